"""Reused shared-memory batch slots between grain workers and the main process."""

import ctypes
import errno
import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from vpr_jax.data.multiprocess import batch_slots
from vpr_jax.data.training import train_pipeline
from tests import test_train_pipeline as pipeline_tests
# The pipeline tests' tiny GSV-XS set (every image a distinct grey level).
from tests.test_train_pipeline import data_root  # noqa: F401  pylint: disable=unused-import
from tests.test_train_pipeline import index  # noqa: F401  pylint: disable=unused-import

pytestmark = pytest.mark.skipif(not batch_slots.supported(),
                                reason='batch slots need /dev/shm and posix_fallocate (Linux)')

SHAPE = (2, 3, 8, 8, 3)


def _own_segments():
  return sorted(n for n in os.listdir('/dev/shm') if n.startswith(f'vpr_jax_{os.getpid()}_'))


@pytest.fixture
def rings(monkeypatch):
  """Two rings of two slots, with this process acting as worker 1."""
  created = batch_slots.SlotRings.create(2, 2, SHAPE)
  assert created is not None
  monkeypatch.setattr(batch_slots, '_worker_ring', None)  # restored after the test
  batch_slots.init_worker(created.spec, 1, 2)
  yield created
  created.close()


def _fill(value):
  worker, slot, array = batch_slots.acquire(SHAPE)
  array[...] = value
  return worker, slot


def test_slot_round_trip_and_lifetime(rings):
  worker, slot = _fill(7)
  assert worker == 1
  batch = rings.array(worker, slot)
  assert batch.shape == SHAPE and batch.dtype == np.uint8 and np.all(batch == 7)
  assert not batch.flags.writeable
  # Views, reshapes and np.asarray of the batch keep the slot in use.
  views = [batch[0], batch.reshape(-1), np.asarray(batch)[:, 1]]
  del batch
  gc.collect()
  other_worker, other_slot = _fill(9)
  assert (other_worker, other_slot) == (1, 1 - slot)
  assert batch_slots.acquire(SHAPE) is None  # both slots in use: the caller uses a plain array
  assert all(np.all(v == 7) for v in views)
  del views
  gc.collect()
  # The first slot is free again (the second one was never handed to the main process).
  worker, again = _fill(5)
  assert again == slot
  assert np.all(rings.array(worker, again) == 5)


def test_give_back_and_mismatches(rings):
  first, second = batch_slots.acquire(SHAPE)[1], batch_slots.acquire(SHAPE)[1]
  assert {first, second} == {0, 1} and batch_slots.acquire(SHAPE) is None
  batch_slots.give_back(first)  # a batch that failed in the worker is never sent
  assert batch_slots.acquire(SHAPE)[1] == first
  assert batch_slots.acquire((1, *SHAPE[1:])) is None
  assert batch_slots.acquire(SHAPE, np.float32) is None
  with pytest.raises(ValueError, match='no batch slot'):
    rings.array(2, 0)


def test_close_unlinks_but_held_batches_stay_readable(rings):
  assert len(_own_segments()) == 2
  worker, slot = _fill(3)
  held = rings.array(worker, slot)
  rings.close()
  assert not _own_segments()
  assert np.all(held == 3)
  del held
  gc.collect()


def test_no_shared_memory_left_gives_the_usual_transport(monkeypatch, caplog):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(batch_slots, '_map', full)
  with caplog.at_level(logging.WARNING):
    assert batch_slots.SlotRings.create(2, 3, SHAPE) is None
  assert 'Cannot reserve' in caplog.text and 'reuse_batch_memory' in caplog.text
  assert not _own_segments()


class _StatVfs:
  """What os.statvfs returns, for a file system with `free` bytes available."""

  def __init__(self, free):
    self.f_frsize, self.f_bavail = 4096, free // 4096


BATCH_BYTES = int(np.prod(SHAPE))


