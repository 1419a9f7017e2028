"""Reusable shared-memory batch buffers between grain worker processes and the main process.

grain moves a worker's numpy output to the main process through a new shared-memory segment per
batch: the worker creates and fills it (page faults and a copy), the main process maps it (page
faults again) and a thread unlinks it later. For a 8 x 4 x 224 x 224 x 3 batch that costs ~7 ms
of CPU, about as much as decoding a third of the batch. Here each worker instead gets a ring of
batch slots in one segment, created once by the main process: the worker decodes straight into
a free slot and sends only (worker, slot); the main process hands out a numpy view of the slot,
and the slot becomes free again when the last array viewing it is garbage-collected.

Lifetime. The view's buffer is exported by a per-batch ctypes object, which every numpy view,
reshape or `np.asarray` of the batch keeps alive (and JAX keeps the numpy array alive while it
reads it); a `weakref.finalize` on that object clears the slot's flag. A slot is therefore never
rewritten while anything can still read it, however long the consumer keeps the batch. When all
of a worker's slots are in use (a consumer holding many batches), the worker falls back to a
plain array, which grain sends its usual way: slower, never wrong, never blocking.

Flags. Byte i of a segment's header is 1 while slot i holds a batch on its way or in use, 0 when
free. Only the worker sets it (0 -> 1, before writing) and only the main process clears it
(1 -> 0, after the last reader is gone), so no lock is needed; the worker learns of the clear by
reading the byte (a store the main process makes after its last read of the slot; on x86 stores
are never reordered before earlier loads; elsewhere the GIL hand-offs and the finalizer's call
chain separate them, without an explicit barrier).

Clean-up. The main process creates and unlinks the segments (`SlotRings.close`, which the train
iterator calls when it stops its workers); Python's resource tracker, which the spawned workers
share, unlinks them if the main process dies first (once the workers have exited, which
`workers.ExitWithParent` makes prompt). The space is reserved when the ring is created
(`posix_fallocate`), so a full /dev/shm gives a warning and grain's usual transport instead of a
crash on first touch. Linux only (the segments are mapped from /dev/shm); elsewhere batches
travel grain's usual way.

How batches travel is decided before the workers start (`choose_transport`), from the free space
of /dev/shm: batch slots where it holds them all, else grain's shared-memory segments (one per
batch, created by the workers without a reservation: a worker that touches a page /dev/shm
cannot back dies of SIGBUS), else, when not even those fit (a container's default 64 MB
`--shm-size`), pickled through grain's pipes: slower, never a crash.

Nothing here imports JAX (it runs in data worker processes).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import mmap
import os
import threading
import uuid
import weakref
from multiprocessing import shared_memory

from absl import logging
import numpy as np

# Slots start on page boundaries (4 KiB on every platform this runs on; larger pages only cost
# alignment padding).
_ALIGN = 4096
_FREE, _BUSY = 0, 1


def _aligned(nbytes: int) -> int:
  return -(-int(nbytes) // _ALIGN) * _ALIGN


@dataclasses.dataclass(frozen=True)
class RingSpec:
  """What a worker needs to find its ring (picklable; sent to the workers).

  Attributes:
    names: shared-memory segment names, one per worker (worker i uses names[i]).
    num_slots: slots per ring.
    shape: shape of the array each slot holds.
    dtype: its numpy dtype name.
  """
  names: tuple[str, ...]
  num_slots: int
  shape: tuple[int, ...]
  dtype: str

  @property
  def slot_bytes(self) -> int:
    return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize

  @property
  def header_bytes(self) -> int:
    return _aligned(self.num_slots)

  @property
  def stride(self) -> int:
    return _aligned(self.slot_bytes)

  @property
  def segment_bytes(self) -> int:
    return self.header_bytes + self.num_slots * self.stride

  def offset(self, slot: int) -> int:
    return self.header_bytes + int(slot) * self.stride


def _segment_path(name: str) -> str:
  # Linux keeps POSIX shared memory as files in /dev/shm; mapping the file directly (rather than
  # through SharedMemory's own mapping) lets the last array viewing a slot unmap it cleanly.
  return os.path.join('/dev/shm', name)


def _map(name: str, nbytes: int, reserve: bool = False) -> mmap.mmap:
  fd = os.open(_segment_path(name), os.O_RDWR)
  try:
    if reserve:
      # Allocates the pages now, so running out of shared memory is an error here and not a
      # SIGBUS on first touch.
      os.posix_fallocate(fd, 0, nbytes)
    return mmap.mmap(fd, nbytes)
  finally:
    os.close(fd)


SHM_FOLDER = '/dev/shm'
SLOTS, GRAIN_SEGMENTS, PIPES = 'batch slots', 'grain shared memory', 'pipes'


def free_shared_memory(folder: str = SHM_FOLDER) -> int | None:
  """Bytes free for shared memory (`os.statvfs` of `folder`), None where it cannot be measured."""
  try:
    stats = os.statvfs(folder)
  except (OSError, AttributeError):
    return None
  return int(stats.f_bavail) * int(stats.f_frsize)


def choose_transport(num_workers: int, num_slots: int, queued_batches: int, batch_bytes: int,
                     reuse_batch_memory: bool, folder: str = SHM_FOLDER) -> str:
  """How batches go from the workers to this process: SLOTS, GRAIN_SEGMENTS or PIPES.

  Args:
    num_workers: grain worker processes.
    num_slots: batch slots per worker (`SlotRings.create`).
    queued_batches: batches a worker may have in grain's queue (plus the one it writes and the
      one the consumer reads, counted here) when they travel through grain's segments.
    batch_bytes: bytes of one batch's images.
    reuse_batch_memory: whether batch slots were asked for (data.reuse_batch_memory).
    folder: the shared-memory file system to measure.

  Returns:
    SLOTS when asked for and they fit in the free space, else GRAIN_SEGMENTS when grain's
    per-batch segments fit, else PIPES (after a warning naming the space and what to change).
  """
  free = free_shared_memory(folder)
  if free is None:
    return SLOTS if reuse_batch_memory and supported() else GRAIN_SEGMENTS
  slots_bytes = num_workers * (_aligned(num_slots) + num_slots * _aligned(batch_bytes))
  segments_bytes = num_workers * (queued_batches + 2) * batch_bytes
  if reuse_batch_memory and supported() and slots_bytes <= free:
    return SLOTS
  if segments_bytes <= free:
    if reuse_batch_memory and supported():
      logging.warning('%s has %.1f MB free, batch slots need %.1f MB: batches travel through a '
                      'new shared-memory segment each (give /dev/shm more space, e.g. docker '
                      '--shm-size, or set data.reuse_batch_memory=False).', folder, free / 1e6,
                      slots_bytes / 1e6)
    return GRAIN_SEGMENTS
  logging.warning('%s has %.1f MB free, %d workers need %.1f MB to pass batches in shared '
                  'memory: batches are pickled through pipes instead (slower). Give the container '
                  'more shared memory (docker --shm-size, Kubernetes an emptyDir of medium '
                  'Memory on /dev/shm), or lower data.num_workers / data.prefetch_buffer_size '
                  '(data.reuse_batch_memory needs %.1f MB).', folder, free / 1e6, num_workers,
                  segments_bytes / 1e6, slots_bytes / 1e6)
  return PIPES


def supported() -> bool:
  """Whether this OS keeps shared memory where batch slots can map it (Linux's /dev/shm)."""
  return hasattr(os, 'posix_fallocate') and os.path.isdir('/dev/shm')


class SlotRings:
  """The main process's side: creates one ring per worker and turns (worker, slot) into arrays.

  Use `create` (None when the rings cannot be made), `spec` for the workers, `array(worker,
  slot)` for each batch received, and `close()` once the workers are stopped.
  """

  def __init__(self, spec: RingSpec, segments: list[shared_memory.SharedMemory],
               maps: list[mmap.mmap]):
    self.spec = spec
    self._segments = segments
    self._maps = maps
    self._lock = threading.Lock()
    self._closed = False

  @classmethod
  def create(cls, num_workers: int, num_slots: int, shape: tuple[int, ...],
             dtype=np.uint8) -> 'SlotRings | None':
    """Creates `num_workers` rings of `num_slots` slots for arrays of `shape`.

    Args:
      num_workers: grain worker processes.
      num_slots: slots per worker (at least its queued batches + the one it is filling + the one
        the consumer is reading, for the fast path to hold in steady state).
      shape: the shape of one slot's array.
      dtype: its dtype.

    Returns:
      The rings, or None when the shared memory cannot be reserved (after a warning) or the OS
      has no /dev/shm: the caller then keeps grain's transport.
    """
    if not supported():
      return None
    tag = uuid.uuid4().hex[:12]
    spec = RingSpec(tuple(f'vpr_jax_{os.getpid()}_{tag}_{i}' for i in range(num_workers)),
                    int(num_slots), tuple(int(s) for s in shape), np.dtype(dtype).name)
    segments, maps = [], []
    try:
      for name in spec.names:
        # SharedMemory creates the segment and registers it with the resource tracker (which
        # unlinks it should this process die); the rings use their own mapping of it.
        segment = shared_memory.SharedMemory(name=name, create=True, size=spec.segment_bytes)
        segments.append(segment)
        segment.close()
        maps.append(_map(name, spec.segment_bytes, reserve=True))
    except OSError as e:
      logging.warning('Cannot reserve %.1f MB of shared memory for batch slots (%s); batches '
                      'travel through a new segment each (data.reuse_batch_memory=False skips '
                      'this attempt; or give /dev/shm more space).',
                      num_workers * spec.segment_bytes / 1e6, e)
      for segment in segments:
        segment.unlink()
      return None
    return cls(spec, segments, maps)

  def array(self, worker: int, slot: int) -> np.ndarray:
    """A read-only view of a slot a worker filled; the slot is freed when no view remains.

    Args:
      worker: the worker's index (the ring).
      slot: the slot it wrote.

    Returns:
      The slot's array, of `spec.shape` and `spec.dtype`.
    """
    spec = self.spec
    if not 0 <= worker < len(self._maps) or not 0 <= slot < spec.num_slots:
      raise ValueError(f'no batch slot ({worker}, {slot}) in rings of {len(self._maps)} x '
                       f'{spec.num_slots}')
    owner = (ctypes.c_ubyte * spec.slot_bytes).from_buffer(self._maps[worker], spec.offset(slot))
    weakref.finalize(owner, self._release, worker, slot)
    view = np.frombuffer(owner, dtype=spec.dtype).reshape(spec.shape)
    # Batches are read, not written: a write would surprise whoever reads the slot next.
    view.flags.writeable = False
    return view

  def _release(self, worker: int, slot: int) -> None:
    with self._lock:
      if not self._closed:
        self._maps[worker][slot] = _FREE

  def close(self) -> None:
    """Unlinks the segments (call after the workers stopped).

    Arrays still viewing slots stay valid; the memory is returned when the last one is gone.
    """
    with self._lock:
      if self._closed:
        return
      self._closed = True
    for segment in self._segments:
      try:
        segment.unlink()
      except FileNotFoundError:
        pass


class _WorkerRing:
  """A worker's side of its ring: finds a free slot and returns a writable view of it."""

  def __init__(self, spec: RingSpec, worker: int):
    self.spec = spec
    self.worker = worker
    self._map = None
    self._next = 0
    self._broken = False

  def _attach(self) -> mmap.mmap | None:
    if self._map is None and not self._broken:
      try:
        self._map = _map(self.spec.names[self.worker], self.spec.segment_bytes)
      except OSError as e:
        logging.warning('Batch slots unavailable in this worker (%s); using plain arrays.', e)
        self._broken = True
    return self._map

  def acquire(self, shape: tuple[int, ...], dtype) -> tuple[int, np.ndarray] | None:
    """(slot, writable view) of a free slot, marked in use; None when none is free or it differs."""
    spec = self.spec
    if tuple(shape) != spec.shape or np.dtype(dtype).name != spec.dtype:
      return None
    flags = self._attach()
    if flags is None:
      return None
    for i in range(spec.num_slots):
      slot = (self._next + i) % spec.num_slots
      if flags[slot] == _FREE:
        flags[slot] = _BUSY
        self._next = slot + 1
        return slot, np.ndarray(spec.shape, spec.dtype, buffer=flags, offset=spec.offset(slot))
    return None

  def release(self, slot: int) -> None:
    """Frees a slot this worker marked but did not send."""
    if self._map is not None:
      self._map[slot] = _FREE


_worker_ring: _WorkerRing | None = None


def init_worker(spec: RingSpec, worker: int, num_workers: int) -> None:
  """grain `worker_init_fn` (bind `spec` with functools.partial): selects this worker's ring."""
  global _worker_ring
  del num_workers  # the spec has one ring per worker
  _worker_ring = _WorkerRing(spec, worker)


def acquire(shape: tuple[int, ...], dtype=np.uint8) -> tuple[int, int, np.ndarray] | None:
  """In a worker with a ring: (worker, slot, writable array) to fill; elsewhere None.

  Args:
    shape: the array's shape.
    dtype: its dtype.

  Returns:
    (worker index, slot, array) - send (worker, slot) to the main process, which reads the array
    with `SlotRings.array` - or None: allocate a plain array instead.
  """
  ring = _worker_ring
  if ring is None:
    return None
  found = ring.acquire(shape, dtype)
  if found is None:
    return None
  return ring.worker, found[0], found[1]


def give_back(slot: int) -> None:
  """In a worker: frees a slot from `acquire` that will not be sent (its batch failed)."""
  ring = _worker_ring
  if ring is not None:
    ring.release(slot)
