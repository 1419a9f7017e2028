"""Shared pieces of the end-to-end tests: a tiny synthetic run, and `vpr_jax.train` subprocesses.

The tiny run is the demo config (configs/demo.py) on 48 synthetic places with 32x32 images, a
ResNet-18 cut after layer2, a one-block MixVPR, P=8 x K=2, SGD with momentum and float32: 6 steps
per epoch.
Subprocesses share a JAX compilation cache in the pytest session's temporary folder, so the train
step is compiled once per session however many runs start and stop.
"""

import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from vpr_jax.configs import demo

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Devices of a single-process run: the same number as the two-process run has in all, so that the
# multi-host test can compare with the reference run of the fault tests.
DEVICES = 4
STEPS_PER_EPOCH = 6
RUN_TIMEOUT_S = 240
# Cheaper CPU code generation: compiling dominates these tiny runs.
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def tiny_overrides(**changes: Any) -> dict[str, Any]:
  """Config overrides (dotted field -> value) of the tiny run, with `changes` (use '__' for '.')."""
  overrides = {
      'data.synthetic.enabled': True,
      'data.synthetic.num_train_places': 48,
      'data.synthetic.num_eval_places': 4,
      'data.synthetic.image_size': (32, 32),
      'data.places_per_batch': 8,
      'data.images_per_place': 2,
      'data.min_img_per_place': 2,
      'data.eval_batch_size': 8,
      'image_size': (32, 32),
      'model.mixvpr_out_channels': 16,
      'model.mixvpr_mix_depth': 1,
      'model.mixvpr_out_rows': 2,
      'model.dtype': 'float32',
      # SGD: parameters move by lr x gradient, so runs that differ only in rounding (another
      # device layout) stay close; Adam's first steps are lr x sign(gradient), whose sign flips
      # for gradients near zero.
      'optim.optimizer': 'sgd',
      'optim.learning_rate': 0.05,
      'optim.warmup_steps': 2,
      'num_epochs': 100,
      'max_steps': 6,
      'checkpoint_every_steps': 2,
      'log_every_steps': 1,
      'eval_before_training': False,
      'eval_every_epochs': 100,
  }
  overrides.update({key.replace('__', '.'): value for key, value in changes.items()})
  return overrides


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def config_flags(overrides: Mapping[str, Any]) -> list[str]:
  """`--config.<field>=<value>` flags of vpr_jax.train for the overrides."""
  return [f'--config.{key}={_flag_value(value)}' for key, value in overrides.items()]


def make_config(overrides: Mapping[str, Any]):
  """The demo config with the overrides applied (what vpr_jax.train builds from the flags)."""
  config = demo.get_config()
  for key, value in overrides.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def prepare_data(data_root: str, overrides: Mapping[str, Any]) -> None:
  """Writes the synthetic dataset the tiny run trains on (as the run would on first use)."""
  from vpr_jax.training import setup
  config = make_config(overrides)
  config.data.root = data_root
  setup.maybe_make_synthetic_data(config, data_root)  # pylint: disable=protected-access


def session_dir(tmp_path_factory, name: str) -> str:
  """A folder shared by all test modules of this pytest session."""
  path = os.path.join(str(tmp_path_factory.getbasetemp()), name)
  os.makedirs(path, exist_ok=True)
  return path


def subprocess_env(tmp_path_factory, devices: Optional[int] = DEVICES, **extra: str) -> dict:
  """Environment of a training subprocess: CPU devices, the session's compilation cache."""
  env = dict(os.environ)
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
               'VPR_DATA_ROOT'):
    env.pop(name, None)
  env.update(
      JAX_PLATFORMS='cpu',
      JAX_COMPILATION_CACHE_DIR=session_dir(tmp_path_factory, 'jax_compilation_cache'),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      VPR_RUNS_DIR=session_dir(tmp_path_factory, 'runs'),
      PYTHONPATH=REPO_ROOT + os.pathsep + env.get('PYTHONPATH', ''),
      PYTHONUNBUFFERED='1',
  )
  # devices=None: the launcher of a multi-process run sets each process's device count.
  env['XLA_FLAGS'] = FAST_COMPILE_FLAGS if devices is None else (
      f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}')
  env.update(extra)
  return env


def train_command(workdir: str, data_root: str, overrides: Mapping[str, Any],
                  module: str = 'tests.train_hooks') -> list[str]:
  """The command line of a training run (`tests.train_hooks` takes vpr_jax.train's flags)."""
  return [sys.executable, '-m', module, '--config=configs/demo.py', f'--workdir={workdir}',
          f'--data_root={data_root}'] + config_flags(overrides)


