"""One benchmark set evaluated: descriptors -> search -> Recall@N, as an `EvalResult`.

`evaluate_dataset` is the path that training's validation and `python -m vpr_jax.eval` share;
`Evaluator` binds it to a model and a list of sets (training calls its `run` every epoch).
"""

import dataclasses
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh
import numpy as np
from tqdm import auto as tqdm

from vpr_jax.data.imaging import images
from vpr_jax.evaluation import descriptors
from vpr_jax.evaluation import search

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
                     num_workers: int = 0, ns: Iterable[int] = search.RECALL_NS,
                     mesh: Optional[Mesh] = None, progress: bool = True,
                     interpolation: str = 'bilinear') -> EvalResult:
  """Descriptors, search and Recall@N of one benchmark set.

  Every process computes all descriptors on its own local devices (a multi-host run gets the same
  numbers on every host without communication).

  Args:
    model: the VPR model.
    variables: its variables (host, device or replicated train-state arrays; under pmap, the
      unreplicated copy without the leading device axis).
    benchmark: a `vpr_jax.data.evaluation.benchmarks.BenchmarkSet`.
    image_size: (height, width) of the model input.
    batch_size: images per forward batch.
    num_workers: decoding worker processes.
    ns: the N of Recall@N.
    mesh: evaluation mesh; default `eval_mesh(batch_size)`.
    progress: show a progress bar of the images embedded (process 0, stderr).
    interpolation: the resize, 'bilinear' or 'bicubic' (config data.eval_interpolation).

  Returns:
    An `EvalResult`.
  """
  ns = tuple(int(n) for n in ns)
  num_database = len(benchmark.database_paths)
  num_queries = len(benchmark.queries_paths)
  if num_database == 0 or num_queries == 0:
    raise ValueError(f'Benchmark {benchmark.name} at {benchmark.root} has {num_database} '
                     f'database and {num_queries} query images; both must be non-empty.')
  mesh = mesh if mesh is not None else descriptors.eval_mesh(batch_size)
  seconds = {}
  start = time.perf_counter()
  # One pass over database then queries: worker processes start once per dataset.
  bar = tqdm.tqdm(total=num_database + num_queries, desc=f'{benchmark.name}: embedding',
                  unit='img', leave=False, dynamic_ncols=True, file=sys.stderr,
                  disable=not progress or jax.process_index() != 0)
  all_descriptors = descriptors.compute_descriptors(
      model, variables, benchmark.root, list(benchmark.database_paths) +
      list(benchmark.queries_paths), image_size, batch_size, num_workers, mesh=mesh,
      decode_options=images.DecodeOptions(interpolation=interpolation), progress=bar.update,
      image_reader=getattr(benchmark, 'image_reader', None))
  bar.close()
  database, queries = all_descriptors[:num_database], all_descriptors[num_database:]
  seconds['embed'] = time.perf_counter() - start
  start = time.perf_counter()
  distances, predictions = search.search(database, queries, max(ns))
  seconds['search'] = time.perf_counter() - start
  recall = search.recall_at_n(predictions, benchmark.positives, ns, num_database=num_database)
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
      correct=search.hit_matrix(predictions, benchmark.positives),
      benchmark=benchmark,
      seconds=seconds)


class Evaluator:
  """Recall@N of one model on fixed benchmark sets; `run(variables)` evaluates them all.

  Training builds one and calls `run` at every validation, so the sets are loaded (and their
  positives computed) once and the jitted forward is compiled once.
  """

  def __init__(self, model, benchmarks: Sequence[Any], image_size: Sequence[int],
               batch_size: int, num_workers: int = 0, ns: Iterable[int] = search.RECALL_NS,
               interpolation: str = 'bilinear'):
    """Binds the model and the sets.

    Args:
      model: the eval-mode VPR model.
      benchmarks: `data.benchmarks.BenchmarkSet`s, the first one ranks checkpoints.
      image_size: (height, width) of the model input.
      batch_size: images per forward batch.
      num_workers: decoding worker processes.
      ns: the N of Recall@N.
      interpolation: the resize, 'bilinear' or 'bicubic' (config data.eval_interpolation).
    """
    self.model = model
    self.interpolation = interpolation
    self.benchmarks = list(benchmarks)
    self.image_size = tuple(int(s) for s in image_size)
    self.batch_size = int(batch_size)
    self.num_workers = int(num_workers)
    self.ns = tuple(int(n) for n in ns)

  @property
  def names(self) -> list[str]:
    """The names of the sets, in evaluation order."""
    return [bench.name for bench in self.benchmarks]

  def run(self, variables: Mapping[str, Any]) -> dict[str, EvalResult]:
    """Evaluates `variables` on every set.

    Args:
      variables: {'params', 'batch_stats'} (host, device or replicated arrays).

    Returns:
      {set name: EvalResult}, in the order of the sets.
    """
    return {bench.name: evaluate_dataset(self.model, variables, bench, self.image_size,
                                         self.batch_size, self.num_workers, self.ns,
                                         interpolation=self.interpolation)
            for bench in self.benchmarks}
