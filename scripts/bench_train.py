"""Training speed: vpr_jax's train step against the PyTorch reference, and the input feeding it.

Modes (--modes, comma-separated; default compute):
  compute     the train step of `vpr_jax.training` (jitted, state donated) on device-resident
              random uint8 batches: warm-up steps (the first compiles), then timed steps ending
              in block_until_ready. Also reported: XLA's FLOP count per image, the compiled
              step's memory, its number of convolutions (forward + backward of the trained
              stages only: nothing runs backward through frozen stages), and --num_devices
              scaling. With torch installed, the same step in PyTorch (the reference below):
              AMP fp16 eager, channels_last, channels_last + torch.compile.
  end_to_end  JPEG files (or the records of a prepared TFDS dataset) -> grain train iterator
              (`train_pipeline.make_train_iterator`, --workers processes) -> `parallel.prefetch`
              -> the same step, as `loop.train_and_evaluate` feeds it; also with the
              transfer in a background thread (--threaded_prefetch).
  pipeline    the grain train iterator alone, no device: what the host delivers.
  augment     device RandAugment (`device_augment.rand_augment`, jitted) alone, on
              device-resident batches.
  eval        descriptor extraction from prepared records: grain decode (--workers) ->
              `descriptors.make_embed_fn`.

Sources for end_to_end / pipeline / eval (--sources original,prepared): --train_dir (with
--layout, --cities), or synthetic GSV-Cities places written to a temporary folder
(--synthetic_places, --source_size; written by --workers processes); 'prepared' reads
--prepared_dir (a built TFDS dataset folder), or builds the original images at the config's image
size into a temporary folder first (`training_set.build_training_set`).

  python scripts/bench_train.py --tiny                          # CPU smoke run (CI)
  python scripts/bench_train.py --output bench_train.json       # seed + MixVPR-paper recipes
  python scripts/bench_train.py --modes end_to_end,pipeline --configs configs/mixvpr.py \\
      --sources original,prepared --augment device --workers 16 --output e2e.json
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python scripts/bench_train.py --tiny --num_devices 1,8   # scaling code path on CPU

The PyTorch reference (torchvision ResNet cropped as configured, the MixVPR module of
scripts/bench_eval.py, pytorch-metric-learning MultiSimilarityLoss + MultiSimilarityMiner,
AdamW, fp16 autocast + GradScaler on CUDA) lives only in this script; it is skipped with a note
when torch or pytorch-metric-learning is missing.

Prints tables (config, batch, vpr_jax img/s, reference img/s, ratio; end-to-end against
compute-only) and writes everything to --output as JSON.
"""

