"""Training across several processes: two JAX processes on localhost behave as one host.

scripts/launch_multihost_local.py starts two `vpr_jax.train` processes (through
tests/train_hooks.py, which records every step) with 2 CPU devices each, coordinated by
`jax.distributed` on 127.0.0.1 (CPU collectives over gloo). They train the tiny synthetic run
(tests/e2e.py) for 2 steps, then the same command resumes them for a third. Each process records,
after every step, a SHA-1 of the parameters on each of its devices and the labels of the batch it
fed. Single-process runs on 4 devices give the numbers to match: the fault tests' reference run
from scratch (steps 1-2), and a run resumed from the two processes' checkpoint of step 2 (step 3).
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import e2e
from vpr_jax.checkpoints import orbax_states

PLACES, IMAGES_PER_PLACE = 8, 2  # e2e.tiny_overrides


def _launch_two_processes(workdir, root, overrides, env, log_dir):
  command = [sys.executable, os.path.join('scripts', 'launch_multihost_local.py'),
             '--num_processes=2', '--devices_per_process=2', f'--log_dir={log_dir}',
             '--timeout=200', '--'] + e2e.train_command(workdir, root, overrides)
  return subprocess.run(command, cwd=e2e.REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=240, check=False)


def _wait(proc, timeout=200):
  e2e.wait_or_kill(proc, timeout)
  assert proc.returncode == 0, e2e.output_of(proc)[-4000:]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The two-process run (2 steps, then resumed for a 3rd) and its single-process counterparts.

  Runs that do not depend on each other run at the same time.
  """
  root = e2e.data_root(tmp_path_factory)
  # Steps 1-2 of one process from scratch: the fault tests' reference run (shared per session).
  reference = e2e.reference_run(tmp_path_factory)
  base = tmp_path_factory.mktemp('multihost')
  workdir, records = str(base / 'run'), str(base / 'records')
  multi_env = e2e.subprocess_env(tmp_path_factory, devices=None, VPR_TEST_RECORD_DIR=records)
  first = _launch_two_processes(workdir, root, e2e.tiny_overrides(max_steps=2), multi_env,
                                base / 'logs_first')
  assert first.returncode == 0, first.stdout[-6000:]

  # Step 3, from the two processes' checkpoint of step 2: by them, and by one process.
  three_steps = e2e.tiny_overrides(max_steps=3)
  resumed_dir = str(base / 'resumed' / 'run')
  shutil.copytree(workdir, resumed_dir)
  resumed = e2e.start_train(
      resumed_dir, root, three_steps,
      e2e.subprocess_env(tmp_path_factory, VPR_TEST_RECORD_DIR=str(base / 'resumed_records')),
      'resumed')
  second = _launch_two_processes(workdir, root, three_steps, multi_env, base / 'logs_second')
  _wait(resumed)
  assert second.returncode == 0, second.stdout[-6000:]
  return dict(workdir=workdir, output=first.stdout + second.stdout,
              resumed_output=e2e.output_of(resumed),
              processes=[e2e.read_records(records, p) for p in (0, 1)],
              single=e2e.read_records(reference + '_records')[:2] +
              e2e.read_records(str(base / 'resumed_records')))


@pytest.mark.slow
def test_processes_hold_identical_parameters_after_every_step(runs):
  first, second = runs['processes']
  assert [r['step'] for r in first] == [r['step'] for r in second] == [1, 2, 3]
  for a, b in zip(first, second):
    # Two local devices each, four copies of the parameters in all: bit for bit the same.
    assert len(a['param_sha1']) == len(b['param_sha1']) == 2
    assert not set(a['param_sha1']) & set(b['param_sha1'])
    assert len(set(a['param_sha1'].values()) | set(b['param_sha1'].values())) == 1, (a, b)
    assert a['loss'] == b['loss']
  for process in (0, 1):
    assert f'process {process} of 2, 2 local / 4 global devices' in runs['output']
  assert '[0] Resumed from' in runs['output'] and 'at step 2.' in runs['output']


@pytest.mark.slow
def test_processes_read_disjoint_halves_of_the_global_batch(runs):
  first, second = runs['processes']
  assert [r['step'] for r in runs['single']] == [1, 2, 3]
  for a, b, single in zip(first, second, runs['single']):
    places_a, places_b = np.unique(a['labels']), np.unique(b['labels'])
    assert len(a['labels']) == len(b['labels']) == PLACES // 2 * IMAGES_PER_PLACE
    assert len(places_a) == len(places_b) == PLACES // 2
    assert not set(places_a) & set(places_b)
    # Process 0 holds the first half of the global batch, process 1 the second.
    assert a['labels'] + b['labels'] == single['labels']


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(runs):
  first, _ = runs['processes']
  single = runs['single']
  # The single-process step 3 starts from the two processes' checkpoint of step 2.
  assert 'Resumed from' in runs['resumed_output'] and 'at step 2.' in runs['resumed_output']
  losses = np.array([r['loss'] for r in first])
  np.testing.assert_allclose(losses, [r['loss'] for r in single], rtol=1e-5, atol=0)
  assert len(set(losses)) == 3  # the parameters did move
  for a, b in zip(first, single):
    # Gradients of BatchNorm biases are sums of nearly cancelling terms (the global batch's
    # BatchNorm backward centres them), and gloo adds partial sums in another order than the
    # in-process all-reduce: those small leaves agree to ~1e-6 absolute, not relative.
    np.testing.assert_allclose(a['param_norms'], b['param_norms'], rtol=1e-5, atol=2e-5)

  # One metrics file and one checkpoint, written by process 0, readable as any other.
  workdir = runs['workdir']
  records = e2e.train_records(workdir)
  assert [r['step'] for r in records] == [1, 2, 3]
  np.testing.assert_allclose([r['loss'] for r in records], losses, rtol=1e-6)
  config, variables, step = orbax_states.load_for_eval(workdir)
  assert step == 3 and tuple(config.image_size) == (32, 32)
  sums = [float(np.sum(x, dtype=np.float64)) for x in jax.tree.leaves(variables['params'])]
  np.testing.assert_allclose(sums, first[-1]['param_sums'], rtol=1e-7, atol=1e-7)
