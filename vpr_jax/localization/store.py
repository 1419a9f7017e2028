"""The index folder: the one place that knows its layout.

Layout of an index folder `INDEX`:

  INDEX/index.json               manifest, written last (the commit point of a build): format
                                 version, generation G, checkpoint path and fingerprint, decode
                                 settings, descriptor dtype, FAISS factory and nprobe, counts
  INDEX/descriptors-G.npy        [N, D] L2-normalised descriptors, float32 (or float16: `half`)
  INDEX/images-G.npz             per row: `paths` (relative to the images folder, '/'-separated),
                                 `sizes` / `mtimes_ns` (to notice changed files), `latlon` [N, 2]
                                 and `utm` [N, 2] (NaN where unknown), `utm_zones` ('10S' or ''),
                                 `coordinate_sources` ('csv', 'name', 'exif' or '')
  INDEX/faiss-G.index            the FAISS index over the rows, in row order
  INDEX/trained-G.index          (trained factories only) the trained, empty index, reused by the
                                 next build so that an incremental build does not train again
  INDEX/pending/part-*.npz       descriptors embedded by a build that has not committed yet

Every file is written atomically (`fileio.atomic_open`); a build writes the files of generation
G + 1 next to those of G and only then replaces index.json (`commit`), so an interrupted build
leaves the previous index usable. Descriptors are written in parts to `pending/` as they are
computed (`write_pending_part`): rerunning the interrupted command embeds only what no part holds
yet (`read_pending`). After a commit, `clean_up` removes the earlier generations and the parts,
each by its own name: any other file in the folder is the user's and stays.

Index folders come from other people too. Every file is read without unpickling
(`safe_numpy`), and checked against the manifest when opened (row counts, descriptor size
and dtype, the FAISS index's size and dimension); a file that is missing, truncated or does not
fit is refused with a `DamagedIndexError` naming it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import time
import uuid
import zipfile
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import faiss
import numpy as np

from vpr_jax import fileio
from vpr_jax import safe_numpy
from vpr_jax.errors import DamagedIndexError
from vpr_jax.errors import IndexMismatchError
from vpr_jax.errors import IndexNotFoundError
from vpr_jax.localization import coordinates
from vpr_jax.localization import faiss_index
from vpr_jax.training.workdir_lock import LOCK_FILENAME

INDEX_FORMAT_VERSION = 1
MANIFEST_FILENAME = 'index.json'
PENDING_SUBDIR = 'pending'
# The files of a generation, by name (`generation_files`): the only files `clean_up` removes.
GENERATION_FILE = re.compile(r'(descriptors-[0-9]+\.npy|images-[0-9]+\.npz|'
                             r'(faiss|trained)-[0-9]+\.index)')
PART_FILE = re.compile(r'part-[0-9]{20}-[0-9a-f]{8}\.npz')
# What reading a damaged file raises: numpy (truncated, pickled: ValueError), zip, FAISS.
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, RuntimeError)
# Manifest fields every reader relies on, and their types.
_MANIFEST_FIELDS = {'generation': int, 'files': dict, 'fingerprint': dict, 'decode': dict,
                    'dtype': str, 'descriptor_dim': int, 'num_images': int, 'checkpoint': str,
                    'images_dir': str, 'faiss_factory': str}
_JSON_TYPE_NAMES = {int: 'integer', dict: 'object', str: 'string'}


@dataclasses.dataclass
class Rows:
  """Per-image rows of an index (or of one pending part)."""
  paths: list[str]
  sizes: np.ndarray
  mtimes_ns: np.ndarray
  latlon: np.ndarray
  utm: np.ndarray
  utm_zones: list[str]
  sources: list[str]
  descriptors: np.ndarray

  @classmethod
  def empty(cls, paths: Sequence[str], descriptors: np.ndarray) -> 'Rows':
    """Rows of `paths` with zero stamps and no coordinates, holding `descriptors`."""
    n = len(paths)
    return cls(paths=list(paths), sizes=np.zeros(n, np.int64), mtimes_ns=np.zeros(n, np.int64),
               latlon=np.full((n, 2), np.nan), utm=np.full((n, 2), np.nan), utm_zones=[''] * n,
               sources=[''] * n, descriptors=descriptors)

  def arrays(self) -> dict[str, np.ndarray]:
    """The arrays of an images-G.npz file (everything but the descriptors)."""
    return {'paths': np.asarray(self.paths, dtype=np.str_),
            'sizes': np.asarray(self.sizes, np.int64),
            'mtimes_ns': np.asarray(self.mtimes_ns, np.int64),
            'latlon': np.asarray(self.latlon, np.float64).reshape(-1, 2),
            'utm': np.asarray(self.utm, np.float64).reshape(-1, 2),
            'utm_zones': np.asarray(self.utm_zones, dtype=np.str_),
            'coordinate_sources': np.asarray(self.sources, dtype=np.str_)}

  @classmethod
  def from_arrays(cls, data: Mapping[str, np.ndarray], descriptors: np.ndarray) -> 'Rows':
    """Rows from the arrays of `arrays()` and their descriptors."""
    return cls(paths=[str(p) for p in data['paths']], sizes=np.asarray(data['sizes']),
               mtimes_ns=np.asarray(data['mtimes_ns']), latlon=np.asarray(data['latlon']),
               utm=np.asarray(data['utm']), utm_zones=[str(z) for z in data['utm_zones']],
               sources=[str(s) for s in data['coordinate_sources']], descriptors=descriptors)

  def copy_row(self, row: int, other: 'Rows', other_row: int) -> None:
    """Sets row `row` to row `other_row` of `other` (stamps, coordinates, descriptor)."""
    self.sizes[row], self.mtimes_ns[row] = other.sizes[other_row], other.mtimes_ns[other_row]
    self.latlon[row], self.utm[row] = other.latlon[other_row], other.utm[other_row]
    self.utm_zones[row], self.sources[row] = other.utm_zones[other_row], other.sources[other_row]
    self.descriptors[row] = other.descriptors[other_row]

  def set_position(self, row: int, position: coordinates.Position | None) -> None:
    """Sets the coordinates of row `row` (unknown where `position` is None)."""
    position = position or coordinates.Position()
    none_to_nan = lambda v: np.nan if v is None else v
    self.latlon[row] = (none_to_nan(position.lat), none_to_nan(position.lon))
    self.utm[row] = (none_to_nan(position.utm_east), none_to_nan(position.utm_north))
    self.utm_zones[row] = position.utm_zone
    self.sources[row] = position.source


  def check(self) -> None:
    """Raises ValueError unless every per-row array has one entry per path."""
    n = len(self.paths)
    lengths = {'sizes': len(self.sizes), 'mtimes_ns': len(self.mtimes_ns),
               'latlon': len(self.latlon), 'utm': len(self.utm), 'utm_zones': len(self.utm_zones),
               'coordinate_sources': len(self.sources), 'descriptors': len(self.descriptors)}
    wrong = {name: length for name, length in lengths.items() if length != n}
    if wrong or np.ndim(self.descriptors) != 2:
      raise ValueError(f'{n} paths but {wrong or "descriptors not 2-D"}')


def damaged(path: str, why: str) -> DamagedIndexError:
  """The error of a damaged index file: which file, why, and what fixes it."""
  return DamagedIndexError(
      f'index file {path} is damaged ({why}); rebuild the index into a new folder (python -m '
      'vpr_jax.index ... --out NEW_FOLDER).')


def _why(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[-1] if text else ""}'.rstrip(': ')


def _npz_writer(arrays: Mapping[str, np.ndarray]) -> Callable[[Any], None]:
  return lambda f: np.savez(f, **arrays)


def _npy_writer(array: np.ndarray) -> Callable[[Any], None]:
  return lambda f: np.save(f, array)


def generation_files(generation: int) -> dict[str, str]:
  """The file names of generation `generation`, by kind."""
  return {'descriptors': f'descriptors-{generation}.npy', 'images': f'images-{generation}.npz',
          'faiss': f'faiss-{generation}.index', 'trained': f'trained-{generation}.index'}


def read_manifest(index_dir: str) -> dict[str, Any] | None:
  """The manifest of an index folder, None when there is none (no committed build)."""
  path = os.path.join(index_dir, MANIFEST_FILENAME)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise damaged(path, f'not a readable index manifest: {_why(e)}') from None
  if not isinstance(manifest, dict):
    raise damaged(path, f'a JSON {type(manifest).__name__}, expected an object')
  if manifest.get('format_version') != INDEX_FORMAT_VERSION:
    raise IndexMismatchError(
        f'{path}: index format version {manifest.get("format_version")!r}, this vpr_jax reads '
        f'{INDEX_FORMAT_VERSION}; rebuild the index.')
  check_manifest(path, manifest)
  return manifest


def check_manifest(path: str, manifest: Mapping[str, Any]) -> None:
  """Refuses a manifest without the fields the readers rely on, or naming foreign files.

  Raises:
    DamagedIndexError: naming the field.
  """
  for field, kind in _MANIFEST_FIELDS.items():
    value = manifest.get(field)
    if not isinstance(value, kind) or isinstance(value, bool):
      raise damaged(path, f'field {field!r} is {value!r}, expected a JSON '
                    f'{_JSON_TYPE_NAMES[kind]}')
  if manifest['generation'] < 1 or manifest['num_images'] < 1 or manifest['descriptor_dim'] < 1:
    raise damaged(path, 'generation, num_images and descriptor_dim must be positive')
  if manifest['dtype'] not in ('float32', 'float16'):
    raise damaged(path, f'dtype {manifest["dtype"]!r}, expected float32 or float16')
  # The files must be the generation's own names: a manifest never points outside its folder.
  expected = generation_files(manifest['generation'])
  files = manifest['files']
  for kind in ('descriptors', 'images', 'faiss') + (('trained',) if 'trained' in files else ()):
    if files.get(kind) != expected[kind]:
      raise damaged(path, f'files.{kind} is {files.get(kind)!r}, expected {expected[kind]!r} '
                    f'(generation {manifest["generation"]})')


def open_for_build(out: str) -> dict[str, Any] | None:
  """The manifest of the index a build will update; None for a new (or never committed) index.

  Raises:
    IndexMismatchError: `out` is a file, or a non-empty folder that is not an index.
  """
  if os.path.exists(out) and not os.path.isdir(out):
    raise IndexMismatchError(f'--out {out!r} is a file; expected an index folder.')
  manifest = read_manifest(out) if os.path.isdir(out) else None
  if manifest is None and os.path.isdir(out) and set(os.listdir(out)) - {PENDING_SUBDIR,
                                                                         LOCK_FILENAME}:
    raise IndexMismatchError(
        f'{out!r} exists, is not empty and holds no {MANIFEST_FILENAME}: not a localisation '
        'index; choose an empty or new folder.')
  return manifest


def require_manifest(index_dir: str) -> dict[str, Any]:
  """The manifest of a committed index.

  Raises:
    IndexNotFoundError: no index at `index_dir`.
  """
  manifest = read_manifest(index_dir) if os.path.isdir(index_dir) else None
  if manifest is None:
    raise IndexNotFoundError(
        f'no localisation index at {index_dir!r} (expected a folder with {MANIFEST_FILENAME} '
        'written by python -m vpr_jax.index).')
  return manifest


def _read_image_rows(path: str, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The arrays of images-G.npz, each with one entry per row of the manifest."""
  try:
    rows = safe_numpy.load_npz(path)
    lengths = {name: len(rows[name]) for name in Rows.empty([], np.zeros((0, 1))).arrays()}
  except _READ_ERRORS as e:
    raise damaged(path, _why(e)) from None
  wrong = {name: n for name, n in lengths.items() if n != manifest['num_images']}
  if wrong:
    raise damaged(path, f'rows {wrong}, the manifest says {manifest["num_images"]} images')
  return rows


