"""Where was this photo taken? A persistent index of geotagged photos, and localisation against it.

`build_index` embeds every image under a folder (recursively) with a checkpoint, exactly as
evaluation does (`evaluation.descriptors.compute_descriptors`: the same decode, torchvision-exact resize and
forward pass), and writes an index folder; `Localizer.from_index(folder).localize(photos)` embeds
new photos the same way and returns, for each, the nearest database images with their coordinates.

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
G + 1 next to those of G and only then replaces index.json, so an interrupted build leaves the
previous index usable. Descriptors are written in parts of `part_size` images to `pending/` as
they are computed: rerunning the interrupted command embeds only what no part holds yet. A build
on an existing index embeds only new or changed files (size or modification time) and drops rows
whose file is gone.

Coordinates, per image, first found of: the `coordinates` CSV (`path,lat,lon`, header optional,
paths relative to the images folder), a benchmark-style name
(`@UTM_east@UTM_north@zone@band@lat@lon@...`), the EXIF GPS tags.

The fingerprint of a checkpoint is its model config (without the fields that do not change the
descriptors: weights path at initialisation, compute dtype), the input size, the preprocessing
version and a SHA-256 of the variables. An index is used only with a checkpoint of the same
fingerprint, and extended only with the same fingerprint and decode settings.

Distances are L2 distances between L2-normalised descriptors (sqrt of what `search.search`
ranks by); with the default flat index the ranking is evaluation's.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import faiss
import jax
import numpy as np
from PIL import Image
import tqdm

from vpr_jax.checkpoints import orbax_states

from vpr_jax.checkpoints import run_config

from vpr_jax.checkpoints import runs

from vpr_jax.evaluation import descriptors as descriptors_lib

from vpr_jax import fileio
from vpr_jax import visualize
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.imaging import images
from vpr_jax.data.multiprocess import workers
from vpr_jax.models import vpr_model
from vpr_jax.errors import CheckpointNotFoundError
from vpr_jax.errors import CoordinatesFileError
from vpr_jax.errors import FaissIndexError
from vpr_jax.errors import ImageFolderError
from vpr_jax.errors import IndexMismatchError
from vpr_jax.errors import IndexNotFoundError

INDEX_FORMAT_VERSION = 1
MANIFEST_FILENAME = 'index.json'
PENDING_SUBDIR = 'pending'
# Changes whenever decode or resize would give other pixels for the same file.
PREPROCESSING_VERSION = 'PIL decode to RGB, torchvision Resize((H, W)) bilinear antialiased; v1'
# Model config fields that do not change the descriptors of given variables.
NON_DESCRIPTOR_MODEL_FIELDS = ('backbone_weights', 'dtype')
DEFAULT_PART_SIZE = 4096
DEFAULT_FAISS_FACTORY = 'Flat'
DEFAULT_NPROBE = 32
# Vectors a trained FAISS index (IVF, PQ) is trained on, at most (a random sample of the rows).
DEFAULT_FAISS_TRAIN_SIZE = 262144
# Smallest database for the 'ivfpq' shorthand: PQ and IVF need thousands of training vectors.
MIN_IVFPQ_IMAGES = 10000
EXIF_GPS_IFD = 0x8825


# ------------------------------------------------------------------------------------------------
# Checkpoint fingerprint.
# ------------------------------------------------------------------------------------------------

def weights_sha256(variables: Any) -> str:
  """SHA-256 of a variables pytree: every leaf's path, dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f'{array.dtype.str}{array.shape}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def checkpoint_fingerprint(config, variables) -> dict[str, Any]:
  """What must agree between an index and the checkpoint that queries it.

  Args:
    config: the checkpoint's ConfigDict.
    variables: its variables.

  Returns:
    JSON-serialisable dict: `model` (config.model without `NON_DESCRIPTOR_MODEL_FIELDS`),
    `image_size`, `preprocessing`, `weights_sha256`.
  """
  model = json.loads(run_config.config_to_json(config.model))
  for field in NON_DESCRIPTOR_MODEL_FIELDS:
    model.pop(field, None)
  return {
      'model': model,
      'image_size': [int(s) for s in config.image_size],
      'preprocessing': PREPROCESSING_VERSION,
      'weights_sha256': weights_sha256(variables),
  }


