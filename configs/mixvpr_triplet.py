"""Seed study: MixVPR trained with TripletMarginLoss + semi-hard TripletMarginMiner."""

import ml_collections

from vpr_jax.configs import default


def get_config():
  """Returns the seed recipe with the triplet loss and its semi-hard miner."""
  config = default.get_config()
  config.loss.name = 'TripletMarginLoss'
  config.loss.params = ml_collections.ConfigDict({'margin': 0.1})
  config.loss.miner_name = 'TripletMarginMiner'
  config.loss.miner_params = ml_collections.ConfigDict({'margin': 0.1, 'type_of_triplets': 'semihard'})
  return config
