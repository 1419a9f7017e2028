"""Seed recipe with average pooling (256-d)."""

from vpr_jax.configs import default


def get_config():
  """Returns the seed recipe with the AVG aggregator."""
  config = default.get_config()
  config.model.aggregator = 'avg'
  return config
