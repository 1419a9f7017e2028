"""Training: the train state, the pure train step, and the train-and-evaluate loop.

The loop (`train_and_evaluate`) builds everything from a config, resumes from the workdir when it
holds a checkpoint, and writes into the workdir:

  config.json       the run's configuration
  metrics.jsonl     one JSON object per line. Training records (every config.log_every_steps):
                    step (optimiser steps done), epoch (0-based epoch of that step), loss and b_acc
                    (means over the steps since the previous record), lr (of the last step),
                    images_per_sec, grad_norm, skipped_steps (non-finite steps so far).
                    Validation records: step, epoch (epochs completed), dataset, recall
                    {"1": percent, "5": ..., "25": ...}. On resume, records after the restored
                    step are dropped, so the file reads as one uninterrupted run.
  tb/               TensorBoard event files (train/*, val/<dataset>/R<N>)
  checkpoints/      see vpr_jax.checkpointing: best keep_best by R@1 of the first validation set,
                    and the latest (with optimiser, RNG and data iterator state)

Non-finite loss or gradients are caught inside the step: the update is not applied (parameters,
BatchNorm statistics and optimiser state keep their values). The host looks at the count at every
log step and before every checkpoint: on_nonfinite='stop' ends the run naming the first bad step
(the checkpoints hold only states from before it); 'skip' carries on and counts skipped steps.
"""

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vpr_jax import checkpointing
from vpr_jax import losses
from vpr_jax import optim
from vpr_jax import parallel

ON_NONFINITE = ('stop', 'skip')
METRICS_FILENAME = 'metrics.jsonl'
TENSORBOARD_SUBDIR = 'tb'
PREDICTIONS_SUBDIR = 'predictions'
RECALL_NS = (1, 5, 10, 15, 20, 25)


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient (config.on_nonfinite='stop')."""


class TrainState(flax_train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics and non-finite bookkeeping.

  Attributes:
    batch_stats: BatchNorm running statistics.
    nonfinite_count: steps whose update was not applied (non-finite loss or gradient).
    first_nonfinite_step: index of the first such step, -1 if none.
  """
  batch_stats: Any
  nonfinite_count: jax.Array
  first_nonfinite_step: jax.Array


