"""Prepared training data: resized, re-encoded JPEGs in ArrayRecord shards, with a place index.

Decoding a 640x480 GSV JPEG and resizing it costs ~10x more CPU than decoding a 224x224 JPEG, and
the train step of the seed recipe consumes images far faster than a 16-core host decodes the
originals. `python -m vpr_jax.prepare` therefore does the decode + resize once and stores the
result; training then reads it through `PreparedSource` (set `config.data.prepared_dir`).

A prepared folder DIR holds:

  DIR/prepared.json      what was prepared from what: format version, source folder, layout,
                         cities, min_img_per_place, image size or short side, JPEG quality and
                         chroma subsampling, shard files and their record counts, images that
                         could not be read, timing.
  DIR/index.npz          the PlaceIndex arrays (`gsv_cities.PlaceIndex`: image paths relative to
                         the source, dates, latitudes, place offsets, labels, cities) without
                         pickles. Record i of the shards is flat image i of this index, so the
                         images of place p are records place_offsets[p]:place_offsets[p + 1].
  DIR/images-00000-of-0000N.array_record
                         one encoded JPEG per record (written with group_size:1, as random
                         access from grain needs). A source image that could not be decoded is
                         stored as an empty record: reading it raises `ImageDecodeError` naming
                         the source file, so the train pipeline's bad-image handling applies.

Sizes. `image_size=(H, W)` stores exactly what the train transform's first step
(`torchvision.transforms.Resize((H, W))` on PIL, `images.resize`) gives, so the train pipeline's
own resize becomes a no-op and the only difference from reading the originals is the JPEG
re-encoding (quality 95 by default). `short_side=S` keeps the aspect ratio (torchvision's
`Resize(S)` rule), for runs that still resize or crop later.

Writing is atomic and resumable: everything goes to `DIR.partial/` (each shard is written under a
temporary name and renamed once closed) and the folder is renamed to DIR at the end. Running the
same command again after an interruption keeps the finished shards; other parameters refuse to
mix with them.

Why raw ArrayRecord and our own index rather than a tensorflow-datasets builder: the tfds Image
feature encodes (and decodes) through TensorFlow, which vpr_jax does not depend on
(`tfds.features.Image.encode_example` fails with "No module named 'tensorflow'"); a plain bytes
feature would work without TensorFlow, but then every record is a tf.train.Example proto to
parse, and the place table (offsets, labels, dates, cities) has no home in tfds's split model.
Raw records are the JPEG bytes themselves, read directly by grain's `ArrayRecordDataSource`.

Nothing here imports JAX: these functions run in data workers.
"""

from __future__ import annotations

from concurrent import futures
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import time
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image

from vpr_jax import errors
from vpr_jax.data import decode
from vpr_jax.data import images
from vpr_jax.errors import PreparedDataError
from vpr_jax.data.gsv_cities import PlaceIndex

FORMAT_VERSION = 1
INFO_FILE = 'prepared.json'
INDEX_FILE = 'index.npz'
PLAN_FILE = 'plan.json'
PARTIAL_SUFFIX = '.partial'
DEFAULT_QUALITY = 95
DEFAULT_RECORDS_PER_SHARD = 50_000
SUBSAMPLING = {'4:4:4': 0, '4:2:2': 1, '4:2:0': 2}
_ARRAY_FIELDS = ('image_paths', 'image_dates', 'image_lats', 'place_offsets', 'place_ids',
                 'place_cities')
# Images handed to a worker at a time: large enough to amortise the inter-process traffic.
_CHUNK_SIZE = 64


def shard_name(shard: int, num_shards: int) -> str:
  """File name of shard number `shard`."""
  return f'images-{shard:05d}-of-{num_shards:05d}.array_record'


def resized_size(width: int, height: int, image_size: Sequence[int] | None,
                 short_side: int | None) -> tuple[int, int]:
  """(width, height) an image of (width, height) is stored at.

  Args:
    width: source width.
    height: source height.
    image_size: (H, W) to resize to exactly, or None.
    short_side: length of the shorter side (aspect ratio kept, torchvision's `Resize(int)`
      rule: the long side is int(short_side * long / short)), or None.

  Returns:
    The stored (width, height).
  """
  if image_size is not None:
    return int(image_size[1]), int(image_size[0])
  if short_side is None:
    return width, height
  if width <= height:
    return int(short_side), int(short_side * height / width)
  return int(short_side * width / height), int(short_side)


