"""Decoding worker processes (training, evaluation, preparation): how many, and their lifetime."""

import os
import threading
import time

from vpr_jax.errors import ConfigError

# -1 ("automatic") never starts more workers than this: past it, the processes' memory and start
# time grow while a single accelerator host rarely decodes faster.
MAX_AUTO_WORKERS = 16


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def resolve_num_workers(num_workers: int, field: str = 'data.num_workers') -> int:
  """-1 -> one worker per available CPU core, at most MAX_AUTO_WORKERS; else the value (>= 0).

  Args:
    num_workers: the configured count.
    field: the config field or flag it came from, for the message.

  Returns:
    The number of worker processes (0: decode in the calling process).

  Raises:
    ConfigError: a negative count other than -1.
  """
  num_workers = int(num_workers)
  if num_workers == -1:
    return min(available_cores(), MAX_AUTO_WORKERS)
  if num_workers < 0:
    raise ConfigError(f'{field} must be -1 (automatic) or >= 0, got {num_workers}.')
  return num_workers


class ExitWithParent:
  """grain `worker_init_fn`: ends the worker process once the process that created this is gone.

  When the main process is killed outright (SIGKILL, the out-of-memory killer), grain's workers
  block on their full output queues and would live on, holding their memory and the shared
  memory that Python's resource tracker frees only once every process sharing it has exited.

  The parent's pid is taken when this object is made (in the main process), not when a worker
  starts: a worker still importing when the main process dies would otherwise take its new
  parent (init or a subreaper) for the one to watch, and never exit.
  """

  def __init__(self, poll_seconds: float = 1.0):
    """Args: poll_seconds: how often a worker checks its parent."""
    self._parent_pid = os.getpid()
    self._poll_seconds = poll_seconds

  def __call__(self, worker_index: int = 0, worker_count: int = 1) -> None:
    """Starts the watch in this worker (grain passes the worker's index and count, unused)."""
    del worker_index, worker_count
    parent_pid, poll_seconds = self._parent_pid, self._poll_seconds

    def watch():
      # An orphan is re-parented (to init or a subreaper): its parent pid changes.
      while os.getppid() == parent_pid:
        time.sleep(poll_seconds)
      os._exit(1)  # at once: no clean-up that could block on the dead parent

    threading.Thread(target=watch, name='vpr_jax-exit-with-parent', daemon=True).start()