def _read_descriptors(path: str, manifest: Mapping[str, Any]) -> np.ndarray:
  """descriptors-G.npy memory-mapped, of the manifest's shape and dtype."""
  try:
    descriptors = safe_numpy.load_npy(path, mmap_mode='r')
  except _READ_ERRORS as e:
    raise damaged(path, _why(e)) from None
  expected = (manifest['num_images'], manifest['descriptor_dim'])
  if descriptors.shape != expected or descriptors.dtype != np.dtype(manifest['dtype']):
    raise damaged(path, f'{descriptors.dtype} {descriptors.shape}, the manifest says '
                  f'{manifest["dtype"]} {expected}')
  return descriptors


def _read_faiss(path: str, manifest: Mapping[str, Any], num_rows: int) -> faiss.Index:
  """A FAISS index file holding `num_rows` vectors of the manifest's dimension."""
  try:
    index = faiss_index.read_index(path)
  except _READ_ERRORS as e:
    raise damaged(path, _why(e)) from None
  if index.d != manifest['descriptor_dim'] or index.ntotal != num_rows:
    raise damaged(path, f'{index.ntotal} vectors of dimension {index.d}, the manifest says '
                  f'{num_rows} of dimension {manifest["descriptor_dim"]}')
  return index


def read_rows(index_dir: str, manifest: Mapping[str, Any]) -> Rows:
  """The rows of the committed generation (descriptors memory-mapped), checked as they are read.

  Raises:
    DamagedIndexError: a file is missing, unreadable or does not fit the manifest.
  """
  files = manifest['files']
  rows = _read_image_rows(os.path.join(index_dir, files['images']), manifest)
  return Rows.from_arrays(rows, _read_descriptors(os.path.join(index_dir, files['descriptors']),
                                                  manifest))


