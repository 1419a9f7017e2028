"""The seed recipe (mldl24-vpr on GSV-Cities): ResNet-18 cropped after layer3, MixVPR, MS loss.

Every other config imports this one and changes only what differs. Every field is documented
here; `python -m vpr_jax.train --config configs/X.py --config.a.b=value` overrides any of them.
"""

import ml_collections

# The 23 GSV-Cities cities the seed trains on (the GSV-XS subset of mldl24-vpr uses the same names).
SEED_CITIES = (
    'Bangkok', 'BuenosAires', 'LosAngeles', 'MexicoCity', 'OSL', 'Rome', 'Barcelona', 'Chicago',
    'Madrid', 'Miami', 'Phoenix', 'TRT', 'Boston', 'Lisbon', 'Medellin', 'Minneapolis', 'PRG',
    'WashingtonDC', 'Brussels', 'London', 'Melbourne', 'Osaka', 'PRS',
)


def get_model_config():
  """Model fields: backbone, aggregator and numerics."""
  model = ml_collections.ConfigDict()
  # 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101' (torchvision layout).
  model.backbone = 'resnet18'
  # Stages removed from the end of the backbone: (4,) drops layer4, (3, 4) drops layer3 and layer4.
  model.layers_to_crop = (4,)
  # 0: stem (conv1+bn1) frozen; 1: + layer1; 2: + layer2; 3: + layer3; -1: nothing frozen.
  model.layers_to_freeze = 2
  # The seed keeps frozen BatchNorms in train mode (batch statistics, running stats updated).
  # True makes frozen stages use (and keep) their running statistics instead.
  model.freeze_bn_stats = False
  # torchvision ImageNet state dict (e.g. resnet18-f37072fd.pth), relative to data.root or
  # absolute; '' means random initialisation (a warning is printed). Never downloaded.
  model.backbone_weights = ''
  # 'avg' | 'gem' | 'convap' | 'mixvpr'.
  model.aggregator = 'mixvpr'
  # GeM: initial p (learnable) and clamp epsilon.
  model.gem_p = 3.0
  model.gem_eps = 1e-6
  # ConvAP: 1x1 conv output channels and adaptive-average-pool output size (s1, s2).
  model.convap_out_channels = 1024
  model.convap_pool_size = (2, 2)
  # MixVPR: channel projection width, number of mixer blocks, MLP ratio, row projection rows.
  model.mixvpr_out_channels = 256
  model.mixvpr_mix_depth = 5
  model.mixvpr_mlp_ratio = 1
  model.mixvpr_out_rows = 4
  # MixVPR row_proj bias: True as mldl24-vpr (the seed); the original MixVPR repository (and its
  # released ResNet-50 checkpoints) has none. `vpr_jax.convert` sets it from the checkpoint.
  model.mixvpr_row_proj_bias = True
  # Compute dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'.
  # Parameters stay float32; norms, pooling powers, LayerNorm and similarities run in float32.
  model.dtype = 'auto'
  return model


