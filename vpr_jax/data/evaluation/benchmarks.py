"""Benchmark sets (database + queries): names, folders, UTM positives within a radius.

A benchmark is one of:

* a registered name (`registry.REGISTRY`): a set of the folder layout (SF-XS, Tokyo-XS, the
  VPR-datasets-downloader sets) or of the gsv-cities family's list files (`list_files`), found
  under the data root where its spec says;
* any folder holding `database/` and `queries/` (absolute, or relative to the data root, or to
  the working directory).

Folder layout:

  <split folder>/<database>/*.jpg   reference images (`database`, SVOX's `gallery`)
  <split folder>/<queries>/*.jpg    query images (`queries`, `queries_night`, ...)

with the position in the file name, '@'-separated: `@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg`
(fields 1 and 2 after splitting the base name on '@'; sub-folders are allowed). The positives of a
query are the database images whose UTM position lies within `radius_m` (25 m, inclusive; a
finite number >= 0) of it, found with a k-d tree and cached (`positives_cache`). Queries without
any positive stay in the Recall@N denominator; how many there are is reported
(`num_without_positives`). UTM values must be finite and within +-1e8 m (real ones are below 1e7).
Queries whose file name is also in the database (the same image on both sides, which makes
Recall@1 trivial for them) are counted (`num_queries_in_database`) and logged as a warning.
A split folder may also hold one `<prefix>_{dbImages,qImages,gt}.npy` triple: it then defines the
image order and the ground truth (`list_files.load_precomputed`).

List layout (the family's sets): the listed paths are relative to the set's image folder, the
ground truth is the family's, and the list files are looked for in the image folder, then in the
ground-truth folder (`data.ground_truth_dir`, default `<data root>/ground_truth`) laid out as
gsv-cities' `datasets/` (`Pittsburgh/pitts30k_test_gt.npy`, `SPED/SPED_gt.npy`, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
from typing import Any, Sequence

from absl import logging
import numpy as np
from scipy.spatial import cKDTree

from vpr_jax.data import roots
from vpr_jax.data.evaluation import list_files
from vpr_jax.data.evaluation import positives_cache
from vpr_jax.data.evaluation import registry
from vpr_jax.errors import DatasetNotFoundError
from vpr_jax.errors import InvalidRadiusError
from vpr_jax.errors import MalformedDatasetError

DEFAULT_RADIUS_M = 25.0
# Where the family's list files are looked for, under the data root, when no folder is given.
DEFAULT_GROUND_TRUTH_DIR = 'ground_truth'
# |UTM east/north| above this is not a position on Earth (real ones are below 1e7 m); far larger
# values overflow the squared distances of the k-d tree.
MAX_ABS_UTM_M = 1e8
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')

EXPECTED_LAYOUT = (
    'expected layout: <split folder>/database/*.jpg and <split folder>/queries/*.jpg, file names '
    '"@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg"')


def expected_layout(spec: registry.BenchmarkSpec | None) -> str:
  """The layout a registered set (or any folder, for None) must have, in words."""
  if spec is None:
    return EXPECTED_LAYOUT
  if spec.kind == registry.FOLDERS:
    return (f'expected layout: <data root>/{spec.folder}/{spec.database}/*.jpg and '
            f'<data root>/{spec.folder}/{spec.queries}/*.jpg, file names '
            '"@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg"')
  return (f'expected layout: the images at <data root>/{spec.folder}/<listed path>, the lists '
          f'{", ".join(spec.list_files())} in that folder or in <ground truth dir>/'
          f'{spec.list_dir}/')


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
    image_reader: None (the images are the files `root/path`), or, for a prepared benchmark,
      a picklable `reader(i) -> uint8 [H, W, 3]` of image i of `image_paths`.
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
  image_reader: Any = None

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
  return 'registered benchmarks: ' + ', '.join(registry.names()) + ' (python -m vpr_jax.datasets)'


def resolve_benchmark_dir(name_or_path: str, data_root: str | None = None) -> str:
  """Finds the folder of a registered name (its split or image folder) or a path.

  Args:
    name_or_path: a registered name, or a folder holding database/ and queries/ (absolute, or
      relative to the data root, or to the working directory).
    data_root: see `roots.resolve_data_root`.

  Returns:
    The absolute folder (its content is not checked here).

  Raises:
    DatasetNotFoundError: with every path tried and the expected layout.
  """
  spec = registry.get(name_or_path)
  if spec is not None:
    root = roots.resolve_data_root(data_root, hint=_registry_hint())
    folder = find_spec_folder(spec, root)
    if folder is None:
      tried = ' nor '.join(repr(os.path.join(root, f)) for f in spec.folders())
      raise DatasetNotFoundError(
          f'benchmark {name_or_path!r} not found: {tried} does not exist; '
          f'{expected_layout(spec)}.')
    return folder
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
  close = difflib.get_close_matches(name_or_path, registry.names() + registry.group_names(), 3)
  known = (f'did you mean {" or ".join(close)}?' if close else
           f'registered: {", ".join(registry.names() + registry.group_names())}')
  raise DatasetNotFoundError(
      f'benchmark {name_or_path!r} not found: it is not a registered name or group ({known}; '
      f'python -m vpr_jax.datasets lists them) and no folder exists at '
      f'{", ".join(map(repr, tried))}; {EXPECTED_LAYOUT}.')


def find_spec_folder(spec: registry.BenchmarkSpec, root: str) -> str | None:
  """The first of the spec's folders (`registry.BenchmarkSpec.folders`) that exists under root."""
  return next((os.path.join(root, f) for f in spec.folders()
               if os.path.isdir(os.path.join(root, f))), None)


