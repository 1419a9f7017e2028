"""Everything a training run needs before its first step, built by one function: `setup_run`.

config -> `check_config` (every module checks its own fields) -> data root, synthetic data,
training places (`data.gsv_cities` or a built TFDS dataset), validation sets -> `programs` (model,
optimiser, compiled step) -> train state (ImageNet weights, or restored from the workdir's latest
checkpoint with the data iterator) -> a `Run`. Nothing is written into the workdir before every
input has been read and checked, so a run that fails here leaves no workdir behind.
"""

import dataclasses
import json
import math
import os
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpr_jax import losses
from vpr_jax import optim
from vpr_jax import parallel
from vpr_jax.checkpoints import orbax_states
from vpr_jax.checkpoints import run_config
from vpr_jax.checkpoints import runs
from vpr_jax.conversion import converter
from vpr_jax.conversion import mapping
from vpr_jax.data.augmentation import augment
from vpr_jax.data.evaluation import catalog
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.imaging import images
from vpr_jax.data import roots
from vpr_jax.data import synthetic
from vpr_jax.data.tfds import training_set
from vpr_jax.data.training import train_pipeline
from vpr_jax.data.multiprocess import workers
from vpr_jax.errors import ConfigError
from vpr_jax.errors import DatasetError
from vpr_jax.evaluation import benchmark_eval
from vpr_jax.models import vpr_model
from vpr_jax.training import init_weights
from vpr_jax.training import programs as programs_lib
from vpr_jax.training import state as state_lib

