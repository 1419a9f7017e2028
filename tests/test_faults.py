"""Faults during training: killed runs, non-finite steps, a full disk.

Runs are `python -m vpr_jax.train` subprocesses of the tiny synthetic run (tests/e2e.py) started
through tests/train_hooks.py, whose hooks pause a run at a chosen point so that it can be killed
there, or inject a NaN or a failing write. Related unit tests: test_checkpointing (interrupted and
failed saves, truncated checkpoints), test_training (a NaN step is not applied; 'skip' and 'stop'
in process; resuming in process). Here: killed runs resume exactly, a NaN stops the run with the
best and latest checkpoints intact, an infinite gradient behind a finite loss is caught, and a full
disk (simulated inside orbax, and real on a tiny tmpfs where one can be mounted) leaves the previous
checkpoints restorable and says so.
"""

import errno
import os
import random
import shutil
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vpr_jax.configs import default
from tests import e2e
from vpr_jax import errors
from vpr_jax.checkpoints import orbax_states
from vpr_jax.training import state as train_state
from vpr_jax.training import step as train_step_lib

# Picks the steps at which runs are killed; another seed exercises other steps.
SEED = int(os.environ.get('VPR_FAULTS_SEED', '0'))
CHECKPOINT_EVERY = 2  # e2e.tiny_overrides: checkpoint_every_steps
LAST_STEP = 6


def _completed_steps(workdir, sub='latest'):
  folder = os.path.join(workdir, 'checkpoints', sub)
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _unfinished(workdir, sub='latest'):
  folder = os.path.join(workdir, 'checkpoints', sub)
  return [name for name in os.listdir(folder) if 'orbax-checkpoint-tmp' in name]


def _kill(proc):
  proc.kill()  # SIGKILL: no handler, no cleanup
  proc.wait(timeout=60)
  assert proc.returncode == -9


def _resumed_from(output):
  for line in output.splitlines():
    if line.startswith('Resumed from '):
      return int(line.rstrip('.').rsplit(' ', 1)[1])
  return None


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = e2e.reference_run(tmp_path_factory)
  return workdir, e2e.train_records(workdir)