@pytest.mark.parametrize('free, reuse, expected, warned', [
    (1 << 30, True, batch_slots.SLOTS, None),
    (1 << 30, False, batch_slots.GRAIN_SEGMENTS, None),
    # Room for grain's segments (2 workers x (2 queued + 2)) but not for 2 x 5 slots.
    (9 * 4096, True, batch_slots.GRAIN_SEGMENTS, 'batch slots need'),
    # Not even one batch per worker: the pipes, with what to change.
    (2 * 4096, True, batch_slots.PIPES, '--shm-size'),
    (2 * 4096, False, batch_slots.PIPES, 'data.num_workers'),
])
def test_transport_follows_the_free_shared_memory(free, reuse, expected, warned, monkeypatch,
                                                  caplog):
  measured = []
  monkeypatch.setattr(os, 'statvfs', lambda folder: measured.append(folder) or _StatVfs(free))
  with caplog.at_level(logging.WARNING):
    transport = batch_slots.choose_transport(2, 5, 2, BATCH_BYTES, reuse)
  assert transport == expected and measured == ['/dev/shm']
  if warned:
    assert warned in caplog.text and 'MB free' in caplog.text, caplog.text
  else:
    assert not caplog.text


@pytest.mark.slow
def test_a_tiny_dev_shm_gives_correct_batches_through_pipes(index, monkeypatch):
  """/dev/shm smaller than the batches in flight (as a container's --shm-size=256k is for real
  batches): no slot, no grain segment, no SIGBUS."""
  config = pipeline_tests._config()  # pylint: disable=protected-access
  reference = list(train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0))
  one_batch = reference[0]['images'].nbytes
  real_statvfs = os.statvfs
  monkeypatch.setattr(os, 'statvfs', lambda folder: _StatVfs(one_batch) if folder == '/dev/shm'
                      else real_statvfs(folder))
  with train_pipeline.make_train_iterator(index, config, seed=0, num_workers=1) as it:
    batches = list(it)
    assert it.transport == batch_slots.PIPES
    assert not _own_segments()
  # Pickled through the pipe: plain arrays, neither a slot nor one of grain's segments.
  assert not any(_slot_backed(b['images']) or _grain_segment(b['images']) for b in batches)
  pipeline_tests._assert_same_batches(batches, reference)  # pylint: disable=protected-access


def _grain_segment(array):
  base = array
  while isinstance(base, np.ndarray) and type(base).__name__ != 'SharedMemoryArray':
    base = base.base
  return type(base).__name__ == 'SharedMemoryArray'


def test_outside_a_worker_there_is_no_slot():
  assert batch_slots.acquire(SHAPE) is None


def _slot_backed(array):
  """Whether an array views a batch slot (its memory exported by a ctypes object)."""
  base = array
  while isinstance(base, np.ndarray):
    base = base.base
  if isinstance(base, memoryview):
    base = base.obj
  return isinstance(base, ctypes.Array)


@pytest.mark.slow
@pytest.mark.parametrize('augment', ['none', 'randaugment'])
def test_worker_batches_through_slots_equal_in_process_batches(index, augment):
  config = pipeline_tests._config(augment=augment)  # pylint: disable=protected-access
  config.num_epochs = 3
  reference = list(train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0))
  with train_pipeline.make_train_iterator(index, config, seed=0, num_workers=2) as it:
    streamed = []
    for step, batch in enumerate(it):
      assert len(_own_segments()) == 2  # one ring per worker, created when the workers start
      # A consumer that drops each batch: every batch but the workers' first can use a slot.
      np.testing.assert_array_equal(batch['images'], reference[step]['images'])
      np.testing.assert_array_equal(batch['labels'], reference[step]['labels'])
      streamed.append(_slot_backed(batch['images']))
      del batch
  assert all(streamed), [i for i, s in enumerate(streamed) if not s]
  assert not _own_segments()