ON_NONFINITE = ('stop', 'skip')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any data is read, on a config that cannot run.

  Each module checks its own fields (model, loss, optimiser, parallelism, augmentation, training
  layout); the run's own fields are checked here.

  Args:
    config: the full ConfigDict.

  Raises:
    ConfigError: naming the field, the value and what is allowed.
  """
  vpr_model.check_config(config)
  losses.check_config(config.loss)
  optim.check_config(config.optim)
  parallel.check_config(config)
  augment.check_config(config.data)
  gsv_cities.check_config(config.data)
  train_pipeline.decode_settings(config)
  init_weights.check_config(config)
  if config.data.eval_interpolation not in images.EVAL_INTERPOLATIONS:
    raise ConfigError(f'Unknown data.eval_interpolation {config.data.eval_interpolation!r}; '
                      f'valid choices: {", ".join(images.EVAL_INTERPOLATIONS)}.')
  if config.on_nonfinite not in ON_NONFINITE:
    raise ConfigError(f'Unknown on_nonfinite {config.on_nonfinite!r}; valid choices: '
                      f'{", ".join(ON_NONFINITE)}.')
  for name in ('num_epochs', 'log_every_steps', 'eval_every_epochs', 'keep_best'):
    if int(config[name]) < 1:
      raise ConfigError(f'{name} must be >= 1, got {config[name]}.')
  for name in ('max_steps', 'checkpoint_every_steps', 'visualize_queries'):
    if int(config[name]) < 0:
      raise ConfigError(f'{name} must be >= 0, got {config[name]}.')
  if int(config.data.eval_batch_size) < 1:
    raise ConfigError(f'data.eval_batch_size must be >= 1, got {config.data.eval_batch_size}.')
  workers.resolve_num_workers(config.data.num_workers)
  fraction = config.data.max_bad_image_fraction
  if not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
    raise ConfigError(f'data.max_bad_image_fraction must be in [0, 1], got {fraction!r}.')
  radius = config.data.positive_radius_m
  if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
    raise ConfigError(f'data.positive_radius_m must be a finite number of metres >= 0, got '
                      f'{radius!r}.')


def maybe_make_synthetic_data(config: ml_collections.ConfigDict, data_root: str) -> None:
  """Generates the synthetic dataset under <data root>/<data.synthetic.dir> once, if enabled.

  Data already there is reused only when it was generated with the same data.synthetic fields;
  other fields are refused (another run may be using that data), naming the differences.
  """
  if not roots.synthetic_enabled(config):
    return
  synth = config.data.synthetic
  out = roots.resolve_under(data_root, synth.dir)
  wanted = {'seed': int(synth.seed), 'num_train_places': int(synth.num_train_places),
            'images_per_place': int(synth.images_per_place),
            'num_eval_places': int(synth.num_eval_places),
            'image_size': [int(s) for s in synth.image_size]}
  summary_path = os.path.join(out, synthetic.SUMMARY_FILE)
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      found = json.load(f).get('params')
    if found is not None and found != wanted:
      differences = ', '.join(f'data.synthetic.{k}={wanted[k]!r} (on disk: {found.get(k)!r})'
                              for k in sorted(wanted) if found.get(k) != wanted[k])
      raise DatasetError(
          f'The synthetic data in {out} was generated with other settings: {differences}. Set '
          'data.synthetic.dir to another folder to generate a new set, or delete this one.')
  elif jax.process_index() == 0:
    logging.info('Writing the synthetic dataset to %s', out)
    synthetic.make_synthetic_dataset(
        out, seed=wanted['seed'], num_train_places=wanted['num_train_places'],
        images_per_place=wanted['images_per_place'], num_eval_places=wanted['num_eval_places'],
        image_size=tuple(wanted['image_size']))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('vpr_jax synthetic data')


def backbone_weights_path(config: ml_collections.ConfigDict, data_root: Optional[str]) -> str:
  """The file named by model.backbone_weights (absolute, or under the data root)."""
  path = os.path.expanduser(config.model.backbone_weights)
  if not os.path.isabs(path) and data_root is not None and not os.path.exists(path):
    path = os.path.join(data_root, path)
  if not os.path.isfile(path):
    raise ConfigError(f'model.backbone_weights={config.model.backbone_weights!r}: no file at '
                      f'{path} (relative paths are under data.root; weights are never '
                      'downloaded).')
  return path


def load_backbone_weights(config: ml_collections.ConfigDict, variables, data_root: str):
  """ImageNet weights from a torchvision file, or the random init with a warning."""
  if not config.model.backbone_weights:
    logging.warning('model.backbone_weights is empty: the backbone starts from a random '
                    'initialisation, not ImageNet weights.')
    return variables
  path = backbone_weights_path(config, data_root)
  if vpr_model.is_vit(config.model):
    logging.info('Loaded DINOv2 backbone weights from %s', path)
    return init_weights.load_vit_backbone(path, variables)
  backbone = converter.load_torchvision_backbone(path, config.model)
  logging.info('Loaded ImageNet backbone weights from %s', path)
  return mapping.with_backbone(jax.device_get(variables), backbone)


def iterator_state_for_process(state, process_index: int, process_count: int):
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


@dataclasses.dataclass
class Run:
  """A training run: what `setup_run` built, and what the loop changes as it goes.

  Attributes:
    config: the full ConfigDict.
    workdir: absolute run folder (config.json, metrics.jsonl, tb/, checkpoints/, predictions/).
    is_main: process 0 (writes files and prints).
    index: the training places (`gsv_cities.PlaceIndex`).
    sizes: global and per-device batch sizes (`parallel.BatchSizes`).
    steps_per_epoch: optimiser steps per epoch.
    num_steps: steps of config.num_epochs epochs.
    last_step: where this run stops (num_steps, or config.max_steps when smaller).
    programs: model, optimiser and compiled step (`programs.Programs`).
    evaluator: the validation sets and how they are evaluated.
    train_iter: the grain iterator of training batches (its state is checkpointed).
    checkpointer: best-N and latest checkpoints of the run.
    state: the train state on the devices (replicated under pmap).
    train_rng: the run's base PRNG key (the step folds its index in).
    step: optimiser steps done.
    start_step: the step this process started (or resumed) at.
    iterator_state: the data iterator's state after the last batch fed to a step.
    best_r1, best_step: the best validation R@1 so far and its step.
    last_val: {dataset: {N: recall}} of the latest validation.
    last_eval_results: {dataset: EvalResult} of the latest validation of this process.
    notes: lines to print at start (resumption, changed settings).
    resumed: whether the run restored a checkpoint of the workdir.
  """
  config: ml_collections.ConfigDict
  workdir: str
  is_main: bool
  index: Any
  sizes: parallel.BatchSizes
  steps_per_epoch: int
  num_steps: int
  last_step: int
  programs: programs_lib.Programs
  evaluator: benchmark_eval.Evaluator
  train_iter: Any
  checkpointer: orbax_states.TrainCheckpointer
  state: Any
  train_rng: jax.Array
  step: int
  start_step: int
  iterator_state: Any = None
  best_r1: Optional[float] = None
  best_step: Optional[int] = None
  last_val: dict = dataclasses.field(default_factory=dict)
  last_eval_results: dict = dataclasses.field(default_factory=dict)
  notes: list = dataclasses.field(default_factory=list)
  resumed: bool = False

  def host_state(self) -> state_lib.TrainState:
    """One host (numpy) copy of the train state."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)),
                        self.programs.dp.to_host(self.state))

  def eval_variables(self) -> dict:
    """{'params', 'batch_stats'} of the current state, one copy, for evaluation."""
    return self.programs.dp.unreplicate({'params': self.state.params,
                                         'batch_stats': self.state.batch_stats})

  def close(self) -> None:
    """Stops the data workers and waits for pending checkpoint writes."""
    self.train_iter.close()
    self.checkpointer.close()


