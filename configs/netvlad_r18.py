"""NetVLAD (Arandjelovic et al., CVPR 2016) on the seed's ResNet-18: 64 clusters x 256 = 16,384-d.

The seed recipe (ResNet-18 cropped after layer3, stem .. layer2 frozen, 224x224, MS loss, AdamW)
with NetVLAD as the aggregator, initialised from k-means of backbone features of 500 training
images before the first step (model.netvlad_init = 'kmeans').
"""

from vpr_jax.configs import default


def get_config():
  """Returns the seed recipe with a k-means-initialised NetVLAD aggregator."""
  config = default.get_config()
  config.model.aggregator = 'netvlad'
  config.model.netvlad_num_clusters = 64
  config.model.netvlad_init = 'kmeans'
  config.model.netvlad_kmeans_images = 500
  return config
