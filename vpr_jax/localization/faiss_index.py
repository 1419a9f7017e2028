"""FAISS for localisation: factory strings, training, adding rows, nprobe, index files.

Distances are L2 distances between L2-normalised descriptors (sqrt of what `search.search`
ranks by); with the default flat index the ranking is evaluation's.
"""

from __future__ import annotations

import math
from typing import Iterable

import faiss
import numpy as np

from vpr_jax import fileio
from vpr_jax.errors import FaissIndexError

DEFAULT_FAISS_FACTORY = 'Flat'
DEFAULT_NPROBE = 32
# Vectors a trained FAISS index (IVF, PQ) is trained on, at most (a random sample of the rows).
DEFAULT_FAISS_TRAIN_SIZE = 262144
# Smallest database for the 'ivfpq' shorthand: PQ and IVF need thousands of training vectors.
MIN_IVFPQ_IMAGES = 10000


def resolve_faiss_factory(factory: str, num_vectors: int, dim: int) -> str:
  """A FAISS factory string; 'flat' and 'ivfpq' are shorthands.

  'ivfpq' picks IVF<nlist>,PQ<m>: nlist the power of two nearest 4 sqrt(N) (at most N / 39, the
  points per centroid FAISS asks for), m the largest divisor of D up to min(64, D / 2) (at most
  64-byte codes).

  Args:
    factory: 'flat', 'ivfpq' or any FAISS factory string (e.g. 'IVF4096,PQ64').
    num_vectors: database size.
    dim: descriptor size.

  Returns:
    The factory string.

  Raises:
    FaissIndexError: 'ivfpq' for fewer than `MIN_IVFPQ_IMAGES` vectors.
  """
  name = factory.strip()
  if name.lower() == 'flat':
    return 'Flat'
  if name.lower() != 'ivfpq':
    return name
  if num_vectors < MIN_IVFPQ_IMAGES:
    raise FaissIndexError(
        f'--faiss ivfpq needs at least {MIN_IVFPQ_IMAGES} images to train, the folder has '
        f'{num_vectors}: use the default flat index (exact, and fast at this size).')
  nlist = 2 ** round(math.log2(4 * math.sqrt(num_vectors)))
  while nlist > 1 and num_vectors < 39 * nlist:
    nlist //= 2
  m = max(d for d in range(1, min(64, max(1, dim // 2)) + 1) if dim % d == 0)
  return f'IVF{nlist},PQ{m}'


def check_factory(factory: str, num_vectors: int, dim: int) -> str:
  """`resolve_faiss_factory`, and FAISS's own parse of the result for `dim`-d vectors.

  Run before any work, so that a mistyped factory string fails at once.

  Raises:
    FaissIndexError: the string is not understood, or 'ivfpq' for too few vectors.
  """
  resolved = resolve_faiss_factory(factory, num_vectors, dim)
  try:
    faiss.index_factory(int(dim), resolved, faiss.METRIC_L2)
  except RuntimeError as e:
    raise FaissIndexError(f'--faiss {factory!r}: FAISS does not understand the factory string '
                          f'{resolved!r} for {dim}-d descriptors: '
                          f'{str(e).strip().splitlines()[-1]}') from None
  return resolved


def needs_training(factory: str, dim: int) -> bool:
  """Whether an index of `factory` must be trained before rows are added (IVF, PQ)."""
  return not faiss.index_factory(dim, factory, faiss.METRIC_L2).is_trained


def train_faiss_index(factory: str, dim: int, training: np.ndarray) -> faiss.Index:
  """An empty FAISS index (L2 metric) of `factory`, trained on `training` when it needs it.

  Raises:
    FaissIndexError: the factory string is not understood, or training failed (too few vectors).
  """
  try:
    index = faiss.index_factory(int(dim), factory, faiss.METRIC_L2)
  except RuntimeError as e:
    raise FaissIndexError(f'FAISS factory string {factory!r} not understood: '
                          f'{str(e).strip().splitlines()[-1]}') from None
  _disable_polysemous_training(index)
  if not index.is_trained:
    training = np.ascontiguousarray(training, np.float32)
    try:
      index.train(training)
    except RuntimeError as e:
      raise FaissIndexError(
          f'FAISS index {factory!r} could not be trained on {len(training)} descriptors: '
          f'{str(e).strip().splitlines()[-1]}') from None
  return index


def train_on_sample(factory: str, descriptors: np.ndarray, train_size: int) -> faiss.Index:
  """`train_faiss_index` on at most `train_size` rows of `descriptors` (a seeded random sample)."""
  rng = np.random.default_rng(0)
  sample = np.sort(rng.choice(len(descriptors), min(len(descriptors), int(train_size)),
                              replace=False))
  return train_faiss_index(factory, int(descriptors.shape[1]), descriptors[sample])


def _disable_polysemous_training(index: faiss.Index) -> None:
  # FAISS trains PQ codes for polysemous (Hamming-filtered) search by default, which this module
  # never uses: on 65k 256-d vectors that training takes minutes, the rest of it seconds.
  node = index
  while node is not None:
    node = faiss.downcast_index(node)
    if hasattr(node, 'do_polysemous_training'):
      node.do_polysemous_training = False
    node = getattr(node, 'index', None) if isinstance(node, faiss.IndexPreTransform) else None
  try:
    ivf = faiss.extract_index_ivf(index)
  except RuntimeError:
    return
  if hasattr(ivf, 'do_polysemous_training'):
    ivf.do_polysemous_training = False


def add_in_chunks(index: faiss.Index, vectors: np.ndarray | Iterable[np.ndarray],
                  chunk: int = 65536) -> faiss.Index:
  """Adds rows (an array of any float dtype, or an iterable of arrays) as float32, chunk by chunk."""
  if isinstance(vectors, np.ndarray):
    array = vectors
    vectors = (array[i:i + chunk] for i in range(0, len(array), chunk))
  for part in vectors:
    index.add(np.ascontiguousarray(part, np.float32))
  return index


def filled(template: faiss.Index, vectors: np.ndarray) -> faiss.Index:
  """A copy of the (trained, empty) `template` holding `vectors`, in row order."""
  return add_in_chunks(faiss.clone_index(template), vectors)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
  """Sets the inverted lists probed per query (no-op for indexes without inverted lists)."""
  try:
    faiss.extract_index_ivf(index).nprobe = int(nprobe)
  except (RuntimeError, AttributeError):
    pass


def write_index(path: str, index: faiss.Index) -> None:
  """Writes a FAISS index file atomically."""
  with fileio.atomic_open(path, binary=True) as f:
    faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def read_index(path: str) -> faiss.Index:
  """Reads a FAISS index file."""
  return faiss.read_index(path)