def resolve_ground_truth_dir(ground_truth_dir: str | None, data_root: str | None) -> str | None:
  """The folder laid out as gsv-cities' `datasets/`: the argument (absolute or under the data
  root), else `<data root>/ground_truth`; None when neither can be formed."""
  if ground_truth_dir:
    try:
      root = roots.resolve_data_root(data_root)
    except DatasetNotFoundError:
      root = None
    return os.path.abspath(roots.resolve_under(root, ground_truth_dir))
  try:
    return os.path.join(roots.resolve_data_root(data_root), DEFAULT_GROUND_TRUTH_DIR)
  except DatasetNotFoundError:
    return None


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


# ------------------------------------------------------------------------------------------------
# Loading.


def _check_subfolders(split_dir: str, name: str, subfolders: Sequence[str],
                      spec: registry.BenchmarkSpec | None):
  missing = [sub for sub in subfolders if not os.path.isdir(os.path.join(split_dir, sub))]
  if missing:
    raise DatasetNotFoundError(
        f'benchmark {name!r} at {split_dir!r} has no {" and no ".join(missing)} folder; '
        f'{expected_layout(spec)}.')


def _from_lists(name: str, root: str, database_paths: list[str], queries_paths: list[str],
                positives: list[np.ndarray], source: str) -> BenchmarkSet:
  where = f'benchmark {name!r}'
  in_database = count_queries_in_database(database_paths, queries_paths)
  _warn_queries_in_database(where, in_database, len(queries_paths))
  return BenchmarkSet(
      name=name, root=root, database_paths=database_paths, queries_paths=queries_paths,
      database_utm=parse_utm_list(database_paths, where, strict=False),
      queries_utm=parse_utm_list(queries_paths, where, strict=False),
      positives=positives, radius_m=None, source=source,
      listing_sha1=_listing_sha1(database_paths, queries_paths),
      num_queries_in_database=in_database)


def _load_family_set(spec: registry.BenchmarkSpec, images_dir: str,
                     ground_truth_dir: str | None, check_files: bool) -> BenchmarkSet:
  """A set of the gsv-cities family's list files (LISTS / MSLS_LISTS)."""
  files = list_files.find_lists(spec, images_dir, ground_truth_dir)
  database_paths, queries_paths, positives = list_files.read_family_lists(spec, files)
  if check_files:
    list_files.check_listed_images(images_dir, database_paths, files['dbImages'])
    list_files.check_listed_images(images_dir, queries_paths, files['qImages'])
  source = os.path.join(os.path.dirname(files['dbImages']), spec.prefix + '_*.npy')
  return _from_lists(spec.name, images_dir, database_paths, queries_paths, positives, source)


def _load_precomputed_set(name: str, split_dir: str, prefix: str,
                          check_files: bool) -> BenchmarkSet:
  database_paths, queries_paths, positives = list_files.load_precomputed(prefix)
  if not database_paths or not queries_paths:
    raise MalformedDatasetError(f'precomputed lists {prefix}_*.npy are empty.')
  if check_files:
    list_files.check_listed_images(split_dir, database_paths, prefix + '_dbImages.npy')
    list_files.check_listed_images(split_dir, queries_paths, prefix + '_qImages.npy')
  return _from_lists(name, split_dir, database_paths, queries_paths, positives,
                     os.path.abspath(prefix))