import argparse
import contextlib
import datetime
import importlib.util
import itertools
import os
import platform
import queue
import sys
import tempfile
import threading
import time
import warnings

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_SCRIPTS)
for _path in (_REPO, _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_common
import bench_eval
from vpr_jax.evaluation import descriptors
from vpr_jax.training import programs
from vpr_jax.training import state as train_state
from vpr_jax import parallel
from vpr_jax.data.augmentation import device_augment
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data import synthetic
from vpr_jax.data.training import train_pipeline
from vpr_jax.data.multiprocess import workers
from vpr_jax.models import vpr_model
# pylint: enable=g-import-not-at-top,wrong-import-position

MODES = ('compute', 'end_to_end', 'pipeline', 'augment', 'eval')
SOURCES = ('original', 'prepared')
REFERENCE_VARIANTS = ('eager', 'channels_last', 'compile')
DEFAULT_CONFIGS = bench_eval.DEFAULT_CONFIGS
# Steps per epoch the schedules are built with: the speed does not depend on it.
_STEPS_PER_EPOCH = 1000
# Frozen stage -> positions in the reference backbone nn.Sequential(conv1, bn1, relu, maxpool,
# layer1, layer2, layer3, layer4).
_TORCH_FROZEN_MODULES = {0: (0, 1), 1: (4,), 2: (5,), 3: (6,)}


# ----------------------------------------------------------------------------------------------
# Configs.


def bench_config(path: str, args, augment: str = 'none', parallel_mode: str = 'jit'):
  """A config file with the command line's overrides (image size, P x K, dtype, augment)."""
  config = bench_eval.load_config(path)
  if args.image_size:
    config.image_size = (args.image_size, args.image_size)
  if args.places_per_batch:
    config.data.places_per_batch = args.places_per_batch
  if args.images_per_place:
    config.data.images_per_place = args.images_per_place
    config.data.min_img_per_place = args.images_per_place
  if args.dtype:
    config.model.dtype = args.dtype
  config.data.augment = augment
  config.parallel = parallel_mode
  return config


def config_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _batch_images(config) -> int:
  return int(config.data.places_per_batch) * int(config.data.images_per_place)


def _sync(tree):
  jax.block_until_ready(tree)
  return tree


def peak_device_memory(device=None):
  """Peak bytes in use on a device so far (None where the backend does not say)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return (stats or {}).get('peak_bytes_in_use')


# ----------------------------------------------------------------------------------------------
# vpr_jax: the train step on device-resident batches.


def _programs(config, devices):
  """The model, optimiser and compiled step the training loop uses for this config."""
  # pylint: disable-next=protected-access
  return programs.get_programs(config, _STEPS_PER_EPOCH, devices=list(devices))


def _initial_state(config, programs, seed: int):
  variables = programs.init(jax.random.PRNGKey(seed))
  state = train_state.create_train_state(config, programs.model, None, tx=programs.tx,
                                      variables=variables)
  return programs.dp.replicate(jax.device_get(state))


def lower_train_step(config, devices=None):
  """The train step of a config lowered for abstract inputs (no initialisation, no compile).

  Cheap enough to inspect the program of a full-size config on a CPU, e.g. its convolutions:
  `lower_train_step(config).as_text().count('stablehlo.convolution')`.
  """
  programs = _programs(config, devices or jax.devices())

  def initial_state():
    variables = programs.init(jax.random.PRNGKey(0))
    return train_state.create_train_state(config, programs.model, None, tx=programs.tx,
                                       variables=variables)

  state = jax.eval_shape(initial_state)
  n = _batch_images(config)
  h, w = (int(s) for s in config.image_size)
  batch = {'images': jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8),
           'labels': jax.ShapeDtypeStruct((n,), jnp.int32)}
  return programs.train_step.lower(state, batch, jax.random.PRNGKey(0))


def random_batch(config, rng: np.random.Generator, places: int | None = None) -> dict:
  """A flat host batch of random uint8 images; K consecutive images share a label."""
  p = places or int(config.data.places_per_batch)
  k = int(config.data.images_per_place)
  h, w = (int(s) for s in config.image_size)
  return {'images': rng.integers(0, 256, (p * k, h, w, 3), dtype=np.uint8),
          'labels': np.repeat(np.arange(p, dtype=np.int32), k)}


def _cost(compiled) -> dict:
  out = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    out['flops'] = float(cost.get('flops', 0.0)) or None
    out['bytes_accessed'] = float(cost.get('bytes accessed', 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    memory = compiled.memory_analysis()
    out['memory'] = {
        'argument_bytes': int(memory.argument_size_in_bytes),
        'output_bytes': int(memory.output_size_in_bytes),
        'alias_bytes': int(memory.alias_size_in_bytes),
        'temp_bytes': int(memory.temp_size_in_bytes),
    }
    # Donated (aliased) state buffers are counted once.
    out['memory']['total_bytes'] = (out['memory']['argument_bytes'] + out['memory']['output_bytes']
                                    - out['memory']['alias_bytes'] + out['memory']['temp_bytes'])
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def bench_vpr_jax_step(config, warmup: int, steps: int, seed: int = 0, devices=None,
                       weak_scaling: bool = True) -> dict:
  """img/s of vpr_jax's jitted train step on device-resident random batches.

  Args:
    config: the (overridden) config; data.augment='device' includes device RandAugment.
    warmup: untimed steps after the compiling one.
    steps: timed steps.
    seed: init and data seed.
    devices: the devices of the data-parallel mesh (default: all).
    weak_scaling: with several devices, P grows with their number (the per-device batch stays
      the recipe's); False splits the recipe's batch over them.

  Returns:
    A dict: img_per_s (global), img_per_s_per_device, compile_seconds, gflop_per_image, memory,
    hlo_convolutions, donation_warnings, loss (finite check) ...
  """
  devices = list(devices or jax.devices())
  config = config.copy_and_resolve_references()
  if weak_scaling and len(devices) > 1:
    config.data.places_per_batch = int(config.data.places_per_batch) * len(devices)
  sizes_p = int(config.data.places_per_batch)
  if (sizes_p * int(config.data.images_per_place)) % len(devices):
    raise ValueError(f'a batch of {sizes_p} x {config.data.images_per_place} images does not '
                     f'split over {len(devices)} devices')
  programs = _programs(config, devices)
  dp = programs.dp
  state = _initial_state(config, programs, seed)
  rng = np.random.default_rng(seed)
  # Two different batches, alternated: nothing can be reused between steps.
  batches = [dp.shard_batch(random_batch(config, rng)) for _ in range(2)]
  step_rng = jax.random.PRNGKey(seed + 1)

  start = time.perf_counter()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    lowered = programs.train_step.lower(state, batches[0], step_rng)
    compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  donation_warnings = [str(w.message) for w in caught if 'donat' in str(w.message).lower()]
  hlo = lowered.as_text()
  analysis = _cost(compiled)

  for i in range(1 + warmup):
    state, metrics = compiled(state, batches[i % 2], step_rng)
  _sync((state, metrics))
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, batches[i % 2], step_rng)
  dispatched = time.perf_counter() - start
  _sync((state, metrics))
  seconds = time.perf_counter() - start
  metrics = jax.device_get(dp.to_host(metrics))
  images = _batch_images(config)
  result = {
      'img_per_s': images * steps / seconds,
      'img_per_s_per_device': images * steps / seconds / len(devices),
      'seconds_per_step': seconds / steps,
      'dispatch_seconds_per_step': dispatched / steps,
      'batch': images,
      'places_per_batch': sizes_p,
      'num_devices': len(devices),
      'compile_seconds': compile_seconds,
      'dtype': str(np.dtype(vpr_model.resolve_dtype(config.model.dtype))),
      'augment': config.data.augment,
      'hlo_convolutions': hlo.count('stablehlo.convolution'),
      'donation_warnings': donation_warnings,
      'loss': float(metrics['loss']),
      'finite': float(metrics['finite']) == 1.0,
      'steps': steps,
      'warmup': warmup,
  }
  if analysis.get('flops'):
    # XLA counts the program of one device; the devices share the global batch.
    result['gflop_per_image'] = analysis['flops'] * len(devices) / images / 1e9
  if analysis.get('memory'):
    result['compiled_memory'] = analysis['memory']
  return result


# ----------------------------------------------------------------------------------------------
# The PyTorch reference train step (only here, never in the package).


def reference_available() -> tuple[bool, str]:
  for name in ('torch', 'torchvision', 'pytorch_metric_learning'):
    if importlib.util.find_spec(name) is None:
      return False, f'{name} is not installed'
  return True, ''


def bench_torch_step(config, variant: str, warmup: int, steps: int, seed: int = 0) -> dict:
  """img/s of the PyTorch family's train step: fp16 AMP on CUDA (float32 on CPU).

  Args:
    config: the (overridden) config; the seed's loss and miner (MultiSimilarity) only.
    variant: 'eager', 'channels_last' or 'compile' (channels_last + torch.compile).
    warmup: untimed steps (the first compiles, for 'compile').
    steps: timed steps.
    seed: torch seed.

  Returns:
    A dict with img_per_s, seconds_per_step, peak memory on CUDA, versions.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import distances as pml_distances  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import losses as pml_losses  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import miners as pml_miners  # pylint: disable=g-import-not-at-top

  if variant not in REFERENCE_VARIANTS:
    raise ValueError(f'unknown reference variant {variant!r}; valid: {REFERENCE_VARIANTS}')
  if (config.loss.name, config.loss.miner_name) != ('MultiSimilarityLoss',
                                                    'MultiSimilarityMiner'):
    raise NotImplementedError(f'the reference step covers MultiSimilarityLoss + '
                              f'MultiSimilarityMiner, not {config.loss.name} + '
                              f'{config.loss.miner_name}')
  if config.optim.optimizer != 'adamw':
    raise NotImplementedError(f'the reference step uses AdamW, not {config.optim.optimizer}')
  torch.manual_seed(seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = bench_eval.build_torch_reference(config).to(device).train()
  # As the family freezes stages: no gradient, BatchNorm still in train mode.
  for stage in range(int(config.model.layers_to_freeze) + 1):
    for position in _TORCH_FROZEN_MODULES[stage]:
      if position < len(model.backbone):
        model.backbone[position].requires_grad_(False)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=float(config.optim.learning_rate),
                                weight_decay=float(config.optim.weight_decay))
  loss_params = dict(config.loss.params)
  loss_fn = pml_losses.MultiSimilarityLoss(
      alpha=float(loss_params.get('alpha', 1.0)), beta=float(loss_params.get('beta', 50.0)),
      base=float(loss_params.get('base', 0.0)), distance=pml_distances.DotProductSimilarity())
  miner = pml_miners.MultiSimilarityMiner(
      epsilon=float(dict(config.loss.miner_params).get('epsilon', 0.1)),
      distance=pml_distances.CosineSimilarity())
  use_amp = device.type == 'cuda'
  scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
  channels_last = variant in ('channels_last', 'compile')
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  forward = torch.compile(model) if variant == 'compile' else model

  p, k = int(config.data.places_per_batch), int(config.data.images_per_place)
  h, w = (int(s) for s in config.image_size)
  generator = torch.Generator(device=device).manual_seed(seed)
  batches = []
  for _ in range(2):
    images = torch.randint(0, 256, (p * k, 3, h, w), dtype=torch.uint8, device=device,
                           generator=generator)
    if channels_last:
      images = images.contiguous(memory_format=torch.channels_last)
    batches.append(images)
  labels = torch.arange(p, device=device).repeat_interleave(k)

  def step(images):
    optimizer.zero_grad(set_to_none=True)
    # Lightning's 16-mixed precision: forward, miner and loss under autocast, scaled backward.
    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
      descriptors = forward(images)
      pairs = miner(descriptors, labels)
      loss = loss_fn(descriptors, labels, pairs)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  step(batches[0])
  sync()
  first_step_seconds = time.perf_counter() - start
  for i in range(warmup):
    step(batches[i % 2])
  sync()
  start = time.perf_counter()
  for i in range(steps):
    loss = step(batches[i % 2])
  sync()
  seconds = time.perf_counter() - start
  result = {
      'variant': variant,
      'img_per_s': p * k * steps / seconds,
      'seconds_per_step': seconds / steps,
      'first_step_seconds': first_step_seconds,
      'dtype': 'float16 (autocast) + GradScaler' if use_amp else 'float32',
      'channels_last': channels_last,
      'compiled': variant == 'compile',
      'loss': float(loss.detach().float().cpu()),
      'torch': torch.__version__,
      'device': torch.cuda.get_device_name() if use_amp else 'cpu',
  }
  if device.type == 'cuda':
    result['peak_device_bytes'] = int(torch.cuda.max_memory_allocated())
  del model, forward, optimizer, batches
  if device.type == 'cuda':
    torch.cuda.empty_cache()
  return result


# ----------------------------------------------------------------------------------------------
# Data for the end-to-end, pipeline and eval modes.


def _city_names(count: int) -> tuple[str, ...]:
  letters = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
  return tuple(f'Synth{letters[i // 26]}{letters[i % 26]}' for i in range(count))


def _write_city(root, seed, city, num_places, images_per_place, source_size):
  return synthetic.make_training_places(
      root, seed=seed, num_train_places=num_places, images_per_place=images_per_place,
      image_size=source_size, cities=(city,), layouts=('gsv_cities',))


def write_synthetic_places(root: str, num_places: int, images_per_place: int, source_size,
                           workers: int, seed: int = 0) -> dict:
  """Synthetic GSV-Cities places under root/gsv_cities, one city per writing process.

  Returns:
    {'train_dir', 'cities', 'num_images', 'seconds'}.
  """
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  num_cities = max(1, min(int(workers), num_places))
  cities = _city_names(num_cities)
  shares = [num_places // num_cities + (i < num_places % num_cities) for i in range(num_cities)]
  start = time.perf_counter()
  jobs = [(root, seed * 1000 + i, city, share, images_per_place, tuple(source_size))
          for i, (city, share) in enumerate(zip(cities, shares))]
  if num_cities == 1:
    summaries = [_write_city(*jobs[0])]
  else:
    with futures.ProcessPoolExecutor(num_cities,
                                     mp_context=multiprocessing.get_context('spawn')) as pool:
      summaries = list(pool.map(_write_city, *zip(*jobs)))
  return {'train_dir': os.path.join(root, 'gsv_cities'), 'cities': cities,
          'num_images': sum(s['num_images'] for s in summaries),
          'seconds': time.perf_counter() - start}


class DataSources:
  """The original index and, on demand, a prepared copy at the config's image size."""

  def __init__(self, args, workdir: str):
    self._args = args
    self._workdir = workdir
    self.info = {}
    if args.train_dir:
      self.train_dir = args.train_dir
      self.layout = args.layout
      self.cities = (tuple(c for c in args.cities.split(',') if c) or
                     tuple(gsv_cities.available_cities(args.train_dir, args.layout)))
      self.info['original'] = {'train_dir': args.train_dir, 'synthetic': False}
    elif args.prepared_dir:
      if 'original' in args.sources:
        raise SystemExit('--prepared_dir without --train_dir: use --sources prepared (the '
                         'original images of the prepared folder are not known here)')
      self.train_dir = None
      self.layout, self.cities = None, None
    else:
      if args.layout != 'gsv_cities':
        raise SystemExit('synthetic places use --layout gsv_cities; give --train_dir otherwise')
      written = write_synthetic_places(os.path.join(workdir, 'synthetic'),
                                       args.synthetic_places, args.images_per_place_data,
                                       args.source_size, max(1, args.workers), args.seed)
      self.train_dir, self.layout, self.cities = (written['train_dir'], 'gsv_cities',
                                                  written['cities'])
      self.info['original'] = {'train_dir': self.train_dir, 'synthetic': True,
                               'source_size': list(args.source_size),
                               'num_images': written['num_images'],
                               'write_seconds': written['seconds']}
      print(f'Wrote {written["num_images"]} synthetic {args.source_size[0]}x'
            f'{args.source_size[1]} JPEGs in {written["seconds"]:.1f} s.', flush=True)
    self._index = None
    self._prepared = {}

  def configure(self, config):
    """Points config.data at this data (cities, layout, min_img_per_place)."""
    if self.cities is not None:
      config.data.cities = tuple(self.cities)
      config.data.train_layout = self.layout
    elif self._args.prepared_dir:
      info, _ = records.read_npz(
          os.path.join(self._args.prepared_dir, training_set.PLACE_INDEX_FILE))
      config.data.cities = tuple(info['cities'])
      config.data.train_layout = info['layout']
      config.data.min_img_per_place = int(info['min_img_per_place'])
    config.data.min_img_per_place = min(int(config.data.min_img_per_place),
                                        int(config.data.images_per_place))
    return config

  def original(self, config):
    if self.train_dir is None:
      raise SystemExit('--sources original needs --train_dir (or no --prepared_dir)')
    if self._index is None:
      self._index = gsv_cities.build_place_index(
          self.train_dir, self.layout, self.cities, int(config.data.min_img_per_place),
          cache_dir=os.path.join(self._workdir, 'index_cache'))
    return self._index

  def prepared(self, config):
    """(index, TrainingSource) of --prepared_dir or of a TFDS build at config.image_size."""
    if self._args.prepared_dir:
      return training_set.open_training_set(self._args.prepared_dir, config)
    size = tuple(int(s) for s in config.image_size)
    if size not in self._prepared:
      index = self.original(config)
      start = time.perf_counter()
      folder = training_set.build_training_set(
          self.train_dir, os.path.join(self._workdir, 'tfds'), layout=self.layout,
          cities=self.cities, min_img_per_place=int(config.data.min_img_per_place),
          encoding=records.ImageEncoding(size), num_workers=self._args.workers)
      seconds = time.perf_counter() - start
      _, source = training_set.open_training_set(folder)
      self.info[f'prepared_{size[0]}x{size[1]}'] = {
          'seconds': seconds,
          'images_per_second': index.num_images / seconds,
          'mean_bytes_per_image': float(np.mean([len(source[i]) for i in range(len(source))])),
          'workers': self._args.workers}
      print(f'Prepared {index.num_images} images at {size[0]}x{size[1]} in {seconds:.1f} s.',
            flush=True)
      self._prepared[size] = folder
    return training_set.open_training_set(self._prepared[size], config)

  def get(self, source: str, config):
    """(index, TrainingSource or None) for 'original' or 'prepared'."""
    if source == 'original':
      return self.original(config), None
    return self.prepared(config)


def data_steps(args) -> tuple[int, int]:
  """(warm-up, timed) batches of the pipeline and end_to_end modes.

  Each grain worker builds whole batches and buffers `prefetch_buffer_size` of them, so the
  first ~2 x workers batches arrive in a burst: they are warm-up, and the timed batches span
  several rounds of all workers (at least 4 x workers).
  """
  return max(args.warmup, 2 * args.workers), max(args.steps, 4 * args.workers)


def _iterator(index, config, source, workers: int, num_batches: int, seed: int):
  steps = train_pipeline.steps_per_epoch(index, config)
  config = config.copy_and_resolve_references()
  config.num_epochs = max(1, -(-num_batches // steps))
  config.data.num_workers = workers
  return train_pipeline.make_train_iterator(index, config, seed, num_workers=workers,
                                            prepared=source)


# ----------------------------------------------------------------------------------------------
# End to end: files -> grain -> device -> step.


_END = object()


class _Failure:

  def __init__(self, error):
    self.error = error


def threaded_prefetch(iterator, put, size: int = 2):
  """`parallel.prefetch` with the host side (next batch + transfer) in a background thread."""
  items = queue.Queue(maxsize=size)
  stop = threading.Event()

  def hand_over(value) -> bool:
    # Gives up once the consumer has stopped, so the thread never blocks on a full queue.
    while not stop.is_set():
      try:
        items.put(value, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not hand_over(put(item)):
          return
      hand_over(_END)
    except BaseException as e:  # pylint: disable=broad-except
      hand_over(_Failure(e))

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      value = items.get()
      if value is _END:
        return
      if isinstance(value, _Failure):
        raise value.error
      yield value
  finally:
    stop.set()
    thread.join(timeout=10)


def bench_end_to_end(config, index, source, workers: int, warmup: int, steps: int,
                     seed: int = 0, threaded: bool = False, devices=None) -> dict:
  """img/s of training from files: grain iterator -> prefetch to device -> the train step."""
  programs = _programs(config, devices or jax.devices())
  dp = programs.dp
  state = _initial_state(config, programs, seed)
  step_rng = jax.random.PRNGKey(seed + 1)
  # Compiled before the workers start: otherwise they fill their buffers during the compile and
  # the timed steps read those instead of waiting for the pipeline.
  state, metrics = programs.train_step(
      state, dp.shard_batch(random_batch(config, np.random.default_rng(seed))), step_rng)
  _sync((state, metrics))
  total = 1 + warmup + steps
  wait = 0.0
  with _iterator(index, config, source, workers, total, seed) as it:
    # The loop's own feed: flattened place batches, each with the iterator state after it.
    put = lambda item: dp.shard_batch(item[0])
    size = 2 if jax.default_backend() != 'cpu' else 1
    if threaded:
      device_batches = threaded_prefetch(parallel.host_batches(it), put, size=size)
    else:
      device_batches = parallel.prefetch(parallel.host_batches(it), put, size=size)
    start = time.perf_counter()
    for _ in range(1 + warmup):
      state, metrics = programs.train_step(state, next(device_batches), step_rng)
    _sync((state, metrics))
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
      before = time.perf_counter()
      batch = next(device_batches)
      wait += time.perf_counter() - before
      state, metrics = programs.train_step(state, batch, step_rng)
    _sync((state, metrics))
    seconds = time.perf_counter() - start
    device_batches.close()
  metrics = jax.device_get(dp.to_host(metrics))
  images = _batch_images(config)
  return {
      'img_per_s': images * steps / seconds,
      'seconds_per_step': seconds / steps,
      'host_wait_seconds_per_step': wait / steps,
      'warmup_seconds': warmup_seconds,
      'warmup': warmup,
      'batch': images,
      'workers': workers,
      'augment': config.data.augment,
      'threaded_prefetch': threaded,
      'finite': float(metrics['finite']) == 1.0,
      'steps': steps,
  }


def bench_pipeline(config, index, source, workers: int, warmup: int, batches: int,
                   seed: int = 0) -> dict:
  """img/s the grain train iterator delivers on the host (no device)."""
  startup, _, seconds = bench_common.time_iterator(
      lambda: _iterator(index, config, source, workers, 1 + warmup + batches, seed),
      warmup, batches)
  images = _batch_images(config)
  return {'img_per_s': images * batches / seconds, 'startup_seconds': startup,
          'workers': workers, 'augment': config.data.augment, 'batches': batches,
          'warmup': warmup,
          'batch': images}


# ----------------------------------------------------------------------------------------------
# Device RandAugment and evaluation from prepared records.


def bench_device_augment(config, batch_size: int, warmup: int, steps: int, seed: int = 0) -> dict:
  """img/s of `device_augment.rand_augment` alone (jitted) on a device-resident batch."""
  data = config.data
  h, w = (int(s) for s in config.image_size)
  augment = jax.jit(lambda images, key: device_augment.rand_augment(
      images, key, int(data.randaugment_num_ops), int(data.randaugment_magnitude),
      int(data.randaugment_num_magnitude_bins)))
  rng = np.random.default_rng(seed)
  images = jax.device_put(rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8))
  keys = [jax.random.PRNGKey(i) for i in range(2)]
  start = time.perf_counter()
  _sync(augment(images, keys[0]))
  compile_seconds = time.perf_counter() - start
  for i in range(warmup):
    _sync(augment(images, keys[i % 2]))
  start = time.perf_counter()
  outs = [augment(images, keys[i % 2]) for i in range(steps)]
  _sync(outs)
  seconds = time.perf_counter() - start
  return {'img_per_s': batch_size * steps / seconds, 'seconds_per_batch': seconds / steps,
          'batch': batch_size, 'compile_seconds': compile_seconds,
          'num_ops': int(data.randaugment_num_ops)}


def bench_eval_prepared(config, source, batch_size: int, workers: int, num_batches: int,
                        seed: int = 0) -> dict:
  """img/s of descriptor extraction reading prepared records (decode in grain workers)."""
  import grain  # pylint: disable=g-import-not-at-top
  model = vpr_model.build_model(config)
  variables = jax.device_put(vpr_model.init_variables(model, jax.random.PRNGKey(seed)),
                             jax.local_devices()[0])
  embed = descriptors.make_embed_fn(model)
  needed = (1 + num_batches) * batch_size
  records = np.arange(needed) % len(source)
  dataset = (grain.MapDataset.source(records.tolist()).map(source.load_array)
             .batch(batch_size, drop_remainder=True))
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                           prefetch_buffer_size=2))
  if workers > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=2))
  iterator = iter(iter_dataset)
  try:
    start = time.perf_counter()
    _sync(embed(variables, next(iterator)))
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outs = [embed(variables, batch) for batch in iterator]
    _sync(outs)
    seconds = time.perf_counter() - start
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()
  images = len(outs) * batch_size
  return {'img_per_s': images / seconds, 'images': images, 'batch': batch_size,
          'workers': workers, 'first_batch_seconds': first_seconds,
          'dtype': str(np.dtype(vpr_model.resolve_dtype(config.model.dtype)))}


# ----------------------------------------------------------------------------------------------
# Tables.


_rate = bench_common.format_rate


def format_compute_table(rows) -> str:
  """config, batch, vpr_jax img/s, reference img/s (fastest variant), ratio."""
  lines = []
  for r in rows:
    ratio = r.get('ratio')
    lines.append((r['label'], str(r['batch']), _rate(r.get('vpr_jax_img_per_s')),
                  _rate(r.get('reference_img_per_s')),
                  f'{ratio:.2f}x' if ratio is not None else 'n/a'))
  return bench_common.format_table(
      ('config', 'batch', 'vpr_jax img/s', 'reference img/s', 'ratio'), lines)


def format_e2e_table(rows) -> str:
  lines = []
  for r in rows:
    ratio = r.get('ratio_to_compute')
    lines.append((r['label'], str(r['batch']), _rate(r['img_per_s']),
                  _rate(r.get('compute_img_per_s')),
                  f'{ratio:.2f}x' if ratio is not None else 'n/a'))
  return bench_common.format_table(
      ('run', 'batch', 'img/s', 'compute-only img/s', 'ratio'), lines)


# ----------------------------------------------------------------------------------------------
# Driver.


def _int_list(text):
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
  if not values or min(values) <= 0:
    raise argparse.ArgumentTypeError(f'expected positive integers, got {text!r}')
  return values


def _choices(valid):
  def parse(text):
    values = [v for v in text.split(',') if v]
    unknown = [v for v in values if v not in valid]
    if unknown or not values:
      raise argparse.ArgumentTypeError(f'unknown {unknown or text!r}; valid: {", ".join(valid)}')
    return values
  return parse


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--modes', type=_choices(MODES), default=None,
                      help=f'comma-separated, of {", ".join(MODES)} (default: compute; --tiny: '
                      'all)')
  parser.add_argument('--configs', default=None,
                      help='comma-separated config files (default: the seed and the MixVPR-paper '
                      'recipes; --tiny: the seed only)')
  parser.add_argument('--image_size', type=int, default=None,
                      help='square input size overriding the configs (--tiny: 32)')
  parser.add_argument('--places_per_batch', type=int, default=None, help='P (--tiny: 4)')
  parser.add_argument('--images_per_place', type=int, default=None, help='K (--tiny: 2)')
  parser.add_argument('--dtype', default=None, choices=('auto', 'float32', 'bfloat16'),
                      help='model.dtype override (default: the config\'s, auto)')
  parser.add_argument('--compute_augment', type=_choices(('none', 'device')), default=['none'],
                      help='compute mode: none and/or device (device RandAugment in the step)')
  parser.add_argument('--augment', default='device', choices=('none', 'device', 'randaugment'),
                      help='end_to_end / pipeline augmentation (data.augment)')
  parser.add_argument('--parallel', type=_choices(('jit', 'pmap')), default=['jit'],
                      help="compute mode: data-parallel implementations to time ('jit,pmap')")
  parser.add_argument('--num_devices', type=_int_list, default=None,
                      help='compute mode: device counts to run on, e.g. 1,8 (a scaling study: '
                      'P grows with the devices); end_to_end and eval use the first count '
                      '(default: all devices, the recipe\'s batch split over them)')
  parser.add_argument('--strong_scaling', action='store_true',
                      help='split the recipe\'s batch over the devices instead of growing P')
  parser.add_argument('--reference', type=_choices(REFERENCE_VARIANTS + ('none',)), default=None,
                      help='PyTorch variants (default: all three on CUDA, eager on CPU)')
  parser.add_argument('--warmup', type=int, default=None, help='untimed steps (default 3)')
  parser.add_argument('--steps', type=int, default=None, help='timed steps (default 20)')
  parser.add_argument('--sources', type=_choices(SOURCES), default=None,
                      help='end_to_end / pipeline data: original and/or prepared (default both)')
  parser.add_argument('--train_dir', default='', help='training folder (default: synthetic)')
  parser.add_argument('--layout', default='gsv_cities', choices=gsv_cities.LAYOUTS)
  parser.add_argument('--cities', default='', help='comma-separated; default: all in train_dir')
  parser.add_argument('--prepared_dir', default='',
                      help='built TFDS dataset folder (`vpr_jax.prepare` prints it; default: build '
                      '--train_dir into a temp folder)')
  parser.add_argument('--synthetic_places', type=int, default=None,
                      help='places of the synthetic set (default 400; --tiny: 8)')
  parser.add_argument('--source_size', type=bench_common.parse_hw, default=None,
                      help='H,W of the synthetic JPEGs (default 480,640 as GSV-Cities; --tiny: '
                      '48,64)')
  parser.add_argument('--workers', type=int, default=None,
                      help='grain worker processes (default: one per core, at most 16; --tiny: 0)')
  parser.add_argument('--threaded_prefetch', action='store_true',
                      help='end_to_end: also run with the host side in a background thread')
  parser.add_argument('--eval_batch_size', type=int, default=None,
                      help='eval mode batch (default 256; --tiny: 8)')
  parser.add_argument('--eval_batches', type=int, default=None,
                      help='eval mode timed batches (default 40; --tiny: 2)')
  parser.add_argument('--tiny', action='store_true',
                      help='CPU smoke run: small images, P x K, steps and data')
  parser.add_argument('--workdir', default='', help='where generated data goes (default: temp)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', default='', help='also write the results to this JSON file')
  args = parser.parse_args(argv)
  tiny = args.tiny
  args.modes = args.modes or (list(MODES) if tiny else ['compute'])
  args.configs = (args.configs.split(',') if args.configs
                  else [DEFAULT_CONFIGS[0]] if tiny else list(DEFAULT_CONFIGS))
  if tiny:
    args.image_size = args.image_size or 32
    args.places_per_batch = args.places_per_batch or 4
    args.images_per_place = args.images_per_place or 2
  args.images_per_place_data = args.images_per_place or 4
  args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
  args.steps = args.steps if args.steps is not None else (2 if tiny else 20)
  args.sources = args.sources or list(SOURCES)
  args.synthetic_places = args.synthetic_places or (8 if tiny else 400)
  args.source_size = args.source_size or ((48, 64) if tiny else (480, 640))
  if args.workers is None:
    args.workers = 0 if tiny else workers.resolve_num_workers(-1)
  args.eval_batch_size = args.eval_batch_size or (8 if tiny else 256)
  args.eval_batches = args.eval_batches or (2 if tiny else 40)
  if args.steps <= 0 or args.warmup < 0 or args.workers < 0:
    parser.error('--steps must be positive, --warmup and --workers non-negative')
  return args


