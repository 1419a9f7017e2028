"""Seed recipe with ConvAP (1x1 conv 256 -> 1024, adaptive average pool 2x2; 4096-d)."""

from vpr_jax.configs import default


def get_config():
  """Returns the seed recipe with the ConvAP aggregator."""
  config = default.get_config()
  config.model.aggregator = 'convap'
  config.model.convap_out_channels = 1024
  config.model.convap_pool_size = (2, 2)
  return config
