"""Evaluation: descriptors on the accelerator, exact FAISS search, Recall@N, result files.

The path of an evaluation (the same for training's validation and for `python -m vpr_jax.eval`):
database and query images -> `compute_descriptors` (jitted forward in fixed-size, padded batches,
sharded over the local devices) -> host float32 -> `search` (exact FAISS flat L2 on L2-normalised
descriptors) -> `recall_at_n` (the family's rule: a query counts at N when any of its top-N
predictions is a positive; the denominator is every query, also those without positives).

Result files (see `evaluate`):
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
Files are written atomically (temporary file in the same folder, then rename).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Sequence
import weakref

from absl import logging
import faiss
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from vpr_jax import checkpointing
from vpr_jax.data import benchmarks
from vpr_jax.data import eval_pipeline
from vpr_jax.data import train_pipeline
from vpr_jax.models import vpr_model

# The N of Recall@N reported by every repository of the family.
DEFAULT_NS = (1, 5, 10, 15, 20, 25)
# Mesh axis over which evaluation batches are split.
BATCH_AXIS = 'batch'


# ------------------------------------------------------------------------------------------------
# Descriptors on the accelerator.
# ------------------------------------------------------------------------------------------------

# (id(model), mesh key) -> (weak reference to the model, embed function). Keeps one jitted
# function per model so that validation every epoch reuses the compiled executable.
_EMBED_CACHE: dict[tuple[int, Any], tuple[weakref.ref, Callable]] = {}


def _mesh_key(mesh: Mesh) -> tuple:
  return (tuple(d.id for d in mesh.devices.flat), mesh.devices.shape, tuple(mesh.axis_names))


def eval_mesh(batch_size: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh evaluation batches are sharded over.

  All local devices when `batch_size` divides by their number, else the first local device alone
  (a batch cannot be split evenly; padding every batch instead would waste work on every step).

  Args:
    batch_size: images per evaluation batch.
    devices: devices to use; default `jax.local_devices()`.

  Returns:
    A 1-D `Mesh` with axis `BATCH_AXIS`.
  """
  devices = list(devices if devices is not None else jax.local_devices())
  if len(devices) > 1 and batch_size % len(devices):
    logging.warning('Evaluation batch size %d does not divide by the %d local devices: '
                    'evaluating on one device. Use a multiple of %d to use them all.',
                    batch_size, len(devices), len(devices))
    devices = devices[:1]
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def make_embed_fn(model, mesh: Mesh | None = None) -> Callable[[Any, Any], jax.Array]:
  """The jitted eval-mode forward pass `embed(variables, images) -> descriptors`.

  The function is built once per (model, mesh) and cached, so repeated evaluations (validation
  every epoch) do not recompile. `images` are uint8 [B, H, W, 3] (host or device arrays; B must
  divide by the mesh size); `variables` must already be placed with `replicate(variables, mesh)`.

  Args:
    model: a flax module whose `apply(variables, images, train=False)` returns a dict with
      'descriptors' [B, D].
    mesh: 1-D mesh with axis `BATCH_AXIS`; default: the first local device.

  Returns:
    `embed(variables, images) -> jax.Array float32 [B, D]`, sharded like the batch (asynchronous:
    convert with `np.asarray` when the values are needed).
  """
  if mesh is None:
    mesh = Mesh(np.asarray(jax.local_devices()[:1]), (BATCH_AXIS,))
  key = (id(model), _mesh_key(mesh))
  cached = _EMBED_CACHE.get(key)
  if cached is not None and cached[0]() is model:
    return cached[1]

  def forward(variables, images):
    outputs = model.apply(variables, images, train=False)
    return outputs['descriptors'].astype(jnp.float32)

  data_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())
  embed = jax.jit(forward, in_shardings=(replicated, data_sharding), out_shardings=data_sharding)
  # Drop entries of collected models so that ids are never confused after reuse.
  for stale in [k for k, (ref, _) in _EMBED_CACHE.items() if ref() is None]:
    del _EMBED_CACHE[stale]
  _EMBED_CACHE[key] = (weakref.ref(model), embed)
  return embed


