r"""`python -m vpr_jax.train` with fault and recording hooks, for the end-to-end tests.

  python -m tests.train_hooks --config configs/demo.py --workdir DIR [--config.x=y ...]

takes exactly the flags of `vpr_jax.train`. Hooks are chosen by environment variables:

  VPR_TEST_MARKER_DIR          folder where the hooks below announce that they were reached.
  VPR_TEST_PAUSE_AFTER_STEP=k  once the training record of step k is in metrics.jsonl (before
                               that step is checkpointed): create <marker dir>/paused_at_<k>
                               and sleep, for the test to kill the process there.
  VPR_TEST_BLOCK_IN_SAVE_STEP=k  inside the checkpoint write of step k, after orbax created its
                               temporary folder: create <marker dir>/saving_<k> and sleep.
  VPR_TEST_NONFINITE_AT_STEP=k  step k (1-based) starts from parameters with a NaN in them, so
                               its loss and gradients are NaN (what a diverging run produces).
  VPR_TEST_ENOSPC_AT_STEP=k    writing the checkpoint of step k fails inside orbax with
                               OSError(ENOSPC), as on a full disk.
  VPR_TEST_SLOW_STEP_S=x       every step first sleeps x seconds (so that a test can signal a
                               run in the middle of its steps).
  VPR_TEST_RECORD_DIR=DIR      after every step, append to DIR/process_<i>.jsonl: the step, the
                               loss, a SHA-1 of the parameters held by each local device, the
                               float64 sum and L2 norm of every parameter leaf, and the labels
                               of the batch this process fed.
"""

import contextlib
import errno
import hashlib
import json
import os
import time

import jax
import numpy as np

from vpr_jax.checkpoints import orbax_states
from vpr_jax.cli import common
from vpr_jax.cli import train
from vpr_jax.training import hooks


_SLEEP_SECONDS = 600


def _env_int(name):
  value = os.environ.get(name, '')
  return int(value) if value else None


def _announce(name):
  marker_dir = os.environ['VPR_TEST_MARKER_DIR']
  os.makedirs(marker_dir, exist_ok=True)
  with open(os.path.join(marker_dir, name), 'w') as f:
    f.write(str(os.getpid()))


class _PauseAfterStep(hooks.Hook):
  """Once the training record of `step` is in metrics.jsonl (before that step is checkpointed)."""

  def __init__(self, step):
    self.step = step

  def on_train_record(self, run, record):
    if record.get('step') == self.step:
      _announce(f'paused_at_{self.step}')
      time.sleep(_SLEEP_SECONDS)


_saving = {'step': None}  # the step being checkpointed, None outside a save


class _TrackSavedStep(hooks.Hook):

  @contextlib.contextmanager
  def on_save(self, run, step):
    _saving['step'] = step
    try:
      yield
    finally:
      _saving['step'] = None


def _install_block_in_save(step):
  real_json_save = orbax_states.ocp.JsonCheckpointHandler.async_save

  async def json_save(self, directory, *args, **kwargs):
    if _saving['step'] == step:
      _announce(f'saving_{step}')
      time.sleep(_SLEEP_SECONDS)  # blocks the whole save, as a stalled write would
    return await real_json_save(self, directory, *args, **kwargs)

  orbax_states.ocp.JsonCheckpointHandler.async_save = json_save


def _install_enospc_at_step(step):
  real_array_save = orbax_states.ocp.StandardCheckpointHandler.async_save

  async def array_save(self, directory, *args, **kwargs):
    if _saving['step'] == step:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await real_array_save(self, directory, *args, **kwargs)

  orbax_states.ocp.StandardCheckpointHandler.async_save = array_save


class _WrapStep(hooks.Hook):
  """Replaces the compiled step of the run by wrap(step)."""

  def __init__(self, wrap):
    self.wrap = wrap

  def wrap_train_step(self, step_fn):
    return self.wrap(step_fn)


def _nonfinite_at_step(step):

  def wrap(real_step):
    # A NaN in the first parameter leaf (not a scalar): the forward pass spreads it to the loss.

    def train_step(state, batch, rng):
      if int(np.asarray(state.step.addressable_shards[0].data)) == step - 1:
        poison = lambda x: x * np.float32('nan') if x.ndim else x
        leaves, tree = jax.tree.flatten(state.params)
        state = state.replace(params=jax.tree.unflatten(tree, [poison(leaves[0])] + leaves[1:]))
      return real_step(state, batch, rng)

    return train_step

  return _WrapStep(wrap)


def _local_rows(array):
  """This process's rows of a global batch array, in order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicated copies of a row block appear once
      seen.add(start)
      rows.append(np.asarray(shard.data).reshape((-1,) + array.shape[1:]))
  return np.concatenate(rows)


def _recorder(record_dir):
  os.makedirs(record_dir, exist_ok=True)

  def record(state, metrics, batch):
    digests = {}
    for leaf in jax.tree.leaves(state.params):
      for shard in leaf.addressable_shards:
        digests.setdefault(shard.device.id, hashlib.sha1()).update(
            np.ascontiguousarray(np.asarray(shard.data)).tobytes())
    leaves = [np.asarray(leaf.addressable_shards[0].data, np.float64)
              for leaf in jax.tree.leaves(state.params)]
    entry = {
        'process': jax.process_index(),
        'step': int(np.asarray(state.step.addressable_shards[0].data)),
        'loss': float(np.asarray(metrics['loss'].addressable_shards[0].data)),
        'param_sha1': {str(device): d.hexdigest() for device, d in sorted(digests.items())},
        'param_sums': [float(np.sum(x)) for x in leaves],
        'param_norms': [float(np.linalg.norm(x)) for x in leaves],
        'labels': _local_rows(batch['labels']).reshape(-1).tolist(),
    }
    # jax.process_index() is only valid once vpr_jax.train has joined the other processes.
    path = os.path.join(record_dir, f'process_{jax.process_index()}.jsonl')
    with open(path, 'a') as f:
      f.write(json.dumps(entry) + '\n')

  def wrap(real_step):

    def train_step(state, batch, rng):
      state, metrics = real_step(state, batch, rng)
      record(state, metrics, batch)
      return state, metrics

    return train_step

  return _WrapStep(wrap)


def _slow_steps(seconds):

  def wrap(real_step):

    def train_step(state, batch, rng):
      time.sleep(seconds)
      return real_step(state, batch, rng)

    return train_step

  return _WrapStep(wrap)


def install_hooks():
  """The hooks named by the environment (see the module docstring); patches orbax for faults."""
  installed = [_TrackSavedStep()]
  pause = _env_int('VPR_TEST_PAUSE_AFTER_STEP')
  if pause is not None:
    installed.append(_PauseAfterStep(pause))
  block = _env_int('VPR_TEST_BLOCK_IN_SAVE_STEP')
  if block is not None:
    _install_block_in_save(block)
  nonfinite = _env_int('VPR_TEST_NONFINITE_AT_STEP')
  if nonfinite is not None:
    installed.append(_nonfinite_at_step(nonfinite))
  enospc = _env_int('VPR_TEST_ENOSPC_AT_STEP')
  if enospc is not None:
    _install_enospc_at_step(enospc)
  if os.environ.get('VPR_TEST_SLOW_STEP_S'):
    installed.append(_slow_steps(float(os.environ['VPR_TEST_SLOW_STEP_S'])))
  if os.environ.get('VPR_TEST_RECORD_DIR'):
    installed.append(_recorder(os.environ['VPR_TEST_RECORD_DIR']))
  return installed


def main(argv):
  train.main(argv, hooks=install_hooks())


if __name__ == '__main__':
  common.run(main)
