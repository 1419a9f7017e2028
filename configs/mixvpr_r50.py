"""MixVPR paper recipe: ResNet-50 cropped after layer3, 320x320, 1024 x 20 x 20 -> 4096-d, 120 x 4."""

from vpr_jax.configs import default


def get_config():
  """Returns the MixVPR paper's model on the seed's training recipe (P=120)."""
  config = default.get_config()
  config.image_size = (320, 320)
  config.model.backbone = 'resnet50'
  config.model.layers_to_crop = (4,)
  config.model.layers_to_freeze = 2
  config.model.aggregator = 'mixvpr'
  config.model.mixvpr_out_channels = 1024
  config.model.mixvpr_mix_depth = 4
  config.model.mixvpr_mlp_ratio = 1
  config.model.mixvpr_out_rows = 4
  config.data.places_per_batch = 120
  return config
