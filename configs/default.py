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
  # 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101' (torchvision layout), or a DINOv2 ViT:
  # 'dinov2_vits14' | 'dinov2_vitb14' | 'dinov2_vitl14' | 'dinov2_vitg14' (torch hub layout).
  model.backbone = 'resnet18'
  # Stages removed from the end of the backbone: (4,) drops layer4, (3, 4) drops layer3 and layer4.
  model.layers_to_crop = (4,)
  # 0: stem (conv1+bn1) frozen; 1: + layer1; 2: + layer2; 3: + layer3; -1: nothing frozen.
  model.layers_to_freeze = 2
  # The seed keeps frozen BatchNorms in train mode (batch statistics, running stats updated).
  # True makes frozen stages use (and keep) their running statistics instead.
  model.freeze_bn_stats = False
  # torchvision ImageNet state dict (e.g. resnet18-f37072fd.pth), or for a ViT the torch hub
  # DINOv2 state dict (e.g. dinov2_vitb14_pretrain.pth), relative to data.root or absolute; ''
  # means random initialisation (a warning is printed). Never downloaded.
  model.backbone_weights = ''
  # DINOv2 only (the ResNet fields above are ignored). Blocks that train, counted from the end:
  # the token embedding and the earlier blocks are frozen (SALAD: 4, BoQ: 2); -1 trains all.
  model.num_trainable_blocks = 4
  # Apply DINOv2's final LayerNorm to the tokens (SALAD: True; BoQ: False).
  model.apply_final_norm = True
  # Register tokens (the hub's dinov2_vit*14_reg models: 4); 0 for the plain models.
  model.num_register_tokens = 0
  # Smaller transformers for tests and demos: width, blocks, heads, side of the learned
  # position-embedding grid; 0 keeps the hub model's (the released weights need 0).
  model.vit_embed_dim = 0
  model.vit_depth = 0
  model.vit_num_heads = 0
  model.vit_pretrained_grid = 0
  # 'avg' | 'gem' | 'convap' | 'mixvpr' | 'salad' (DINOv2 only) | 'boq' | 'netvlad'.
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
  # MixVPR row_proj bias: True as in the MixVPR repository (nn.Linear(hw, out_rows)) and
  # mldl24-vpr (the seed); False builds it without one. `vpr_jax.convert` sets it from the
  # checkpoint's keys (row_proj.bias present or not).
  model.mixvpr_row_proj_bias = True
  # SALAD: clusters m, cluster feature size l, global token size g (descriptor g + l * m), and
  # the dropout of its per-token MLPs in training (the authors' 0.3).
  model.salad_num_clusters = 64
  model.salad_cluster_dim = 128
  model.salad_token_dim = 256
  model.salad_dropout = 0.3
  # BoQ: input projection channels P (attention heads P // 64), learned queries per block, blocks,
  # output rows (descriptor P * rows).
  model.boq_proj_channels = 512
  model.boq_num_queries = 64
  model.boq_num_layers = 2
  model.boq_row_dim = 32
  # NetVLAD: clusters K (descriptor K * channels).
  model.netvlad_num_clusters = 64
  # NetVLAD start: 'random', or 'kmeans': before the first step, k-means of backbone features of
  # netvlad_kmeans_images training images (100 locations each) sets the centroids and the
  # assignment conv, as the family's NetVLAD initialisation does.
  model.netvlad_init = 'random'
  model.netvlad_kmeans_images = 500
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
  # Evaluation (validation and vpr_jax.eval) input size; None means image_size. SALAD and BoQ
  # train at 224 and evaluate at 322 (ViTs: multiples of 14).
  config.eval_image_size = ml_collections.FieldReference(None, field_type=tuple)
  # Weights that initialise training (fine-tuning): a checkpoint folder written by
  # vpr_jax.convert or a training workdir, holding variables of this model; '' for none. Loaded
  # after model.backbone_weights (replacing them) and ignored when the workdir resumes.
  config.init_from = ''
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
  # Workers decode into shared-memory batch buffers created once and reused (True), instead of
  # grain sending each batch through a new shared-memory segment (False: ~7 ms more CPU per
  # 8x4x224x224 batch). Reserves (prefetch_buffer_size + 3) batches of /dev/shm per worker.
  data.reuse_batch_memory = True
  # Skip undecodable training images, but stop when more than this fraction of reads failed.
  data.max_bad_image_fraction = 0.01
  # Validation datasets and the positive radius in metres: registered names (python -m
  # vpr_jax.datasets lists them; e.g. 'pitts30k_val', 'msls_val' as gsv-cities validates),
  # groups ('family', 'all_available'), split folders or built benchmark folders.
  data.val_datasets = ('sf_xs_val',)
  data.positive_radius_m = 25.0
  # The gsv-cities family's list files, in a folder laid out as gsv-cities' datasets/
  # (Pittsburgh/pitts30k_test_gt.npy, SPED/SPED_gt.npy, ...); relative to data.root or absolute.
  # '' = <data.root>/ground_truth. Lists inside a set's own image folder are found first.
  data.ground_truth_dir = ''
  # Benchmarks built with `python -m vpr_jax.prepare --benchmark` (the folders it prints,
  # relative to data.root or absolute): a validation or --dataset name they were built from is
  # read from the build instead of its folder.
  data.prepared_benchmarks = ()
  # Images per evaluation batch (the last batch is padded and masked).
  data.eval_batch_size = 256
  # Evaluation resize: 'bilinear' (torchvision's Resize on PIL images, the family's and SALAD's)
  # or 'bicubic' (torch's antialiased bicubic on the image tensor, as BoQ evaluates).
  data.eval_interpolation = 'bilinear'
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
  # 'sgd' (torch.optim.SGD with momentum) | 'adamw' (torch.optim.AdamW) | 'adam' (also AdamW:
  # what gsv-cities, MixVPR and mldl24-vpr build for optimizer='adam') | 'adam_l2'
  # (torch.optim.Adam, weight decay added to the gradient).
  optim.optimizer = 'adamw'
  optim.learning_rate = 5e-4
  # Decoupled for adamw/adam; L2 added to the gradient for sgd/adam_l2 (as torch.optim does).
  optim.weight_decay = 1e-4
  optim.momentum = 0.9
  # lr * min(1, (step+1)/warmup_steps) over the first warmup_steps steps.
  optim.warmup_steps = 600
  # 'multistep' (milestones in epochs, x gamma) | 'cosine' (to 0 at the end) | 'constant' |
  # 'linear' (torch's LinearLR: factor 1 -> linear_end_factor over linear_steps steps, 0 = all).
  optim.schedule = 'multistep'
  optim.milestones = (5, 10, 15, 25)
  optim.gamma = 0.3
  optim.linear_end_factor = 0.2
  optim.linear_steps = 0

  # Epochs over the training places.
  config.num_epochs = 30
  # Stop after this many steps (0: no limit); useful for smoke tests.
  config.max_steps = 0
  # Data parallelism: 'jit' (jax.jit over a device Mesh with NamedSharding) or 'pmap'.
  config.parallel = 'jit'
  # BatchNorm statistics over several devices: True computes them over the global batch (the
  # one-device result; one small all-reduce per BatchNorm layer and pass); False uses each
  # device's own images (PyTorch DDP's default without SyncBatchNorm: no collective per layer;
  # the running statistics move by the mean over devices).
  config.sync_batch_norm = True
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