def _load_named_set(name: str, split_dir: str, database_dir: str, queries_dir: str,
                    radius_m: float, use_cache: bool,
                    spec: registry.BenchmarkSpec | None) -> BenchmarkSet:
  """A set of the folder layout: the images listed, positives from the names (cached)."""
  database_paths = list_images(os.path.join(split_dir, database_dir), split_dir)
  queries_paths = list_images(os.path.join(split_dir, queries_dir), split_dir)
  for sub, paths in ((database_dir, database_paths), (queries_dir, queries_paths)):
    if not paths:
      raise MalformedDatasetError(
          f'benchmark {name!r}: no images ({", ".join(IMAGE_EXTENSIONS)}) in '
          f'{os.path.join(split_dir, sub)!r}; {expected_layout(spec)}.')
  where = f'benchmark {name!r} ({split_dir})'
  database_utm = parse_utm_list(database_paths, where)
  queries_utm = parse_utm_list(queries_paths, where)
  listing_sha1 = _listing_sha1(database_paths, queries_paths)
  in_database = count_queries_in_database(database_paths, queries_paths)
  _warn_queries_in_database(where, in_database, len(queries_paths))
  positives = None
  key = positives_cache.cache_key(split_dir, listing_sha1, float(radius_m))
  if use_cache:
    positives = positives_cache.read(split_dir, key, len(queries_paths))
  if positives is None:
    positives = compute_positives(database_utm, queries_utm, radius_m)
    if use_cache:
      positives_cache.write(split_dir, key, positives)
  return BenchmarkSet(
      name=name, root=split_dir, database_paths=database_paths,
      queries_paths=queries_paths, database_utm=database_utm, queries_utm=queries_utm,
      positives=positives, radius_m=float(radius_m), source='names', listing_sha1=listing_sha1,
      num_queries_in_database=in_database)


def load_benchmark(name_or_path: str, data_root: str | None = None,
                   radius_m: float = DEFAULT_RADIUS_M, precomputed_prefix: str | None = None,
                   use_precomputed: bool = True, use_cache: bool = True,
                   check_files: bool = True,
                   ground_truth_dir: str | None = None) -> BenchmarkSet:
  """Loads a benchmark set: image lists, UTM positions and positives.

  Args:
    name_or_path: a registered name (`registry.REGISTRY`) or a split folder.
    data_root: the data root ('' or None: $VPR_DATA_ROOT); only needed for registered names and
      relative paths.
    radius_m: positive radius in metres (inclusive); not used when list files give the ground
      truth.
    precomputed_prefix: path prefix of `<prefix>_{dbImages,qImages,gt}.npy` files that define the
      order and the ground truth of a folder-layout set (they may live outside the split folder).
    use_precomputed: look for such a triple inside the split folder when no prefix is given.
    use_cache: read/write the positives cache.
    check_files: with list files, check that every listed image exists.
    ground_truth_dir: the family's list files, laid out as gsv-cities' `datasets/` (absolute or
      under the data root); default `<data root>/ground_truth`.

  Returns:
    A BenchmarkSet.

  Raises:
    DatasetNotFoundError: the folder, a subfolder or the list files are missing.
    MalformedDatasetError: no images, names without coordinates, inconsistent lists.
    ArrayFileError / UnsafeArrayFileError: a list file is unreadable or holds more than data.
    InvalidRadiusError: `radius_m` is not a finite number >= 0.
  """
  radius_m = check_radius(radius_m)
  spec = registry.get(name_or_path)
  split_dir = resolve_benchmark_dir(name_or_path, data_root)
  if spec is not None and spec.kind != registry.FOLDERS:
    return _load_family_set(spec, split_dir,
                            resolve_ground_truth_dir(ground_truth_dir, data_root), check_files)
  database_dir, queries_dir = (spec.database, spec.queries) if spec else ('database', 'queries')
  _check_subfolders(split_dir, name_or_path, (database_dir, queries_dir), spec)
  if precomputed_prefix is None and use_precomputed:
    precomputed_prefix = list_files.find_precomputed_prefix(split_dir)
  if precomputed_prefix is not None:
    return _load_precomputed_set(name_or_path, split_dir, precomputed_prefix, check_files)
  return _load_named_set(name_or_path, split_dir, database_dir, queries_dir, radius_m,
                         use_cache, spec)