def create_train_state(config: ml_collections.ConfigDict, model, rng: jax.Array, *,
                       tx: optax.GradientTransformation,
                       variables: Optional[Mapping[str, Any]] = None) -> TrainState:
  """Initialises (or wraps given) model variables and the optimiser state.

  Args:
    config: the full ConfigDict (image_size).
    model: the VPRModel.
    rng: PRNG key for the initialisation (unused when `variables` is given).
    tx: the optimiser (`optim.make_optimizer`).
    variables: {'params', 'batch_stats'} to start from, e.g. with ImageNet weights.

  Returns:
    The TrainState at step 0.
  """
  if variables is None:
    from vpr_jax.models import vpr_model  # pylint: disable=g-import-not-at-top
    variables = vpr_model.init_variables(model, rng, tuple(config.image_size))
  state = TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}),
      nonfinite_count=jnp.zeros((), jnp.int32),
      first_nonfinite_step=jnp.full((), -1, jnp.int32))
  # A typed int32 step (not a Python int) keeps the step's input signature fixed: no recompile.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, model,
               loss_fn: Callable, schedule: Callable, axis_name: Optional[str] = None,
               augment_fn: Optional[Callable] = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch. Pure; jit or pmap it at the call site.

  Args:
    state: the TrainState.
    batch: 'images' uint8 [P, K, H, W, 3] or flat [N, H, W, 3], 'labels' int [P, K] or [N].
      Under pmap, this device's shard (flat).
    rng: the run's base PRNG key; the step folds its index in.
    model: the VPRModel (BatchNorm axis_name set for pmap).
    loss_fn: `losses.make_loss(...)` result: (descriptors [N, D], labels [N]) -> (loss, metrics).
    schedule: step -> learning rate (for the metrics).
    axis_name: the pmap axis; None under jit (GSPMD makes the batch global).
    augment_fn: optional on-device augmentation (images, rng, axis_name) -> images.

  Returns:
    (new state, metrics): loss, b_acc, lr, grad_norm, finite (1.0 if the update was applied).
  """
  images, labels = batch['images'], batch['labels']
  if images.ndim == 5:
    images = images.reshape((-1,) + images.shape[2:])
    labels = labels.reshape(-1)
  if augment_fn is not None:
    images = augment_fn(images, jax.random.fold_in(rng, state.step), axis_name)

  def loss_of(params):
    outputs, mutated = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                   train=True, mutable=['batch_stats'])
    # The miner and the loss see the whole global batch, as on one device.
    descriptors = parallel.gather_global_batch(outputs['descriptors'], axis_name)
    all_labels = parallel.gather_global_batch(labels, axis_name)
    loss, loss_metrics = loss_fn(descriptors, all_labels)
    return loss, (mutated.get('batch_stats', {}), loss_metrics)

  (loss, (batch_stats, loss_metrics)), grads = jax.value_and_grad(loss_of, has_aux=True)(
      state.params)
  # Every device computed the loss of the whole batch; collectives' transposes sum the
  # per-device objectives, so the mean over devices is the gradient of that one loss.
  grads = parallel.global_mean(grads, axis_name)
  finite = jnp.isfinite(loss) & _all_finite(grads)

  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  keep = lambda new, old: jnp.where(finite, new, old)
  new_state = updated.replace(
      params=jax.tree.map(keep, updated.params, state.params),
      opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state),
      batch_stats=jax.tree.map(keep, updated.batch_stats, state.batch_stats),
      nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where(
          (state.first_nonfinite_step < 0) & ~finite, state.step.astype(jnp.int32),
          state.first_nonfinite_step))
  metrics = {
      'loss': loss.astype(jnp.float32),
      'b_acc': jnp.asarray(loss_metrics.get('b_acc', jnp.nan), jnp.float32),
      # The optimiser's own step count (skipped steps do not advance it) drives its schedule.
      'lr': schedule(state.step - state.nonfinite_count),
      'grad_norm': optax.tree.norm(grads),
      'finite': finite.astype(jnp.float32),
  }
  return new_state, metrics


def device_rand_augment(config: ml_collections.ConfigDict) -> Callable:
  """On-device RandAugment for data.augment='device': (images, rng, axis_name) -> images.

  Under pmap, the ops of the whole global batch are drawn and each device takes its slice, so
  the draws do not depend on the number of devices.
  """
  from vpr_jax.data import device_augment  # pylint: disable=g-import-not-at-top
  data = config.data
  num_ops, magnitude = int(data.randaugment_num_ops), int(data.randaugment_magnitude)
  bins = int(data.randaugment_num_magnitude_bins)

  def augment(images, rng, axis_name):
    if axis_name is None:
      return device_augment.rand_augment(images, rng, num_ops, magnitude, bins)
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    tables = device_augment.make_op_tables(h, w, magnitude, bins)
    total = n * jax.lax.axis_size(axis_name)
    ops, negative = device_augment.sample_ops(rng, total, num_ops)
    start = jax.lax.axis_index(axis_name) * n
    ops = jax.lax.dynamic_slice_in_dim(ops, start, n)
    negative = jax.lax.dynamic_slice_in_dim(negative, start, n)
    for i in range(num_ops):
      images = device_augment.apply_ops(images, ops[:, i], negative[:, i], tables)
    return images

  return augment


# ----------------------------------------------------------------------------------------------
# Checks at start.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before reading data, on unknown names (listing the valid choices).

  Checks backbone, aggregator, dtype, loss, miner, optimiser, schedule, parallel mode,
  on_nonfinite, augmentation mode and training layout.
  """
  from vpr_jax.data import augment  # pylint: disable=g-import-not-at-top
  from vpr_jax.data import gsv_cities  # pylint: disable=g-import-not-at-top
  from vpr_jax.models import vpr_model  # pylint: disable=g-import-not-at-top
  vpr_model.build_model(config)
  losses.make_loss(config.loss.name, config.loss.params, config.loss.miner_name,
                   config.loss.miner_params)
  optim.validate_optim_config(config.optim)
  if config.parallel not in parallel.PARALLEL_MODES:
    raise ValueError(f'Unknown parallel mode {config.parallel!r}; valid choices: '
                     f'{", ".join(parallel.PARALLEL_MODES)}.')
  if config.on_nonfinite not in ON_NONFINITE:
    raise ValueError(f'Unknown on_nonfinite {config.on_nonfinite!r}; valid choices: '
                     f'{", ".join(ON_NONFINITE)}.')
  if config.data.augment not in augment.AUGMENT_MODES:
    raise ValueError(f'Unknown data.augment {config.data.augment!r}; valid choices: '
                     f'{", ".join(augment.AUGMENT_MODES)}.')
  if config.data.train_layout not in gsv_cities.LAYOUTS:
    raise ValueError(f'Unknown data.train_layout {config.data.train_layout!r}; valid choices: '
                     f'{", ".join(gsv_cities.LAYOUTS)}.')
  for name in ('num_epochs', 'log_every_steps', 'eval_every_epochs', 'keep_best'):
    if int(config[name]) < 1:
      raise ValueError(f'{name} must be >= 1, got {config[name]}.')
  for name in ('max_steps', 'checkpoint_every_steps'):
    if int(config[name]) < 0:
      raise ValueError(f'{name} must be >= 0, got {config[name]}.')


