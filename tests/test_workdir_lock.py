"""One process per workdir: real processes contend for `vpr_jax.workdir_lock`."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import e2e
from vpr_jax.training import workdir_lock

# Takes the lock (optionally forking a child that inherits it), says so, then waits to be killed.
HOLDER = r'''
import os, sys, time
from vpr_jax.training import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire()
if len(sys.argv) > 2 and sys.argv[2] == 'fork':
  child = os.fork()
  if child == 0:
    time.sleep(120)
    os._exit(0)
  print('child', child, flush=True)
print('locked', flush=True)
time.sleep(120)
'''
# Tries to take the lock as an entry point would: one line and status 1 when refused.
CONTENDER = r'''
import sys
from vpr_jax.training import workdir_lock
try:
  with workdir_lock.WorkdirLock(sys.argv[1]):
    print('locked', flush=True)
except workdir_lock.WorkdirLockedError as e:
  raise SystemExit(f'{type(e).__name__}: {e}')
'''


def _env():
  return dict(os.environ, PYTHONPATH=e2e.REPO_ROOT)


def _start_holder(workdir, *extra):
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir), *extra], cwd=e2e.REPO_ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line.split())
    if line.startswith('locked'):
      return proc, lines
  proc.kill()
  raise AssertionError(f'holder did not take the lock: {lines} {proc.stderr.read()}')


def _contend(workdir):
  start = time.monotonic()
  result = subprocess.run([sys.executable, '-c', CONTENDER, str(workdir)], cwd=e2e.REPO_ROOT,
                          env=_env(), capture_output=True, text=True, timeout=60, check=False)
  return result, time.monotonic() - start


def _kill(proc):
  if proc.poll() is None:
    proc.kill()
  proc.wait()
  proc.stdout.close()
  proc.stderr.close()


def test_second_process_fails_at_once_naming_the_holder_then_gets_it_after_sigkill(tmp_path):
  workdir = tmp_path / 'run'
  holder, _ = _start_holder(workdir)
  try:
    recorded = json.loads((workdir / workdir_lock.LOCK_FILENAME).read_text())
    assert recorded['pid'] == holder.pid and recorded['host'] == socket.gethostname()
    refused, seconds = _contend(workdir)
    assert refused.returncode == 1, refused.stderr
    assert 'Traceback' not in refused.stderr and refused.stdout == ''
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith('WorkdirLockedError: ')
    for part in (str(workdir), f'pid {holder.pid}', f'host {socket.gethostname()}',
                 recorded['start_time']):
      assert part in lines[0], (part, lines[0])
    # "At once": the time to start Python and import the module, not a wait for the holder.
    assert seconds < 30 and holder.poll() is None

    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # The killed process's lock file is still there, naming it; the kernel dropped the flock.
    lock_path = workdir / workdir_lock.LOCK_FILENAME
    assert json.loads(lock_path.read_text())['pid'] == holder.pid
    with open(lock_path) as f:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # Would raise BlockingIOError if still held.
      fcntl.flock(f, fcntl.LOCK_UN)
    taken, _ = _contend(workdir)
    assert taken.returncode == 0 and taken.stdout == 'locked\n', taken.stderr
  finally:
    _kill(holder)


def test_lock_inherited_by_an_orphan_child_is_stale_when_its_holder_is_dead(tmp_path):
  """A forked child keeps the flock when its parent is killed; the dead pid in the file frees it."""
  workdir = tmp_path / 'run'
  holder, lines = _start_holder(workdir, 'fork')
  child = int(lines[0][1])
  try:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    os.kill(child, 0)  # The orphan is alive and still holds the flock of the old file.
    taken, _ = _contend(workdir)
    assert taken.returncode == 0 and taken.stdout == 'locked\n', taken.stderr
  finally:
    _kill(holder)
    try:
      os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_same_process_twice_is_refused_and_release_cleans_up(tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.WorkdirLock(str(workdir)) as lock:
    assert lock.held and (workdir / '.lock').exists()
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'pid {os.getpid()} on host'):
      workdir_lock.WorkdirLock(str(workdir)).acquire()
  assert not lock.held
  # The lock created the workdir and nothing else was written: nothing is left behind.
  assert not workdir.exists()

  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text('{}\n')
  lock = workdir_lock.WorkdirLock(str(workdir)).acquire()
  lock.release()
  lock.release()  # Idempotent.
  assert sorted(os.listdir(workdir)) == ['metrics.jsonl']
  # Released: another lock can be taken at once.
  with workdir_lock.WorkdirLock(str(workdir)):
    pass


def test_only_process_zero_takes_the_lock(tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.WorkdirLock(str(workdir), process_index=0):
    with workdir_lock.WorkdirLock(str(workdir), process_index=1) as other:
      assert not other.held
  assert not workdir.exists()


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'run'
  path.write_text('not a folder')
  with pytest.raises(workdir_lock.WorkdirNotUsableError, match='is a file; expected a folder'):
    workdir_lock.WorkdirLock(str(path)).acquire()
  with pytest.raises(workdir_lock.WorkdirNotUsableError, match='cannot be created'):
    workdir_lock.WorkdirLock(str(path / 'sub')).acquire()
  assert path.read_text() == 'not a folder'


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_workdir(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  workdir.chmod(0o555)
  try:
    with pytest.raises(workdir_lock.WorkdirNotUsableError, match='is not writable'):
      workdir_lock.WorkdirLock(str(workdir)).acquire()
  finally:
    workdir.chmod(0o755)


def test_read_only_workdir_simulated(tmp_path, monkeypatch):
  """What a read-only folder or file system returns (runs also as root, which ignores modes)."""
  workdir = tmp_path / 'run'
  workdir.mkdir()

  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

  monkeypatch.setattr(workdir_lock.os, 'open', read_only)
  with pytest.raises(workdir_lock.WorkdirNotUsableError) as raised:
    workdir_lock.WorkdirLock(str(workdir)).acquire()
  message = str(raised.value)
  assert '\n' not in message and str(workdir) in message and 'is not writable' in message
