"""How many decoding worker processes a data pipeline starts (training, evaluation, preparation)."""

import os

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