def encode_jpeg(img: Image.Image, quality: int, subsampling: str) -> bytes:
  """JPEG bytes of an RGB PIL image (baseline, no metadata)."""
  buffer = io.BytesIO()
  img.save(buffer, format='JPEG', quality=int(quality), subsampling=SUBSAMPLING[subsampling])
  return buffer.getvalue()


def decode_pixels(data: bytes, name: str, min_size: Sequence[int] | None = None,
                  decoder: str = 'turbo', out: np.ndarray | None = None) -> np.ndarray:
  """Decodes a record completely into 8-bit RGB pixels (`decode.decode_rgb`).

  Args:
    data: the encoded image (an empty record marks a source image that could not be read).
    name: what to call the image in errors (the source file).
    min_size: optional (H, W) for a DCT-scaled decode (`decode.decode_rgb`).
    decoder: 'turbo' or 'pil' (`decode.DECODERS`).
    out: optional array to decode into (`decode.decode_rgb`).

  Returns:
    uint8 [H, W, 3].

  Raises:
    errors.ImageDecodeError: empty or undecodable bytes.
  """
  if not data:
    raise errors.ImageDecodeError(
        name, 'the source image could not be decoded when the data was prepared (empty record)')
  return decode.decode_rgb(data, name, min_size, decoder, out)


def decode_image(data: bytes, name: str) -> Image.Image:
  """`decode_pixels` as an RGB PIL image."""
  return Image.fromarray(decode_pixels(data, name))


@dataclasses.dataclass(frozen=True)
class _EncodeJob:
  """What a worker needs to turn one source image into stored bytes (picklable)."""
  image_size: tuple[int, int] | None
  short_side: int | None
  quality: int
  subsampling: str

  def __call__(self, path: str) -> tuple[bytes, str]:
    """Returns (JPEG bytes, '') or (b'', reason the source could not be read)."""
    try:
      img = images.load_rgb(path)
    except errors.ImageDecodeError as e:
      return b'', e.reason
    width, height = resized_size(img.width, img.height, self.image_size, self.short_side)
    if (width, height) != img.size:
      # PIL's antialiased bilinear, exactly what torchvision's Resize does on PIL images.
      img = images.resize(img, (height, width))
    return encode_jpeg(img, self.quality, self.subsampling), ''


def _params(index: PlaceIndex, image_size, short_side, quality, subsampling,
            records_per_shard) -> dict[str, Any]:
  return {
      'format_version': FORMAT_VERSION,
      'source_fingerprint': index.fingerprint,
      'num_images': index.num_images,
      'image_size': list(image_size) if image_size is not None else None,
      'short_side': short_side,
      'quality': int(quality),
      'subsampling': subsampling,
      'records_per_shard': int(records_per_shard),
  }


def _fingerprint(params: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(params, sort_keys=True).encode('utf-8')).hexdigest()


def _write_json_atomic(path: str, value: Any):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    raise PreparedDataError(f'{what} {path!r} does not exist.') from None
  except (OSError, ValueError) as e:
    raise PreparedDataError(f'{what} {path!r} cannot be read: {e}') from None


def _check_prepare_args(image_size, short_side, quality, subsampling, records_per_shard):
  if (image_size is None) == (short_side is None):
    raise ValueError('give exactly one of image_size (H, W) and short_side; got '
                     f'image_size={image_size!r}, short_side={short_side!r}.')
  if image_size is not None:
    if len(image_size) != 2 or any(int(s) != s or s <= 0 for s in image_size):
      raise ValueError(f'image_size must be (height, width) of positive integers, got '
                       f'{image_size!r}.')
  if short_side is not None and (int(short_side) != short_side or short_side <= 0):
    raise ValueError(f'short_side must be a positive integer, got {short_side!r}.')
  if not 1 <= int(quality) <= 100:
    raise ValueError(f'quality must be in [1, 100], got {quality!r}.')
  if subsampling not in SUBSAMPLING:
    raise ValueError(f'subsampling must be one of {sorted(SUBSAMPLING)}, got {subsampling!r}.')
  if int(records_per_shard) <= 0:
    raise ValueError(f'records_per_shard must be positive, got {records_per_shard!r}.')