# ----------------------------------------------------------------------------------------------
# Host-side helpers of the loop.


def _resolve_under(root: str, path: str) -> str:
  path = os.path.expanduser(path)
  return path if os.path.isabs(path) else os.path.join(root, path)


def _synthetic_enabled(config: ml_collections.ConfigDict) -> bool:
  synth = config.data.get('synthetic')
  return synth is not None and bool(synth.enabled)


def _resolve_data_root(config: ml_collections.ConfigDict) -> str:
  """config.data.root, else $VPR_DATA_ROOT; synthetic runs fall back to ~/.cache/vpr_jax."""
  from vpr_jax.data import benchmarks  # pylint: disable=g-import-not-at-top
  if _synthetic_enabled(config):
    root = (config.data.root or os.environ.get(benchmarks.DATA_ROOT_ENV) or
            os.path.join(os.path.expanduser('~'), '.cache', 'vpr_jax'))
    root = os.path.abspath(os.path.expanduser(root))
    os.makedirs(root, exist_ok=True)
    return root
  return benchmarks.resolve_data_root(config.data.root)


def _maybe_make_synthetic_data(config: ml_collections.ConfigDict, data_root: str) -> None:
  """Generates the synthetic dataset under <data root>/<data.synthetic.dir> once, if enabled."""
  if not _synthetic_enabled(config):
    return
  from vpr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  synth = config.data.synthetic
  out = _resolve_under(data_root, synth.dir)
  if jax.process_index() == 0 and not os.path.isfile(os.path.join(out, synthetic.SUMMARY_FILE)):
    logging.info('Writing the synthetic dataset to %s', out)
    synthetic.make_synthetic_dataset(
        out, seed=int(synth.seed), num_train_places=int(synth.num_train_places),
        images_per_place=int(synth.images_per_place),
        num_eval_places=int(synth.num_eval_places), image_size=tuple(synth.image_size))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('vpr_jax synthetic data')