def _reference_variants(args) -> list[str]:
  if args.reference is not None:
    return [v for v in args.reference if v != 'none']
  import torch  # pylint: disable=g-import-not-at-top
  return list(REFERENCE_VARIANTS) if torch.cuda.is_available() else ['eager']


def run_compute(args, results):
  have_reference, why_not = reference_available()
  variants = _reference_variants(args) if have_reference else []
  if not have_reference and args.reference != ['none']:
    results['notes'].append(f'PyTorch reference skipped: {why_not}.')
    print(f'Note: PyTorch reference skipped ({why_not}).', flush=True)
  # An explicit list of device counts is a scaling study (P grows with the devices unless
  # --strong_scaling); by default the recipe's batch is split over all devices, as in training.
  scaling_study = args.num_devices is not None
  device_counts = args.num_devices or [jax.device_count()]
  for count in device_counts:
    if count > jax.device_count():
      raise SystemExit(f'--num_devices {count}: only {jax.device_count()} devices')
  for path in args.configs:
    name = config_name(path)
    reference = None
    for augment, parallel_mode in itertools.product(args.compute_augment, args.parallel):
      config = bench_config(path, args, augment, parallel_mode)
      for count in device_counts:
        label = name + ('' if augment == 'none' else ' +device-augment') + (
            f' ({count} device{"s" if count > 1 else ""})'
            if len(device_counts) > 1 or count > 1 else '') + (
                f' [{parallel_mode}]' if len(args.parallel) > 1 else '')
        out = bench_vpr_jax_step(config, args.warmup, args.steps, args.seed,
                                 devices=jax.devices()[:count],
                                 weak_scaling=scaling_study and not args.strong_scaling)
        row = {'label': label, 'config': name, 'config_file': path, 'augment': augment,
               'parallel': parallel_mode, 'num_devices': count, 'batch': out['batch'],
               'image_size': list(config.image_size), 'vpr_jax_img_per_s': out['img_per_s'],
               'vpr_jax': out, 'peak_device_bytes_after': peak_device_memory()}
        print(f'{label}: vpr_jax {_rate(out["img_per_s"])} img/s ({out["dtype"]}, batch '
              f'{out["batch"]}, compile {out["compile_seconds"]:.1f} s, '
              f'{out.get("gflop_per_image", float("nan")):.2f} GFLOP/img, '
              f'{out["hlo_convolutions"]} convolutions)', flush=True)
        if augment == 'none' and count == 1 and variants and parallel_mode == args.parallel[0]:
          if reference is None:
            reference = {}
            for variant in variants:
              try:
                reference[variant] = bench_torch_step(config, variant, args.warmup, args.steps,
                                                      args.seed)
                print(f'{name}: reference {variant} '
                      f'{_rate(reference[variant]["img_per_s"])} img/s', flush=True)
              except NotImplementedError as e:
                reference[variant] = {'skipped': str(e)}
              except Exception as e:  # pylint: disable=broad-except
                # A failing variant (e.g. torch.compile without a compiler) must not hide the
                # others.
                reference[variant] = {'failed': f'{type(e).__name__}: {e}'}
                print(f'{name}: reference {variant} failed: {type(e).__name__}: {e}', flush=True)
          rates = {v: r['img_per_s'] for v, r in reference.items() if 'img_per_s' in r}
          row['reference'] = reference
          if rates:
            best = max(rates, key=rates.get)
            row.update({'reference_variant': best, 'reference_img_per_s': rates[best],
                        'ratio': out['img_per_s'] / rates[best]})
        results['compute'].append(row)
  counts = [r for r in results['compute']
            if r['augment'] == 'none' and r['parallel'] == args.parallel[0]]
  for name in {r['config'] for r in counts}:
    single = [r for r in counts if r['config'] == name and r['num_devices'] == 1]
    for r in counts:
      if r['config'] == name and r['num_devices'] > 1 and single:
        r['per_device_vs_one_device'] = (r['vpr_jax']['img_per_s_per_device'] /
                                         single[0]['vpr_jax']['img_per_s_per_device'])


