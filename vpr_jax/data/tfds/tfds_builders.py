"""Prepared data as TFDS datasets, built and read without TensorFlow.

Two `tfds.core.GeneratorBasedBuilder`s write ArrayRecord datasets (`file_format='array_record'`,
`disable_shuffling=True`: record i is the i-th example generated):

* `VprTrainingSet`: the training places of GSV-Cities or GSV-XS (`gsv_cities.build_place_index`),
  one split 'train' in place-index order (the images of place p are the records
  place_offsets[p]:place_offsets[p + 1]); each image resized (exact (H, W) as the train
  transform's first step, `images.resize`, or the short side, `images.resized_size`) and
  re-encoded to JPEG (`images.encode_jpeg`); with its place (position and label), city, latitude,
  longitude, year, month, heading, panorama id and source path. The place index itself is stored
  next to the records (`place_index.npz`), so that a reader needs no pass over the records.
* `VprBenchmark`: an evaluation set (`benchmarks.load_benchmark`), splits 'database' and 'queries'
  in evaluation order, with UTM coordinates, source paths and, for queries, the positives; images
  as stored on disk unless a size is asked for. The table is stored too (`benchmark.npz`).

None of the data can be downloaded automatically: the builders read the folder given as the
manual directory (`MANUAL_DOWNLOAD_INSTRUCTIONS`). They are registered TFDS builders with named
configs, as `tfds build` expects:

  tfds build vpr_training_set --imports=vpr_jax.data.tfds.tfds_builders --config=gsv_cities_224 \
      --manual_dir=/data/gsv_cities --data_dir=/data/tfds

but the `tfds` command of tensorflow-datasets 4.9.10 itself imports TensorFlow (it fails with "No
module named 'tensorflow'" before building). Without TensorFlow, build with `python -m vpr_jax.prepare`
(`build_training_set`, or `build_benchmark` with --benchmark; any settings), or by name:
`tfds.builder('vpr_training_set/gsv_cities_224', data_dir=..., file_format='array_record')
.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))`.

A built dataset is the folder holding `dataset_info.json`
(`<data_dir>/vpr_training_set/<config>/<version>`); `tfds.builder_from_directory(folder)` opens
it, and `open_training_set` / `open_benchmark` give random access to the records:
`open_training_set` is what training reads when config.data.prepared_dir is set (the train
pipeline's `prepared` source), and the benchmark sources have the same interface (evaluation
still reads the split folders). The stored JPEG bytes are decoded by the project's decoder (whole examples are read
with `tfds.decode.SkipDecoding()` for the image; image reads take the bytes straight from the
serialized example, which TFDS's generic decoding of every feature would make ~10x slower).

Images that cannot be decoded while building are stored as empty bytes: reading one raises
`errors.ImageDecodeError` naming the source file, so the train pipeline's bad-image handling
applies.
"""

from __future__ import annotations

from concurrent import futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
# The Example proto TFDS itself parses records with when TensorFlow is absent.
from tensorflow_datasets.proto import tf_example_pb2

from vpr_jax import errors
from vpr_jax.configs import default
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.imaging import decode
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.imaging import images
from vpr_jax.data.training.gsv_cities import PlaceIndex
from vpr_jax.errors import BuiltDatasetError

TRAIN_SPLIT = 'train'
BENCHMARK_SPLITS = ('database', 'queries')
PLACE_INDEX_FILE = 'place_index.npz'
BENCHMARK_FILE = 'benchmark.npz'
VERSION = tfds.core.Version('1.0.0')
_INDEX_ARRAYS = ('image_paths', 'image_dates', 'image_lats', 'place_offsets', 'place_ids',
                 'place_cities')
# tf.train.Example stores floats in 32 bits: coordinates are kept exact as raw float64 bytes.
_FLOAT64 = tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES)
# Images handed to a worker at a time when encoding in parallel.
_CHUNK_SIZE = 64


# ----------------------------------------------------------------------------------------------
# Encoding (what is done to each image before it is stored).


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


def _encoded(encoding: ImageEncoding, paths: Sequence[str],
             num_workers: int) -> Iterator[tuple[bytes, str]]:
  """Encodes `paths` in order, in `num_workers` processes (0: in this one)."""
  if num_workers <= 0:
    yield from map(encoding, paths)
    return
  # 'spawn': the caller may hold threads or an accelerator runtime that must not be forked.
  with futures.ProcessPoolExecutor(num_workers,
                                   mp_context=multiprocessing.get_context('spawn')) as pool:
    yield from pool.map(encoding, paths, chunksize=_CHUNK_SIZE)


