"""SIGTERM and SIGINT end a loop after the current step, on 1 or 2 processes."""

import os
import signal
import subprocess
import sys
import time

from jax.experimental import multihost_utils
import pytest

from tests import e2e
from vpr_jax.training import preemption


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=e2e.REPO_ROOT, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  env.update(extra)
  return env


def _start_loop(marker_dir, *args):
  return subprocess.Popen([sys.executable, '-m', 'tests.preemption_loop', str(marker_dir), *args],
                          cwd=e2e.REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _read_until(proc, wanted, timeout=120):
  """Lines of proc's stdout up to and including `wanted`."""
  lines = []
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line.strip())
    if lines[-1] == wanted:
      return lines
  proc.kill()
  raise AssertionError(f'{wanted!r} not seen: {lines}\n{proc.stderr.read()}')


def _finish(proc, timeout=60):
  """Waits for proc; returns the rest of its stdout (after what _read_until took) and stderr."""
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  # Read through the same buffered files as _read_until (communicate() would skip their buffers).
  return proc.stdout.read(), proc.stderr.read()


@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_cleanly(signal_number, tmp_path):
  proc = _start_loop(tmp_path)
  before = _read_until(proc, 'end 2')
  proc.send_signal(signal_number)
  out, err = _finish(proc)
  assert proc.returncode == 0, err
  assert 'Traceback' not in err, err
  name = signal.Signals(signal_number).name
  assert err.strip().splitlines() == [
      f'{name} received: stopping after the current step and saving a checkpoint (send it again '
      'to stop at once, without saving).']
  saved = (tmp_path / 'process_0.txt').read_text()
  step = int(saved.split()[-1])
  assert saved == f'saved at step {step}' and step >= 2
  # Every step begun was finished, and the save came after the last one.
  lines = before + out.strip().splitlines()
  assert lines[-2:] == [f'end {step}', f'Stopped by {name} after step {step}.'], lines
  begun = [int(line.split()[1]) for line in lines if line.startswith('begin')]
  ended = [int(line.split()[1]) for line in lines if line.startswith('end')]
  assert begun == ended == list(range(1, step + 1))


@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT])
def test_second_signal_stops_at_once_without_saving(signal_number, tmp_path):
  proc = _start_loop(tmp_path, '--slow_save')
  _read_until(proc, 'end 1')
  proc.send_signal(signal_number)
  _read_until(proc, 'saving')  # The 60 s save has begun.
  start = time.monotonic()
  proc.send_signal(signal_number)
  _, err = _finish(proc, timeout=30)
  assert time.monotonic() - start < 20
  # SIGTERM: its default action; SIGINT: KeyboardInterrupt, which Python ends with SIGINT.
  assert proc.returncode == -signal_number, (proc.returncode, err)
  assert not (tmp_path / 'process_0.txt').exists()


def test_handlers_are_restored_and_second_signal_raises_keyboard_interrupt():
  lines = []
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with preemption.StopRequest(announce=lines.append) as stop:
    assert signal.getsignal(signal.SIGTERM) != before[1]
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and stop.signal_name == 'SIGINT' and len(lines) == 1
    assert stop.should_stop(2) and stop.stop_step == 2
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  with preemption.StopRequest(announce=lines.append):
    pass
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_single_process_answers_every_step_without_communication(monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError('no communication expected with one process')

  monkeypatch.setattr(multihost_utils, 'process_allgather', forbidden)
  stop = preemption.StopRequest(check_every_steps=10)
  assert [stop.should_stop(step) for step in (1, 2)] == [False, False]
  stop.request()
  assert stop.should_stop(3) and stop.stop_step == 3  # Not a multiple of 10: one process.
  assert preemption.any_process(True) and not preemption.any_process(False)


def test_several_processes_agree_at_the_next_check(monkeypatch):
  """The reduction's inputs and outputs, with two fake processes (the real run is below)."""
  gathered = []

  def allgather(local):
    gathered.append(local.tolist())
    return [[0], [1]]  # The other process received the signal.

  monkeypatch.setattr(preemption.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  stop = preemption.StopRequest(check_every_steps=4)
  assert [stop.should_stop(step) for step in (1, 2, 3)] == [False, False, False]
  assert gathered == []
  assert stop.should_stop(4) and stop.stop_step == 4 and gathered == [[0]]
  assert stop.signal_name == 'SIGTERM'  # Asked by the other process.


def test_bad_check_interval():
  with pytest.raises(ValueError, match='check_every_steps must be a positive integer, got 0'):
    preemption.StopRequest(check_every_steps=0)


def test_two_processes_stop_at_the_same_step(tmp_path):
  """Process 1 alone gets SIGTERM in step 3; both save after step 4 (they check every 4 steps)."""
  command = [sys.executable, os.path.join('scripts', 'launch_multihost_local.py'),
             '--num_processes=2', '--devices_per_process=1', f'--log_dir={tmp_path / "logs"}',
             '--timeout=150', '--', sys.executable, '-m', 'tests.preemption_loop', str(tmp_path),
             '--signal_self_at=1:3', '--check_every_steps=4']
  result = subprocess.run(command, cwd=e2e.REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=180, check=False)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  for process in (0, 1):
    assert (tmp_path / f'process_{process}.txt').read_text() == 'saved at step 4'
    log = (tmp_path / 'logs' / f'process_{process}.log').read_text()
    assert 'begin 5' not in log and 'Traceback' not in log, log[-3000:]
  assert 'SIGTERM received' in (tmp_path / 'logs' / 'process_1.log').read_text()
  assert 'SIGTERM received' not in (tmp_path / 'logs' / 'process_0.log').read_text()
