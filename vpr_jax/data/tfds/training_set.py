"""The training places as a TFDS dataset: `VprTrainingSet`, its build and its reader.

`VprTrainingSet` stores the training places of GSV-Cities or GSV-XS
(`gsv_cities.build_place_index`), one split 'train' in place-index order (the images of place p
are the records place_offsets[p]:place_offsets[p + 1]); each image resized (exact (H, W) as the
train transform's first step, `images.resize`, or the short side, `images.resized_size`) and
re-encoded to JPEG (`images.encode_jpeg`); with its place (position and label), city, latitude,
longitude, year, month, heading, panorama id and source path. The place index itself is stored
next to the records (`place_index.npz`), so that a reader needs no pass over the records.
`open_training_set` is what training reads when config.data.prepared_dir is set (the train
pipeline's `prepared` source). Shared machinery: `records`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from vpr_jax.configs import default
from vpr_jax.data.tfds import records
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.training.gsv_cities import PlaceIndex
from vpr_jax.errors import BuiltDatasetError

TRAIN_SPLIT = 'train'


PLACE_INDEX_FILE = 'place_index.npz'


INDEX_ARRAYS = ('image_paths', 'image_dates', 'image_lats', 'place_offsets', 'place_ids',
                 'place_cities')


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
               min_img_per_place: int = 4,
               encoding: records.ImageEncoding = records.ImageEncoding((224, 224)),
               **kwargs):
    kwargs.setdefault('version', records.VERSION)
    super().__init__(**kwargs)
    self.layout = layout
    self.cities = tuple(cities)
    self.min_img_per_place = int(min_img_per_place)
    self.encoding = encoding


class VprTrainingSet(tfds.core.GeneratorBasedBuilder):
  """GSV-Cities / GSV-XS training places: resized JPEGs, place, city, position, date, heading."""

  VERSION = records.VERSION
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
                        encoding=records.ImageEncoding((320, 320)),
                        description='GSV-Cities, the 23 seed cities, resized to 320x320.'),
      TrainingSetConfig(name='gsv_xs_224', layout='gsv_xs',
                        description='GSV-XS, the 23 seed cities, resized to 224x224.'),
  ]

  def __init__(self, *, num_workers: int = 0, **kwargs):
    self._num_workers = int(num_workers)
    self._metadata = records.NpzMetadata(PLACE_INDEX_FILE)
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
            'latitude': records.FLOAT64,
            'longitude': records.FLOAT64,
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
    self._metadata.arrays = {name: getattr(index, name) for name in INDEX_ARRAYS}
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
    for i, (data, reason) in enumerate(records.encoded(config.encoding, paths, self._num_workers)):
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


def training_set_name(layout: str, cities: Sequence[str], min_img_per_place: int,
                      encoding: records.ImageEncoding) -> str:
  """The default config name of a training set: the layout and a hash of every setting."""
  return records.config_name(layout, {'cities': list(cities),
                                      'min_img_per_place': min_img_per_place,
                                      'encoding': encoding.describe()})


def training_set_folder(data_dir: str, name: str) -> str:
  """Where `build_training_set(..., data_dir, name=name)` puts the built dataset."""
  return os.path.join(os.path.abspath(os.fspath(data_dir)), VprTrainingSet.name, name,
                      str(records.VERSION))


def build_training_set(manual_dir: str, data_dir: str, *, layout: str, cities: Sequence[str],
                       min_img_per_place: int, encoding: records.ImageEncoding,
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
  directory = records.build_dataset(builder, manual_dir, num_shards, overwrite)
  # TFDS reuses a finished folder of the same name: check that it holds these source files.
  check_built_from(directory, gsv_cities.build_place_index(manual_dir, layout, cities,
                                                           min_img_per_place))
  return directory


def check_built_from(directory: str, index: PlaceIndex) -> None:
  """Checks that a built training set holds the images of `index` (the same source files).

  Raises:
    BuiltDatasetError: it was built from other files (or is not a built training set).
  """
  stored = records.read_npz(os.path.join(os.fspath(directory), PLACE_INDEX_FILE))[0]['fingerprint']
  if stored != index.fingerprint:
    raise BuiltDatasetError(f'{directory!r} was built from other files than those now in '
                            f'{index.root!r}; remove it (or choose another data_dir), or '
                            'overwrite it, and build again.')


class TrainingSource(records.SplitSource):
  """The 'train' split of a VprTrainingSet; record i is flat image i of its place index."""

  def __init__(self, directory: str):
    meta, arrays = records.read_npz(os.path.join(os.fspath(directory), PLACE_INDEX_FILE))
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
  builder = records.open_builder(directory)
  path = os.path.join(os.fspath(directory), PLACE_INDEX_FILE)
  meta, arrays = records.read_npz(path)
  missing = [name for name in INDEX_ARRAYS if name not in arrays]
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
                    **{name: arrays[name] for name in INDEX_ARRAYS})


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
