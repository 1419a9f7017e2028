"""Small helpers shared by the benchmark scripts: argument parsing and result files."""

import argparse
import json
import os
import time


def parse_hw(text: str) -> tuple[int, int]:
  """'H,W', 'HxW' or one size -> (H, W), for argparse."""
  values = [int(v) for v in text.replace('x', ',').split(',')]
  if len(values) == 1:
    values *= 2
  if len(values) != 2 or min(values) <= 0:
    raise argparse.ArgumentTypeError(f'expected H,W (or one size), got {text!r}')
  return tuple(values)


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