def _start_partial(partial: str, params: dict[str, Any], overwrite: bool) -> None:
  """Creates DIR.partial, or checks that an existing one was started with the same parameters."""
  plan_path = os.path.join(partial, PLAN_FILE)
  if os.path.isdir(partial):
    plan = None
    if os.path.exists(plan_path):
      try:
        plan = _read_json(plan_path, 'Preparation plan')
      except PreparedDataError:
        plan = None
    if plan == params:
      logging.info('Resuming the preparation in %s.', partial)
      return
    if not overwrite:
      raise PreparedDataError(
          f'{partial!r} holds an unfinished preparation with other parameters '
          f'({plan_path} says {plan}, this run asks for {params}); remove it or pass '
          'overwrite=True (--overwrite).')
    shutil.rmtree(partial)
  os.makedirs(partial)
  _write_json_atomic(plan_path, params)


def _shard_done(partial: str, shard: int, num_shards: int, expected: int) -> dict | None:
  """The stats of a finished shard, or None if it must be (re)written."""
  stats_path = os.path.join(partial, shard_name(shard, num_shards) + '.json')
  if not (os.path.exists(stats_path) and
          os.path.exists(os.path.join(partial, shard_name(shard, num_shards)))):
    return None
  try:
    stats = _read_json(stats_path, 'Shard summary')
  except PreparedDataError:
    return None
  return stats if stats.get('num_records') == expected else None