def replicate(variables, mesh: Mesh):
  """Places `variables` on every device of `mesh` (a no-op when already there).

  Train-state variables of a multi-host run are global arrays; evaluation runs on each host's
  local devices, so a replicated global array is replaced by its local copy first.

  Args:
    variables: pytree of arrays (numpy or jax).
    mesh: the evaluation mesh.

  Returns:
    The pytree, replicated over `mesh`.
  """
  def to_local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise ValueError('Evaluation needs replicated variables; got an array of shape '
                         f'{x.shape} sharded as {x.sharding}.')
      return x.addressable_data(0)
    return x
  variables = jax.tree_util.tree_map(to_local, variables)
  return jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))


def compute_descriptors(model, variables, root: str, paths: Sequence[str], image_size,
                        batch_size: int, num_workers: int = 0, mesh: Mesh | None = None,
                        decode_options=None, progress: Callable[[int], None] | None = None
                        ) -> np.ndarray:
  """Descriptors of the images `root/paths[i]`, computed in eval mode.

  Batches have a fixed size (the last one padded, padding dropped by its mask) so the forward
  pass compiles once; batch i+1 is read while the device computes batch i.

  Args:
    model: the VPR model (see `make_embed_fn`).
    variables: its variables {'params', 'batch_stats'}.
    root: folder the paths are relative to.
    paths: image paths relative to `root`.
    image_size: (height, width) the images are resized to.
    batch_size: images per batch.
    num_workers: decoding worker processes (0: in this process).
    mesh: evaluation mesh; default `eval_mesh(batch_size)`.
    decode_options: `images.DecodeOptions` (EXIF orientation, fast JPEG decode); default exact
      with EXIF ignored, as the references.
    progress: called with the number of images of each batch once its descriptors are stored.

  Returns:
    float32 [len(paths), D], row i for paths[i].
  """
  num_images = len(paths)
  if num_images == 0:
    raise ValueError(f'No images to embed under {root}.')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  mesh = mesh if mesh is not None else eval_mesh(batch_size)
  embed = make_embed_fn(model, mesh)
  variables = replicate(variables, mesh)

  descriptors = None
  filled = np.zeros(num_images, bool)

  def store(pending):
    nonlocal descriptors
    outputs, mask, index = pending
    outputs = np.asarray(outputs, np.float32)
    if descriptors is None:
      descriptors = np.zeros((num_images, outputs.shape[-1]), np.float32)
    rows = index[mask]
    if rows.size and (rows.min() < 0 or rows.max() >= num_images):
      raise ValueError(f'Evaluation batch index out of range [0, {num_images}).')
    descriptors[rows] = outputs[mask]
    filled[rows] = True
    if progress is not None:
      progress(int(rows.size))

  iterator = eval_pipeline.make_eval_iterator(root, list(paths), tuple(image_size), batch_size,
                                              num_workers=num_workers,
                                              decode_options=decode_options)
  pending = None
  for batch in iterator:
    images = np.asarray(batch['images'])
    mask = np.asarray(batch['mask'], bool)
    index = np.asarray(batch['index'], np.int64)
    if images.shape[0] != batch_size:
      # A short batch would compile a second executable: pad it here.
      pad = batch_size - images.shape[0]
      if pad < 0:
        raise ValueError(f'Evaluation batch of {images.shape[0]} images, expected {batch_size}.')
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
      index = np.concatenate([index, np.full(pad, -1, np.int64)])
    outputs = embed(variables, images)
    if pending is not None:
      store(pending)
    pending = (outputs, mask, index)
  if pending is not None:
    store(pending)
  if not filled.all():
    missing = [paths[i] for i in np.flatnonzero(~filled)[:5]]
    raise RuntimeError(f'{int((~filled).sum())} of {num_images} images under {root} got no '
                       f'descriptor (first: {missing}).')
  return descriptors


