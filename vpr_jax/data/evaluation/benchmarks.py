"""Benchmark sets (database + queries), UTM positives within a radius, and the dataset registry.

Layout of a benchmark split (SF-XS, Tokyo-XS, the gmberton-style sets and the synthetic ones):

  <split folder>/database/*.jpg   reference images
  <split folder>/queries/*.jpg    query images

with the position in the file name, '@'-separated: `@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg`
(fields 1 and 2 after splitting the base name on '@'; sub-folders below database/ and queries/ are
allowed). The positives of a query are the database images whose UTM position lies within
`radius_m` (25 m, inclusive; a finite number >= 0) of it, found with a k-d tree. Queries without
any positive stay in the Recall@N denominator; how many there are is reported
(`num_without_positives`). UTM values must be finite and within +-1e8 m (real ones are below 1e7).
Queries whose file name is also in the database (the same image on both sides, which makes
Recall@1 trivial for them) are counted (`num_queries_in_database`) and logged as a warning.

Registered names, relative to the data root (the layouts of the SF-XS and Tokyo-XS releases used
by mldl24-vpr, whose loaders read `sf_xs/{val,test}/` and `tokyo_xs/test/` and the image lists
`database/...`, `queries/...` relative to those folders):

  sf_xs_val -> sf_xs/val        sf_xs_test -> sf_xs/test        tokyo_xs -> tokyo_xs/test
  synthetic_val -> synthetic_val                                synthetic_test -> synthetic_test

Any folder that holds database/ and queries/ can also be given directly (absolute, or relative to
the data root, or to the working directory).

Precomputed lists: the gsv-cities family ships `<prefix>_dbImages.npy`, `<prefix>_qImages.npy`
(relative paths) and `<prefix>_gt.npy` (object array of database-index lists). When exactly one
such triple sits in the split folder (or one is given with `precomputed_prefix`), it defines the
image order and the ground truth, so indices match those files. Otherwise the order is the sorted
list of relative paths and the ground truth comes from the names.

Positives computed from names are cached in `<split>/.vpr_jax_cache/` (or, when that folder is not
writable, in `$VPR_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/vpr_jax`, else `~/.cache/vpr_jax`), keyed
on the file listing and the radius.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
import tempfile
from typing import Sequence

from absl import logging
import numpy as np
from scipy.spatial import cKDTree

from vpr_jax.data import roots
from vpr_jax.errors import DatasetNotFoundError
from vpr_jax.errors import InvalidRadiusError
from vpr_jax.errors import MalformedDatasetError

REGISTRY = {
    'sf_xs_val': 'sf_xs/val',
    'sf_xs_test': 'sf_xs/test',
    'tokyo_xs': 'tokyo_xs/test',
    'synthetic_val': 'synthetic_val',
    'synthetic_test': 'synthetic_test',
}
CACHE_DIR_ENV = 'VPR_JAX_CACHE_DIR'
DEFAULT_RADIUS_M = 25.0
# |UTM east/north| above this is not a position on Earth (real ones are below 1e7 m); far larger
# values overflow the squared distances of the k-d tree.
MAX_ABS_UTM_M = 1e8
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_CACHE_VERSION = 1

EXPECTED_LAYOUT = (
    'expected layout: <split folder>/database/*.jpg and <split folder>/queries/*.jpg, file names '
    '"@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg"')


@dataclasses.dataclass
class BenchmarkSet:
  """One benchmark split, ready for evaluation.

  Attributes:
    name: the registered name or the path it was asked for by.
    root: absolute split folder; image paths are relative to it.
    database_paths: database images (relative paths), in evaluation order.
    queries_paths: query images (relative paths), in evaluation order.
    database_utm: float64 [N, 2] (east, north); NaN where a name carries no position (only
      possible when precomputed lists give the ground truth).
    queries_utm: float64 [M, 2].
    positives: per query, the sorted int64 indices of its positive database images.
    radius_m: the positive radius (None when precomputed ground truth was used).
    source: 'names' or the path prefix of the precomputed lists.
    listing_sha1: fingerprint of the ordered path lists (to record with results).
    num_queries_in_database: queries whose file name is also a database image's (the same
      image on both sides): allowed, counted, and logged as a warning.
  """
  name: str
  root: str
  database_paths: list[str]
  queries_paths: list[str]
  database_utm: np.ndarray
  queries_utm: np.ndarray
  positives: list[np.ndarray]
  radius_m: float | None
  source: str
  listing_sha1: str
  num_queries_in_database: int = 0

  @property
  def num_database(self) -> int:
    return len(self.database_paths)

  @property
  def num_queries(self) -> int:
    return len(self.queries_paths)

  @property
  def num_without_positives(self) -> int:
    return sum(1 for p in self.positives if len(p) == 0)

  @property
  def image_paths(self) -> list[str]:
    """Database paths then query paths (relative to `root`): the order descriptors are computed."""
    return list(self.database_paths) + list(self.queries_paths)

  def summary(self) -> dict:
    """A JSON-serialisable description, to record alongside results."""
    return {
        'name': self.name, 'root': self.root, 'num_database': self.num_database,
        'num_queries': self.num_queries, 'num_without_positives': self.num_without_positives,
        'radius_m': self.radius_m, 'source': self.source, 'listing_sha1': self.listing_sha1,
        'num_queries_in_database': self.num_queries_in_database,
    }

  def __repr__(self) -> str:
    return (f'BenchmarkSet(name={self.name!r}, root={self.root!r}, database={self.num_database}, '
            f'queries={self.num_queries}, without_positives={self.num_without_positives}, '
            f'source={self.source!r})')


# ------------------------------------------------------------------------------------------------
# Data root and name resolution.


def _registry_hint() -> str:
  return 'registered benchmarks: ' + ', '.join(f'{k} -> <root>/{v}' for k, v in REGISTRY.items())


def resolve_benchmark_dir(name_or_path: str, data_root: str | None = None) -> str:
  """Finds the split folder of a registered name or a path.

  Args:
    name_or_path: a name in REGISTRY, or a folder holding database/ and queries/ (absolute, or
      relative to the data root, or to the working directory).
    data_root: see `roots.resolve_data_root`.

  Returns:
    The absolute split folder (its content is not checked here).

  Raises:
    DatasetNotFoundError: with every path tried and the expected layout.
  """
  if name_or_path in REGISTRY:
    root = roots.resolve_data_root(data_root, hint=_registry_hint())
    split_dir = os.path.join(root, REGISTRY[name_or_path])
    if not os.path.isdir(split_dir):
      raise DatasetNotFoundError(
          f'benchmark {name_or_path!r} not found: {split_dir!r} does not exist '
          f'(registered as <data root>/{REGISTRY[name_or_path]}); {EXPECTED_LAYOUT}.')
    return split_dir
  path = os.path.expanduser(name_or_path)
  tried = []
  if os.path.isabs(path):
    tried.append(path)
  else:
    try:
      tried.append(os.path.join(roots.resolve_data_root(data_root, hint=_registry_hint()), path))
    except DatasetNotFoundError:
      pass
    tried.append(os.path.abspath(path))
  for candidate in tried:
    if os.path.isdir(candidate):
      return os.path.abspath(candidate)
  raise DatasetNotFoundError(
      f'benchmark {name_or_path!r} not found: it is not a registered name '
      f'({", ".join(sorted(REGISTRY))}) and no folder exists at {", ".join(map(repr, tried))}; '
      f'{EXPECTED_LAYOUT}.')


# ------------------------------------------------------------------------------------------------
# Listing, names, positives.


def list_images(folder: str, relative_to: str) -> list[str]:
  """Sorted relative paths ('/'-separated) of the images under `folder`, recursively."""
  found = []
  for directory, subdirs, files in os.walk(folder):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    for file_name in files:
      if file_name.lower().endswith(IMAGE_EXTENSIONS) and not file_name.startswith('.'):
        relative = os.path.relpath(os.path.join(directory, file_name), relative_to)
        found.append(relative.replace(os.sep, '/'))
  return sorted(found)


def parse_utm(path: str) -> tuple[float, float]:
  """(east, north) from an '@'-format file name (fields 1 and 2 of the base name).

  Raises:
    ValueError: naming the file, when the fields are missing or not numbers.
  """
  fields = os.path.basename(path).split('@')
  try:
    if len(fields) < 3:
      raise ValueError('too few fields')
    east, north = float(fields[1]), float(fields[2])
  except ValueError:
    raise ValueError(
        f'cannot read UTM coordinates from the file name {path!r}: expected '
        f'"@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg"') from None
  for field, text, value in (('UTM_east', fields[1], east), ('UTM_north', fields[2], north)):
    if not (np.isfinite(value) and abs(value) <= MAX_ABS_UTM_M):
      raise ValueError(
          f'{field} {text!r} in the file name {path!r} is not a position: expected a finite '
          f'number of metres within +-{MAX_ABS_UTM_M:g}')
  return east, north


def parse_utm_list(paths: Sequence[str], where: str, strict: bool = True) -> np.ndarray:
  """float64 [len(paths), 2] of (east, north); NaN rows for unparsable names unless `strict`."""
  utm = np.full((len(paths), 2), np.nan, dtype=np.float64)
  for i, path in enumerate(paths):
    try:
      utm[i] = parse_utm(path)
    except ValueError as e:
      if strict:
        raise MalformedDatasetError(f'{where}: {e}') from None
  return utm


def check_radius(radius_m) -> float:
  """The positive radius as a float, checked.

  Args:
    radius_m: config data.positive_radius_m (metres).

  Returns:
    float(radius_m).

  Raises:
    InvalidRadiusError: not a number, NaN, infinite or negative (a NaN radius would silently
      give no positive at all, hence recalls of 0).
  """
  try:
    radius = float(radius_m)
  except (TypeError, ValueError):
    radius = math.nan
  if not (math.isfinite(radius) and radius >= 0):
    raise InvalidRadiusError(
        f'positive radius (data.positive_radius_m) is {radius_m!r}: expected a finite number of '
        f'metres >= 0 (the benchmarks use {DEFAULT_RADIUS_M:g}).')
  return radius


def compute_positives(database_utm: np.ndarray, queries_utm: np.ndarray,
                      radius_m: float = DEFAULT_RADIUS_M) -> list[np.ndarray]:
  """Database indices within `radius_m` (Euclidean, inclusive) of each query.

  Args:
    database_utm: [N, 2] positions in metres.
    queries_utm: [M, 2] positions in metres.
    radius_m: the radius; a database image exactly at this distance is a positive.

  Returns:
    M sorted int64 arrays.

  Raises:
    InvalidRadiusError: `radius_m` is not a finite number >= 0.
  """
  database_utm = np.asarray(database_utm, dtype=np.float64).reshape(-1, 2)
  queries_utm = np.asarray(queries_utm, dtype=np.float64).reshape(-1, 2)
  radius_m = check_radius(radius_m)
  if len(queries_utm) == 0:
    return []
  if len(database_utm) == 0:
    return [np.zeros((0,), np.int64) for _ in range(len(queries_utm))]
  tree = cKDTree(database_utm)
  # The tree compares squared distances with radius**2 (<=), so the boundary is included.
  neighbours = tree.query_ball_point(queries_utm, r=float(radius_m), p=2.0, return_sorted=True)
  return [np.asarray(sorted(n), dtype=np.int64) for n in neighbours]


def count_queries_in_database(database_paths: Sequence[str],
                              queries_paths: Sequence[str]) -> int:
  """How many queries have the file name (base name) of a database image."""
  database_names = {os.path.basename(p) for p in database_paths}
  return sum(1 for p in queries_paths if os.path.basename(p) in database_names)


def _warn_queries_in_database(where: str, count: int, num_queries: int):
  if count:
    logging.warning('%s: %d of %d queries have the file name of a database image (the same '
                    'image on both sides?); they are kept and evaluated as any query.', where,
                    count, num_queries)


def _listing_sha1(database_paths: Sequence[str], queries_paths: Sequence[str]) -> str:
  digest = hashlib.sha1()
  for tag, paths in ((b'D', database_paths), (b'Q', queries_paths)):
    digest.update(tag)
    for path in paths:
      digest.update(path.encode('utf-8') + b'\n')
  return digest.hexdigest()


def pack_positives(positives: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Flat int64 indices + int64 offsets [M + 1] for a list of index arrays."""
  lengths = np.array([len(p) for p in positives], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  flat = (np.concatenate([np.asarray(p, np.int64) for p in positives])
          if len(positives) else np.zeros((0,), np.int64))
  return flat.astype(np.int64), offsets


def unpack_positives(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
  """Inverse of `pack_positives`."""
  return [np.asarray(flat[offsets[i]:offsets[i + 1]], np.int64) for i in range(len(offsets) - 1)]


# ------------------------------------------------------------------------------------------------
# Cache.


def _user_cache_dir() -> str:
  if os.environ.get(CACHE_DIR_ENV):
    return os.path.join(os.path.expanduser(os.environ[CACHE_DIR_ENV]), 'benchmarks')
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'vpr_jax', 'benchmarks')


def _cache_key(split_dir: str, listing_sha1: str, radius_m: float) -> str:
  digest = hashlib.sha1(f'{_CACHE_VERSION}|{listing_sha1}|{radius_m!r}'.encode('utf-8'))
  # The user-level cache is shared by all splits: keep the folder in the key there.
  digest.update(os.path.abspath(split_dir).encode('utf-8'))
  return digest.hexdigest()[:20]


def _cache_candidates(split_dir: str, key: str) -> list[str]:
  return [os.path.join(split_dir, '.vpr_jax_cache', f'positives_{key}.npz'),
          os.path.join(_user_cache_dir(), f'positives_{key}.npz')]


def _read_cache(split_dir: str, key: str, num_queries: int) -> list[np.ndarray] | None:
  for path in _cache_candidates(split_dir, key):
    if os.path.isfile(path):
      try:
        with np.load(path) as data:
          flat, offsets = data['flat'], data['offsets']
        if len(offsets) == num_queries + 1:
          return unpack_positives(flat, offsets)
      except Exception:  # pylint: disable=broad-except
        pass  # A damaged cache file is rebuilt.
  return None


def _write_cache(split_dir: str, key: str, positives: Sequence[np.ndarray]) -> str | None:
  flat, offsets = pack_positives(positives)
  for path in _cache_candidates(split_dir, key):
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
      with os.fdopen(fd, 'wb') as f:
        np.savez_compressed(f, flat=flat, offsets=offsets)
      os.replace(tmp, path)  # Atomic: readers never see a partial file.
      return path
    except OSError:
      continue
  return None


# ------------------------------------------------------------------------------------------------
# Precomputed lists.


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


def load_precomputed(prefix: str, num_database: int | None = None):
  """Reads `<prefix>_dbImages.npy`, `<prefix>_qImages.npy`, `<prefix>_gt.npy`.

  Returns:
    (database_paths, queries_paths, positives as sorted int64 arrays).

  Raises:
    DatasetNotFoundError / MalformedDatasetError: naming the file.
  """
  files = {kind: f'{prefix}_{kind}.npy' for kind in ('dbImages', 'qImages', 'gt')}
  for path in files.values():
    if not os.path.isfile(path):
      raise DatasetNotFoundError(f'precomputed list {path!r} does not exist.')
  lists = {}
  for kind in ('dbImages', 'qImages'):
    array = np.load(files[kind], allow_pickle=False)
    if array.ndim != 1 or array.dtype.kind not in 'US':
      raise MalformedDatasetError(
          f'{files[kind]!r}: expected a 1-D array of path strings, got {array.dtype} {array.shape}')
    lists[kind] = [str(p.decode('utf-8') if isinstance(p, bytes) else p) for p in array]
  # The ground truth is an object array of lists: it needs pickle (the files are the user's own).
  gt = np.load(files['gt'], allow_pickle=True)
  if len(gt) != len(lists['qImages']):
    raise MalformedDatasetError(
        f'{files["gt"]!r} has {len(gt)} entries but {files["qImages"]!r} lists '
        f'{len(lists["qImages"])} queries.')
  num_database = len(lists['dbImages']) if num_database is None else num_database
  positives = []
  for i, entry in enumerate(gt):
    indices = np.unique(np.asarray(entry, dtype=np.int64).reshape(-1))
    if len(indices) and (indices[0] < 0 or indices[-1] >= num_database):
      raise MalformedDatasetError(
          f'{files["gt"]!r}: query {i} lists database index {int(indices[-1])} (or a negative '
          f'one); there are {num_database} database images.')
    positives.append(indices)
  return lists['dbImages'], lists['qImages'], positives


# ------------------------------------------------------------------------------------------------
# Loading.


def _check_subfolders(split_dir: str, name: str):
  missing = [sub for sub in ('database', 'queries')
             if not os.path.isdir(os.path.join(split_dir, sub))]
  if missing:
    raise DatasetNotFoundError(
        f'benchmark {name!r} at {split_dir!r} has no {" and no ".join(missing)} folder; '
        f'{EXPECTED_LAYOUT}.')


def load_benchmark(name_or_path: str, data_root: str | None = None,
                   radius_m: float = DEFAULT_RADIUS_M, precomputed_prefix: str | None = None,
                   use_precomputed: bool = True, use_cache: bool = True,
                   check_files: bool = True) -> BenchmarkSet:
  """Loads a benchmark split: image lists, UTM positions and positives.

  Args:
    name_or_path: a registered name (REGISTRY) or a split folder.
    data_root: the data root ('' or None: $VPR_DATA_ROOT); only needed for registered names and
      relative paths.
    radius_m: positive radius in metres (inclusive); not used when precomputed ground truth is.
    precomputed_prefix: path prefix of `<prefix>_{dbImages,qImages,gt}.npy` files that define the
      order and the ground truth (they may live outside the split folder).
    use_precomputed: look for such a triple inside the split folder when no prefix is given.
    use_cache: read/write the positives cache.
    check_files: with precomputed lists, check that every listed image exists.

  Returns:
    A BenchmarkSet.

  Raises:
    DatasetNotFoundError: the split folder (or database/, queries/) is missing.
    MalformedDatasetError: no images, names without coordinates, inconsistent lists.
    InvalidRadiusError: `radius_m` is not a finite number >= 0.
  """
  radius_m = check_radius(radius_m)
  split_dir = resolve_benchmark_dir(name_or_path, data_root)
  _check_subfolders(split_dir, name_or_path)
  if precomputed_prefix is None and use_precomputed:
    precomputed_prefix = find_precomputed_prefix(split_dir)

  if precomputed_prefix is not None:
    database_paths, queries_paths, positives = load_precomputed(precomputed_prefix)
    if not database_paths or not queries_paths:
      raise MalformedDatasetError(f'precomputed lists {precomputed_prefix}_*.npy are empty.')
    if check_files:
      present = set(list_images(split_dir, split_dir))
      for path in database_paths + queries_paths:
        if path not in present and not os.path.isfile(os.path.join(split_dir, path)):
          raise MalformedDatasetError(
              f'{precomputed_prefix}_*.npy lists {path!r}, which does not exist in {split_dir!r}.')
    where = f'benchmark {name_or_path!r}'
    in_database = count_queries_in_database(database_paths, queries_paths)
    _warn_queries_in_database(where, in_database, len(queries_paths))
    return BenchmarkSet(
        name=name_or_path, root=split_dir, database_paths=database_paths,
        queries_paths=queries_paths,
        database_utm=parse_utm_list(database_paths, where, strict=False),
        queries_utm=parse_utm_list(queries_paths, where, strict=False),
        positives=positives, radius_m=None, source=os.path.abspath(precomputed_prefix),
        listing_sha1=_listing_sha1(database_paths, queries_paths),
        num_queries_in_database=in_database)

  database_paths = list_images(os.path.join(split_dir, 'database'), split_dir)
  queries_paths = list_images(os.path.join(split_dir, 'queries'), split_dir)
  for sub, paths in (('database', database_paths), ('queries', queries_paths)):
    if not paths:
      raise MalformedDatasetError(
          f'benchmark {name_or_path!r}: no images ({", ".join(IMAGE_EXTENSIONS)}) in '
          f'{os.path.join(split_dir, sub)!r}; {EXPECTED_LAYOUT}.')
  where = f'benchmark {name_or_path!r} ({split_dir})'
  database_utm = parse_utm_list(database_paths, where)
  queries_utm = parse_utm_list(queries_paths, where)
  listing_sha1 = _listing_sha1(database_paths, queries_paths)
  in_database = count_queries_in_database(database_paths, queries_paths)
  _warn_queries_in_database(where, in_database, len(queries_paths))
  positives = None
  key = _cache_key(split_dir, listing_sha1, float(radius_m))
  if use_cache:
    positives = _read_cache(split_dir, key, len(queries_paths))
  if positives is None:
    positives = compute_positives(database_utm, queries_utm, radius_m)
    if use_cache:
      _write_cache(split_dir, key, positives)
  return BenchmarkSet(
      name=name_or_path, root=split_dir, database_paths=database_paths,
      queries_paths=queries_paths, database_utm=database_utm, queries_utm=queries_utm,
      positives=positives, radius_m=float(radius_m), source='names', listing_sha1=listing_sha1,
      num_queries_in_database=in_database)
