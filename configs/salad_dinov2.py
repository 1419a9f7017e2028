"""SALAD (Izquierdo & Civera, CVPR 2024): DINOv2 ViT-B/14 + SALAD, 8,448-d, as serizba/salad trains it.

ViT-B/14 with DINOv2's final norm, the last 4 blocks trained; SALAD with 64 clusters x 128 + a
256-d global token, dropout 0.3; 60 places x 4 images at 224x224; evaluated at 322x322 (bilinear).
AdamW lr 6e-5, weight decay 9.5e-9, LinearLR 1 -> 0.2 over 4,000 steps, 4 epochs, MS loss + miner.
The authors train in fp16 mixed precision; here model.dtype 'auto' gives bfloat16 on GPU/TPU.
"""

from vpr_jax.configs import default


def get_config():
  """Returns the SALAD recipe (DINOv2 weights: model.backbone_weights = the hub state dict)."""
  config = default.get_config()
  config.image_size = (224, 224)
  config.eval_image_size = (322, 322)
  config.data.eval_interpolation = 'bilinear'

  model = config.model
  model.backbone = 'dinov2_vitb14'
  model.num_trainable_blocks = 4
  model.apply_final_norm = True
  model.aggregator = 'salad'
  model.salad_num_clusters = 64
  model.salad_cluster_dim = 128
  model.salad_token_dim = 256
  model.salad_dropout = 0.3

  config.data.places_per_batch = 60
  config.data.images_per_place = 4

  optim = config.optim
  optim.optimizer = 'adamw'
  optim.learning_rate = 6e-5
  optim.weight_decay = 9.5e-9
  optim.warmup_steps = 0
  optim.schedule = 'linear'
  optim.linear_end_factor = 0.2
  optim.linear_steps = 4000
  config.loss.miner_params.epsilon = 0.1
  config.num_epochs = 4
  return config