def read_search_files(index_dir: str, manifest: Mapping[str, Any]
                      ) -> tuple[dict[str, np.ndarray], faiss.Index]:
  """(the arrays of images-G.npz, the FAISS index) of the committed generation, checked.

  Raises:
    DamagedIndexError: a file is missing, unreadable, or does not fit the manifest (a FAISS file
      of another index would give the vectors of other images).
  """
  files = manifest['files']
  rows = _read_image_rows(os.path.join(index_dir, files['images']), manifest)
  return rows, _read_faiss(os.path.join(index_dir, files['faiss']), manifest,
                           manifest['num_images'])


def read_trained(index_dir: str, manifest: Mapping[str, Any]) -> faiss.Index:
  """The trained, empty FAISS index of the committed generation (only when it has one)."""
  return _read_faiss(os.path.join(index_dir, generation_files(manifest['generation'])['trained']),
                     manifest, 0)


def part_key(fingerprint: Mapping[str, Any], settings: Mapping[str, Any], dtype: str) -> str:
  """What a pending part must agree with to be reused: checkpoint, decode settings, dtype."""
  text = json.dumps({'fingerprint': fingerprint, 'decode': settings, 'dtype': dtype},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def read_pending(index_dir: str, key: str) -> list[Rows]:
  """The pending parts written with `key`; others and unreadable ones are ignored with a warning."""
  parts = []
  pending_dir = os.path.join(index_dir, PENDING_SUBDIR)
  for path in sorted(glob.glob(os.path.join(pending_dir, 'part-*.npz'))):
    try:
      data = safe_numpy.load_npz(path)
      if str(data['key']) != key:
        logging.warning('Ignoring %s: embedded with another model or decode settings.', path)
        continue
      part = Rows.from_arrays(data, np.asarray(data['descriptors']))
      part.check()
      parts.append(part)
    except _READ_ERRORS as e:
      # A part is only work saved: one that cannot be read is embedded again.
      logging.warning('Ignoring unreadable part %s (%s).', path, _why(e))
  return parts


def write_pending_part(index_dir: str, rows: Rows, key: str) -> None:
  """Saves embedded rows to pending/ under a new name (time-ordered, unique)."""
  name = f'part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz'
  fileio.atomic_write(
      os.path.join(index_dir, PENDING_SUBDIR, name),
      _npz_writer({**rows.arrays(), 'descriptors': rows.descriptors, 'key': np.asarray(key)}),
      binary=True)


def commit(index_dir: str, generation: int, table: Rows, index: faiss.Index,
           trained: faiss.Index | None, fields: Mapping[str, Any]) -> dict[str, Any]:
  """Writes generation `generation`, then its manifest (the commit point).

  Args:
    index_dir: the index folder.
    generation: the new generation's number.
    table: its rows.
    index: the FAISS index over them.
    trained: the trained, empty FAISS index to reuse next time (None for untrained factories).
    fields: the manifest's other fields (checkpoint, fingerprint, settings, counts), in order.

  Returns:
    The manifest written.
  """
  files = generation_files(generation)
  fileio.atomic_write(os.path.join(index_dir, files['descriptors']),
                      _npy_writer(table.descriptors), binary=True)
  fileio.atomic_write(os.path.join(index_dir, files['images']), _npz_writer(table.arrays()),
                      binary=True)
  faiss_index.write_index(os.path.join(index_dir, files['faiss']), index)
  if trained is not None:
    faiss_index.write_index(os.path.join(index_dir, files['trained']), trained)
  manifest = {
      'format_version': INDEX_FORMAT_VERSION,
      'generation': generation,
      **fields,
      'files': {k: v for k, v in files.items() if k != 'trained' or trained is not None},
  }
  fileio.atomic_write(os.path.join(index_dir, MANIFEST_FILENAME),
                      json.dumps(manifest, indent=2) + '\n')
  return manifest


def clean_up(index_dir: str, manifest: Mapping[str, Any]) -> None:
  """After a commit: removes the files of the other generations and the pending parts.

  Only files named as a build names them (`GENERATION_FILE`, `PART_FILE`) are removed: anything
  else in the folder (a user's descriptors.npz, notes) stays.
  """
  keep = set(manifest['files'].values())
  for name in os.listdir(index_dir):
    path = os.path.join(index_dir, name)
    if name not in keep and GENERATION_FILE.fullmatch(name) and os.path.isfile(path):
      os.remove(path)
  pending_dir = os.path.join(index_dir, PENDING_SUBDIR)
  for path in glob.glob(os.path.join(pending_dir, 'part-*.npz')):
    if PART_FILE.fullmatch(os.path.basename(path)):
      os.remove(path)
  if os.path.isdir(pending_dir) and not os.listdir(pending_dir):
    os.rmdir(pending_dir)
