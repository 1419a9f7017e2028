"""Evaluation results for people and files: the seed's recall table, JSON, NPZ and CSV.

- JSON (`write_json`): one object per dataset with `dataset`, `num_database`, `num_queries`,
  `queries_without_positives`, `recall` ({"1": percent, "5": ...}, string keys) and a few
  descriptive fields; one dataset -> that object, several -> a list of them in the order asked.
- Descriptors (`save_descriptors`): `.npz` with float32 `database` [N, D] and `queries` [M, D],
  unicode string arrays `database_paths` / `queries_paths` (relative to the benchmark split
  folder, row order of the descriptors) and float64 `database_utm` / `queries_utm` [., 2].
  Several datasets -> one file per dataset, `<stem>_<dataset>.npz`.
- Predictions (`save_predictions`): CSV, one row per (query, rank), columns `dataset, query_index,
  query, rank (1-based), database_index, database, distance_m (UTM, metres), correct (1/0),
  descriptor_distance (squared L2 between normalised descriptors)`; several datasets share a file.
Files are written atomically (`fileio.atomic_write`).
"""

import csv
import io
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from vpr_jax import fileio
from vpr_jax.evaluation.benchmark_eval import EvalResult

def _center(text: str, width: int) -> str:
  # Odd leftovers go to the side that keeps the text visually centred, as PrettyTable does.
  excess = width - len(text)
  if excess <= 0:
    return text
  left = excess // 2
  if excess % 2 and len(text) % 2 == 0:
    left += 1
  return ' ' * left + text + ' ' * (excess - left)


def format_recall_table(name: str, recall: Mapping[int, float]) -> str:
  """The seed's `Performance on <name>` table: a K row and a Recall@K row (percent, 2 decimals).

  Args:
    name: dataset name shown in the title.
    recall: {N: percent}.

  Returns:
    The table as a multi-line string (no trailing newline).
  """
  header = ['K'] + [str(n) for n in recall]
  row = ['Recall@K'] + [f'{v:.2f}' for v in recall.values()]
  widths = [max(len(h), len(r)) for h, r in zip(header, row)]
  title = f'Performance on {name}'
  # A title wider than the table grows the columns in proportion (as PrettyTable does).
  min_content = len(title) + 2 - 3 * len(widths) + 1
  if sum(widths) < min_content:
    scale = min_content / sum(widths)
    widths = [int(w * scale) for w in widths]
    widths[-1] += min_content - sum(widths)
  inner = sum(w + 2 for w in widths) + len(widths) - 1
  rule = '+' + '+'.join('-' * (w + 2) for w in widths) + '+'

  def line(cells):
    return '|' + '|'.join(' ' + _center(c, w) + ' ' for c, w in zip(cells, widths)) + '|'

  return '\n'.join([
      '+' + '-' * inner + '+',
      '|' + _center(' ' + title + ' ', inner) + '|',
      rule, line(header), rule, line(row), rule])


def write_json(path: str, results: Sequence[EvalResult], extra: Optional[Mapping[str, Any]] = None
               ) -> None:
  """Writes the recall summary: one object for one dataset, a list of objects for several.

  Args:
    path: output file.
    results: the evaluated datasets.
    extra: fields added to every object (e.g. checkpoint, step, image_size).
  """
  records = [{**r.summary(), **(dict(extra) if extra else {})} for r in results]
  payload = records[0] if len(records) == 1 else records
  fileio.atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2) + '\n'))


def per_dataset_path(path: str, dataset: str, num_datasets: int) -> str:
  """`path` for one dataset; `<stem>_<dataset><ext>` when several share one file name."""
  if num_datasets == 1:
    return path
  stem, ext = os.path.splitext(path)
  return f'{stem}_{fileio.safe_file_name(dataset)}{ext}'


def save_descriptors(path: str, result: EvalResult) -> None:
  """Writes the descriptors and image paths of one dataset to an `.npz` file (see module doc)."""
  benchmark = result.benchmark
  arrays = {
      'database': np.asarray(result.database_descriptors, np.float32),
      'queries': np.asarray(result.query_descriptors, np.float32),
      'database_paths': np.asarray([str(p) for p in benchmark.database_paths], dtype=np.str_),
      'queries_paths': np.asarray([str(p) for p in benchmark.queries_paths], dtype=np.str_),
  }
  for field in ('database_utm', 'queries_utm'):
    value = getattr(benchmark, field, None)
    if value is not None:
      arrays[field] = np.asarray(value, np.float64)

  def write(f):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    f.write(buffer.getvalue())
  fileio.atomic_write(path, write, binary=True)


PREDICTION_COLUMNS = ('dataset', 'query_index', 'query', 'rank', 'database_index', 'database',
                      'distance_m', 'correct', 'descriptor_distance')


def _format_metres(value: float) -> str:
  # Precomputed ground truth may come with names that carry no coordinates.
  return f'{value:.2f}' if np.isfinite(value) else ''


def prediction_rows(result: EvalResult, top_k: Optional[int] = None) -> Iterable[list[Any]]:
  """Rows of the predictions CSV for one dataset (one per query and rank)."""
  benchmark = result.benchmark
  k = result.predictions.shape[1] if top_k is None else min(top_k, result.predictions.shape[1])
  predictions = result.predictions[:, :k]
  database_utm = np.asarray(benchmark.database_utm, np.float64)
  queries_utm = np.asarray(benchmark.queries_utm, np.float64)
  metres = np.linalg.norm(database_utm[predictions] - queries_utm[:, None, :], axis=-1)
  for q in range(predictions.shape[0]):
    for r in range(k):
      d = int(predictions[q, r])
      yield [result.dataset, q, benchmark.queries_paths[q], r + 1, d, benchmark.database_paths[d],
             _format_metres(metres[q, r]), int(result.correct[q, r]),
             f'{float(result.distances[q, r]):.6f}']


def save_predictions(path: str, results: Sequence[EvalResult], top_k: Optional[int] = None) -> None:
  """Writes the top-k predictions of every dataset to one CSV (see module doc).

  Args:
    path: output file.
    results: the evaluated datasets.
    top_k: predictions per query (default: all that were searched, max N of Recall@N).
  """
  def write(f):
    writer = csv.writer(f)
    writer.writerow(PREDICTION_COLUMNS)
    for result in results:
      writer.writerows(prediction_rows(result, top_k))
  fileio.atomic_write(path, write)