def data_devices(args) -> list:
  """Devices of the end_to_end and eval modes: the first of --num_devices, else all."""
  return jax.devices()[:args.num_devices[0]] if args.num_devices else jax.devices()


def _compute_rate(results, name, num_devices):
  """Compute-only img/s of a config (no augmentation) on as many devices, if measured."""
  for r in results['compute']:
    if (r['config'] == name and r['augment'] == 'none' and r['num_devices'] == num_devices):
      return r['vpr_jax_img_per_s']
  return None


def run_data_modes(args, results, workdir):
  data = DataSources(args, workdir)
  results['data'] = data.info
  for path in args.configs:
    name = config_name(path)
    config = data.configure(bench_config(path, args, args.augment))
    devices = data_devices(args)
    compute = _compute_rate(results, name, len(devices))
    for source_name in args.sources:
      index, source = data.get(source_name, config)
      tag = f'{name} {source_name}/{args.augment}/{args.workers}w'
      if 'pipeline' in args.modes:
        out = bench_pipeline(config, index, source, args.workers, *data_steps(args), args.seed)
        row = {'label': f'{tag} pipeline', 'mode': 'pipeline', 'config': name,
               'source': source_name, **out}
        if compute:
          row.update({'compute_img_per_s': compute, 'ratio_to_compute': out['img_per_s'] / compute})
        results['end_to_end'].append(row)
        print(f'{row["label"]}: {_rate(out["img_per_s"])} img/s', flush=True)
      if 'end_to_end' in args.modes:
        for threaded in ([False, True] if args.threaded_prefetch else [False]):
          out = bench_end_to_end(config, index, source, args.workers, *data_steps(args),
                                 args.seed, threaded=threaded, devices=devices)
          row = {'label': f'{tag} train' + (' threaded' if threaded else ''),
                 'mode': 'end_to_end', 'config': name, 'source': source_name, **out}
          if compute:
            row.update({'compute_img_per_s': compute,
                        'ratio_to_compute': out['img_per_s'] / compute})
          results['end_to_end'].append(row)
          print(f'{row["label"]}: {_rate(out["img_per_s"])} img/s (host wait '
                f'{out["host_wait_seconds_per_step"] * 1e3:.1f} ms/step)', flush=True)
      if 'eval' in args.modes and source_name == 'prepared':
        out = bench_eval_prepared(config, source, args.eval_batch_size, args.workers,
                                  args.eval_batches, args.seed)
        results['eval'].append({'label': f'{name} prepared eval/{args.workers}w',
                                'config': name, **out})
        print(f'{name}: descriptors from prepared records {_rate(out["img_per_s"])} img/s',
              flush=True)