@pytest.mark.slow
def test_consumer_holding_every_batch_still_gets_correct_ones(index):
  config = pipeline_tests._config()  # pylint: disable=protected-access
  config.num_epochs = 3
  reference = list(train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0))
  with train_pipeline.make_train_iterator(index, config, seed=0, num_workers=1) as it:
    held = list(it)
  # Slots ran out after the first few held batches; the rest came through grain's segments.
  kinds = [_slot_backed(b['images']) for b in held]
  assert any(kinds) and not all(kinds), kinds
  pipeline_tests._assert_same_batches(held, reference)  # pylint: disable=protected-access
  assert not _own_segments()


@pytest.mark.slow
def test_reuse_off_creates_no_slots(index):
  config = pipeline_tests._config(reuse_batch_memory=False)  # pylint: disable=protected-access
  reference = list(train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0))
  with train_pipeline.make_train_iterator(index, config, seed=0, num_workers=1) as it:
    batches = list(it)
    assert not _own_segments()
  assert not any(_slot_backed(b['images']) for b in batches)
  pipeline_tests._assert_same_batches(batches, reference)  # pylint: disable=protected-access


_KILLED_TRAINER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from absl import flags

def main():
  flags.FLAGS.mark_as_parsed()
  from tests import test_train_pipeline as pipeline_tests
  from vpr_jax.data.training import train_pipeline
  index = pipeline_tests._index({root!r}, 'killed')
  it = train_pipeline.make_train_iterator(index, pipeline_tests._config(), seed=0, num_workers=2)
  next(it)
  print('PID', os.getpid(), flush=True)
  os.kill(os.getpid(), signal.SIGKILL)

if __name__ == '__main__':
  main()
"""


@pytest.mark.slow
def test_killed_main_process_takes_its_workers_and_slots_along(tmp_path, data_root):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / 'killed_trainer.py'
  script.write_text(textwrap.dedent(_KILLED_TRAINER.format(repo=repo, root=data_root)))
  log = tmp_path / 'log.txt'
  with open(log, 'w') as out:
    # Output to a file: a pipe would stay open as long as any worker lives.
    completed = subprocess.run([sys.executable, str(script)], stdout=out, stderr=subprocess.STDOUT,
                               timeout=300, check=False)
  text = log.read_text()
  assert completed.returncode == -signal.SIGKILL, text
  pid = int(text.split('PID ')[1].split()[0])
  # The workers notice the orphaning within a second of their start and exit; the resource
  # tracker they share with the killed process then unlinks the slots. A worker may still be
  # importing (seconds on a loaded machine) when the main process dies.
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:
    left = [n for n in os.listdir('/dev/shm') if n.startswith(f'vpr_jax_{pid}_')]
    if not left:
      break
    time.sleep(0.5)
  assert not left, text


_ORPHANED_WORKER = """
import os, pickle, subprocess, sys, time
sys.path.insert(0, {repo!r})
from vpr_jax.data.multiprocess import workers

# The "main process": makes the init function, starts a "worker", and dies before the worker
# has run it (the worker still importing, say).
init = pickle.dumps(workers.ExitWithParent(poll_seconds=0.2))
worker = '''
import pickle, sys, time
time.sleep(1.0)  # the parent is gone by now
pickle.loads(sys.stdin.buffer.read())(0, 1)
time.sleep(60)
sys.exit(0)
'''
child = subprocess.Popen([sys.executable, '-c', worker], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
child.stdin.write(init)
child.stdin.close()
print(child.pid, flush=True)
os._exit(0)
"""


def _running(pid):
  try:
    with open(f'/proc/{pid}/stat') as stat:
      return stat.read().rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie has exited
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads /proc')
def test_worker_started_after_its_parent_died_exits():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  completed = subprocess.run([sys.executable, '-c', _ORPHANED_WORKER.format(repo=repo)],
                             capture_output=True, text=True, timeout=120, check=True)
  worker_pid = int(completed.stdout.split()[0])
  deadline = time.monotonic() + 30
  while _running(worker_pid) and time.monotonic() < deadline:
    time.sleep(0.2)
  still_running = _running(worker_pid)
  if still_running:
    os.kill(worker_pid, signal.SIGKILL)
  assert not still_running, 'the orphaned worker outlived its parent'