# ------------------------------------------------------------------------------------------------
# Search and Recall@N.
# ------------------------------------------------------------------------------------------------

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


def recall_from_hits(hits, ns: Iterable[int] = DEFAULT_NS) -> dict[int, float]:
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


def recall_at_n(predictions, positives: Sequence[Any], ns: Iterable[int] = DEFAULT_NS,
                num_database: int | None = None) -> dict[int, float]:
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


# ------------------------------------------------------------------------------------------------
# One dataset.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalResult:
  """The evaluation of one benchmark set.

  Attributes:
    dataset: benchmark name.
    num_database: database images.
    num_queries: query images.
    queries_without_positives: queries with no database image within the positive radius.
    recall: {N: percent}.
    database_descriptors: float32 [N, D].
    query_descriptors: float32 [M, D].
    predictions: int64 [M, k] database indices, best first.
    distances: float32 [M, k] squared L2 distances between normalised descriptors.
    correct: bool [M, k], prediction is a positive.
    benchmark: the `BenchmarkSet` evaluated (paths, UTM coordinates, positives).
    seconds: wall time per phase ('embed': database and queries, 'search').
  """
  dataset: str
  num_database: int
  num_queries: int
  queries_without_positives: int
  recall: dict[int, float]
  database_descriptors: np.ndarray
  query_descriptors: np.ndarray
  predictions: np.ndarray
  distances: np.ndarray
  correct: np.ndarray
  benchmark: Any = None
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  def summary(self) -> dict[str, Any]:
    """The JSON record of this result (recall keys are strings)."""
    return {
        'dataset': self.dataset,
        'num_database': int(self.num_database),
        'num_queries': int(self.num_queries),
        'queries_without_positives': int(self.queries_without_positives),
        'recall': {str(n): float(v) for n, v in self.recall.items()},
        'descriptor_dim': int(self.query_descriptors.shape[1]),
        'positive_radius_m': getattr(self.benchmark, 'radius_m', None),
        'listing_sha1': getattr(self.benchmark, 'listing_sha1', None),
        'seconds': {k: round(float(v), 3) for k, v in self.seconds.items()},
    }


def evaluate_dataset(model, variables, benchmark, image_size, batch_size: int,
                     num_workers: int = 0, ns: Iterable[int] = DEFAULT_NS,
                     mesh: Mesh | None = None) -> EvalResult:
  """Descriptors, search and Recall@N of one benchmark set.

  Every process computes all descriptors on its own local devices (a multi-host run gets the same
  numbers on every host without communication).

  Args:
    model: the VPR model.
    variables: its variables (host, device or replicated train-state arrays; under pmap, the
      unreplicated copy without the leading device axis).
    benchmark: a `vpr_jax.data.benchmarks.BenchmarkSet`.
    image_size: (height, width) of the model input.
    batch_size: images per forward batch.
    num_workers: decoding worker processes.
    ns: the N of Recall@N.
    mesh: evaluation mesh; default `eval_mesh(batch_size)`.

  Returns:
    An `EvalResult`.
  """
  ns = tuple(int(n) for n in ns)
  num_database = len(benchmark.database_paths)
  num_queries = len(benchmark.queries_paths)
  if num_database == 0 or num_queries == 0:
    raise ValueError(f'Benchmark {benchmark.name} at {benchmark.root} has {num_database} '
                     f'database and {num_queries} query images; both must be non-empty.')
  mesh = mesh if mesh is not None else eval_mesh(batch_size)
  seconds = {}
  start = time.perf_counter()
  # One pass over database then queries: worker processes start once per dataset.
  descriptors = compute_descriptors(
      model, variables, benchmark.root, list(benchmark.database_paths) +
      list(benchmark.queries_paths), image_size, batch_size, num_workers, mesh=mesh)
  database, queries = descriptors[:num_database], descriptors[num_database:]
  seconds['embed'] = time.perf_counter() - start
  start = time.perf_counter()
  distances, predictions = search(database, queries, max(ns))
  seconds['search'] = time.perf_counter() - start
  recall = recall_at_n(predictions, benchmark.positives, ns, num_database=num_database)
  return EvalResult(
      dataset=benchmark.name,
      num_database=num_database,
      num_queries=num_queries,
      queries_without_positives=sum(1 for p in benchmark.positives if np.size(p) == 0),
      recall=recall,
      database_descriptors=database,
      query_descriptors=queries,
      predictions=predictions,
      distances=distances,
      correct=hit_matrix(predictions, benchmark.positives),
      benchmark=benchmark,
      seconds=seconds)


