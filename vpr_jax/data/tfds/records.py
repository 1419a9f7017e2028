"""What every prepared dataset shares: image encoding, stored tables, building and record sources.

Two `tfds.core.GeneratorBasedBuilder`s (`training_set.VprTrainingSet`,
`benchmark_set.VprBenchmark`) write ArrayRecord datasets (`file_format='array_record'`,
`disable_shuffling=True`: record i is the i-th example generated). This module holds what they
share: how an image is stored (`ImageEncoding`: resized and re-encoded to JPEG, or the file as it
is), the numpy table saved next to the records (`NpzMetadata`, `read_npz`), the build call
(`build_dataset`) and random access to the stored bytes of one split (`SplitSource`).

None of the data can be downloaded automatically: the builders read the folder given as the
manual directory (`MANUAL_DOWNLOAD_INSTRUCTIONS`). They are registered TFDS builders with named
configs, as `tfds build` expects:

  tfds build vpr_training_set --imports=vpr_jax.data.tfds.training_set --config=gsv_cities_224 \
      --manual_dir=/data/gsv_cities --data_dir=/data/tfds

but the `tfds` command of tensorflow-datasets 4.9.10 itself imports TensorFlow (it fails with "No
module named 'tensorflow'" before building). Without TensorFlow, build with `python -m
vpr_jax.prepare` (`training_set.build_training_set`, or `benchmark_set.build_benchmark` with
--benchmark; any settings), or by name: `tfds.builder('vpr_training_set/gsv_cities_224',
data_dir=..., file_format='array_record').download_and_prepare(
download_config=tfds.download.DownloadConfig(manual_dir=...))`.

A built dataset is the folder holding `dataset_info.json`
(`<data_dir>/vpr_training_set/<config>/<version>`); `tfds.builder_from_directory(folder)` opens
it. The stored JPEG bytes are decoded by the project's decoder (whole examples are read with
`tfds.decode.SkipDecoding()` for the image; image reads take the bytes straight from the
serialized example, which TFDS's generic decoding of every feature would make ~10x slower).

Images that cannot be decoded while building are stored as empty bytes: reading one raises
`errors.ImageDecodeError` naming the source file, so the train pipeline's bad-image handling
applies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
# The Example proto TFDS itself parses records with when TensorFlow is absent.
from tensorflow_datasets.proto import tf_example_pb2

from vpr_jax import errors
from vpr_jax import safe_numpy
from vpr_jax.data.imaging import decode
from vpr_jax.data.imaging import images
from vpr_jax.errors import BuiltDatasetError

VERSION = tfds.core.Version('1.0.0')


# tf.train.Example stores floats in 32 bits: coordinates are kept exact as raw float64 bytes.
FLOAT64 = tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES)


# The largest side of a prepared image. Images are resized whole in every worker, and a command
# asking for 100000 x 100000 pixels (30 GB an image) would be ended by the out-of-memory killer
# without a word; 8192 is above every size the family trains or evaluates at (at most 518).
MAX_IMAGE_SIDE = 8192

# Images handed to a worker at a time when encoding in parallel.
_CHUNK_SIZE = 64


@dataclasses.dataclass(frozen=True)
class ImageEncoding:
  """How images are stored: resized to `image_size` (H, W) or `short_side`, or kept as they are.

  Attributes:
    image_size: (H, W) to resize to exactly (the train transform's first step), or None.
    short_side: shorter side in pixels, aspect ratio kept (torchvision's `Resize(int)`), or None.
    quality: JPEG quality of the re-encoded images.
    subsampling: JPEG chroma subsampling, '4:2:0', '4:2:2' or '4:4:4'.
  """
  image_size: tuple[int, int] | None = None
  short_side: int | None = None
  quality: int = images.DEFAULT_QUALITY
  subsampling: str = '4:2:0'

  def __post_init__(self):
    if self.image_size is not None and self.short_side is not None:
      raise ValueError(f'give image_size or short_side, not both; got image_size='
                       f'{self.image_size!r}, short_side={self.short_side!r}.')
    if self.image_size is not None and (
        len(self.image_size) != 2 or any(int(s) != s or s <= 0 for s in self.image_size)):
      raise ValueError(f'image_size must be (height, width) of positive integers, got '
                       f'{self.image_size!r}.')
    if self.short_side is not None and (int(self.short_side) != self.short_side
                                        or self.short_side <= 0):
      raise ValueError(f'short_side must be a positive integer, got {self.short_side!r}.')
    sides = tuple(self.image_size or ()) + ((self.short_side,) if self.short_side else ())
    if sides and max(sides) > MAX_IMAGE_SIDE:
      raise ValueError(f'image sides must be at most {MAX_IMAGE_SIDE} pixels, got {sides}.')
    if not 1 <= int(self.quality) <= 100:
      raise ValueError(f'quality must be in [1, 100], got {self.quality!r}.')
    if self.subsampling not in images.SUBSAMPLING:
      raise ValueError(f'subsampling must be one of {sorted(images.SUBSAMPLING)}, got '
                       f'{self.subsampling!r}.')
    if self.image_size is not None:
      # A tuple of ints whatever was given, so that describe() and the config name agree.
      object.__setattr__(self, 'image_size', tuple(int(s) for s in self.image_size))

  @property
  def keeps_originals(self) -> bool:
    return self.image_size is None and self.short_side is None

  def __call__(self, path: str) -> tuple[bytes, str]:
    """(stored bytes, '') or (b'', why the source could not be read). Picklable for workers."""
    if self.keeps_originals:
      try:
        with open(path, 'rb') as f:
          return f.read(), ''
      except OSError as e:
        return b'', f'{type(e).__name__}: {e}'
    try:
      img = images.load_rgb(path)
    except errors.ImageDecodeError as e:
      return b'', e.reason
    width, height = images.resized_size(img.width, img.height, self.image_size,
                                        self.short_side)
    if (width, height) != img.size:
      # PIL's antialiased bilinear, exactly what torchvision's Resize does on PIL images.
      img = images.resize(img, (height, width))
    return images.encode_jpeg(img, self.quality, self.subsampling), ''

  def describe(self) -> dict[str, Any]:
    return {'image_size': list(self.image_size) if self.image_size else None,
            'short_side': self.short_side, 'quality': self.quality,
            'subsampling': self.subsampling}


def encoded(encoding: ImageEncoding, paths: Sequence[str],
             num_workers: int) -> Iterator[tuple[bytes, str]]:
  """Encodes `paths` in order, in `num_workers` processes (0: in this one)."""
  if num_workers <= 0:
    yield from map(encoding, paths)
    return
  # 'spawn': the caller may hold threads or an accelerator runtime that must not be forked.
  # Started from `python -m vpr_jax.prepare`, the workers ignore Ctrl-C (`cli.spawned`).
  pool = multiprocessing.get_context('spawn').Pool(num_workers)
  try:
    yield from pool.imap(encoding, paths, chunksize=_CHUNK_SIZE)
    pool.close()
  finally:
    # After the last image: the workers exit. On Ctrl-C or an error: they are stopped at once
    # (finishing the chunks they hold would encode up to num_workers x 64 more images).
    pool.terminate()
    pool.join()


class NpzMetadata(tfds.core.Metadata):
  """Arrays saved next to the records (TFDS writes them into the dataset folder atomically)."""

  def __init__(self, file_name: str):
    self.file_name = file_name
    self.arrays: dict[str, np.ndarray] = {}
    self.meta: dict[str, Any] = {}

  def save_metadata(self, data_dir):
    with open(os.path.join(os.fspath(data_dir), self.file_name), 'wb') as f:
      np.savez(f, meta=np.array(json.dumps(self.meta)), **self.arrays)

  def load_metadata(self, data_dir):
    self.meta, self.arrays = read_npz(os.path.join(os.fspath(data_dir), self.file_name))


def read_npz(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(meta dict, arrays) of a file written by the builders (no pickles)."""
  if not os.path.isfile(path):
    raise BuiltDatasetError(f'{path} does not exist: the folder is not a dataset built by '
                            'vpr_jax.data.tfds (or is incomplete).')
  try:
    # A prepared dataset may come from someone else: read without pickles.
    arrays = safe_numpy.load_npz(path)
    return json.loads(str(arrays.pop('meta'))), arrays
  except (OSError, KeyError, ValueError) as e:  # ArrayFileError is a ValueError
    raise BuiltDatasetError(f'{path} cannot be read: {e}') from None


def config_name(prefix: str, settings: dict[str, Any]) -> str:
  """A config name that changes with every setting (so that builds never mix)."""
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode('utf-8')).hexdigest()
  return f'{prefix}_{digest[:12]}'


def build_dataset(builder: tfds.core.GeneratorBasedBuilder, manual_dir: str, num_shards: int | None,
           overwrite: bool) -> str:
  manual_dir = os.path.abspath(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir):
    raise BuiltDatasetError(f'Manual directory {manual_dir!r} does not exist. '
                            + ' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split()))
  # TFDS writes into a temporary folder renamed when complete: an interrupted build leaves no
  # dataset behind, and the next build starts over.
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, num_shards=num_shards, download_mode=mode))
  return os.fspath(builder.data_dir)


