"""What a configuration compiles: model, optimiser, loss and the jitted (or pmapped) step.

Kept per configuration, so that later runs in the same process (resumed runs, studies, tests,
benchmarks) reuse the compiled step instead of compiling it again.
"""

import dataclasses
import functools
import json
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import optax

from vpr_jax import losses
from vpr_jax import optim
from vpr_jax import parallel
from vpr_jax.checkpoints import run_config
from vpr_jax.data.augmentation import device_augment
from vpr_jax.models import vpr_model
from vpr_jax.training import step

@dataclasses.dataclass
class Programs:
  """What a run compiles: kept per configuration so that later runs in the same process (resumed
  runs, studies, tests) reuse the compiled step, initialisation and evaluation."""
  dp: parallel.DataParallel
  model: Any
  eval_model: Any
  tx: optax.GradientTransformation
  schedule: Callable
  init: Callable
  train_step: Callable


_PROGRAMS: dict[str, Programs] = {}


_MAX_PROGRAMS = 4


# Config fields that shape the compiled programs.
_PROGRAM_FIELDS = ('model', 'image_size', 'eval_image_size', 'loss', 'optim', 'num_epochs', 'parallel',
                   'sync_batch_norm',
                   'data.augment', 'data.randaugment_num_ops', 'data.randaugment_magnitude',
                   'data.randaugment_num_magnitude_bins')


def clear_program_cache() -> None:
  """Forgets the compiled programs of earlier runs (e.g. after patching the loss)."""
  _PROGRAMS.clear()


def get_programs(config: ml_collections.ConfigDict, steps_per_epoch: int,
                 devices: Optional[Sequence[jax.Device]] = None) -> Programs:
  """Model, optimiser and compiled functions of a configuration (cached per process).

  Args:
    config: the full ConfigDict.
    steps_per_epoch: optimiser steps per epoch (the schedule's milestones are in epochs).
    devices: the devices of data parallelism; default all (benchmarks of scaling pass fewer).

  Returns:
    The `Programs` of the configuration.
  """
  flat = json.loads(run_config.config_to_json(config))
  selected = {}
  for field in _PROGRAM_FIELDS:
    value = flat
    # A field that an older config lacks (e.g. eval_image_size) counts as None.
    for part in field.split('.'):
      value = value.get(part) if isinstance(value, dict) else None
    selected[field] = value
  key = json.dumps({'fields': selected, 'steps_per_epoch': steps_per_epoch,
                    'devices': [d.id for d in (devices or jax.devices())]}, sort_keys=True)
  if key in _PROGRAMS:
    return _PROGRAMS[key]

  dp = parallel.DataParallel(config.parallel, devices)
  sync = bool(config.get('sync_batch_norm', True))
  # Per-device BatchNorm statistics: under jit the batch is split into one group per device
  # (its shard); under pmap each device already sees only its own images.
  groups = dp.num_devices if (not sync and dp.mode == 'jit') else 1
  model = vpr_model.build_model(config, bn_axis_name=dp.axis_name, bn_sync=sync,
                                bn_groups=groups)
  image_size = tuple(int(s) for s in config.image_size)
  init = jax.jit(lambda rng: vpr_model.init_variables(model, rng, image_size))
  abstract_params = jax.eval_shape(init, jax.random.PRNGKey(0))['params']
  frozen_mask = vpr_model.model_frozen_param_mask(abstract_params, config.model)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch, frozen_mask)
  loss_fn = losses.make_loss(config.loss.name, config.loss.params, config.loss.miner_name,
                             config.loss.miner_params)
  augment_fn = (device_augment.make_augment_fn(config) if config.data.augment == 'device'
                else None)
  train_step = dp.compile_step(functools.partial(
      step.train_step, model=model, loss_fn=loss_fn, schedule=schedule, axis_name=dp.axis_name,
      augment_fn=augment_fn))
  programs = Programs(dp=dp, model=model, eval_model=vpr_model.build_model(
                           config, image_size=vpr_model.eval_image_size(config)), tx=tx,
                       schedule=schedule, init=init, train_step=train_step)
  while len(_PROGRAMS) >= _MAX_PROGRAMS:
    _PROGRAMS.pop(next(iter(_PROGRAMS)))
  _PROGRAMS[key] = programs
  return programs