def prepare_training_data(index: PlaceIndex, out_dir: str, *,
                          image_size: Sequence[int] | None = None,
                          short_side: int | None = None, quality: int = DEFAULT_QUALITY,
                          subsampling: str = '4:2:0', num_workers: int = 0,
                          records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
                          overwrite: bool = False,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Writes the images of `index` resized and re-encoded into ArrayRecord shards under out_dir.

  Args:
    index: the training places (`gsv_cities.build_place_index`).
    out_dir: the prepared folder to create (layout in the module doc).
    image_size: (H, W) to resize every image to (the training size); or
    short_side: shorter side in pixels, aspect ratio kept.
    quality: JPEG quality, 1..100.
    subsampling: JPEG chroma subsampling, '4:2:0' (PIL's default), '4:2:2' or '4:4:4'.
    num_workers: processes decoding and encoding; 0 works in this process.
    records_per_shard: images per ArrayRecord file.
    overwrite: replace an existing non-empty out_dir (and a partial preparation made with other
      parameters).
    progress: called with a one-line progress report now and then (default: logging.info).

  Returns:
    The contents of prepared.json (counts, bad images, images per second...).

  Raises:
    PreparedDataError: out_dir exists and is not empty (without overwrite), or a partial
      preparation with other parameters is in the way.
  """
  _check_prepare_args(image_size, short_side, quality, subsampling, records_per_shard)
  image_size = tuple(int(s) for s in image_size) if image_size is not None else None
  short_side = int(short_side) if short_side is not None else None
  progress = progress or (lambda line: logging.info('%s', line))
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise PreparedDataError(f'{out_dir!r} exists and is not a folder.')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise PreparedDataError(f'{out_dir!r} exists and is not empty; choose another folder or pass '
                            'overwrite=True (--overwrite).')
  params = _params(index, image_size, short_side, quality, subsampling, records_per_shard)
  partial = out_dir + PARTIAL_SUFFIX
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  _start_partial(partial, params, overwrite)

  # Imported here: the writer is only needed when preparing.
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  num_images = index.num_images
  num_shards = max(1, math.ceil(num_images / records_per_shard))
  job = _EncodeJob(image_size, short_side, int(quality), subsampling)
  paths = [index.image_path(i) for i in range(num_images)]
  shard_stats = []
  start = time.perf_counter()
  done_images, written_images = 0, 0
  pool = None
  if num_workers > 0:
    # 'spawn': the caller may hold threads or an accelerator runtime that must not be forked.
    # An executor (unlike multiprocessing.Pool) fails instead of hanging when a worker dies.
    pool = futures.ProcessPoolExecutor(num_workers,
                                       mp_context=multiprocessing.get_context('spawn'))
  try:
    for shard in range(num_shards):
      lo, hi = shard * records_per_shard, min(num_images, (shard + 1) * records_per_shard)
      name = shard_name(shard, num_shards)
      stats = _shard_done(partial, shard, num_shards, hi - lo)
      if stats is not None:
        shard_stats.append(stats)
        done_images += hi - lo
        continue
      tmp_path = os.path.join(partial, name + '.inprogress')
      writer = array_record_module.ArrayRecordWriter(tmp_path, 'group_size:1')
      bad, num_bytes = [], 0
      results = (pool.map(job, paths[lo:hi], chunksize=_CHUNK_SIZE) if pool is not None
                 else map(job, paths[lo:hi]))
      last_report = time.perf_counter()
      for offset, (data, reason) in enumerate(results):
        writer.write(data)
        num_bytes += len(data)
        if reason:
          record = lo + offset
          bad.append({'record': record, 'path': index.image_paths[record].decode('utf-8'),
                      'reason': reason})
          logging.warning('Cannot decode %s (%s); stored as an empty record.',
                          paths[record], reason)
        done_images += 1
        written_images += 1
        now = time.perf_counter()
        if now - last_report > 30:
          last_report = now
          progress(f'{done_images}/{num_images} images, '
                   f'{written_images / (now - start):.0f} images/s')
      writer.close()
      os.replace(tmp_path, os.path.join(partial, name))
      stats = {'file': name, 'num_records': hi - lo, 'num_bytes': num_bytes, 'bad': bad}
      _write_json_atomic(os.path.join(partial, name + '.json'), stats)
      shard_stats.append(stats)
      progress(f'shard {shard + 1}/{num_shards} written ({done_images}/{num_images} images)')
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  seconds = time.perf_counter() - start

  _save_index(os.path.join(partial, INDEX_FILE), index)
  bad = [b for s in shard_stats for b in s['bad']]
  total_bytes = sum(s['num_bytes'] for s in shard_stats)
  info = dict(params)
  info.update({
      'source_root': index.root,
      'layout': index.layout,
      'cities': list(index.cities),
      'min_img_per_place': index.min_img_per_place,
      'num_places': index.num_places,
      'shards': [{'file': s['file'], 'num_records': s['num_records']} for s in shard_stats],
      'num_bad_images': len(bad),
      'bad_images': bad,
      'total_bytes': total_bytes,
      'mean_bytes_per_image': total_bytes / max(1, num_images - len(bad)),
      'num_workers': int(num_workers),
      'seconds_this_run': seconds,
      'images_per_second_this_run': written_images / seconds if seconds > 0 else None,
      'fingerprint': _fingerprint(params),
  })
  _write_json_atomic(os.path.join(partial, INFO_FILE), info)
  for stats in shard_stats:
    os.remove(os.path.join(partial, stats['file'] + '.json'))
  os.remove(os.path.join(partial, PLAN_FILE))

  # The prepared folder appears complete or not at all.
  old = None
  if os.path.isdir(out_dir):
    old = f'{out_dir}.old{os.getpid()}'
    os.replace(out_dir, old)
  os.replace(partial, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  rate = info['images_per_second_this_run']
  progress(f'Prepared {num_images} images ({len(bad)} unreadable) of {index.num_places} places '
           f'into {out_dir}: {total_bytes / 2**20:.1f} MiB'
           + (f', {rate:.0f} images/s' if written_images and rate else ''))
  return info


def _save_index(path: str, index: PlaceIndex):
  meta = {'layout': index.layout, 'cities': list(index.cities), 'root': index.root,
          'min_img_per_place': index.min_img_per_place,
          'num_dropped_places': index.num_dropped_places,
          'num_dropped_images': index.num_dropped_images, 'fingerprint': index.fingerprint}
  with open(path, 'wb') as f:
    np.savez(f, meta=np.array(json.dumps(meta)),
             **{name: getattr(index, name) for name in _ARRAY_FIELDS})


def read_info(directory: str) -> dict[str, Any]:
  """The prepared.json of a prepared folder, checked for format and completeness.

  Raises:
    PreparedDataError: not a (complete) prepared folder, another format version, or shard
      files missing.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    partial = directory.rstrip('/') + PARTIAL_SUFFIX
    hint = (f' ({partial!r} holds an unfinished preparation: run the same prepare command '
            'again to finish it)' if os.path.isdir(partial) else '')
    raise PreparedDataError(f'Prepared data folder {directory!r} does not exist{hint}.')
  info = _read_json(os.path.join(directory, INFO_FILE), 'Prepared data description')
  if info.get('format_version') != FORMAT_VERSION:
    raise PreparedDataError(
        f'{os.path.join(directory, INFO_FILE)} has format_version '
        f'{info.get("format_version")!r}; this vpr_jax reads version {FORMAT_VERSION}. '
        'Prepare the data again.')
  missing = [s['file'] for s in info.get('shards', [])
             if not os.path.isfile(os.path.join(directory, s['file']))]
  if missing or not info.get('shards'):
    raise PreparedDataError(f'Prepared data folder {directory!r} lacks shard files: '
                            f'{missing or "none listed"}.')
  return info


def load_prepared_index(directory: str) -> PlaceIndex:
  """The PlaceIndex of a prepared folder (record i = flat image i).

  `root` is the source folder the data was prepared from (named in error messages); its
  fingerprint combines the source index and the preparation parameters.

  Raises:
    PreparedDataError: the folder is incomplete or its index does not match its shards.
  """
  info = read_info(directory)
  path = os.path.join(directory, INDEX_FILE)
  try:
    with np.load(path, allow_pickle=False) as data:
      meta = json.loads(str(data['meta']))
      arrays = {name: data[name] for name in _ARRAY_FIELDS}
  except (OSError, KeyError, ValueError) as e:
    raise PreparedDataError(f'Prepared place index {path!r} cannot be read: {e}') from None
  num_records = sum(int(s['num_records']) for s in info['shards'])
  if arrays['image_paths'].shape[0] != num_records:
    raise PreparedDataError(f'{path} lists {arrays["image_paths"].shape[0]} images but the shards '
                            f'of {directory!r} hold {num_records} records.')
  return PlaceIndex(root=meta['root'], layout=meta['layout'], cities=tuple(meta['cities']),
                    min_img_per_place=int(meta['min_img_per_place']),
                    num_dropped_places=int(meta['num_dropped_places']),
                    num_dropped_images=int(meta['num_dropped_images']),
                    fingerprint=f'prepared-{info["fingerprint"]}', **arrays)


class PreparedSource:
  """Random access to the stored JPEGs of a prepared folder: record i -> bytes.

  Picklable (grain workers receive a copy and open the files lazily). Record i is flat image i
  of `load_prepared_index(directory)`.
  """

  def __init__(self, directory: str):
    self._directory = os.path.abspath(os.fspath(directory))
    info = read_info(self._directory)
    self._counts = [int(s['num_records']) for s in info['shards']]
    # "file[start:end]" saves opening every shard just to count its records.
    self._instructions = [f'{os.path.join(self._directory, s["file"])}[0:{n}]'
                          for s, n in zip(info['shards'], self._counts)]
    self._num_records = sum(self._counts)
    with np.load(os.path.join(self._directory, INDEX_FILE), allow_pickle=False) as data:
      self._place_offsets = np.asarray(data['place_offsets'], np.int64)
    # The paths (tens of MB for GSV-Cities) are only needed for messages: loaded on first use,
    # never pickled into workers.
    self._image_paths = None
    self.image_size = tuple(info['image_size']) if info.get('image_size') else None
    self.short_side = info.get('short_side')
    self._source_root = info.get('source_root', '')
    self._reader = None

  @property
  def directory(self) -> str:
    return self._directory

  def _data_source(self):
    if self._reader is None:
      from grain.sources import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
      self._reader = ArrayRecordDataSource(self._instructions)
    return self._reader

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_reader'] = None
    state['_image_paths'] = None
    return state

  def __len__(self) -> int:
    return self._num_records

  def _check(self, record: int) -> int:
    record = int(record)
    if not 0 <= record < self._num_records:
      raise IndexError(f'record {record} out of range [0, {self._num_records}) in '
                       f'{self._directory}')
    return record

  def __getitem__(self, record: int) -> bytes:
    return self._data_source()[self._check(record)]

  def __getitems__(self, records: Sequence[int]) -> list[bytes]:
    return list(self._data_source().__getitems__([self._check(r) for r in records]))

  def source_path(self, record: int) -> str:
    """The source image a record was prepared from (absolute; for messages)."""
    record = self._check(record)
    if self._image_paths is None:
      with np.load(os.path.join(self._directory, INDEX_FILE), allow_pickle=False) as data:
        self._image_paths = data['image_paths']
    relative = self._image_paths[record].decode('utf-8')
    return os.path.join(self._source_root, relative)

  def place_records(self, place: int) -> np.ndarray:
    """Record numbers of place `place` (its position in the index, not its label)."""
    return np.arange(self._place_offsets[place], self._place_offsets[place + 1])

  def read_place(self, place: int, which: Sequence[int] | None = None) -> list[bytes]:
    """Encoded images of a place.

    Args:
      place: position of the place in the index.
      which: positions within the place (e.g. the K sampled ones); None reads all.

    Returns:
      The JPEG bytes, in the order asked.
    """
    records = self.place_records(place)
    if which is not None:
      records = records[np.asarray(which, np.int64)]
    return self.__getitems__(records.tolist())

  def record_name(self, record: int) -> str:
    """How errors name a record: its source file, the record number and the folder."""
    return f'{self.source_path(record)} (prepared record {record} in {self._directory})'

  def load_pixels(self, record: int, min_size: Sequence[int] | None = None,
                  decoder: str = 'turbo', out: np.ndarray | None = None) -> np.ndarray:
    """Decoded record as uint8 [H, W, 3] (`decode_pixels`; `out` as in `decode.decode_rgb`).

    Raises:
      errors.ImageDecodeError: naming the source file, when the record is empty or corrupt.
    """
    try:
      return decode_pixels(self[record], '', min_size, decoder, out)
    except errors.ImageDecodeError as e:
      # The name needs the paths (tens of MB), loaded only when something fails.
      raise errors.ImageDecodeError(self.record_name(record), e.reason) from None

  def load_rgb(self, record: int) -> Image.Image:
    """Decoded record as an RGB PIL image (a drop-in for `images.load_rgb(path)`).

    Raises:
      errors.ImageDecodeError: naming the source file, when the record is empty or corrupt.
    """
    return Image.fromarray(self.load_pixels(record))

  def load_array(self, record: int) -> np.ndarray:
    """Decoded record as uint8 [H, W, 3]."""
    return self.load_pixels(record)


def _same_cities(a: Sequence[str], b: Sequence[str]) -> bool:
  return [c.lower() for c in a] == [c.lower() for c in b]


def open_prepared(directory: str, config=None) -> tuple[PlaceIndex, PreparedSource]:
  """The place index and the record source of a prepared folder, checked against a config.

  Args:
    directory: the prepared folder.
    config: the run's ConfigDict; when given, its data.train_layout, data.cities (order
      included: it sets the labels) and data.min_img_per_place must be those the data was
      prepared with, and a stored size other than config.image_size gives a warning (the train
      transform then resizes again).

  Returns:
    (PlaceIndex, PreparedSource).

  Raises:
    PreparedDataError: the folder is incomplete or was prepared for another configuration.
  """
  index = load_prepared_index(directory)
  source = PreparedSource(directory)
  if config is not None:
    data = config.data
    mismatches = []
    if data.train_layout != index.layout:
      mismatches.append(f'data.train_layout is {data.train_layout!r}, prepared {index.layout!r}')
    if not _same_cities(tuple(data.cities), index.cities):
      mismatches.append(f'data.cities is {list(data.cities)}, prepared {list(index.cities)}')
    if int(data.min_img_per_place) != index.min_img_per_place:
      mismatches.append(f'data.min_img_per_place is {data.min_img_per_place}, prepared '
                        f'{index.min_img_per_place}')
    if mismatches:
      raise PreparedDataError(f'Prepared data {directory!r} does not match the config: '
                              + '; '.join(mismatches) + '. Prepare it again for this config.')
    if source.image_size is None or tuple(source.image_size) != tuple(config.image_size):
      logging.warning('Prepared data %s stores images at %s, the config trains at %s: every '
                      'image is resized again when read.', directory,
                      source.image_size or f'short side {source.short_side}',
                      tuple(config.image_size))
  return index, source