def _backbone_weights_path(config: ml_collections.ConfigDict, data_root: Optional[str]) -> str:
  path = os.path.expanduser(config.model.backbone_weights)
  if not os.path.isabs(path) and data_root is not None and not os.path.exists(path):
    path = os.path.join(data_root, path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'model.backbone_weights={config.model.backbone_weights!r}: no file at '
                            f'{path} (relative paths are under data.root; weights are never '
                            'downloaded).')
  return path


def _load_backbone_weights(config, variables, data_root):
  """ImageNet weights from a torchvision file, or the random init with a warning."""
  if not config.model.backbone_weights:
    logging.warning('model.backbone_weights is empty: the backbone starts from a random '
                    'initialisation, not ImageNet weights.')
    return variables
  from vpr_jax import convert  # pylint: disable=g-import-not-at-top
  path = _backbone_weights_path(config, data_root)
  backbone = convert.load_torchvision_backbone(path, config.model)
  logging.info('Loaded ImageNet backbone weights from %s', path)
  return convert.with_backbone(jax.device_get(variables), backbone)


def _host_state_parts(host_state: TrainState, rng) -> tuple[dict, dict]:
  variables = {'params': host_state.params, 'batch_stats': host_state.batch_stats}
  train = {'step': host_state.step, 'opt_state': host_state.opt_state,
           'rng': np.asarray(rng),
           'nonfinite_count': host_state.nonfinite_count,
           'first_nonfinite_step': host_state.first_nonfinite_step}
  return variables, jax.tree.map(np.asarray, train)


def _iterator_state_for_process(state, process_index: int, process_count: int):
  """The saved data iterator state, addressed to this process.

  Checkpoints keep one copy of the iterator state (process 0's). The train pipeline's position is
  the global step, the same on every process and for any number of processes (the global batches
  do not depend on how they are split); only its fingerprint names the process and the process
  count (and its bad-image counters are process 0's). So a run may resume on another number of
  hosts.
  """
  fingerprint = state.get('fingerprint') if isinstance(state, dict) else None
  if isinstance(fingerprint, dict) and 'process_index' in fingerprint:
    state = dict(state, fingerprint=dict(fingerprint, process_index=process_index,
                                         process_count=process_count))
  return state


