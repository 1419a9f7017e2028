"""BoQ (Ali-bey et al., CVPR 2024) on DINOv2 ViT-B/14: 12,288-d, as amaralibey/Bag-of-Queries trains it.

ViT-B/14 without its final norm, the last 2 blocks trained; BoQ with a 384-channel projection
(6 heads), 2 blocks of 64 learned queries, 32 output rows; 128 places x 4 images at 224x224;
evaluated at 322x322 with torch's antialiased bicubic resize. AdamW lr 1e-4, weight decay 1e-4,
40 epochs, MultiStepLR [10, 20] x 0.1, MS loss + miner, RandAugment magnitude 15.

Differences from the authors' training: BoQ warms the learning rate up linearly over its first 10
epochs, while optim.warmup_steps counts steps (set it to 10 x the steps per epoch that training
prints); its training images are resized bicubic, here bilinear (the seed's train transform).
"""

from vpr_jax.configs import default


def get_config():
  """Returns the BoQ-DINOv2 recipe (DINOv2 weights: model.backbone_weights = the hub state dict)."""
  config = default.get_config()
  config.image_size = (224, 224)
  config.eval_image_size = (322, 322)
  config.data.eval_interpolation = 'bicubic'

  model = config.model
  model.backbone = 'dinov2_vitb14'
  model.num_trainable_blocks = 2
  model.apply_final_norm = False
  model.aggregator = 'boq'
  model.boq_proj_channels = 384
  model.boq_num_queries = 64
  model.boq_num_layers = 2
  model.boq_row_dim = 32

  config.data.places_per_batch = 128
  config.data.images_per_place = 4
  config.data.randaugment_magnitude = 15

  optim = config.optim
  optim.optimizer = 'adamw'
  optim.learning_rate = 1e-4
  optim.weight_decay = 1e-4
  optim.schedule = 'multistep'
  optim.milestones = (10, 20)
  optim.gamma = 0.1
  config.num_epochs = 40
  return config