def open_builder(directory: str):
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isfile(os.path.join(directory, 'dataset_info.json')):
    raise BuiltDatasetError(
        f'{directory!r} is not a built TFDS dataset (no dataset_info.json); give the folder '
        'printed when the dataset was built (<data_dir>/<name>/<config>/<version>).')
  return tfds.builder_from_directory(directory)


def _image_bytes(serialized: bytes) -> bytes:
  """The encoded image of a serialized example (an Image feature is one bytes value)."""
  return tf_example_pb2.Example.FromString(serialized).features.feature['image'].bytes_list.value[0]


class SplitSource:
  """Random access to the stored image bytes of one split: record i -> bytes.

  `__len__`, `__getitem__`, `__getitems__`, `load_pixels` (what the train pipeline reads),
  `load_rgb`, `load_array`, `source_path`, `record_name`, and for the training set
  `place_records` and `read_place`. Picklable: grain workers receive a copy and open the records
  lazily.
  """

  def __init__(self, directory: str, split: str, source_root: str, paths_file: str,
               paths_key: str, place_offsets: np.ndarray | None = None):
    self._directory = os.path.abspath(os.fspath(directory))
    self._split = split
    # The source paths (tens of MB for GSV-Cities) are only needed for messages: loaded from
    # the stored table on first use, never pickled into workers.
    self._paths_file = os.path.join(self._directory, paths_file)
    self._paths_key = paths_key
    self._paths = None
    builder = open_builder(self._directory)
    if split not in builder.info.splits:
      raise BuiltDatasetError(f'{self._directory!r} has no split {split!r} (it has '
                              f'{sorted(builder.info.splits)}).')
    self._num_records = int(builder.info.splits[split].num_examples)
    self._source_root = source_root
    self._place_offsets = place_offsets
    self._examples = None
    self._records = None

  @property
  def directory(self) -> str:
    return self._directory

  def _example_source(self):
    """Whole examples, the image left encoded (decoded by the project's decoder)."""
    if self._examples is None:
      builder = tfds.builder_from_directory(self._directory)
      self._examples = builder.as_data_source(
          self._split, decoders={'image': tfds.decode.SkipDecoding()})
    return self._examples

  def _record_source(self):
    """Serialized examples. TFDS's generic decoding of every feature costs ~1 ms a record in
    Python (measured: ~1,400 records/s), so the image bytes are taken from the proto directly
    (~20,000 records/s)."""
    if self._records is None:
      builder = tfds.builder_from_directory(self._directory)
      self._records = builder.as_data_source(
          self._split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    return self._records

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_examples'] = None
    state['_records'] = None
    state['_paths'] = None
    return state

  def __len__(self) -> int:
    return self._num_records

  def _check(self, record: int) -> int:
    record = int(record)
    if not 0 <= record < self._num_records:
      raise IndexError(f'record {record} out of range [0, {self._num_records}) in '
                       f'{self._directory} ({self._split})')
    return record

  def example(self, record: int) -> dict[str, Any]:
    """The whole stored example (image as encoded bytes, text fields as bytes)."""
    return self._example_source()[self._check(record)]

  def __getitem__(self, record: int) -> bytes:
    return _image_bytes(self._record_source()[self._check(record)])

  def __getitems__(self, records: Sequence[int]) -> list[bytes]:
    checked = [self._check(r) for r in records]
    return [_image_bytes(r) for r in self._record_source().__getitems__(checked)]

  def source_path(self, record: int) -> str:
    """The source image a record was built from (absolute; for messages)."""
    record = self._check(record)
    if self._paths is None:
      self._paths = read_npz(self._paths_file)[1][self._paths_key]
    return os.path.join(self._source_root, self._paths[record].decode('utf-8'))

  def place_records(self, place: int) -> np.ndarray:
    """Record numbers of place `place` (its position in the index, not its label)."""
    if self._place_offsets is None:
      raise BuiltDatasetError(f'{self._directory!r} ({self._split}) has no places.')
    return np.arange(self._place_offsets[place], self._place_offsets[place + 1])

  def read_place(self, place: int, which: Sequence[int] | None = None) -> list[bytes]:
    """Encoded images of a place, in the order asked (`which`: positions within the place)."""
    records = self.place_records(place)
    if which is not None:
      records = records[np.asarray(which, np.int64)]
    return self.__getitems__(records.tolist())

  def record_name(self, record: int) -> str:
    """How errors name a record: its source file, the record number, the split and the folder."""
    return f'{self.source_path(record)} (record {record} of {self._split} in {self._directory})'

  def load_pixels(self, record: int, min_size: Sequence[int] | None = None,
                  decoder: str = 'turbo', out: np.ndarray | None = None) -> np.ndarray:
    """Decoded record as uint8 [H, W, 3] (`decode.decode_stored`; arguments as there).

    Raises:
      errors.ImageDecodeError: naming the source file, when the record is empty or corrupt.
    """
    try:
      return decode.decode_stored(self[record], '', min_size, decoder, out)
    except errors.ImageDecodeError as e:
      # The source paths (tens of MB) are loaded only when something fails.
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
