"""Small helpers shared by the benchmark scripts: argument parsing, environment, result files."""

import argparse
import datetime
import json
import os
import platform
import time

import jax


def parse_hw(text: str) -> tuple[int, int]:
  """'H,W', 'HxW' or one size -> (H, W), for argparse."""
  values = [int(v) for v in text.replace('x', ',').split(',')]
  if len(values) == 1:
    values *= 2
  if len(values) != 2 or min(values) <= 0:
    raise argparse.ArgumentTypeError(f'expected H,W (or one size), got {text!r}')
  return tuple(values)


def parse_int_list(text: str) -> list[int]:
  """'1,2,8' -> [1, 2, 8] (positive integers), for argparse."""
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
  if not values or min(values) <= 0:
    raise argparse.ArgumentTypeError(f'expected positive integers, got {text!r}')
  return values


def parse_choices(valid):
  """An argparse type: a comma-separated list of names from `valid` -> the list of names."""
  def parse(text):
    """'a,b' -> ['a', 'b'], each checked against `valid`."""
    values = [v for v in text.split(',') if v]
    unknown = [v for v in values if v not in valid]
    if unknown or not values:
      raise argparse.ArgumentTypeError(f'unknown {unknown or text!r}; valid: {", ".join(valid)}')
    return values
  return parse


def environment() -> dict:
  """Date, host, Python, JAX backend and devices, and the versions of the libraries measured."""
  device = jax.local_devices()[0]
  env = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'host': platform.node(), 'platform': platform.platform(), 'python': platform.python_version(),
      'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'backend': jax.default_backend(),
      'device': device.device_kind, 'num_devices': jax.device_count(),
  }
  for name in ('flax', 'optax', 'grain', 'torch', 'torchvision', 'pytorch_metric_learning'):
    try:
      module = __import__(name)
      env[name] = getattr(module, '__version__', '?')
    except ImportError:
      env[name] = None
  return env


def peak_device_memory(device=None):
  """Peak bytes in use on a device so far (None where the backend does not say)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return (stats or {}).get('peak_bytes_in_use')


def block(tree):
  """Waits until every array of `tree` is computed (JAX dispatches asynchronously); `tree`."""
  jax.block_until_ready(tree)
  return tree


def write_json(path: str, results) -> None:
  """Writes `results` as JSON atomically (temporary file, then rename) and says so."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, default=str)
    f.write('\n')
  os.replace(tmp, path)
  print(f'Wrote {path}')


def format_rate(value) -> str:
  """An images/s figure with thousands separators, or 'n/a'."""
  return f'{value:,.0f}' if isinstance(value, (int, float)) else 'n/a'


def format_table(header, lines) -> str:
  """A plain-text table: first column left-aligned, the others right-aligned."""
  lines = [tuple(header)] + [tuple(line) for line in lines]
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  out = []
  for i, line in enumerate(lines):
    out.append('  '.join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j])
                         for j, cell in enumerate(line)))
    if i == 0:
      out.append('  '.join('-' * width for width in widths))
  return '\n'.join(out)


def time_iterator(make_iterator, warmup: int, batches: int) -> tuple:
  """Times an iterator: (start-up seconds to the first batch, seconds for `batches` timed ones).

  Args:
    make_iterator: () -> an iterator usable as a context manager (closed at the end).
    warmup: untimed batches after the first.
    batches: timed batches.

  Returns:
    (startup_seconds, iterator, timed_seconds); the iterator is already closed.
  """
  start = time.perf_counter()
  with make_iterator() as it:
    next(it)
    startup = time.perf_counter() - start
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
      del batch
    seconds = time.perf_counter() - start
  return startup, it, seconds
