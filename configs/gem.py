"""Seed recipe with GeM pooling (learnable p, initialised to 3; 256-d)."""

from vpr_jax.configs import default


def get_config():
  """Returns the seed recipe with the GeM aggregator."""
  config = default.get_config()
  config.model.aggregator = 'gem'
  config.model.gem_p = 3.0
  return config
