"""Benchmark list files: image paths and ground truth in `.npy` files, read safely and checked.

The gsv-cities family ships, per benchmark, `<prefix>_dbImages.npy` and `<prefix>_qImages.npy`
(1-D string arrays of image paths relative to the image folder) and `<prefix>_gt.npy` (per query,
the database indices of its positives: an object array of index arrays or lists, or an int
array `[num_queries, K]` such as SPED's `[607, 1]`); MSLS val has `qIdx` (the queries used,
indices into qImages) and `pIdx` (their positives) instead of `gt`. A query with an empty list has
no positive and stays in the Recall@N denominator, as in the family.

These files come from other people: they are read with `safe_numpy` (object arrays rebuilt from
plain data only, never unpickled), and every inconsistency is one line naming the file: a file
missing or truncated, lengths that disagree, an index out of range, a path outside the folder, a
listed image that is not there.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np

from vpr_jax import safe_numpy
from vpr_jax.data.evaluation import registry
from vpr_jax.errors import DatasetNotFoundError
from vpr_jax.errors import MalformedDatasetError


def read_paths(path: str) -> list[str]:
  """The image paths of a `*_dbImages.npy` / `*_qImages.npy` file (relative, '/'-separated).

  Raises:
    ArrayFileError / UnsafeArrayFileError: unreadable or refused file.
    MalformedDatasetError: not a 1-D array of relative paths.
  """
  array = safe_numpy.load_npy(path)
  if array.ndim != 1 or array.dtype.kind not in 'USO':
    raise MalformedDatasetError(
        f'{path!r}: expected a 1-D array of image paths, got {array.dtype} {array.shape}.')
  paths = []
  for i, entry in enumerate(array):
    if isinstance(entry, bytes):
      entry = entry.decode('utf-8', 'replace')
    if not isinstance(entry, str) or not entry:
      raise MalformedDatasetError(f'{path!r}: entry {i} is {entry!r}, not an image path.')
    parts = entry.replace('\\', '/').split('/')
    if os.path.isabs(entry) or '..' in parts:
      raise MalformedDatasetError(
          f'{path!r}: entry {i} {entry!r} is not a path inside the image folder (absolute or '
          'with ..).')
    paths.append(str(entry))
  return paths


def read_indices(path: str, upper: int, what: str) -> np.ndarray:
  """A 1-D int array of indices in [0, upper) (MSLS's `qIdx`)."""
  array = safe_numpy.load_npy(path)
  if array.ndim != 1 or array.dtype.kind not in 'iu':
    raise MalformedDatasetError(
        f'{path!r}: expected a 1-D array of {what} indices, got {array.dtype} {array.shape}.')
  array = array.astype(np.int64)
  if array.size and (array.min() < 0 or array.max() >= upper):
    bad = int(array[(array < 0) | (array >= upper)][0])
    raise MalformedDatasetError(f'{path!r}: index {bad} is outside the {upper} {what}.')
  return array


def _as_indices(entry, path: str, query: int) -> np.ndarray:
  values = np.asarray(entry)
  if values.dtype == object:
    values = np.asarray(values.tolist())
  if values.size == 0:
    return np.zeros(0, np.int64)
  if values.dtype.kind not in 'iu':
    raise MalformedDatasetError(
        f'{path!r}: the positives of query {query} are {values.dtype} values, expected database '
        'indices (integers).')
  return np.unique(values.astype(np.int64).reshape(-1))


def read_positives(path: str, num_queries: int, num_database: int,
                   queries_file: str) -> list[np.ndarray]:
  """Per query, the sorted database indices of its positives (`*_gt.npy`, `pIdx`).

  Args:
    path: the ground-truth file.
    num_queries: how many queries it must describe.
    num_database: database size (indices must be below it).
    queries_file: the file the queries come from (for the message on a length mismatch).

  Raises:
    MalformedDatasetError: wrong length, non-integer or out-of-range indices.
  """
  array = safe_numpy.load_npy(path)
  if array.ndim == 0 or (array.dtype != object and array.dtype.kind not in 'iu'):
    raise MalformedDatasetError(
        f'{path!r}: expected per-query lists of database indices, got {array.dtype} '
        f'{array.shape}.')
  if len(array) != num_queries:
    raise MalformedDatasetError(
        f'{path!r} has {len(array)} entries but {queries_file!r} gives {num_queries} queries.')
  positives = [_as_indices(entry, path, i) for i, entry in enumerate(array)]
  for i, indices in enumerate(positives):
    if len(indices) and (indices[0] < 0 or indices[-1] >= num_database):
      bad = int(indices[0] if indices[0] < 0 else indices[-1])
      raise MalformedDatasetError(
          f'{path!r}: query {i} lists database index {bad}; there are {num_database} database '
          'images.')
  return positives


# ------------------------------------------------------------------------------------------------
# The family's sets.


def list_locations(spec: registry.BenchmarkSpec, images_dir: str,
                   ground_truth_dir: str | None) -> list[str]:
  """Where the list files of `spec` are looked for, in order."""
  locations = [images_dir]
  if ground_truth_dir:
    locations.append(os.path.join(ground_truth_dir, spec.list_dir))
  return locations


def find_lists(spec: registry.BenchmarkSpec, images_dir: str,
               ground_truth_dir: str | None) -> dict[str, str]:
  """{kind: path} of the list files of a LISTS / MSLS_LISTS set.

  The first location (`list_locations`) holding any of them must hold all of them.

  Raises:
    DatasetNotFoundError: naming the files and the folders looked in.
  """
  for location in list_locations(spec, images_dir, ground_truth_dir):
    files = {kind: os.path.join(location, f'{spec.prefix}_{kind}.npy')
             for kind in spec.list_kinds()}
    present = [kind for kind, path in files.items() if os.path.isfile(path)]
    if present and len(present) < len(files):
      missing = [os.path.basename(files[k]) for k in files if k not in present]
      raise DatasetNotFoundError(
          f'benchmark {spec.name!r}: {location!r} holds '
          f'{", ".join(os.path.basename(files[k]) for k in present)} but not '
          f'{", ".join(missing)}.')
    if present:
      return files
  raise DatasetNotFoundError(
      f'benchmark {spec.name!r}: no list files {", ".join(spec.list_files())} in '
      f'{" or ".join(map(repr, list_locations(spec, images_dir, ground_truth_dir)))} '
      '(the gsv-cities family\'s lists; set data.ground_truth_dir / --ground_truth_dir to the '
      'folder laid out as gsv-cities\' datasets/).')


def read_family_lists(spec: registry.BenchmarkSpec, files: dict[str, str]):
  """(database paths, query paths, positives) of a LISTS / MSLS_LISTS set, checked."""
  database = read_paths(files['dbImages'])
  queries = read_paths(files['qImages'])
  if spec.kind == registry.MSLS_LISTS:
    used = read_indices(files['qIdx'], len(queries), f'queries of {files["qImages"]!r}')
    queries = [queries[i] for i in used]
    positives = read_positives(files['pIdx'], len(queries), len(database), files['qIdx'])
  else:
    positives = read_positives(files['gt'], len(queries), len(database), files['qImages'])
  for kind, paths in (('dbImages', database), ('qImages', queries)):
    if not paths:
      raise MalformedDatasetError(f'{files[kind]!r} lists no image.')
  return database, queries, positives


def check_listed_images(root: str, paths: Sequence[str], list_file: str) -> None:
  """Every listed image is a file under `root`.

  Raises:
    MalformedDatasetError: naming the first missing image, the list and how many are missing.
  """
  missing = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
  if missing:
    raise MalformedDatasetError(
        f'{list_file!r} lists {missing[0]!r}, which is not in {root!r} ({len(missing)} of '
        f'{len(paths)} listed images are missing).')


# ------------------------------------------------------------------------------------------------
# A triple inside a split folder (any benchmark in the folder layout may carry one).


def find_precomputed_prefix(split_dir: str) -> str | None:
  """The `<prefix>` of a complete `<prefix>_{dbImages,qImages,gt}.npy` triple in the folder.

  Raises:
    MalformedDatasetError: several complete triples (ambiguous).
  """
  prefixes = []
  for path in sorted(glob.glob(os.path.join(glob.escape(split_dir), '*_dbImages.npy'))):
    prefix = path[:-len('_dbImages.npy')]
    if os.path.isfile(prefix + '_qImages.npy') and os.path.isfile(prefix + '_gt.npy'):
      prefixes.append(prefix)
  if len(prefixes) > 1:
    raise MalformedDatasetError(
        f'{split_dir!r} holds several precomputed list triples ({", ".join(prefixes)}); pass one '
        'with precomputed_prefix.')
  return prefixes[0] if prefixes else None


def load_precomputed(prefix: str):
  """Reads `<prefix>_dbImages.npy`, `<prefix>_qImages.npy`, `<prefix>_gt.npy`.

  Returns:
    (database_paths, queries_paths, positives as sorted int64 arrays).

  Raises:
    DatasetNotFoundError / MalformedDatasetError / ArrayFileError: naming the file.
  """
  files = {kind: f'{prefix}_{kind}.npy' for kind in ('dbImages', 'qImages', 'gt')}
  for path in files.values():
    if not os.path.isfile(path):
      raise DatasetNotFoundError(f'precomputed list {path!r} does not exist.')
  database = read_paths(files['dbImages'])
  queries = read_paths(files['qImages'])
  positives = read_positives(files['gt'], len(queries), len(database), files['qImages'])
  return database, queries, positives