def start_train(workdir: str, data_root: str, overrides: Mapping[str, Any], env: dict,
                log_name: str, module: str = 'tests.train_hooks') -> subprocess.Popen:
  """Starts a training run; its output goes to <workdir>/../<log_name>.log."""
  log_path = os.path.join(os.path.dirname(workdir), f'{log_name}.log')
  log = open(log_path, 'w')
  proc = subprocess.Popen(train_command(workdir, data_root, overrides, module), cwd=REPO_ROOT,
                          env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log_path = log_path
  log.close()
  return proc


def output_of(proc: subprocess.Popen) -> str:
  with open(proc.log_path) as f:
    return f.read()


def run_train(workdir: str, data_root: str, overrides: Mapping[str, Any], env: dict,
              log_name: str, module: str = 'tests.train_hooks',
              timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
  """Runs a training run to its end; returns (exit status, output)."""
  proc = start_train(workdir, data_root, overrides, env, log_name, module)
  wait_or_kill(proc, timeout)
  return proc.returncode, output_of(proc)


def wait_or_kill(proc, timeout: float) -> None:
  """Waits for a process; kills it if it is still running after `timeout` (then raises)."""
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def wait_for_file(path: str, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> None:
  """Waits until `path` exists; fails with the run's output if the run ends first."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f'The run ended (status {proc.returncode}) before {path} appeared:\n'
                           + output_of(proc)[-4000:])
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f'{path} did not appear within {timeout} s:\n' +
                           output_of(proc)[-4000:])
    time.sleep(0.05)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_records(workdir: str) -> list[dict]:
  return [r for r in read_metrics(workdir) if 'loss' in r]


def read_records(record_dir: str, process: int = 0) -> list[dict]:
  """What tests.train_hooks recorded after each step (VPR_TEST_RECORD_DIR)."""
  with open(os.path.join(record_dir, f'process_{process}.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def data_root(tmp_path_factory) -> str:
  """The tiny run's synthetic dataset, written once per session."""
  root = session_dir(tmp_path_factory, 'tiny_data')
  prepare_data(root, tiny_overrides())
  return root


def reference_run(tmp_path_factory) -> str:
  """An uninterrupted tiny run of 6 steps (with step records), made once per session.

  Returns:
    Its workdir; the records are in <workdir>_records.
  """
  base = session_dir(tmp_path_factory, 'reference')
  workdir = os.path.join(base, 'run')
  done = os.path.join(base, 'done')
  if not os.path.exists(done):
    root = data_root(tmp_path_factory)
    env = subprocess_env(tmp_path_factory, VPR_TEST_RECORD_DIR=workdir + '_records')
    status, output = run_train(workdir, root, tiny_overrides(), env, 'reference')
    assert status == 0, output[-4000:]
    with open(done, 'w') as f:
      f.write('ok')
  return workdir


def file_snapshot(root: str) -> dict[str, bytes]:
  """{relative path: bytes} of every file under root (to check that nothing changed)."""
  snapshot = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        snapshot[os.path.relpath(path, root)] = f.read()
  return snapshot


def final_error(output: str) -> str:
  """The exception a failed run ended with: from its 'XxxError: ...' line to the end."""
  lines = [line for line in output.splitlines() if line.strip()]
  pattern = re.compile(r'^([A-Za-z_][\w.]*\.)?\w*(Error|Exception)(: |$)')
  for i in range(len(lines) - 1, -1, -1):
    if pattern.match(lines[i]):
      return '\n'.join(lines[i:])
  return lines[-1] if lines else ''


def assert_same_losses(got: Sequence[dict], expected: Sequence[dict], rtol: float = 1e-6):
  """Per-step training records agree: same steps, losses within rtol."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert [r['step'] for r in got] == [r['step'] for r in expected]
  np.testing.assert_allclose([r['loss'] for r in got], [r['loss'] for r in expected], rtol=rtol,
                             atol=0)
  np.testing.assert_allclose([r['grad_norm'] for r in got], [r['grad_norm'] for r in expected],
                             rtol=rtol * 10, atol=0)


class RunsCode:
  """Pickles as a call of `os.system('touch MARKER')`: what a hostile list file holds."""

  def __init__(self, marker: str):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def write_hostile_split(split_dir: str, marker: str, prefix: str = 'x') -> None:
  """A benchmark split folder whose `<prefix>_gt.npy` runs `touch marker` when unpickled.

  Two database and one query image with '@' names, the lists naming them, and a ground truth
  that is an object array holding a `RunsCode`: `np.load(..., allow_pickle=True)` would run it.
  """
  database = ['database/@0.00@0.00@10@S@37.0@-122.0@@.jpg',
              'database/@100.00@0.00@10@S@37.0@-122.0@@.jpg']
  queries = ['queries/@5.00@0.00@10@S@37.0@-122.0@@.jpg']
  for i, relative in enumerate(database + queries):
    path = os.path.join(split_dir, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path)
  np.save(os.path.join(split_dir, f'{prefix}_dbImages.npy'), np.array(database))
  np.save(os.path.join(split_dir, f'{prefix}_qImages.npy'), np.array(queries))
  gt = np.empty(1, dtype=object)
  gt[0] = RunsCode(marker)
  np.save(os.path.join(split_dir, f'{prefix}_gt.npy'), gt, allow_pickle=True)


class PickleMarker:
  """Unpickling this runs `touch <path>`: hostile files carry it, and the marker file shows
  whether a reader unpickled anything (it must never exist)."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (os.system, (f'touch {self.path}',))