@pytest.mark.slow
def test_sigkill_at_a_step_and_during_a_checkpoint_write(reference, tmp_path, tmp_path_factory):
  reference_dir, expected = reference
  assert [r['step'] for r in expected] == list(range(1, LAST_STEP + 1))
  rng = random.Random(SEED)
  root = e2e.data_root(tmp_path_factory)
  workdir = str(tmp_path / 'run')
  markers = str(tmp_path / 'markers')
  overrides = e2e.tiny_overrides()

  # 1. Killed once step `kill_step` is done and logged, before it is checkpointed.
  kill_step = rng.randint(CHECKPOINT_EVERY + 1, LAST_STEP - 1)
  env = e2e.subprocess_env(tmp_path_factory, VPR_TEST_MARKER_DIR=markers,
                           VPR_TEST_PAUSE_AFTER_STEP=str(kill_step))
  proc = e2e.start_train(workdir, root, overrides, env, 'killed_at_step')
  e2e.wait_for_file(os.path.join(markers, f'paused_at_{kill_step}'), proc)
  _kill(proc)
  saved = (kill_step - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
  assert _completed_steps(workdir) == [saved]
  assert [r['step'] for r in e2e.train_records(workdir)] == list(range(1, kill_step + 1))

  # 2. The same command resumes from `saved`; killed while orbax writes checkpoint `save_step`.
  save_step = rng.choice(range(saved + CHECKPOINT_EVERY, LAST_STEP + 1, CHECKPOINT_EVERY))
  env = e2e.subprocess_env(tmp_path_factory, VPR_TEST_MARKER_DIR=markers,
                           VPR_TEST_BLOCK_IN_SAVE_STEP=str(save_step))
  proc = e2e.start_train(workdir, root, overrides, env, 'killed_in_save')
  e2e.wait_for_file(os.path.join(markers, f'saving_{save_step}'), proc)
  assert any(name.startswith(f'{save_step}.') for name in _unfinished(workdir)), os.listdir(
      os.path.join(workdir, 'checkpoints', 'latest'))
  _kill(proc)
  assert _resumed_from(e2e.output_of(proc)) == saved
  previous = save_step - CHECKPOINT_EVERY
  assert _completed_steps(workdir) == [previous]

  # 3. Rerun to the end: resumes from the last complete checkpoint and ends where the
  # uninterrupted run ended, step by step.
  status, output = e2e.run_train(workdir, root, overrides, e2e.subprocess_env(tmp_path_factory),
                                 'finished')
  assert status == 0, output[-4000:]
  assert _resumed_from(output) == previous
  e2e.assert_same_losses(e2e.train_records(workdir), expected)
  assert _completed_steps(workdir) == [LAST_STEP] and not _unfinished(workdir)
  _, got, _ = orbax_states.load_for_eval(workdir, step=LAST_STEP)
  _, want, _ = orbax_states.load_for_eval(reference_dir, step=LAST_STEP)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


@pytest.mark.slow
def test_nonfinite_step_stops_the_run_and_keeps_good_checkpoints(tmp_path, tmp_path_factory):
  root = e2e.data_root(tmp_path_factory)
  workdir = str(tmp_path / 'run')
  bad_step = 3
  # Validation before training gives a best checkpoint (step 0); step 2 is the latest.
  overrides = e2e.tiny_overrides(eval_before_training=True, visualize_queries=0)
  env = e2e.subprocess_env(tmp_path_factory, VPR_TEST_NONFINITE_AT_STEP=str(bad_step))
  status, output = e2e.run_train(workdir, root, overrides, env, 'nonfinite')
  assert status != 0
  last = e2e.final_error(output)
  assert 'NonFiniteError' in last and f'at step {bad_step} ' in last, output[-3000:]
  assert f'detected at step {bad_step})' in last
  assert _completed_steps(workdir, 'best') == [0]
  assert _completed_steps(workdir, 'latest') == [2]
  assert not _unfinished(workdir) and not _unfinished(workdir, 'best')
  records = e2e.train_records(workdir)
  assert [r['step'] for r in records] == [1, 2]
  # Both checkpoints restore, and hold finite values.
  for step in (0, 2):
    _, variables, restored = orbax_states.load_for_eval(workdir, step=step)
    assert restored == step
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
  assert orbax_states.load_for_eval(workdir)[2] == 0  # the best by R@1


@pytest.mark.slow
def test_disk_full_during_a_run_keeps_previous_checkpoints(reference, tmp_path, tmp_path_factory):
  root = e2e.data_root(tmp_path_factory)
  workdir = str(tmp_path / 'run')
  env = e2e.subprocess_env(tmp_path_factory, VPR_TEST_ENOSPC_AT_STEP='4')
  status, output = e2e.run_train(workdir, root, e2e.tiny_overrides(), env, 'disk_full')
  assert status != 0
  last = e2e.final_error(output)
  assert 'CheckpointWriteError' in output, output[-3000:]
  assert 'Could not save checkpoint step 4' in output and 'No space left on device' in output
  assert 'The previous checkpoints are intact (latest: steps [2]' in last, last
  assert 'Free some space, then rerun the same command' in last
  assert _completed_steps(workdir) == [2] and not _unfinished(workdir)

  # With space again, the same command resumes from step 2 and ends as the uninterrupted run.
  status, output = e2e.run_train(workdir, root, e2e.tiny_overrides(),
                                 e2e.subprocess_env(tmp_path_factory), 'after_disk_full')
  assert status == 0, output[-4000:]
  assert _resumed_from(output) == 2
  e2e.assert_same_losses(e2e.train_records(workdir), reference[1])


class _OneWeight(nn.Module):
  """descriptor = mean pixel x w, with w = 0 at the start."""

  @nn.compact
  def __call__(self, images, train):
    del train
    x = jnp.mean(images.astype(jnp.float32), axis=(1, 2, 3))[:, None]
    return {'descriptors': nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)(x)}


def test_infinite_gradient_with_finite_loss_is_caught():
  # d cbrt(d)/dd is infinite at d = 0: the loss is finite (0), its gradient is not.
  loss_fn = lambda descriptors, labels: (jnp.cbrt(descriptors[0, 0]), {})
  model = _OneWeight()
  images = np.full((4, 2, 2, 3), 7, np.uint8)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  config = default.get_config()
  state = train_state.create_train_state(config, model, None, tx=optax.sgd(0.1),
                                      variables={'params': variables['params']})
  step = jax.jit(lambda state, batch: train_step_lib.train_step(
      state, batch, jax.random.PRNGKey(0), model=model, loss_fn=loss_fn,
      schedule=lambda count: 0.1))
  new_state, metrics = step(state, {'images': images, 'labels': np.arange(4, dtype=np.int32)})
  assert float(metrics['loss']) == 0.0 and not np.isfinite(float(metrics['grad_norm']))
  assert float(metrics['finite']) == 0.0
  jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
  assert int(new_state.nonfinite_count) == 1 and int(new_state.first_nonfinite_step) == 0