def fingerprint_differences(built: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
  """Names of the fingerprint fields that differ (model fields as `model.<name>`)."""
  differing = []
  for key in sorted(set(built) | set(given)):
    a, b = built.get(key), given.get(key)
    if key == 'model' and isinstance(a, dict) and isinstance(b, dict):
      differing += [f'model.{k}' for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      differing.append('weights' if key == 'weights_sha256' else key)
  return differing


# ------------------------------------------------------------------------------------------------
# Coordinates.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Position:
  """Where a database image was taken; fields are None when unknown."""
  lat: float | None = None
  lon: float | None = None
  utm_east: float | None = None
  utm_north: float | None = None
  utm_zone: str = ''
  source: str = ''


def _valid_latlon(lat: float, lon: float) -> bool:
  return math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180


def position_from_name(path: str) -> Position | None:
  """Position from a benchmark-style name `@UTM_east@UTM_north@zone@band@lat@lon@...`, or None."""
  try:
    east, north = benchmarks.parse_utm(path)
  except ValueError:
    return None
  fields = os.path.basename(path).split('@')
  zone = ''.join(fields[3:5]) if len(fields) > 4 else ''
  lat = lon = None
  try:
    lat, lon = float(fields[5]), float(fields[6])
    if not _valid_latlon(lat, lon):
      lat = lon = None
  except (IndexError, ValueError):
    pass
  return Position(lat, lon, east, north, zone, 'name')


def _rational_degrees(value) -> float:
  degrees, minutes, seconds = (float(v) for v in value)
  return degrees + minutes / 60.0 + seconds / 3600.0


def position_from_exif(path: str) -> Position | None:
  """Position from the EXIF GPS tags of an image file, or None when it has none (or bad ones)."""
  try:
    with Image.open(path) as img:
      gps = img.getexif().get_ifd(EXIF_GPS_IFD)
      lat = _rational_degrees(gps[2]) * (-1.0 if str(gps.get(1, 'N')).upper() == 'S' else 1.0)
      lon = _rational_degrees(gps[4]) * (-1.0 if str(gps.get(3, 'E')).upper() == 'W' else 1.0)
  except Exception:  # pylint: disable=broad-except
    # No file, no EXIF, no GPS IFD, malformed values: no position from EXIF.
    return None
  return Position(lat, lon, source='exif') if _valid_latlon(lat, lon) else None


def read_coordinates_csv(path: str, images_dir: str) -> dict[str, Position]:
  """Reads `path,lat,lon` rows (an optional header row names the columns).

  Args:
    path: the CSV file.
    images_dir: the indexed folder; absolute image paths are made relative to it.

  Returns:
    {relative path ('/'-separated): Position}.

  Raises:
    CoordinatesFileError: missing file, or a row that is not path,lat,lon with valid degrees.
  """
  positions = {}
  try:
    with open(path, newline='') as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError) as e:
    raise CoordinatesFileError(f'cannot read coordinates file {path!r}: {e}') from None
  columns = (0, 1, 2)
  if rows and not _is_number(rows[0][1:2]):
    header = [c.strip().lower() for c in rows[0]]
    try:
      columns = (header.index('path'), header.index('lat'), header.index('lon'))
    except ValueError:
      raise CoordinatesFileError(
          f'{path}:1: header {rows[0]!r} lacks the columns path, lat, lon') from None
    rows = [None] + rows[1:]
  for line, row in enumerate(rows, start=1):
    if row is None or not any(cell.strip() for cell in row):
      continue
    try:
      image, lat, lon = row[columns[0]].strip(), float(row[columns[1]]), float(row[columns[2]])
      if not image or not _valid_latlon(lat, lon):
        raise ValueError
    except (IndexError, ValueError):
      raise CoordinatesFileError(
          f'{path}:{line}: expected path,lat,lon with lat in [-90, 90] and lon in [-180, 180], '
          f'got {row!r}') from None
    if os.path.isabs(image):
      image = os.path.relpath(image, images_dir)
    positions[os.path.normpath(image).replace(os.sep, '/')] = Position(lat, lon, source='csv')
  return positions


def _is_number(cells: Sequence[str]) -> bool:
  try:
    float(cells[0])
    return True
  except (IndexError, ValueError):
    return False


# ------------------------------------------------------------------------------------------------
# FAISS.
# ------------------------------------------------------------------------------------------------

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


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
  """Sets the inverted lists probed per query (no-op for indexes without inverted lists)."""
  try:
    faiss.extract_index_ivf(index).nprobe = int(nprobe)
  except (RuntimeError, AttributeError):
    pass


def _write_faiss(path: str, index: faiss.Index) -> None:
  with fileio.atomic_open(path, binary=True) as f:
    faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def _read_faiss(path: str) -> faiss.Index:
  return faiss.read_index(path)


# ------------------------------------------------------------------------------------------------
# The index folder.
# ------------------------------------------------------------------------------------------------

def _normalised(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _npz_bytes_writer(arrays: Mapping[str, np.ndarray]) -> Callable[[Any], None]:
  return lambda f: np.savez(f, **arrays)


def _npy_writer(array: np.ndarray) -> Callable[[Any], None]:
  return lambda f: np.save(f, array)


def read_manifest(index_dir: str) -> dict[str, Any] | None:
  """The manifest of an index folder, None when there is none (no committed build)."""
  path = os.path.join(index_dir, MANIFEST_FILENAME)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IndexMismatchError(f'{path} is not a readable index manifest ({e}).') from None
  if manifest.get('format_version') != INDEX_FORMAT_VERSION:
    raise IndexMismatchError(
        f'{path}: index format version {manifest.get("format_version")!r}, this vpr_jax reads '
        f'{INDEX_FORMAT_VERSION}; rebuild the index.')
  return manifest


def _generation_files(generation: int) -> dict[str, str]:
  return {'descriptors': f'descriptors-{generation}.npy', 'images': f'images-{generation}.npz',
          'faiss': f'faiss-{generation}.index', 'trained': f'trained-{generation}.index'}


@dataclasses.dataclass
class _Rows:
  """Per-image rows of an index (or of one pending part)."""
  paths: list[str]
  sizes: np.ndarray
  mtimes_ns: np.ndarray
  latlon: np.ndarray
  utm: np.ndarray
  utm_zones: list[str]
  sources: list[str]
  descriptors: np.ndarray

  def arrays(self) -> dict[str, np.ndarray]:
    return {'paths': np.asarray(self.paths, dtype=np.str_),
            'sizes': np.asarray(self.sizes, np.int64),
            'mtimes_ns': np.asarray(self.mtimes_ns, np.int64),
            'latlon': np.asarray(self.latlon, np.float64).reshape(-1, 2),
            'utm': np.asarray(self.utm, np.float64).reshape(-1, 2),
            'utm_zones': np.asarray(self.utm_zones, dtype=np.str_),
            'coordinate_sources': np.asarray(self.sources, dtype=np.str_)}

  @classmethod
  def from_arrays(cls, data: Mapping[str, np.ndarray], descriptors: np.ndarray) -> '_Rows':
    return cls(paths=[str(p) for p in data['paths']], sizes=np.asarray(data['sizes']),
               mtimes_ns=np.asarray(data['mtimes_ns']), latlon=np.asarray(data['latlon']),
               utm=np.asarray(data['utm']), utm_zones=[str(z) for z in data['utm_zones']],
               sources=[str(s) for s in data['coordinate_sources']], descriptors=descriptors)

  def set_position(self, row: int, position: Position | None) -> None:
    position = position or Position()
    none_to_nan = lambda v: np.nan if v is None else v
    self.latlon[row] = (none_to_nan(position.lat), none_to_nan(position.lon))
    self.utm[row] = (none_to_nan(position.utm_east), none_to_nan(position.utm_north))
    self.utm_zones[row] = position.utm_zone
    self.sources[row] = position.source


def _image_stamps(images_dir: str, paths: Sequence[str]) -> dict[str, tuple[int, int]]:
  stamps = {}
  for path in paths:
    stat = os.stat(os.path.join(images_dir, path))
    stamps[path] = (int(stat.st_size), int(stat.st_mtime_ns))
  return stamps


def list_database_images(images_dir: str) -> list[str]:
  """Sorted image paths (.jpg, .jpeg, .png) under `images_dir`, recursively, relative to it.

  Raises:
    ImageFolderError: the folder is missing, not a folder, or holds no image.
  """
  if not os.path.exists(images_dir):
    raise ImageFolderError(f'image folder {images_dir!r} does not exist.')
  if not os.path.isdir(images_dir):
    raise ImageFolderError(f'{images_dir!r} is not a folder; expected a folder of images.')
  paths = benchmarks.list_images(images_dir, images_dir)
  if not paths:
    raise ImageFolderError(
        f'no images under {images_dir!r}: expected files ending in '
        f'{", ".join(benchmarks.IMAGE_EXTENSIONS)} (sub-folders are searched).')
  return paths


@dataclasses.dataclass
class BuildStats:
  """What a `build_index` run did.

  Attributes:
    num_images: rows of the index written.
    embedded: images embedded by this run.
    reused: rows taken from the previous index.
    resumed: rows taken from the parts of an interrupted run.
    removed: rows of the previous index dropped (file gone or changed).
    faiss_factory: the FAISS index written.
    seconds: wall time of the run.
    up_to_date: nothing changed; no file was written.
  """
  num_images: int
  embedded: int
  reused: int
  resumed: int
  removed: int
  faiss_factory: str
  seconds: float
  up_to_date: bool = False


def _load_model(checkpoint: str):
  try:
    runs.resolve_checkpoint_dir(checkpoint)
  except FileNotFoundError as e:
    raise CheckpointNotFoundError(str(e)) from None
  config, variables, step = orbax_states.load_for_eval(checkpoint)
  return config, variables, step, vpr_model.build_model(config)


def _decode_settings(exif_transpose: bool, fast_decode: bool) -> dict[str, bool]:
  return {'exif_transpose': bool(exif_transpose), 'fast_decode': bool(fast_decode)}


def _part_key(fingerprint: Mapping[str, Any], settings: Mapping[str, Any], dtype: str) -> str:
  text = json.dumps({'fingerprint': fingerprint, 'decode': settings, 'dtype': dtype},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _read_pending(pending_dir: str, key: str) -> list[_Rows]:
  parts = []
  for path in sorted(glob.glob(os.path.join(pending_dir, 'part-*.npz'))):
    try:
      with np.load(path) as data:
        if str(data['key']) != key:
          logging.warning('Ignoring %s: embedded with another model or decode settings.', path)
          continue
        parts.append(_Rows.from_arrays(data, np.asarray(data['descriptors'])))
    except (OSError, ValueError, KeyError) as e:
      logging.warning('Ignoring unreadable part %s (%s).', path, e)
  return parts


def _position_of(images_dir: str, path: str) -> Position | None:
  return position_from_name(path) or position_from_exif(os.path.join(images_dir, path))


def build_index(checkpoint: str, images_dir: str, out: str, *, half: bool = False,
                faiss_factory: str = DEFAULT_FAISS_FACTORY, coordinates: str | None = None,
                exif_transpose: bool = True, fast_decode: bool = False,
                batch_size: int | None = None, num_workers: int | None = 0,
                part_size: int = DEFAULT_PART_SIZE, nprobe: int = DEFAULT_NPROBE,
                faiss_train_size: int = DEFAULT_FAISS_TRAIN_SIZE, show_progress: bool = True,
                print_fn: Callable[[str], None] = print) -> BuildStats:
  """Builds or updates the localisation index of a folder of images (layout in the module doc).

  Args:
    checkpoint: checkpoint folder or training workdir (see `orbax_states.load_for_eval`).
    images_dir: the database folder; every .jpg/.jpeg/.png below it is indexed.
    out: the index folder (created; an existing index of the same checkpoint is updated).
    half: store the descriptors as float16 (half the disk; FAISS still searches float32).
    faiss_factory: 'flat' (exact, the default), 'ivfpq', or a FAISS factory string.
    coordinates: CSV of path,lat,lon (paths relative to `images_dir`); takes precedence over
      names and EXIF.
    exif_transpose: embed photos upright according to their EXIF orientation.
    fast_decode: DCT-scaled JPEG decoding (see `images.DecodeOptions`).
    batch_size: images per forward batch; default the checkpoint's data.eval_batch_size.
    num_workers: decoding worker processes (-1: one per core; None: the checkpoint's setting).
    part_size: images per pending part (the work an interruption can lose).
    nprobe: inverted lists searched per query, for IVF indexes.
    faiss_train_size: at most this many descriptors (a random sample) train an IVF/PQ index.
    show_progress: show a progress bar while embedding.
    print_fn: where the summary goes.

  Returns:
    A `BuildStats`.

  Raises:
    ImageFolderError, CoordinatesFileError, IndexMismatchError, FaissIndexError,
    images.ImageDecodeError: bad input, each with a one-line message.
  """
  start = time.perf_counter()
  images_dir = os.path.abspath(os.fspath(images_dir))
  out = os.path.abspath(os.fspath(out))
  paths = list_database_images(images_dir)
  csv_positions = read_coordinates_csv(coordinates, images_dir) if coordinates else None
  if os.path.exists(out) and not os.path.isdir(out):
    raise IndexMismatchError(f'--out {out!r} is a file; expected an index folder.')
  manifest = read_manifest(out) if os.path.isdir(out) else None
  if manifest is None and os.path.isdir(out) and set(os.listdir(out)) - {PENDING_SUBDIR}:
    raise IndexMismatchError(
        f'{out!r} exists, is not empty and holds no {MANIFEST_FILENAME}: not a localisation '
        'index; choose an empty or new folder.')

  config, variables, step, model = _load_model(checkpoint)
  fingerprint = checkpoint_fingerprint(config, variables)
  settings = _decode_settings(exif_transpose, fast_decode)
  dtype = 'float16' if half else 'float32'
  if manifest is not None:
    differing = fingerprint_differences(manifest['fingerprint'], fingerprint)
    if differing:
      raise IndexMismatchError(
          f'index {out!r} was built with another checkpoint ({", ".join(differing)} differ); '
          'index into another folder, or delete this one to rebuild it.')
    built_settings = dict(manifest['decode'], half=manifest['dtype'] == 'float16')
    for name, value in dict(settings, half=bool(half)).items():
      built = built_settings.get(name)
      if built != value:
        raise IndexMismatchError(
            f'index {out!r} was built with {name}={built}, this run asks for {value}; use the '
            'same settings, or another folder.')
  key = _part_key(fingerprint, settings, dtype)
  pending_dir = os.path.join(out, PENDING_SUBDIR)
  stamps = _image_stamps(images_dir, paths)

  # Rows already embedded: the committed index, then the parts of an interrupted run (newer).
  known: dict[str, tuple[str, _Rows, int]] = {}
  previous = None
  if manifest is not None:
    files = _generation_files(manifest['generation'])
    with np.load(os.path.join(out, files['images'])) as data:
      previous = _Rows.from_arrays(data, np.load(os.path.join(out, files['descriptors']),
                                                 mmap_mode='r'))
    for row, path in enumerate(previous.paths):
      known[path] = ('index', previous, row)
  for part in _read_pending(pending_dir, key):
    for row, path in enumerate(part.paths):
      known[path] = ('pending', part, row)

  def still_valid(path):
    origin = known.get(path)
    if origin is None or path not in stamps:
      return False
    rows, row = origin[1], origin[2]
    return (int(rows.sizes[row]), int(rows.mtimes_ns[row])) == stamps[path]

  todo = [p for p in paths if not still_valid(p)]
  removed = sum(1 for p in (previous.paths if previous else ()) if not still_valid(p))
  resolve_faiss_factory(faiss_factory, len(paths), 1)  # A bad shorthand fails before embedding.
  if (manifest is not None and not todo and not removed and csv_positions is None
      and len(paths) == manifest['num_images'] and faiss_factory in (
          manifest['faiss_factory'], manifest.get('faiss_requested'))):
    seconds = time.perf_counter() - start
    print_fn(f'Index {out} is up to date ({len(paths)} images).')
    return BuildStats(len(paths), 0, len(paths), 0, 0, manifest['faiss_factory'], seconds, True)

  # Embed what is missing, part by part; each part is committed to pending/ when complete.
  batch_size = int(batch_size or config.data.eval_batch_size)
  num_workers = workers.resolve_num_workers(
      config.data.num_workers if num_workers is None else num_workers)
  image_size = tuple(int(s) for s in config.image_size)
  decode = images.DecodeOptions(**settings)
  part_size = max(int(part_size), 1)
  parts: list[_Rows] = []
  with tqdm.tqdm(total=len(todo), desc='Embedding', unit='img', disable=not show_progress or
                 not todo) as bar:
    for begin in range(0, len(todo), part_size):
      chunk = todo[begin:begin + part_size]
      descriptors = descriptors_lib.compute_descriptors(
          model, variables, images_dir, chunk, image_size, batch_size, num_workers,
          decode_options=decode, progress=bar.update)
      rows = _Rows(paths=list(chunk),
                   sizes=np.asarray([stamps[p][0] for p in chunk], np.int64),
                   mtimes_ns=np.asarray([stamps[p][1] for p in chunk], np.int64),
                   latlon=np.full((len(chunk), 2), np.nan), utm=np.full((len(chunk), 2), np.nan),
                   utm_zones=[''] * len(chunk), sources=[''] * len(chunk),
                   descriptors=_normalised(descriptors).astype(dtype))
      for row, path in enumerate(chunk):
        rows.set_position(row, _position_of(images_dir, path))
      fileio.atomic_write(
          os.path.join(pending_dir, f'part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz'),
          _npz_bytes_writer({**rows.arrays(), 'descriptors': rows.descriptors,
                             'key': np.asarray(key)}), binary=True)
      parts.append(rows)
      for row, path in enumerate(chunk):
        known[path] = ('new', rows, row)

  # The rows of the new generation, in path order.
  origins = [known[p] for p in paths]
  resumed = sum(1 for o in origins if o[0] == 'pending')
  reused = sum(1 for o in origins if o[0] == 'index')
  dim = int(origins[0][1].descriptors.shape[1])
  table = _Rows(paths=list(paths), sizes=np.zeros(len(paths), np.int64),
                mtimes_ns=np.zeros(len(paths), np.int64), latlon=np.full((len(paths), 2), np.nan),
                utm=np.full((len(paths), 2), np.nan), utm_zones=[''] * len(paths),
                sources=[''] * len(paths), descriptors=np.empty((len(paths), dim), dtype))
  for i, (_, rows, row) in enumerate(origins):
    table.sizes[i], table.mtimes_ns[i] = rows.sizes[row], rows.mtimes_ns[row]
    table.latlon[i], table.utm[i] = rows.latlon[row], rows.utm[row]
    table.utm_zones[i], table.sources[i] = rows.utm_zones[row], rows.sources[row]
    table.descriptors[i] = rows.descriptors[row]
  if csv_positions is not None:
    unknown = sorted(set(csv_positions) - set(paths))
    if unknown:
      logging.warning('%d rows of %s name no indexed image (first: %s).', len(unknown),
                      coordinates, unknown[0])
    for i, path in enumerate(paths):
      if path in csv_positions:
        table.set_position(i, csv_positions[path])
      elif table.sources[i] == 'csv':
        # Listed by an earlier CSV but not by this one: back to what the file itself says.
        table.set_position(i, _position_of(images_dir, path))

  # FAISS: reuse the trained (empty) index of the previous build when the factory is the same.
  factory = resolve_faiss_factory(faiss_factory, len(paths), dim)
  template = None
  if manifest is not None and manifest['faiss_factory'] == factory and manifest.get('trained'):
    template = _read_faiss(os.path.join(out, _generation_files(manifest['generation'])['trained']))
  if template is None:
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(paths), min(len(paths), int(faiss_train_size)),
                                replace=False))
    template = train_faiss_index(factory, dim, table.descriptors[sample])
  trained = not faiss.index_factory(dim, factory, faiss.METRIC_L2).is_trained
  index = faiss.clone_index(template)
  add_in_chunks(index, table.descriptors)

  generation = (manifest['generation'] + 1) if manifest is not None else 1
  files = _generation_files(generation)
  fileio.atomic_write(os.path.join(out, files['descriptors']), _npy_writer(table.descriptors),
                      binary=True)
  fileio.atomic_write(os.path.join(out, files['images']), _npz_bytes_writer(table.arrays()),
                      binary=True)
  _write_faiss(os.path.join(out, files['faiss']), index)
  if trained:
    _write_faiss(os.path.join(out, files['trained']), template)
  new_manifest = {
      'format_version': INDEX_FORMAT_VERSION,
      'generation': generation,
      'checkpoint': os.path.abspath(checkpoint),
      'step': None if step is None else int(step),
      'fingerprint': fingerprint,
      'decode': settings,
      'dtype': dtype,
      'descriptor_dim': dim,
      'images_dir': images_dir,
      'num_images': len(paths),
      'num_with_coordinates': int(np.isfinite(table.latlon).all(axis=1).sum()),
      'faiss_factory': factory,
      'faiss_requested': faiss_factory,
      'trained': trained,
      'nprobe': int(nprobe),
      'batch_size': batch_size,
      'files': {k: v for k, v in files.items() if k != 'trained' or trained},
  }
  fileio.atomic_write(os.path.join(out, MANIFEST_FILENAME),
                      json.dumps(new_manifest, indent=2) + '\n')
  # Committed: what the manifest does not name is left over from earlier builds.
  keep = set(new_manifest['files'].values()) | {MANIFEST_FILENAME}
  for name in os.listdir(out):
    path = os.path.join(out, name)
    if name not in keep and os.path.isfile(path) and name.endswith(('.npy', '.npz', '.index')):
      os.remove(path)
  for path in glob.glob(os.path.join(pending_dir, 'part-*.npz')):
    os.remove(path)
  if os.path.isdir(pending_dir) and not os.listdir(pending_dir):
    os.rmdir(pending_dir)

  stats = BuildStats(num_images=len(paths), embedded=len(todo), reused=reused, resumed=resumed,
                     removed=removed, faiss_factory=factory, seconds=time.perf_counter() - start)
  print_fn(f'Indexed {len(paths)} images of {images_dir} into {out}: {stats.embedded} embedded, '
           f'{stats.reused} kept, {stats.resumed} resumed from an interrupted run, '
           f'{stats.removed} removed; {new_manifest["num_with_coordinates"]} with coordinates; '
           f'FAISS {factory}; {stats.seconds:.1f} s.')
  return stats


# ------------------------------------------------------------------------------------------------
# Localisation.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Match:
  """One database image found for a photo.

  Attributes:
    rank: 1 for the nearest.
    image: path relative to the indexed folder.
    file: absolute path of that image.
    distance: L2 distance between the normalised descriptors (0 = identical, 2 = opposite).
    lat, lon: degrees, or None when unknown.
    utm_east, utm_north, utm_zone: UTM position (metres, zone+band) when the name gave one.
    coordinate_source: 'csv', 'name', 'exif' or ''.
  """
  rank: int
  image: str
  file: str
  distance: float
  lat: float | None
  lon: float | None
  utm_east: float | None = None
  utm_north: float | None = None
  utm_zone: str | None = None
  coordinate_source: str = ''

  def to_dict(self) -> dict[str, Any]:
    return {'image': self.image, 'distance': self.distance, 'lat': self.lat, 'lon': self.lon,
            'rank': self.rank, 'file': self.file, 'utm_east': self.utm_east,
            'utm_north': self.utm_north, 'utm_zone': self.utm_zone,
            'coordinate_source': self.coordinate_source}


@dataclasses.dataclass
class Localization:
  """The matches of one photo, nearest first; `image` is the path as given (or '<array i>')."""
  image: str
  matches: list[Match]

  def to_dict(self) -> dict[str, Any]:
    return {'image': self.image, 'matches': [m.to_dict() for m in self.matches]}


def _finite_or_none(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


class Localizer:
  """Finds where photos were taken, against an index written by `build_index`."""

  def __init__(self, index_dir: str, manifest: Mapping[str, Any], rows: Mapping[str, np.ndarray],
               faiss_index: faiss.Index, config, variables, model):
    """Use `Localizer.from_index`."""
    self.index_dir = index_dir
    self.manifest = dict(manifest)
    self.paths = [str(p) for p in rows['paths']]
    self.latlon = np.asarray(rows['latlon'], np.float64)
    self.utm = np.asarray(rows['utm'], np.float64)
    self.utm_zones = [str(z) for z in rows['utm_zones']]
    self.sources = [str(s) for s in rows['coordinate_sources']]
    self.faiss_index = faiss_index
    self.config = config
    self.variables = variables
    self.model = model

  @classmethod
  def from_index(cls, index_dir: str, checkpoint: str | None = None) -> 'Localizer':
    """Opens an index and the checkpoint it was built with.

    Args:
      index_dir: folder written by `build_index`.
      checkpoint: the checkpoint to embed photos with; default the one the index was built with.
        Either way its fingerprint must be the index's.

    Returns:
      A Localizer.

    Raises:
      IndexNotFoundError: no index at `index_dir`.
      IndexMismatchError: the checkpoint differs from the index's (model, weights, input size or
        preprocessing).
    """
    index_dir = os.path.abspath(os.fspath(index_dir))
    manifest = read_manifest(index_dir) if os.path.isdir(index_dir) else None
    if manifest is None:
      raise IndexNotFoundError(
          f'no localisation index at {index_dir!r} (expected a folder with {MANIFEST_FILENAME} '
          'written by python -m vpr_jax.index).')
    checkpoint = checkpoint or manifest['checkpoint']
    config, variables, _, model = _load_model(checkpoint)
    differing = fingerprint_differences(manifest['fingerprint'],
                                        checkpoint_fingerprint(config, variables))
    if differing:
      raise IndexMismatchError(
          f'index {index_dir!r} was built with another model or preprocessing than checkpoint '
          f'{os.path.abspath(checkpoint)!r} ({", ".join(differing)} differ); rebuild the index '
          'with this checkpoint.')
    files = manifest['files']
    with np.load(os.path.join(index_dir, files['images'])) as data:
      rows = {k: data[k] for k in data.files}
    faiss_index = _read_faiss(os.path.join(index_dir, files['faiss']))
    set_nprobe(faiss_index, manifest.get('nprobe', DEFAULT_NPROBE))
    return cls(index_dir, manifest, rows, faiss_index, config, variables, model)

  @property
  def images_dir(self) -> str:
    """The folder the index was built from."""
    return self.manifest['images_dir']

  def embed(self, photos: Sequence[str | np.ndarray], exif_transpose: bool | None = None,
            fast_decode: bool | None = None, batch_size: int | None = None) -> np.ndarray:
    """L2-normalised float32 descriptors [len(photos), D] of image files or uint8 arrays.

    Args:
      photos: file paths, or uint8 [H, W, 3] RGB arrays (already upright).
      exif_transpose: default the index's setting.
      fast_decode: default the index's setting.
      batch_size: default the index's, at most len(photos).
    """
    settings = dict(self.manifest['decode'])
    if exif_transpose is not None:
      settings['exif_transpose'] = bool(exif_transpose)
    if fast_decode is not None:
      settings['fast_decode'] = bool(fast_decode)
    batch_size = int(batch_size or min(self.manifest.get('batch_size') or 8, len(photos)))
    entries = [p if isinstance(p, np.ndarray) else os.path.abspath(os.fspath(p)) for p in photos]
    descriptors = descriptors_lib.compute_descriptors(
        self.model, self.variables, '', entries, tuple(int(s) for s in self.config.image_size),
        batch_size, 0, decode_options=images.DecodeOptions(**settings))
    return _normalised(descriptors)

  def search(self, descriptors: np.ndarray, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(L2 distances [M, k], row indices [M, k]) of the nearest database rows; -1 when missing."""
    k = max(1, min(int(top_k), self.faiss_index.ntotal))
    squared, rows = self.faiss_index.search(np.ascontiguousarray(descriptors, np.float32), k)
    return np.sqrt(np.maximum(squared, 0.0)), rows

  def localize(self, photos: Sequence[str | np.ndarray] | str | np.ndarray, top_k: int = 5,
               exif_transpose: bool | None = None, fast_decode: bool | None = None
               ) -> list[Localization]:
    """The top-k database images of each photo, with their coordinates.

    Args:
      photos: a path, an array, or a sequence of them (see `embed`).
      top_k: matches per photo (at most the database size).
      exif_transpose: default the index's setting (True for `build_index`'s default).
      fast_decode: default the index's setting.

    Returns:
      One `Localization` per photo, in order.

    Raises:
      images.ImageDecodeError: a photo cannot be read (names the file).
    """
    if isinstance(photos, (str, os.PathLike, np.ndarray)):
      photos = [photos]
    photos = list(photos)
    if not photos:
      return []
    if top_k < 1:
      raise ValueError(f'top_k must be positive, got {top_k}.')
    descriptors = self.embed(photos, exif_transpose, fast_decode)
    distances, rows = self.search(descriptors, top_k)
    results = []
    for q, photo in enumerate(photos):
      name = f'<array {q}>' if isinstance(photo, np.ndarray) else os.fspath(photo)
      matches = []
      for rank, (distance, row) in enumerate(zip(distances[q], rows[q]), start=1):
        if row < 0:
          continue
        zone = self.utm_zones[row]
        matches.append(Match(
            rank=rank, image=self.paths[row],
            file=os.path.join(self.images_dir, self.paths[row]), distance=float(distance),
            lat=_finite_or_none(self.latlon[row, 0]), lon=_finite_or_none(self.latlon[row, 1]),
            utm_east=_finite_or_none(self.utm[row, 0]),
            utm_north=_finite_or_none(self.utm[row, 1]), utm_zone=zone or None,
            coordinate_source=self.sources[row]))
      results.append(Localization(name, matches))
    return results


def results_json(results: Sequence[Localization]) -> str:
  """`{"queries": [{"image": ..., "matches": [{"image", "distance", "lat", "lon", ...}]}]}`."""
  return json.dumps({'queries': [r.to_dict() for r in results]}, indent=2) + '\n'


def format_result(result: Localization) -> str:
  """Printable lines for one photo: its path, then one line per match."""
  lines = [result.image]
  for m in result.matches:
    where = (f'lat {m.lat:.6f} lon {m.lon:.6f}' if m.lat is not None and m.lon is not None
             else 'no coordinates')
    if m.utm_east is not None:
      where += f' (UTM {m.utm_east:.1f} E {m.utm_north:.1f} N {m.utm_zone or ""})'.replace(' )',
                                                                                         ')')
    lines.append(f'  {m.rank}. {m.image}  distance {m.distance:.4f}  {where}')
  return '\n'.join(lines)


def write_sheet(result: Localization, photo: str | np.ndarray, out_dir: str, number: int,
                exif_transpose: bool = True,
                tile_size: tuple[int, int] = visualize.DEFAULT_TILE_SIZE) -> str:
  """Writes a PNG of the photo beside its matches, with their coordinates and distances.

  Args:
    result: the photo's `Localization`.
    photo: the photo (file or uint8 array).
    out_dir: folder of the sheets (created).
    number: position of the photo in its batch, the prefix of the file name.
    exif_transpose: show the photo upright by its EXIF orientation.
    tile_size: (height, width) of each image.

  Returns:
    The path of the PNG.
  """
  captions = ['query']
  for m in result.matches:
    where = (f'{m.lat:.5f}, {m.lon:.5f}' if m.lat is not None and m.lon is not None
             else 'no coordinates')
    captions.append(f'#{m.rank}  distance {m.distance:.3f}\n{where}')
  source = Image.fromarray(photo) if isinstance(photo, np.ndarray) else os.fspath(photo)
  sheet = visualize.render_tiles(
      [source] + [m.file for m in result.matches], captions,
      [visualize.QUERY_COLOR] + [visualize.MATCH_COLOR] * len(result.matches),
      result.image, tile_size,
      exif_transpose=[exif_transpose] * (1 + len(result.matches)))
  stem = os.path.splitext(os.path.basename(result.image))[0]
  stem = re.sub(r'[^A-Za-z0-9_.-]+', '_', stem).strip('_')[:80] or 'photo'
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'{number:04d}_{stem}.png')
  with fileio.atomic_open(path, binary=True) as f:
    sheet.save(f, format='PNG')
  return path