def load_training_places(config: ml_collections.ConfigDict, data_root: str):
  """(place index, prepared source or None): the training places as configured."""
  if config.data.prepared_dir:
    # Images resized once and re-encoded into a TFDS dataset (`python -m vpr_jax.prepare`):
    # same places and order.
    return training_set.open_training_set(
        roots.resolve_under(data_root, config.data.prepared_dir), config)
  index = gsv_cities.build_place_index(
      roots.resolve_under(data_root, config.data.train_dir), config.data.train_layout,
      tuple(config.data.cities), int(config.data.min_img_per_place),
      cache_dir=config.data.cache_dir, rebuild=bool(config.data.rebuild_index))
  # K images are drawn per place: refused here, in a second, rather than when batching starts.
  gsv_cities.check_images_per_place(index, int(config.data.images_per_place))
  return index, None


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Builds a run from its config; resumes from `workdir` when it holds a checkpoint.

  Args:
    config: the full ConfigDict (configs/default.py documents every field).
    workdir: the run folder.

  Returns:
    The `Run`, at its start step, with config.json written into the workdir.
  """
  check_config(config)
  workdir = os.path.abspath(os.fspath(workdir))
  process_index, process_count = jax.process_index(), jax.process_count()

  # Data locations, checked before anything heavy happens.
  data_root = roots.config_data_root(config)
  maybe_make_synthetic_data(config, data_root)
  # The validation sets are read (and their lists checked) before the heavy work.
  val_sets = catalog.load_benchmarks(
      tuple(config.data.val_datasets), data_root, float(config.data.positive_radius_m),
      ground_truth_dir=config.data.get('ground_truth_dir', ''),
      prepared=tuple(config.data.get('prepared_benchmarks', ())),
      print_fn=lambda line: logging.info('%s', line))
  if config.model.backbone_weights:
    backbone_weights_path(config, data_root)
  # A checkpoint of another configuration is refused before the data is read.
  checkpoint_dir = os.path.join(workdir, runs.CHECKPOINTS_SUBDIR)
  run_config.check_resumable(checkpoint_dir, config)

  sizes = parallel.batch_sizes(int(config.data.places_per_batch),
                               int(config.data.images_per_place))
  index, prepared_source = load_training_places(config, data_root)
  steps_per_epoch = train_pipeline.steps_per_epoch(index, config, process_count)
  num_steps = int(config.num_epochs) * steps_per_epoch
  last_step = min(num_steps, int(config.max_steps)) if config.max_steps else num_steps

  programs = programs_lib.get_programs(config, steps_per_epoch)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  variables = load_backbone_weights(config, programs.init(init_rng), data_root)
  if config.init_from:
    variables = init_weights.load_init_from(config, variables)
  host_state = jax.device_get(state_lib.create_train_state(
      config, programs.model, init_rng, tx=programs.tx, variables=variables))
  train_iter = train_pipeline.make_train_iterator(
      index, config, seed=int(config.seed), process_index=process_index,
      process_count=process_count, prepared=prepared_source)
  evaluator = benchmark_eval.Evaluator(
      programs.eval_model, val_sets, vpr_model.eval_image_size(config),
      int(config.data.eval_batch_size),
      num_workers=workers.resolve_num_workers(config.data.num_workers),
      interpolation=str(config.data.eval_interpolation))

  # Every input has been read and checked: a run that fails before here leaves no workdir behind.
  os.makedirs(workdir, exist_ok=True)
  checkpointer = orbax_states.TrainCheckpointer(checkpoint_dir, config)
  if process_index == 0:
    run_config.write_config(workdir, config)
  run = Run(config=config, workdir=workdir, is_main=process_index == 0, index=index,
            sizes=sizes, steps_per_epoch=steps_per_epoch, num_steps=num_steps,
            last_step=last_step, programs=programs, evaluator=evaluator, train_iter=train_iter,
            checkpointer=checkpointer, state=None, train_rng=train_rng, step=0, start_step=0)
  restored_step = checkpointer.latest_step()
  if restored_step is not None:
    host_state = _restore(run, host_state, restored_step, process_index, process_count)
  elif config.model.netvlad_init == 'kmeans':
    kmeans = init_weights.kmeans_netvlad(
        config, {'params': host_state.params, 'batch_stats': host_state.batch_stats}, index,
        prepared_source)
    host_state = host_state.replace(params=kmeans['params'])
  run.state = programs.dp.replicate(host_state)
  run.iterator_state = train_iter.get_state()
  return run


def _restore(run: Run, host_state, step: int, process_index: int, process_count: int):
  """Restores the run's state, RNG, data iterator and best R@1 from checkpoint `step`."""
  target_vars, target_train = state_lib.checkpoint_items(host_state, run.train_rng)
  restored = run.checkpointer.restore(target_vars, target_train, step=step)
  host_state, run.train_rng = state_lib.restore_checkpoint_items(
      host_state, restored['variables'], restored['train'])
  if restored['data_iterator_state'] is not None:
    run.train_iter.set_state(iterator_state_for_process(restored['data_iterator_state'],
                                                        process_index, process_count))
  run.step = run.start_step = int(restored['train']['step'])
  run.resumed = True
  best_step = run.checkpointer.best_step()
  if best_step is not None:
    run.best_r1 = run.checkpointer.best.metrics(best_step)['r1']
    run.best_step = best_step
  run.last_val = dict(restored['info'].get('val', {}))
  run.notes.append(f'Resumed from {run.checkpointer.directory} at step {run.start_step}.')
  return host_state


def describe(run: Run) -> list[str]:
  """The tables printed at the start of a run: data, batch sizes, parameters, schedule."""
  config = run.config
  return [
      gsv_cities.format_stats(run.index, run.sizes.places_global, run.sizes.images_per_place,
                              jax.process_count()),
      run.sizes.describe(),
      vpr_model.format_parameter_table(
          vpr_model.count_parameters(run.host_state().params, model_config=config.model),
          config.model),
      f'{run.steps_per_epoch} steps per epoch, {run.num_steps} steps in {config.num_epochs} '
      f'epochs; this run stops at step {run.last_step}. parallel={config.parallel} over '
      f'{run.programs.dp.num_devices} devices, compute dtype '
      f'{jnp.dtype(vpr_model.resolve_dtype(config.model.dtype)).name}.',
  ]