# ------------------------------------------------------------------------------------------------
# The seed's table.
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Result files.
# ------------------------------------------------------------------------------------------------

def _atomic_write(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
  """Writes via `write(file)` to a temporary file next to `path`, then renames it into place."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
  try:
    with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'newline': ''})) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, results: Sequence[EvalResult], extra: Mapping[str, Any] | None = None
               ) -> None:
  """Writes the recall summary: one object for one dataset, a list of objects for several.

  Args:
    path: output file.
    results: the evaluated datasets.
    extra: fields added to every object (e.g. checkpoint, step, image_size).
  """
  records = [{**r.summary(), **(dict(extra) if extra else {})} for r in results]
  payload = records[0] if len(records) == 1 else records
  _atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2) + '\n'))


def _safe_name(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'dataset'


def per_dataset_path(path: str, dataset: str, num_datasets: int) -> str:
  """`path` for one dataset; `<stem>_<dataset><ext>` when several share one file name."""
  if num_datasets == 1:
    return path
  stem, ext = os.path.splitext(path)
  return f'{stem}_{_safe_name(dataset)}{ext}'


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
  _atomic_write(path, write, binary=True)


PREDICTION_COLUMNS = ('dataset', 'query_index', 'query', 'rank', 'database_index', 'database',
                      'distance_m', 'correct', 'descriptor_distance')


def _format_metres(value: float) -> str:
  # Precomputed ground truth may come with names that carry no coordinates.
  return f'{value:.2f}' if np.isfinite(value) else ''


def prediction_rows(result: EvalResult, top_k: int | None = None) -> Iterable[list[Any]]:
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


def save_predictions(path: str, results: Sequence[EvalResult], top_k: int | None = None) -> None:
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
  _atomic_write(path, write)


# ------------------------------------------------------------------------------------------------
# The library entry point of `python -m vpr_jax.eval`.
# ------------------------------------------------------------------------------------------------

def evaluate(checkpoint: str | None, datasets: Sequence[str] | None = None,
             data_root: str = '', *, config=None, batch_size: int | None = None,
             num_workers: int | None = None, output: str | None = None,
             save_descriptors_to: str | None = None, save_predictions_to: str | None = None,
             visualize: int = 0, only_failures: bool = False,
             visualize_dir: str | None = None, visualize_k: int = 5,
             print_fn: Callable[[str], None] = print) -> list[EvalResult]:
  """Evaluates a checkpoint on benchmark sets, prints the tables and writes the requested files.

  Args:
    checkpoint: checkpoint or training workdir (the best checkpoint is used); None or '': the most
      recent run in the default runs folder.
    datasets: registered benchmark names or folders; default: the config's validation sets.
    data_root: datasets root; '' -> the config's data.root, then $VPR_DATA_ROOT.
    config: a ConfigDict used instead of the checkpoint's (e.g. another image size or radius).
    batch_size: images per forward batch; default config.data.eval_batch_size.
    num_workers: decoding worker processes (-1: one per core); default config.data.num_workers.
    output: JSON summary file.
    save_descriptors_to: `.npz` descriptors file (one per dataset when several).
    save_predictions_to: predictions CSV.
    visualize: number of query sheets (PNG) per dataset; 0 for none.
    only_failures: visualise only queries whose top-1 prediction is wrong.
    visualize_dir: folder of the sheets (a subfolder per dataset); default ./visualizations.
    visualize_k: predictions per sheet.
    print_fn: where the tables and notes go.

  Returns:
    One `EvalResult` per dataset, in the order given.
  """
  if not checkpoint:
    runs_dir = checkpointing.default_runs_dir()
    checkpoint = checkpointing.find_latest_run(runs_dir)
    if checkpoint is None:
      raise FileNotFoundError(f'No --checkpoint given and no run with a checkpoint under '
                              f'{os.path.abspath(runs_dir)} (set $VPR_RUNS_DIR or pass '
                              '--checkpoint).')
  checkpoint_config, variables, step = checkpointing.load_for_eval(checkpoint)
  print_fn(f'Checkpoint: {os.path.abspath(checkpoint)} (step {step})')
  if config is None:
    config = checkpoint_config
  elif config.model.to_dict() != checkpoint_config.model.to_dict():
    logging.warning('The model fields of the given config differ from those of the checkpoint; '
                    'the checkpoint variables may not fit.')
  datasets = list(datasets) if datasets else list(config.data.val_datasets)
  if not datasets:
    raise ValueError('No dataset to evaluate: pass --dataset.')
  batch_size = int(batch_size or config.data.eval_batch_size)
  num_workers = train_pipeline.resolve_num_workers(
      config.data.num_workers if num_workers is None else num_workers)
  image_size = tuple(int(s) for s in config.image_size)
  radius = float(config.data.positive_radius_m)
  model = vpr_model.build_model(config)
  if config is not checkpoint_config:
    # A config of another architecture would otherwise fail deep inside the forward pass.
    expected = jax.eval_shape(
        lambda: vpr_model.init_variables(model, jax.random.PRNGKey(0), image_size))
    differences = checkpointing.tree_differences(expected, variables)
    if differences:
      raise checkpointing.CheckpointMismatchError(
          f'The variables of {os.path.abspath(checkpoint)} (step {step}) do not fit the model of '
          'the given config; evaluate without --config, or with the config the checkpoint was '
          'trained with. Differences:\n  ' + '\n  '.join(differences))
  root = data_root or config.data.root

  results = []
  for name in datasets:
    benchmark = benchmarks.load_benchmark(name, root, radius_m=radius)
    result = evaluate_dataset(model, variables, benchmark, image_size, batch_size, num_workers)
    print_fn(format_recall_table(result.dataset, result.recall))
    notes = []
    if result.queries_without_positives:
      within = (f'within {benchmark.radius_m:g} m' if benchmark.radius_m is not None
                else 'in the ground truth')
      notes.append(f'{result.queries_without_positives} of {result.num_queries} queries have no '
                   f'positive {within} (counted as misses).')
    if result.num_database < max(DEFAULT_NS):
      notes.append(f'The database has only {result.num_database} images: Recall@N for larger N '
                   'uses all of them.')
    for note in notes:
      print_fn(note)
    results.append(result)

  extra = {'checkpoint': os.path.abspath(checkpoint), 'step': None if step is None else int(step),
           'image_size': list(image_size)}
  if output:
    write_json(output, results, extra)
    print_fn(f'Wrote {output}')
  if save_descriptors_to:
    for result in results:
      path = per_dataset_path(save_descriptors_to, result.dataset, len(results))
      save_descriptors(path, result)
      print_fn(f'Wrote {path}')
  if save_predictions_to:
    save_predictions(save_predictions_to, results)
    print_fn(f'Wrote {save_predictions_to}')
  if visualize:
    from vpr_jax import visualize as visualize_lib  # pylint: disable=g-import-not-at-top
    visualize_dir = visualize_dir or 'visualizations'
    for result in results:
      folder = os.path.join(visualize_dir, _safe_name(result.dataset))
      written = visualize_lib.visualize_predictions(result, folder, visualize, top_k=visualize_k,
                                                    only_failures=only_failures)
      print_fn(f'Wrote {len(written)} query sheets to {folder}')
  return results