class _NpzMetadata(tfds.core.Metadata):
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
  try:
    with np.load(path, allow_pickle=False) as data:
      return (json.loads(str(data['meta'])),
              {name: data[name] for name in data.files if name != 'meta'})
  except FileNotFoundError:
    raise BuiltDatasetError(f'{path} does not exist: the folder is not a dataset built by '
                            'vpr_jax.data.tfds.tfds_builders (or is incomplete).') from None
  except (OSError, KeyError, ValueError) as e:
    raise BuiltDatasetError(f'{path} cannot be read: {e}') from None


# ----------------------------------------------------------------------------------------------
# The training set.


def _parse_gsv_cities_name(relative: str, city: str) -> dict[str, Any]:
  """Fields of `Images/<City>/<city>_<place>_<yyyy>_<mm>_<deg>_<lat>_<lon>_<panoid>.jpg`."""
  stem = os.path.splitext(os.path.basename(relative))[0]
  if not stem.startswith(city + '_'):
    raise gsv_cities.DatasetError(f'{relative}: expected a name starting with {city}_')
  place, year, month, heading, lat, lon, panoid = stem[len(city) + 1:].split('_', 6)
  return {'year': int(year), 'month': int(month), 'heading': int(heading),
          'latitude': float(lat), 'longitude': float(lon), 'panoid': panoid,
          'utm': (np.nan, np.nan)}


def _parse_gsv_xs_name(relative: str) -> dict[str, Any]:
  """Fields of `<city>/@east@north@zone@band@lat@lon@panoid@@deg@@@@yyyymm@place@.jpg`."""
  tokens = os.path.basename(relative).split('@')
  return {'year': int(tokens[13][:4]), 'month': int(tokens[13][4:]), 'heading': int(tokens[9]),
          'latitude': float(tokens[5]), 'longitude': float(tokens[6]), 'panoid': tokens[7],
          'utm': (float(tokens[1]), float(tokens[2]))}


class TrainingSetConfig(tfds.core.BuilderConfig):
  """Which training places to store, and how.

  Attributes:
    layout: 'gsv_cities' or 'gsv_xs' (config data.train_layout).
    cities: city names in config order (config data.cities; the order sets the labels).
    min_img_per_place: places with fewer images are dropped (config data.min_img_per_place).
    encoding: how the images are resized and re-encoded.
  """

  def __init__(self, *, layout: str = 'gsv_cities', cities: Sequence[str] = default.SEED_CITIES,
               min_img_per_place: int = 4, encoding: ImageEncoding = ImageEncoding((224, 224)),
               **kwargs):
    kwargs.setdefault('version', VERSION)
    super().__init__(**kwargs)
    self.layout = layout
    self.cities = tuple(cities)
    self.min_img_per_place = int(min_img_per_place)
    self.encoding = encoding