def get_config():
  """Returns the seed recipe: ResNet-18 [crop 4, freeze 2] + MixVPR 1024-d, MS loss, AdamW."""
  config = ml_collections.ConfigDict()
  # Global seed: parameter init, data order, augmentation.
  config.seed = 0
  # Input height and width in pixels (images are resized to this, bilinear, on PIL images).
  config.image_size = (224, 224)
  config.model = get_model_config()

  data = config.data = ml_collections.ConfigDict()
  # Root of all datasets; '' means $VPR_DATA_ROOT. Relative paths below are under it.
  data.root = ''
  # Training set layout: 'gsv_cities' (Dataframes/*.csv + Images/<City>/) or 'gsv_xs' ('@' names).
  data.train_layout = 'gsv_cities'
  # Training set folder, relative to data.root (or absolute).
  data.train_dir = 'gsv_cities'
  # Cities to train on.
  data.cities = SEED_CITIES
  # Places per batch (P) and images per place (K): a batch holds P*K images.
  data.places_per_batch = 100
  data.images_per_place = 4
  # Places with fewer images are dropped from the index.
  data.min_img_per_place = 4
  # True: K images drawn at random (without replacement) each epoch; False: the K most recent.
  data.random_sample_from_each_place = True
  # False: shuffle within each city (batches mostly from one city: harder negatives); True: all.
  data.shuffle_all = False
  # Where the place index is cached ('' = <train_dir>/.vpr_jax_cache); rebuild forces a new one.
  data.cache_dir = ''
  data.rebuild_index = False
  # Prepared training images (`python -m vpr_jax.prepare`): the built TFDS dataset folder it
  # prints (the one holding dataset_info.json), relative to data.root or absolute; the place index
  # and the resized JPEGs are then read from it instead of data.train_dir. '' reads the originals.
  data.prepared_dir = ''
  # Training image decode: 'exact' (libjpeg-turbo for JPEGs, Pillow otherwise; Pillow's pixels),
  # 'dct_scaled' (JPEGs decoded at 1/2, 1/4 or 1/8 scale, still >= image_size, then the exact
  # resize: faster on large originals, pixels close to but not equal to 'exact') or 'pil' (Pillow
  # only; 'exact' pixels, slower). Evaluation always decodes exactly.
  data.decode = 'exact'
  # Train augmentation: 'randaugment' (CPU, torchvision semantics), 'device' (on the
  # accelerator inside the step) or 'none'.
  data.augment = 'randaugment'
  data.randaugment_num_ops = 3
  data.randaugment_magnitude = 9
  data.randaugment_num_magnitude_bins = 31
  # grain worker processes for decoding/augmentation; -1 = one per CPU core (at most 16).
  data.num_workers = -1
  # Batches grain prepares ahead per worker.
  data.prefetch_buffer_size = 2
  # Skip undecodable training images, but stop when more than this fraction of reads failed.
  data.max_bad_image_fraction = 0.01
  # Validation datasets (registered names or folders) and the positive radius in metres.
  data.val_datasets = ('sf_xs_val',)
  data.positive_radius_m = 25.0
  # Images per evaluation batch (the last batch is padded and masked).
  data.eval_batch_size = 256
  # Synthetic data (demo and tests): when enabled, the training set and the validation sets are
  # generated under <data.root>/<synthetic.dir> on first use (deterministic from synthetic.seed).
  synth = data.synthetic = ml_collections.ConfigDict()
  synth.enabled = False
  synth.dir = 'synthetic'
  synth.seed = 0
  synth.num_train_places = 0
  synth.images_per_place = 4
  synth.num_eval_places = 0
  synth.image_size = (64, 64)

  loss = config.loss = ml_collections.ConfigDict()
  # pytorch-metric-learning names and argument names (see vpr_jax.losses).
  loss.name = 'MultiSimilarityLoss'
  loss.params = ml_collections.ConfigDict({'alpha': 1.0, 'beta': 50.0, 'base': 0.0})
  loss.miner_name = 'MultiSimilarityMiner'
  loss.miner_params = ml_collections.ConfigDict({'epsilon': 0.1})

  optim = config.optim = ml_collections.ConfigDict()
  # 'sgd' (with momentum) | 'adam' | 'adamw'.
  optim.optimizer = 'adamw'
  optim.learning_rate = 5e-4
  # Decoupled for adamw; L2 added to the gradient for sgd/adam (as torch.optim does).
  optim.weight_decay = 1e-4
  optim.momentum = 0.9
  # lr * min(1, (step+1)/warmup_steps) over the first warmup_steps steps.
  optim.warmup_steps = 600
  # 'multistep' (milestones in epochs, x gamma) | 'cosine' (to 0 at the end) | 'constant'.
  optim.schedule = 'multistep'
  optim.milestones = (5, 10, 15, 25)
  optim.gamma = 0.3

  # Epochs over the training places.
  config.num_epochs = 30
  # Stop after this many steps (0: no limit); useful for smoke tests.
  config.max_steps = 0
  # Data parallelism: 'jit' (jax.jit over a device Mesh with NamedSharding) or 'pmap'.
  config.parallel = 'jit'
  # Validate every this many epochs, and optionally before the first step.
  config.eval_every_epochs = 1
  config.eval_before_training = False
  # Checkpoints: the best keep_best by validation R@1 of the first val dataset, plus the latest.
  config.keep_best = 3
  # Also save the latest state every this many steps (0: only at validations).
  config.checkpoint_every_steps = 0
  # Log training metrics every this many steps.
  config.log_every_steps = 50
  # After training, write this many query + top-5 prediction PNGs of each validation set to
  # <workdir>/predictions/ (green border: within the positive radius; red: not).
  config.visualize_queries = 0
  # What to do on a non-finite loss or gradient: 'stop' or 'skip' (the step is not applied).
  config.on_nonfinite = 'stop'
  return config
