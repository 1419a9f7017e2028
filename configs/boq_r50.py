"""BoQ (Ali-bey et al., CVPR 2024) on ResNet-50: 16,384-d, as amaralibey/Bag-of-Queries trains it.

ResNet-50 cropped after layer3 (1,024 channels), conv1 .. layer2 frozen; BoQ with a 512-channel
projection (8 heads), 2 blocks of 64 learned queries, 32 output rows; 128 places x 4 images at
320x320; evaluated at 384x384 with torch's antialiased bicubic resize. Optimiser and schedule as
`boq_dinov2` (and the same two differences from the authors' training, listed there).
"""

from vpr_jax.configs import boq_dinov2


def get_config():
  """Returns the BoQ-R50 recipe (ImageNet weights: model.backbone_weights = resnet50-*.pth)."""
  config = boq_dinov2.get_config()
  config.image_size = (320, 320)
  config.eval_image_size = (384, 384)
  config.data.eval_interpolation = 'bicubic'

  model = config.model
  model.backbone = 'resnet50'
  model.layers_to_crop = (4,)
  model.layers_to_freeze = 2
  model.aggregator = 'boq'
  model.boq_proj_channels = 512
  model.boq_num_queries = 64
  model.boq_num_layers = 2
  model.boq_row_dim = 32
  return config
