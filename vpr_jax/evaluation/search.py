"""Exact nearest-neighbour search (FAISS) and Recall@N, by the rule of the GSV-Cities family.

`search` ranks the database for each query (exact flat L2 on L2-normalised float32 descriptors:
the same ranking as inner product); `recall_at_n` counts a query at N when any of its top-N
predictions is a positive, over every query, also those without positives.
"""

from typing import Any, Iterable, Optional, Sequence

from absl import logging
import faiss
import numpy as np

# The N of Recall@N reported by every repository of the family.
RECALL_NS = (1, 5, 10, 15, 20, 25)

def _normalised(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f'{name} descriptors: expected a non-empty [num, dim] array, got shape '
                     f'{x.shape}.')
  if not np.isfinite(x).all():
    raise ValueError(f'{name} descriptors contain NaN or infinite values.')
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def search(database, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact nearest database descriptors of each query.

  FAISS `IndexFlatL2` on L2-normalised float32 descriptors (the same ranking as inner product);
  the GPU flat index when faiss has GPUs, the CPU one when it has none or the GPU one fails.

  Args:
    database: [N, D] descriptors.
    queries: [M, D] descriptors.
    k: neighbours per query; clamped to N.

  Returns:
    (distances float32 [M, min(k, N)] squared L2 between normalised descriptors, ascending;
     predictions int64 [M, min(k, N)] database row indices).
  """
  database = _normalised(database, 'database')
  queries = _normalised(queries, 'query')
  if database.shape[1] != queries.shape[1]:
    raise ValueError(f'Descriptor sizes differ: database {database.shape[1]}, '
                     f'queries {queries.shape[1]}.')
  if k < 1:
    raise ValueError(f'k must be positive, got {k}.')
  k = min(int(k), database.shape[0])
  dim = database.shape[1]
  if faiss.get_num_gpus() > 0:
    try:
      index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
      index.add(database)
      distances, predictions = index.search(queries, k)
      return distances.astype(np.float32), predictions.astype(np.int64)
    except (RuntimeError, MemoryError) as e:  # e.g. memory held by the JAX allocator.
      logging.warning('FAISS GPU search failed (%s); searching on the CPU.', e)
  index = faiss.IndexFlatL2(dim)
  index.add(database)
  distances, predictions = index.search(queries, k)
  return distances.astype(np.float32), predictions.astype(np.int64)


def hit_matrix(predictions, positives: Sequence[Any]) -> np.ndarray:
  """hits[q, r] = predictions[q, r] is a positive of query q.

  Args:
    predictions: int [M, k] database indices (negative entries never hit).
    positives: M integer arrays of database indices.

  Returns:
    bool [M, k].
  """
  predictions = np.asarray(predictions, np.int64)
  if predictions.ndim != 2:
    raise ValueError(f'predictions: expected [num_queries, k], got shape {predictions.shape}.')
  num_queries = predictions.shape[0]
  if len(positives) != num_queries:
    raise ValueError(f'positives has {len(positives)} entries for {num_queries} queries.')
  lists = [np.asarray(p, np.int64).reshape(-1) for p in positives]
  counts = np.asarray([p.size for p in lists], np.int64)
  flat = np.concatenate(lists) if counts.sum() else np.zeros(0, np.int64)
  if flat.size and flat.min() < 0:
    raise ValueError('positives contain negative database indices.')
  # Encode (query, database index) pairs as single integers and test membership in one sort.
  width = int(max(predictions.max(initial=0), flat.max(initial=0))) + 1
  positive_keys = np.repeat(np.arange(num_queries, dtype=np.int64), counts) * width + flat
  prediction_keys = np.arange(num_queries, dtype=np.int64)[:, None] * width + predictions
  return np.isin(prediction_keys, positive_keys) & (predictions >= 0)


def recall_from_hits(hits, ns: Iterable[int] = RECALL_NS) -> dict[int, float]:
  """Recall@N in percent from a hit matrix (see `recall_at_n`)."""
  hits = np.asarray(hits, bool)
  num_queries, k = hits.shape
  if num_queries == 0 or k == 0:
    raise ValueError(f'Recall needs at least one query and one prediction, got {hits.shape}.')
  found_within = np.logical_or.accumulate(hits, axis=1)
  recall = {}
  for n in ns:
    if int(n) < 1:
      raise ValueError(f'Recall@N needs N >= 1, got {n}.')
    recall[int(n)] = 100.0 * float(found_within[:, min(int(n), k) - 1].sum()) / num_queries
  return recall


def recall_at_n(predictions, positives: Sequence[Any], ns: Iterable[int] = RECALL_NS,
                num_database: Optional[int] = None) -> dict[int, float]:
  """Recall@N in percent, by the rule of the GSV-Cities family.

  A query counts at N when any of its top-N predictions is a positive. The denominator is all
  queries, including those without any positive (so R@N <= 100 * share of queries with one).
  When there are fewer than N predictions per query (database smaller than N), R@N uses all of
  them; a warning says so.

  Args:
    predictions: int [M, k] database indices, best first.
    positives: M integer arrays of the positive database indices of each query.
    ns: the N to report.
    num_database: database size, if known: checks that k was not cut short by the caller.

  Returns:
    {N: percent} for each N in `ns`.
  """
  ns = tuple(int(n) for n in ns)
  predictions = np.asarray(predictions)
  k = predictions.shape[1] if predictions.ndim == 2 else 0
  largest = max(ns)
  if num_database is not None and k < min(largest, num_database):
    raise ValueError(f'Recall@{largest} needs {min(largest, num_database)} predictions per query, '
                     f'got {k}.')
  hits = hit_matrix(predictions, positives)
  if all(np.size(p) == 0 for p in positives):
    logging.warning('No query has a positive in the database: every Recall@N is 0.')
  if k < largest:
    logging.warning('Only %d predictions per query (database of %s images): Recall@N for N > %d '
                    'uses all %d.', k, num_database if num_database is not None else k, k, k)
  return recall_from_hits(hits, ns)