def _numpy_tree(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


class _MetricsFile:
  """metrics.jsonl, written by process 0; truncated to the restored step on resume."""

  def __init__(self, path: str, enabled: bool):
    self.path = path
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          break  # a line cut short by a crash ends the usable history
        if int(record.get('step', 0)) <= step:
          kept.append(line)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(''.join(line + '\n' for line in kept))
    os.replace(tmp, self.path)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def _finite_or_none(value: float) -> Optional[float]:
  value = float(value)
  return value if np.isfinite(value) else None


class _Console:
  """Tables printed on process 0, then a tqdm progress bar (created at the first update)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.total, self.initial, self.enabled = total, initial, enabled
    self.bar = None

  def print(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def update(self, steps: int, postfix: Optional[Mapping[str, Any]] = None) -> None:
    if not self.enabled:
      return
    if self.bar is None:
      from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm.tqdm(total=self.total, initial=self.initial, unit='step',
                           dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
    if postfix:
      self.bar.set_postfix(postfix, refresh=False)
    self.bar.update(steps)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _make_summary_writer(workdir: str, enabled: bool):
  if not enabled:
    return None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('tensorboardX is not installed: no TensorBoard event files.')
    return None
  return tensorboardX.SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_SUBDIR))


# ----------------------------------------------------------------------------------------------
# Compiled programs, shared by the runs of one process.


@dataclasses.dataclass
class _Programs:
  """What a run compiles: kept per configuration so that later runs in the same process (resumed
  runs, studies, tests) reuse the compiled step, initialisation and evaluation."""
  dp: parallel.DataParallel
  model: Any
  eval_model: Any
  tx: optax.GradientTransformation
  schedule: Callable
  init: Callable
  train_step: Callable


_PROGRAMS: dict[str, _Programs] = {}
_MAX_PROGRAMS = 4

# Config fields that shape the compiled programs.
_PROGRAM_FIELDS = ('model', 'image_size', 'loss', 'optim', 'num_epochs', 'parallel',
                   'data.augment', 'data.randaugment_num_ops', 'data.randaugment_magnitude',
                   'data.randaugment_num_magnitude_bins')


def clear_program_cache() -> None:
  """Forgets the compiled programs of earlier runs (e.g. after patching the loss)."""
  _PROGRAMS.clear()


def _get_programs(config: ml_collections.ConfigDict, steps_per_epoch: int,
                  devices=None) -> _Programs:
  """Model, optimiser and compiled functions of a configuration (cached per process).

  `devices` (default: all) restricts data parallelism to some devices (benchmarks of scaling).
  """
  from vpr_jax.models import vpr_model  # pylint: disable=g-import-not-at-top
  flat = json.loads(checkpointing.config_to_json(config))
  selected = {}
  for field in _PROGRAM_FIELDS:
    value = flat
    for part in field.split('.'):
      value = value[part]
    selected[field] = value
  key = json.dumps({'fields': selected, 'steps_per_epoch': steps_per_epoch,
                    'devices': [d.id for d in (devices or jax.devices())]}, sort_keys=True)
  if key in _PROGRAMS:
    return _PROGRAMS[key]

  dp = parallel.DataParallel(config.parallel, devices)
  model = vpr_model.build_model(config, bn_axis_name=dp.axis_name)
  image_size = tuple(int(s) for s in config.image_size)
  init = jax.jit(lambda rng: vpr_model.init_variables(model, rng, image_size))
  abstract_params = jax.eval_shape(init, jax.random.PRNGKey(0))['params']
  frozen_mask = vpr_model.frozen_param_mask(abstract_params, int(config.model.layers_to_freeze))
  tx, schedule = optim.make_optimizer(config, steps_per_epoch, frozen_mask)
  loss_fn = losses.make_loss(config.loss.name, config.loss.params, config.loss.miner_name,
                             config.loss.miner_params)
  augment_fn = device_rand_augment(config) if config.data.augment == 'device' else None
  step = dp.compile_step(functools.partial(
      train_step, model=model, loss_fn=loss_fn, schedule=schedule, axis_name=dp.axis_name,
      augment_fn=augment_fn))
  programs = _Programs(dp=dp, model=model, eval_model=vpr_model.build_model(config), tx=tx,
                       schedule=schedule, init=init, train_step=step)
  while len(_PROGRAMS) >= _MAX_PROGRAMS:
    _PROGRAMS.pop(next(iter(_PROGRAMS)))
  _PROGRAMS[key] = programs
  return programs


# ----------------------------------------------------------------------------------------------
# The loop.


def _write_prediction_sheets(eval_results, workdir: str, num_queries: int, print_fn) -> None:
  """Query + top-5 prediction sheets of the latest validation, one folder per dataset."""
  from vpr_jax import visualize  # pylint: disable=g-import-not-at-top
  for name, result in eval_results.items():
    out_dir = os.path.join(workdir, PREDICTIONS_SUBDIR, name.replace('/', '_'))
    written = visualize.visualize_predictions(result, out_dir, num_queries)
    print_fn(f'Wrote {len(written)} prediction sheets of {name} to {out_dir}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and validates a model as configured; resumes from `workdir` if it has a checkpoint.

  Args:
    config: the full ConfigDict (configs/default.py documents every field).
    workdir: where config.json, metrics.jsonl, tb/ and checkpoints/ go.

  Returns:
    A summary dict: 'step' (steps done), 'train' (last training record), 'val' ({dataset: recall}
    of the last validation), 'best_r1' and 'best_step', 'skipped_steps'.
  """
  # pylint: disable=g-import-not-at-top
  from vpr_jax import evaluation
  from vpr_jax.data import benchmarks
  from vpr_jax.data import gsv_cities
  from vpr_jax.data import train_pipeline
  from vpr_jax.models import vpr_model
  # pylint: enable=g-import-not-at-top

  validate_config(config)
  workdir = os.path.abspath(os.fspath(workdir))
  is_main = jax.process_index() == 0
  process_index, process_count = jax.process_index(), jax.process_count()

  # Data locations, checked before anything heavy happens.
  data_root = _resolve_data_root(config)
  _maybe_make_synthetic_data(config, data_root)
  for name in config.data.val_datasets:
    benchmarks.resolve_benchmark_dir(name, data_root)
  train_dir = _resolve_under(data_root, config.data.train_dir)
  if config.model.backbone_weights:
    _backbone_weights_path(config, data_root)
  # A checkpoint of another configuration is refused before the data is read.
  checkpoint_dir = os.path.join(workdir, checkpointing.CHECKPOINTS_SUBDIR)
  checkpointing.check_resumable(checkpoint_dir, config)

  sizes = parallel.batch_sizes(int(config.data.places_per_batch),
                               int(config.data.images_per_place))
  prepared_source = None
  if config.data.prepared_dir:
    # Images resized once and re-encoded (`python -m vpr_jax.prepare`): same places and order.
    from vpr_jax.data import prepared  # pylint: disable=g-import-not-at-top
    index, prepared_source = prepared.open_prepared(
        _resolve_under(data_root, config.data.prepared_dir), config)
  else:
    index = gsv_cities.build_place_index(
        train_dir, config.data.train_layout, tuple(config.data.cities),
        int(config.data.min_img_per_place), cache_dir=config.data.cache_dir,
        rebuild=bool(config.data.rebuild_index))
  steps_per_epoch = train_pipeline.steps_per_epoch(index, config, process_count)
  num_steps = int(config.num_epochs) * steps_per_epoch
  last_step = min(num_steps, int(config.max_steps)) if config.max_steps else num_steps
  val_sets = [benchmarks.load_benchmark(name, data_root, radius_m=config.data.positive_radius_m)
              for name in config.data.val_datasets]

  programs = _get_programs(config, steps_per_epoch)
  dp, model = programs.dp, programs.model
  rng = jax.random.PRNGKey(int(config.seed))
  init_rng, train_rng = jax.random.split(rng)
  variables = _load_backbone_weights(config, programs.init(init_rng), data_root)
  state = create_train_state(config, model, init_rng, tx=programs.tx, variables=variables)
  host_state = jax.device_get(state)

  train_iter = train_pipeline.make_train_iterator(index, config, seed=int(config.seed),
                                                  process_index=process_index,
                                                  process_count=process_count,
                                                  prepared=prepared_source)

  # Every input has been read and checked: a run that fails before here leaves no workdir behind.
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpointing.TrainCheckpointer(checkpoint_dir, config)
  if is_main:
    checkpointing._write_text_atomic(  # pylint: disable=protected-access
        os.path.join(workdir, checkpointing.CONFIG_FILENAME), checkpointing.config_to_json(config))
  console_lines = []
  start_step = 0
  best = {'r1': None, 'step': None}
  last_val: dict[str, Any] = {}
  restored_step = checkpointer.latest_step()
  if restored_step is not None:
    target_vars, target_train = _host_state_parts(host_state, train_rng)
    restored = checkpointer.restore(target_vars, target_train, step=restored_step)
    train_item = restored['train']
    host_state = host_state.replace(
        step=train_item['step'], params=restored['variables']['params'],
        batch_stats=restored['variables']['batch_stats'], opt_state=train_item['opt_state'],
        nonfinite_count=train_item['nonfinite_count'],
        first_nonfinite_step=train_item['first_nonfinite_step'])
    train_rng = jnp.asarray(train_item['rng'])
    if restored['data_iterator_state'] is not None:
      train_iter.set_state(_iterator_state_for_process(restored['data_iterator_state'],
                                                       process_index, process_count))
    start_step = int(train_item['step'])
    best_step = checkpointer.best_step()
    if best_step is not None:
      best = {'r1': checkpointer.best.metrics(best_step)['r1'], 'step': best_step}
    last_val = dict(restored['info'].get('val', {}))
    console_lines.append(f'Resumed from {checkpointer.directory} at step {start_step}.')

  metrics_file = _MetricsFile(os.path.join(workdir, METRICS_FILENAME), is_main)
  metrics_file.truncate_after(start_step)
  writer = _make_summary_writer(workdir, is_main)
  console = _Console(total=last_step, initial=start_step, enabled=is_main)
  for line in console_lines:
    console.print(line)
  console.print(gsv_cities.format_stats(index, sizes.places_global, sizes.images_per_place,
                                        process_count))
  console.print(sizes.describe())
  console.print(vpr_model.format_parameter_table(
      vpr_model.count_parameters(host_state.params, int(config.model.layers_to_freeze)),
      config.model))
  console.print(f'{steps_per_epoch} steps per epoch, {num_steps} steps in {config.num_epochs} '
                f'epochs; this run stops at step {last_step}. parallel={config.parallel} over '
                f'{dp.num_devices} devices, compute dtype '
                f'{jnp.dtype(vpr_model.resolve_dtype(config.model.dtype)).name}.')

  state = dp.replicate(host_state)
  p_train_step = programs.train_step

  def host_state_now():
    return _numpy_tree(dp.to_host(state))

  pending = []  # (step number, metrics on device) since the last training record
  last_eval_results = {}  # dataset name -> evaluation.EvalResult of the latest validation

  def check_finite(step: int) -> int:
    """Raises (on_nonfinite='stop') for a bad step since the last check; returns the count."""
    if config.on_nonfinite == 'stop' and pending:
      flags = jax.device_get(dp.unreplicate([metrics['finite'] for _, metrics in pending]))
      bad = [number for (number, _), flag in zip(pending, flags) if float(flag) == 0.0]
      if bad:
        raise NonFiniteError(
            f'Non-finite loss or gradient at step {bad[0]} (the update was not applied; '
            f'detected at step {step}). Checkpoints in {checkpointer.directory} are intact '
            f'(latest step {checkpointer.latest_step()}). Set on_nonfinite="skip" to skip such '
            'steps.')
    return int(np.asarray(jax.device_get(dp.unreplicate(state.nonfinite_count))))

  def validate(step: int) -> dict[str, dict[str, float]]:
    variables_now = dp.unreplicate({'params': state.params, 'batch_stats': state.batch_stats})
    results = {}
    for bench in val_sets:
      result = evaluation.evaluate_dataset(
          programs.eval_model, variables_now, bench, tuple(config.image_size),
          int(config.data.eval_batch_size),
          num_workers=train_pipeline.resolve_num_workers(config.data.num_workers), ns=RECALL_NS)
      recall = {str(n): float(v) for n, v in result.recall.items()}
      results[bench.name] = recall
      last_eval_results[bench.name] = result
      console.print(evaluation.format_recall_table(bench.name, result.recall))
      metrics_file.write({'step': step, 'epoch': step // steps_per_epoch, 'dataset': bench.name,
                          'recall': recall})
      if writer is not None:
        for n, value in recall.items():
          writer.add_scalar(f'val/{bench.name}/R{n}', value, step)
    if writer is not None:
      writer.flush()
    return results

  def save(step: int, val_results: Optional[Mapping[str, Any]] = None) -> None:
    variables_now, train_now = _host_state_parts(host_state_now(), train_rng)
    r1 = None
    if val_results:
      first = val_results[val_sets[0].name]
      r1 = first['1']
      if best['r1'] is None or r1 > best['r1']:
        best.update(r1=r1, step=step)
    checkpointer.save(step, variables=variables_now, train=train_now,
                      data_iterator_state=iterator_state, r1=r1,
                      info={'epoch': step // steps_per_epoch, 'val': dict(val_results or {})})

  iterator_state = train_iter.get_state()
  skipped = int(host_state.nonfinite_count)
  last_record: dict[str, Any] = {}
  step = start_step
  try:
    if config.eval_before_training and step == 0:
      last_val = validate(0)
      save(0, last_val)

    def host_batches():
      while True:
        try:
          batch = next(train_iter)
        except StopIteration:
          return
        batch = parallel.flatten_places({'images': batch['images'], 'labels': batch['labels']})
        yield batch, train_iter.get_state()

    device_batches = parallel.prefetch(
        host_batches(), lambda item: (dp.shard_batch(item[0]), item[1]),
        size=2 if jax.default_backend() != 'cpu' else 1)
    interval_start, interval_steps = time.perf_counter(), 0
    while step < last_step:
      try:
        batch, batch_iterator_state = next(device_batches)
      except StopIteration:
        break
      state, metrics = p_train_step(state, batch, train_rng)
      step += 1
      pending.append((step, metrics))
      interval_steps += 1
      iterator_state = batch_iterator_state
      end_of_epoch = step % steps_per_epoch == 0
      log_now = step % int(config.log_every_steps) == 0 or step == last_step or end_of_epoch
      if log_now:
        skipped = check_finite(step)
        fetched = jax.device_get(dp.unreplicate([metrics for _, metrics in pending]))
        pending.clear()
        # Measured after the fetch, which waits for the (asynchronously dispatched) steps.
        elapsed = max(time.perf_counter() - interval_start, 1e-9)
        finite = [m for m in fetched if float(m['finite']) > 0]
        mean = lambda key, rows=finite: (float(np.mean([float(m[key]) for m in rows]))
                                         if rows else float('nan'))
        last_record = {
            'step': step, 'epoch': (step - 1) // steps_per_epoch,
            'loss': _finite_or_none(mean('loss')), 'b_acc': _finite_or_none(mean('b_acc')),
            'lr': float(fetched[-1]['lr']),
            'images_per_sec': interval_steps * sizes.images_global / elapsed,
            'grad_norm': _finite_or_none(mean('grad_norm')), 'skipped_steps': skipped,
        }
        metrics_file.write(last_record)
        if writer is not None:
          for key in ('loss', 'b_acc', 'lr', 'images_per_sec', 'grad_norm'):
            if last_record[key] is not None:
              writer.add_scalar(f'train/{key}', last_record[key], step)
        console.update(interval_steps, {
            'loss': f'{mean("loss"):.4f}', 'b_acc': f'{mean("b_acc"):.3f}',
            'lr': f'{last_record["lr"]:.2e}', 'img/s': f'{last_record["images_per_sec"]:.0f}'})
        interval_start, interval_steps = time.perf_counter(), 0
      epochs_done = step // steps_per_epoch
      if end_of_epoch and epochs_done % int(config.eval_every_epochs) == 0:
        check_finite(step)
        last_val = validate(step)
        save(step, last_val)
        interval_start = time.perf_counter()
      elif config.checkpoint_every_steps and step % int(config.checkpoint_every_steps) == 0:
        check_finite(step)
        save(step)
    if step > start_step and checkpointer.latest_step() != step:
      check_finite(step)
      save(step)
    if is_main and int(config.visualize_queries) > 0 and last_eval_results:
      _write_prediction_sheets(last_eval_results, workdir, int(config.visualize_queries),
                               console.print)
  finally:
    console.close()
    train_iter.close()
    checkpointer.close()
    if writer is not None:
      writer.close()
  return {'step': step, 'train': last_record, 'val': last_val, 'best_r1': best['r1'],
          'best_step': best['step'], 'skipped_steps': skipped}
