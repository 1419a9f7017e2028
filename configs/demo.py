"""The embedded default: a synthetic city, trained and evaluated on a CPU in a few minutes.

The training places, the validation split and the test split are generated on first use under
<data.root>/synthetic (data.root falls back to $VPR_DATA_ROOT, then to ~/.cache/vpr_jax). The model
is the seed's (ResNet-18 + MixVPR, MS loss + MS miner, AdamW) made small: 64x64 images, the
backbone cropped after layer2 (128 x 8 x 8 features), a narrower MixVPR. Validation runs before
and after training, so the log shows what training bought.
"""

from vpr_jax.configs import default


def get_config():
  """Returns the demo config (synthetic city, small model, CPU-friendly sizes)."""
  config = default.get_config()
  config.image_size = (64, 64)

  config.model.backbone = 'resnet18'
  config.model.layers_to_crop = (3, 4)
  config.model.layers_to_freeze = -1
  config.model.aggregator = 'mixvpr'
  config.model.mixvpr_out_channels = 64
  config.model.mixvpr_mix_depth = 2
  config.model.mixvpr_out_rows = 4

  data = config.data
  data.synthetic.enabled = True
  data.synthetic.dir = 'synthetic'
  data.synthetic.seed = 0
  data.synthetic.num_train_places = 1000
  data.synthetic.images_per_place = 4
  data.synthetic.num_eval_places = 50
  data.synthetic.image_size = (64, 64)
  data.train_layout = 'gsv_cities'
  data.train_dir = 'synthetic/gsv_cities'
  data.cities = ('SynthA', 'SynthB')
  data.val_datasets = ('synthetic/synthetic_val',)
  data.places_per_batch = 32
  data.images_per_place = 4
  data.min_img_per_place = 4
  data.augment = 'none'
  data.num_workers = 0
  data.eval_batch_size = 64

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 20
  config.optim.milestones = (3,)
  config.num_epochs = 4
  config.eval_before_training = True
  config.visualize_queries = 12
  config.log_every_steps = 10
  return config