def run_augment(args, results):
  for path in args.configs:
    config = bench_config(path, args, 'device')
    batch = _batch_images(config)
    out = bench_device_augment(config, batch, args.warmup, args.steps, args.seed)
    results['augment'].append({'label': config_name(path), 'config': config_name(path),
                               'image_size': list(config.image_size), **out})
    print(f'{config_name(path)}: device RandAugment alone {_rate(out["img_per_s"])} img/s '
          f'(batch {batch})', flush=True)


def environment() -> dict:
  device = jax.local_devices()[0]
  env = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'host': platform.node(), 'platform': platform.platform(), 'python': platform.python_version(),
      'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'backend': jax.default_backend(),
      'device': device.device_kind, 'num_devices': jax.device_count(),
  }
  for name in ('flax', 'optax', 'grain', 'torch', 'torchvision', 'pytorch_metric_learning'):
    try:
      module = __import__(name)
      env[name] = getattr(module, '__version__', '?')
    except ImportError:
      env[name] = None
  return env


def main(argv=None) -> dict:
  args = parse_args(argv)
  # grain's worker processes read absl flags; this script parses its own arguments.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  results = {'env': environment(), 'args': {k: v for k, v in vars(args).items()},
             'compute': [], 'end_to_end': [], 'augment': [], 'eval': [], 'notes': []}
  env = results['env']
  print(f'JAX {env["jax"]} on {env["backend"]}: {env["device"]} x {env["num_devices"]}; '
        f'{env["cpu_count"]} CPUs', flush=True)
  if args.workdir:
    os.makedirs(args.workdir, exist_ok=True)
    workdir, cleanup = args.workdir, contextlib.nullcontext()
  else:
    cleanup = tempfile.TemporaryDirectory(prefix='vpr_jax_bench_train_')
    workdir = cleanup.name
  with cleanup:
    if 'compute' in args.modes:
      run_compute(args, results)
    if 'augment' in args.modes:
      run_augment(args, results)
    if {'end_to_end', 'pipeline', 'eval'} & set(args.modes):
      run_data_modes(args, results, workdir)
  results['peak_device_bytes'] = peak_device_memory()

  if results['compute']:
    print()
    print(format_compute_table(results['compute']))
    for row in results['compute']:
      for variant, ref in (row.get('reference') or {}).items():
        detail = _rate(ref['img_per_s']) + ' img/s' if 'img_per_s' in ref else (
            ref.get('skipped') or ref.get('failed'))
        print(f'  {row["config"]} reference {variant}: {detail}')
      if 'per_device_vs_one_device' in row:
        print(f'  {row["label"]}: per-device throughput {row["per_device_vs_one_device"]:.2f}x '
              'of one device')
  if results['end_to_end']:
    print()
    print(format_e2e_table(results['end_to_end']))
  for row in results['augment'] + results['eval']:
    print(f'{row["label"]}: {_rate(row["img_per_s"])} img/s')
  peak = results['peak_device_bytes']
  print('Peak device memory: ' + (f'{peak / 2**30:.2f} GiB' if peak is not None
                                  else f'n/a (not reported by {env["backend"]})'))
  if args.output:
    bench_common.write_json(args.output, results)
  return results


if __name__ == '__main__':
  main()
