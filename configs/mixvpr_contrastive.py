"""Seed study: MixVPR trained with ContrastiveLoss + PairMarginMiner."""

import ml_collections

from vpr_jax.configs import default


def get_config():
  """Returns the seed recipe with the contrastive loss and its pair-margin miner."""
  config = default.get_config()
  config.loss.name = 'ContrastiveLoss'
  config.loss.params = ml_collections.ConfigDict({'pos_margin': 0.0, 'neg_margin': 1.0})
  config.loss.miner_name = 'PairMarginMiner'
  config.loss.miner_params = ml_collections.ConfigDict({'pos_margin': 0.7, 'neg_margin': 0.3})
  return config
