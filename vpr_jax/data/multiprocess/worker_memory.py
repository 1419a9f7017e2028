"""Shared memory of grain's worker processes, released before this process exits.

Batches made by grain workers arrive in shared memory, which grain unlinks from a background
thread when the arrays are garbage-collected. At interpreter exit that thread may not have run
yet, and Python's resource tracker then warns about "leaked shared_memory objects" after every
evaluation and training run. `release_at_exit` (called whenever a pipeline starts workers)
collects the last arrays and lets grain's deletion thread finish before the process ends.
"""

import atexit
import gc

from grain._src.python.ipc import shared_memory_array  # no public API exposes the deleter

_installed = False


def _drain() -> None:
  gc.collect()
  # grain keeps one class-wide thread pool that closes and unlinks the shared memory of deleted
  # arrays; closing and joining it waits for the pending deletions.
  array_class = shared_memory_array.SharedMemoryArray
  pool = getattr(array_class, '_del_thread_pool', None)
  if pool is not None:
    pool.close()
    pool.join()


def release_at_exit() -> None:
  """Makes this process release grain's shared memory before it exits (idempotent)."""
  global _installed
  if not _installed:
    atexit.register(_drain)
    _installed = True
