"""Small helpers shared by the benchmark scripts: argument parsing and result files."""

import argparse
import json
import os


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