class VprTrainingSet(tfds.core.GeneratorBasedBuilder):
  """GSV-Cities / GSV-XS training places: resized JPEGs, place, city, position, date, heading."""

  VERSION = VERSION
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
GSV-Cities and GSV-XS cannot be downloaded automatically. Download GSV-Cities from
https://www.kaggle.com/datasets/amaralibey/gsv-cities (or GSV-XS as distributed with mldl24-vpr),
extract it, and pass the extracted training folder as the manual directory:
  gsv_cities layout: <manual_dir>/Dataframes/<City>.csv and <manual_dir>/Images/<City>/*.jpg
  gsv_xs layout:     <manual_dir>/<city>/@UTM_east@UTM_north@...@YYYYMM@place@.jpg
"""
  BUILDER_CONFIGS = [
      TrainingSetConfig(name='gsv_cities_224', layout='gsv_cities',
                        description='GSV-Cities, the 23 seed cities, resized to 224x224.'),
      TrainingSetConfig(name='gsv_cities_320', layout='gsv_cities',
                        encoding=ImageEncoding((320, 320)),
                        description='GSV-Cities, the 23 seed cities, resized to 320x320.'),
      TrainingSetConfig(name='gsv_xs_224', layout='gsv_xs',
                        description='GSV-XS, the 23 seed cities, resized to 224x224.'),
  ]

  def __init__(self, *, num_workers: int = 0, **kwargs):
    self._num_workers = int(num_workers)
    self._metadata = _NpzMetadata(PLACE_INDEX_FILE)
    self._index = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'place': np.int32,
            'place_id': np.int32,
            'city': tfds.features.ClassLabel(names=list(config.cities)),
            'latitude': _FLOAT64,
            'longitude': _FLOAT64,
            'year': np.int32,
            'month': np.int32,
            'heading': np.int32,
            'panoid': tfds.features.Text(),
            'source_path': tfds.features.Text(),
        }),
        supervised_keys=('image', 'place_id'),
        disable_shuffling=True,
        metadata=self._metadata,
        homepage='https://github.com/amaralibey/gsv-cities',
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    index = gsv_cities.build_place_index(
        os.fspath(dl_manager.manual_dir), config.layout, config.cities, config.min_img_per_place)
    self._index = index
    self._metadata.arrays = {name: getattr(index, name) for name in _INDEX_ARRAYS}
    self._metadata.meta = {
        'root': index.root, 'layout': index.layout, 'cities': list(index.cities),
        'min_img_per_place': index.min_img_per_place,
        'num_dropped_places': index.num_dropped_places,
        'num_dropped_images': index.num_dropped_images, 'fingerprint': index.fingerprint,
        'encoding': config.encoding.describe(), 'bad_images': []}
    return {TRAIN_SPLIT: self._generate_examples(index)}

  def _generate_examples(self, index: PlaceIndex):
    config = self.builder_config
    place_of_image = np.repeat(np.arange(index.num_places, dtype=np.int32),
                               index.images_per_place)
    paths = [index.image_path(i) for i in range(index.num_images)]
    bad = self._metadata.meta['bad_images']
    for i, (data, reason) in enumerate(_encoded(config.encoding, paths, self._num_workers)):
      relative = index.image_paths[i].decode('utf-8')
      if reason:
        bad.append({'record': i, 'path': relative, 'reason': reason})
        logging.warning('Cannot decode %s (%s); stored as empty bytes.', paths[i], reason)
      place = int(place_of_image[i])
      city = int(index.place_cities[place])
      if index.layout == 'gsv_cities':
        fields = _parse_gsv_cities_name(relative, index.cities[city])
      else:
        fields = _parse_gsv_xs_name(relative)
      del fields['utm']
      yield i, dict(fields, image=data, place=place, place_id=int(index.place_ids[place]),
                    city=city, source_path=relative)


# ----------------------------------------------------------------------------------------------
# Benchmark sets.


class BenchmarkSetConfig(tfds.core.BuilderConfig):
  """How a benchmark split is stored.

  Attributes:
    encoding: how images are stored (by default the files as they are).
    radius_m: positive radius in metres, when the ground truth comes from the names.
  """

  def __init__(self, *, encoding: ImageEncoding = ImageEncoding(),
               radius_m: float = benchmarks.DEFAULT_RADIUS_M, **kwargs):
    kwargs.setdefault('version', VERSION)
    super().__init__(**kwargs)
    self.encoding = encoding
    self.radius_m = float(radius_m)


class VprBenchmark(tfds.core.GeneratorBasedBuilder):
  """A VPR benchmark split: database and query images with UTM coordinates and positives."""

  VERSION = VERSION
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Benchmark sets (Pittsburgh, MSLS, Nordland, SPED, SF-XS, Tokyo-XS, ...) cannot be downloaded
automatically. Prepare the split folder as for evaluation and pass it as the manual directory:
  <manual_dir>/database/@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg
  <manual_dir>/queries/@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg
(optionally with <prefix>_dbImages.npy / _qImages.npy / _gt.npy ground truth inside it).
"""
  BUILDER_CONFIGS = [
      BenchmarkSetConfig(name='originals', description='The image files as they are.'),
      BenchmarkSetConfig(name='resized_224', encoding=ImageEncoding((224, 224)),
                         description='Images resized to 224x224 (JPEG quality 95).'),
      BenchmarkSetConfig(name='resized_320', encoding=ImageEncoding((320, 320)),
                         description='Images resized to 320x320 (JPEG quality 95).'),
  ]

  def __init__(self, *, num_workers: int = 0, **kwargs):
    self._num_workers = int(num_workers)
    self._metadata = _NpzMetadata(BENCHMARK_FILE)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    keeps_originals = self.builder_config.encoding.keeps_originals
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            # The files as they are may be JPEG or PNG; resized ones are JPEG.
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=None if keeps_originals else 'jpeg'),
            'utm': tfds.features.Tensor(shape=(2,), dtype=np.float64,
                                        encoding=tfds.features.Encoding.BYTES),
            'positives': tfds.features.Sequence(np.int64),
            'source_path': tfds.features.Text(),
        }),
        disable_shuffling=True,
        metadata=self._metadata,
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    split = benchmarks.load_benchmark(os.path.abspath(os.fspath(dl_manager.manual_dir)),
                                      radius_m=config.radius_m, use_cache=False)
    flat, offsets = benchmarks.pack_positives(split.positives)
    self._metadata.arrays = {
        'database_paths': np.array([p.encode('utf-8') for p in split.database_paths], np.bytes_),
        'queries_paths': np.array([p.encode('utf-8') for p in split.queries_paths], np.bytes_),
        'database_utm': split.database_utm, 'queries_utm': split.queries_utm,
        'positives': flat, 'positive_offsets': offsets}
    self._metadata.meta = {'summary': split.summary(), 'encoding': config.encoding.describe(),
                           'bad_images': {'database': [], 'queries': []}}
    no_positives = [np.zeros(0, np.int64)] * split.num_database
    return {
        'database': self._generate_examples(split.root, 'database', split.database_paths,
                                            split.database_utm, no_positives),
        'queries': self._generate_examples(split.root, 'queries', split.queries_paths,
                                           split.queries_utm, split.positives),
    }

  def _generate_examples(self, root, split_name, paths, utm, positives):
    bad = self._metadata.meta['bad_images'][split_name]
    absolute = [os.path.join(root, p) for p in paths]
    encoded = _encoded(self.builder_config.encoding, absolute, self._num_workers)
    for i, (data, reason) in enumerate(encoded):
      if reason:
        bad.append({'record': i, 'path': paths[i], 'reason': reason})
        logging.warning('Cannot read %s (%s); stored as empty bytes.', absolute[i], reason)
      yield i, {'image': data, 'utm': np.asarray(utm[i], np.float64),
                'positives': np.asarray(positives[i], np.int64), 'source_path': paths[i]}


# ----------------------------------------------------------------------------------------------
# Building.


def _config_name(prefix: str, settings: dict[str, Any]) -> str:
  """A config name that changes with every setting (so that builds never mix)."""
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode('utf-8')).hexdigest()
  return f'{prefix}_{digest[:12]}'


def training_set_name(layout: str, cities: Sequence[str], min_img_per_place: int,
                      encoding: ImageEncoding) -> str:
  """The default config name of a training set: the layout and a hash of every setting."""
  return _config_name(layout, {'cities': list(cities), 'min_img_per_place': min_img_per_place,
                               'encoding': encoding.describe()})


def training_set_folder(data_dir: str, name: str) -> str:
  """Where `build_training_set(..., data_dir, name=name)` puts the built dataset."""
  return os.path.join(os.path.abspath(os.fspath(data_dir)), VprTrainingSet.name, name,
                      str(VERSION))


def benchmark_name(manual_dir: str, radius_m: float, encoding: ImageEncoding) -> str:
  """The default config name of a benchmark: the split folder's name and a hash of the settings."""
  folder = os.path.abspath(os.fspath(manual_dir))
  return _config_name(
      ''.join(c if c.isalnum() else '_' for c in os.path.basename(folder)) or 'benchmark',
      {'folder': folder, 'radius_m': float(radius_m), 'encoding': encoding.describe()})


def benchmark_folder(data_dir: str, name: str) -> str:
  """Where `build_benchmark(..., data_dir, name=name)` puts the built dataset."""
  return os.path.join(os.path.abspath(os.fspath(data_dir)), VprBenchmark.name, name,
                      str(VERSION))


def _build(builder: tfds.core.GeneratorBasedBuilder, manual_dir: str, num_shards: int | None,
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


def build_training_set(manual_dir: str, data_dir: str, *, layout: str, cities: Sequence[str],
                       min_img_per_place: int, encoding: ImageEncoding,
                       name: str | None = None, num_workers: int = 0,
                       num_shards: int | None = None, overwrite: bool = False) -> str:
  """Builds (or finds already built) a VprTrainingSet; returns the folder of the built dataset.

  Args:
    manual_dir: the training folder (GSV-Cities or GSV-XS layout).
    data_dir: the TFDS data folder to write under.
    layout: 'gsv_cities' or 'gsv_xs'.
    cities: city names in config order.
    min_img_per_place: places with fewer images are dropped.
    encoding: how images are resized and re-encoded.
    name: the builder config name (the folder under `vpr_training_set/`); by default the layout
      and a hash of the settings, so that other settings never reuse a build.
    num_workers: processes decoding and encoding images; 0 works in this process.
    num_shards: ArrayRecord files to write; None lets TFDS choose (files of 64 MiB to 1 GiB).
    overwrite: build again even when a dataset of the same name is already built.

  Returns:
    The folder holding `dataset_info.json` (for `open_training_set` /
    `tfds.builder_from_directory`).

  Raises:
    BuiltDatasetError: the manual directory does not exist, or a dataset built under the same
      name came from other source files.
    gsv_cities.DatasetError: the training folder does not have the expected layout.
  """
  if name is None:
    name = training_set_name(layout, cities, min_img_per_place, encoding)
  config = TrainingSetConfig(name=name, layout=layout, cities=cities,
                             min_img_per_place=min_img_per_place, encoding=encoding)
  builder = VprTrainingSet(config=config, data_dir=os.fspath(data_dir),
                           file_format='array_record', num_workers=num_workers)
  directory = _build(builder, manual_dir, num_shards, overwrite)
  # TFDS reuses a finished folder of the same name: check that it holds these source files.
  check_built_from(directory, gsv_cities.build_place_index(manual_dir, layout, cities,
                                                           min_img_per_place))
  return directory


def check_built_from(directory: str, index: PlaceIndex) -> None:
  """Checks that a built training set holds the images of `index` (the same source files).

  Raises:
    BuiltDatasetError: it was built from other files (or is not a built training set).
  """
  stored = read_npz(os.path.join(os.fspath(directory), PLACE_INDEX_FILE))[0]['fingerprint']
  if stored != index.fingerprint:
    raise BuiltDatasetError(f'{directory!r} was built from other files than those now in '
                            f'{index.root!r}; remove it (or choose another data_dir), or '
                            'overwrite it, and build again.')


def build_benchmark(manual_dir: str, data_dir: str, *, encoding: ImageEncoding = ImageEncoding(),
                    radius_m: float = benchmarks.DEFAULT_RADIUS_M, name: str | None = None,
                    num_workers: int = 0, overwrite: bool = False) -> str:
  """Builds (or finds already built) a VprBenchmark of one split folder; returns its folder.

  Args:
    manual_dir: the benchmark split folder (database/ and queries/).
    data_dir: the TFDS data folder to write under.
    encoding: how images are stored (default: the files as they are).
    radius_m: positive radius (when the ground truth comes from the names).
    name: the builder config name; by default the split folder's name and a hash of it and of
      the settings.
    num_workers: processes reading and encoding images; 0 works in this process.
    overwrite: build again even when a dataset of the same name is already built.

  Returns:
    The folder holding `dataset_info.json`.
  """
  if name is None:
    name = benchmark_name(manual_dir, radius_m, encoding)
  config = BenchmarkSetConfig(name=name, encoding=encoding, radius_m=radius_m)
  builder = VprBenchmark(config=config, data_dir=os.fspath(data_dir),
                         file_format='array_record', num_workers=num_workers)
  return _build(builder, manual_dir, None, overwrite)


# ----------------------------------------------------------------------------------------------
# Reading.


def _open_builder(directory: str):
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
    builder = _open_builder(self._directory)
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


class TrainingSource(SplitSource):
  """The 'train' split of a VprTrainingSet; record i is flat image i of its place index."""

  def __init__(self, directory: str):
    meta, arrays = read_npz(os.path.join(os.fspath(directory), PLACE_INDEX_FILE))
    super().__init__(directory, TRAIN_SPLIT, meta['root'], PLACE_INDEX_FILE, 'image_paths',
                     np.asarray(arrays['place_offsets'], np.int64))
    encoding = meta.get('encoding', {})
    self.image_size = tuple(encoding['image_size']) if encoding.get('image_size') else None
    self.short_side = encoding.get('short_side')


def load_training_index(directory: str) -> PlaceIndex:
  """The PlaceIndex stored with a built training set (record i = flat image i).

  Raises:
    BuiltDatasetError: not a built training set, or its index does not match its records.
  """
  builder = _open_builder(directory)
  path = os.path.join(os.fspath(directory), PLACE_INDEX_FILE)
  meta, arrays = read_npz(path)
  missing = [name for name in _INDEX_ARRAYS if name not in arrays]
  if missing:
    raise BuiltDatasetError(f'{path} lacks {missing}.')
  num_records = int(builder.info.splits[TRAIN_SPLIT].num_examples)
  if arrays['image_paths'].shape[0] != num_records:
    raise BuiltDatasetError(f'{path} lists {arrays["image_paths"].shape[0]} images but '
                            f'{directory!r} holds {num_records} records.')
  return PlaceIndex(root=meta['root'], layout=meta['layout'], cities=tuple(meta['cities']),
                    min_img_per_place=int(meta['min_img_per_place']),
                    num_dropped_places=int(meta['num_dropped_places']),
                    num_dropped_images=int(meta['num_dropped_images']),
                    fingerprint=f'tfds-{meta["fingerprint"]}-{json.dumps(meta["encoding"])}',
                    **{name: arrays[name] for name in _INDEX_ARRAYS})


def open_training_set(directory: str, config=None) -> tuple[PlaceIndex, TrainingSource]:
  """The place index and the record source of a built training set, checked against a config.

  What training reads when config.data.prepared_dir is set.

  Args:
    directory: the built dataset folder (holding dataset_info.json).
    config: the run's ConfigDict; when given, its data.train_layout, data.cities (order
      included) and data.min_img_per_place must be those the data was built with, and a stored
      size other than config.image_size gives a warning.

  Returns:
    (PlaceIndex, TrainingSource).

  Raises:
    BuiltDatasetError: the folder is not a built training set or was built for another config.
  """
  index = load_training_index(directory)
  source = TrainingSource(directory)
  if config is not None:
    data = config.data
    mismatches = []
    if data.train_layout != index.layout:
      mismatches.append(f'data.train_layout is {data.train_layout!r}, built {index.layout!r}')
    if [c.lower() for c in data.cities] != [c.lower() for c in index.cities]:
      mismatches.append(f'data.cities is {list(data.cities)}, built {list(index.cities)}')
    if int(data.min_img_per_place) != index.min_img_per_place:
      mismatches.append(f'data.min_img_per_place is {data.min_img_per_place}, built '
                        f'{index.min_img_per_place}')
    if mismatches:
      raise BuiltDatasetError(f'Built dataset {directory!r} does not match the config: '
                              + '; '.join(mismatches) + '. Build it again for this config.')
    if source.image_size is None or tuple(source.image_size) != tuple(config.image_size):
      logging.warning('Built dataset %s stores images at %s, the config trains at %s: every '
                      'image is resized again when read.', directory,
                      source.image_size or f'short side {source.short_side}',
                      tuple(config.image_size))
  return index, source


def open_benchmark(directory: str) -> tuple[benchmarks.BenchmarkSet, dict[str, SplitSource]]:
  """A built benchmark: its BenchmarkSet (paths, UTM, positives) and a source per split.

  Args:
    directory: the built dataset folder (holding dataset_info.json).

  Returns:
    (BenchmarkSet whose `root` is the source split folder, {'database': ..., 'queries': ...}).

  Raises:
    BuiltDatasetError: not a built benchmark.
  """
  _open_builder(directory)
  meta, arrays = read_npz(os.path.join(os.fspath(directory), BENCHMARK_FILE))
  summary = meta['summary']
  split = benchmarks.BenchmarkSet(
      name=summary['name'], root=summary['root'],
      database_paths=[p.decode('utf-8') for p in arrays['database_paths']],
      queries_paths=[p.decode('utf-8') for p in arrays['queries_paths']],
      database_utm=arrays['database_utm'], queries_utm=arrays['queries_utm'],
      positives=benchmarks.unpack_positives(arrays['positives'], arrays['positive_offsets']),
      radius_m=summary['radius_m'], source=summary['source'],
      listing_sha1=summary['listing_sha1'])
  sources = {name: SplitSource(directory, name, split.root, BENCHMARK_FILE, f'{name}_paths')
             for name in BENCHMARK_SPLITS}
  return split, sources