# ------------------------------------------------------------------------------------------------
# A full disk, in process: the checkpointer's own guarantees.


def _variables(value):
  return {'params': {'w': np.full((64, 64), value, np.float32)},
          'batch_stats': {'mean': np.full((8,), value, np.float32)}}


def _train_item(step):
  return {'step': np.int32(step), 'opt_state': {'mu': np.full((64, 64), step, np.float32)}}


def _check_previous_steps_restore(directory, config, steps):
  checkpointer = orbax_states.TrainCheckpointer(directory, config)
  assert sorted(checkpointer.latest.all_steps()) == [steps['latest']]
  for step in (steps['latest'], steps['best']):
    restored = checkpointer.restore(_variables(0.0), _train_item(0), step=step)
    np.testing.assert_array_equal(restored['variables']['params']['w'],
                                  _variables(float(step))['params']['w'])
    assert int(restored['train']['step']) == step
  checkpointer.close()


# orbax leaves a callback for its closed event loop behind after a failed item write.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_enospc_inside_orbax_names_the_intact_checkpoints(tmp_path, monkeypatch):
  config = default.get_config()
  directory = str(tmp_path / 'checkpoints')
  checkpointer = orbax_states.TrainCheckpointer(directory, config)
  checkpointer.save(1, variables=_variables(1.0), train=_train_item(1), r1=50.0)
  checkpointer.save(2, variables=_variables(2.0), train=_train_item(2))
  real_save = orbax_states.ocp.StandardCheckpointHandler.async_save

  async def full_disk(self, directory, *args, **kwargs):
    if 'train' in os.path.basename(str(directory)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await real_save(self, directory, *args, **kwargs)

  monkeypatch.setattr(orbax_states.ocp.StandardCheckpointHandler, 'async_save', full_disk)
  with pytest.raises(errors.CheckpointWriteError) as error:
    checkpointer.save(3, variables=_variables(3.0), train=_train_item(3), r1=60.0)
  monkeypatch.undo()
  message = str(error.value)
  assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
  assert 'Could not save checkpoint step 3' in message and '(no space left on device)' in message
  assert 'previous checkpoints are intact (latest: steps [2], best: steps [1])' in message
  assert not _unfinished(str(tmp_path)) and not _unfinished(str(tmp_path), 'best')
  checkpointer.close()
  _check_previous_steps_restore(directory, config, {'latest': 2, 'best': 1})


@pytest.fixture
def tiny_filesystem(tmp_path):
  """A 1 MiB tmpfs (needs root and CAP_SYS_ADMIN; skipped where it cannot be mounted)."""
  mount_point = tmp_path / 'tmpfs'
  mount_point.mkdir()
  if shutil.which('mount') is None:
    pytest.skip('no mount command')
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount_point)],
                          capture_output=True, text=True, check=False)
  if result.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
  try:
    yield mount_point
  finally:
    subprocess.run(['umount', str(mount_point)], capture_output=True, check=False)


def test_real_full_disk_keeps_previous_checkpoints(tiny_filesystem):
  config = default.get_config()
  directory = str(tiny_filesystem / 'checkpoints')
  checkpointer = orbax_states.TrainCheckpointer(directory, config)
  checkpointer.save(1, variables=_variables(1.0), train=_train_item(1), r1=50.0)
  checkpointer.save(2, variables=_variables(2.0), train=_train_item(2))
  stats = os.statvfs(tiny_filesystem)
  with open(tiny_filesystem / 'filler', 'wb') as f:
    f.write(b'\0' * (stats.f_bavail * stats.f_frsize - 8192))
  # Random values: zstd cannot squeeze them into the few kilobytes left.
  noisy = {'params': {'w': np.random.default_rng(0).random((64, 64), np.float32)},
           'batch_stats': {'mean': np.zeros((8,), np.float32)}}
  with pytest.raises(errors.CheckpointWriteError,
                     match=r'step 3 .*\(no space left on device\)(.|\n)*previous checkpoints are '
                     r'intact \(latest: steps \[2\], best: steps \[1\]\)') as error:
    checkpointer.save(3, variables=noisy, train=_train_item(3))
  assert error.value.errno == errno.ENOSPC
  assert len(str(error.value)) < 2000  # tensorstore's spec dump is cut
  checkpointer.close()
  os.remove(tiny_filesystem / 'filler')
  assert not _unfinished(str(tiny_filesystem))
  _check_previous_steps_restore(directory, config, {'latest': 2, 'best': 1})
