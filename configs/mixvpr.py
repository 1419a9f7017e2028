"""Seed recipe with the MixVPR aggregator (256 x 14 x 14 -> 256 x 4 = 1024-d)."""

from vpr_jax.configs import default


def get_config():
  """Returns the seed recipe (MixVPR is the default aggregator)."""
  return default.get_config()
