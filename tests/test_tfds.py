"""TFDS builders of the training and benchmark sets: built and read without TensorFlow."""

import csv
import io
import os
import pickle
import subprocess
import sys

import grain
import numpy as np
from PIL import Image
import pytest

from configs import default as default_config
from vpr_jax import errors
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.imaging import images
from vpr_jax.data import synthetic
from vpr_jax.data.tfds import benchmark_set
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data.training import train_pipeline

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CITIES = synthetic.DEFAULT_CITIES
_SIZE = (24, 32)
_ENCODING = records.ImageEncoding(_SIZE)
_TRAIN_DIRS = {'gsv_cities': 'gsv_cities', 'gsv_xs': 'gsv_xs'}


def _config(root, layout='gsv_cities'):
  config = default_config.get_config()
  config.image_size = _SIZE
  config.data.root = str(root)
  config.data.train_layout = layout
  config.data.train_dir = _TRAIN_DIRS[layout]
  config.data.cities = _CITIES
  config.data.places_per_batch = 4
  config.data.images_per_place = 4
  config.data.augment = 'none'
  config.data.num_workers = 0
  return config


@pytest.fixture(scope='module')
def built(synthetic_root, tmp_path_factory):
  """The synthetic training set in both layouts, built at 24x32 (the first with 2 workers)."""
  data_dir = tmp_path_factory.mktemp('tfds')
  folders = {}
  for layout, workers in (('gsv_cities', 2), ('gsv_xs', 0)):
    folders[layout] = training_set.build_training_set(
        os.path.join(str(synthetic_root), _TRAIN_DIRS[layout]), str(data_dir), layout=layout,
        cities=_CITIES, min_img_per_place=4, encoding=_ENCODING, num_workers=workers)
  return data_dir, folders


@pytest.mark.parametrize('layout', ['gsv_cities', 'gsv_xs'])
def test_training_set_holds_the_index_and_the_prepared_bytes(layout, built, synthetic_root,
                                                             tmp_path):
  _, folders = built
  folder = folders[layout]
  assert os.path.isfile(os.path.join(folder, 'dataset_info.json'))
  train_dir = os.path.join(str(synthetic_root), _TRAIN_DIRS[layout])
  index = gsv_cities.build_place_index(train_dir, layout, _CITIES, 4,
                                       cache_dir=str(tmp_path / 'cache'))
  loaded, source = training_set.open_training_set(folder, _config(synthetic_root, layout))
  for name in ('image_paths', 'image_dates', 'image_lats', 'place_offsets', 'place_ids',
               'place_cities'):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name), err_msg=name)
  assert loaded.cities == index.cities and loaded.root == index.root
  assert len(source) == index.num_images and source.image_size == _SIZE

  # Record for record, the train transform's resize of the source, encoded at quality 95...
  for record in range(index.num_images):
    resized = images.resize(images.load_rgb(index.image_path(record)), _SIZE)
    assert source[record] == images.encode_jpeg(resized, 95, '4:2:0'), record
  got = source.load_array(5)
  assert got.shape == (*_SIZE, 3) and got.dtype == np.uint8
  # ... decoded by the project's decoder: Pillow's pixels of the stored JPEG, which only the JPEG
  # loss separates from the resized source (tiny noisy images).
  with Image.open(io.BytesIO(source[5])) as stored:
    np.testing.assert_array_equal(got, np.asarray(stored.convert('RGB')))
  resized = images.to_uint8_array(images.resize(images.load_rgb(index.image_path(5)), _SIZE))
  assert np.abs(got.astype(np.int32) - resized).mean() < 8.0
  assert source.source_path(5) == index.image_path(5)
  assert source.record_name(5).startswith(index.image_path(5) + ' (record 5 of train')
  place = 3
  np.testing.assert_array_equal(source.place_records(place), index.place_images(place))
  assert source.read_place(place, which=[2, 0]) == [source[int(index.place_images(place)[2])],
                                                    source[int(index.place_images(place)[0])]]


def test_training_examples_carry_the_image_metadata(built, synthetic_root):
  """Place, city, position, date and heading agree with the CSV rows of GSV-Cities."""
  _, folders = built
  index, source = training_set.open_training_set(folders['gsv_cities'])
  rows = {}
  for city in _CITIES:
    with open(os.path.join(str(synthetic_root), 'gsv_cities', 'Dataframes', f'{city}.csv')) as f:
      for row in csv.DictReader(f):
        rows[row['panoid']] = row
  for record in (0, 7, index.num_images - 1):
    example = source.example(record)
    place = int(np.searchsorted(index.place_offsets, record, side='right') - 1)
    assert example['place'] == place
    assert example['place_id'] == index.place_ids[place]
    assert _CITIES[example['city']] == index.cities[index.place_cities[place]]
    row = rows[example['panoid'].decode()]
    assert row['city_id'] == _CITIES[example['city']]
    assert (example['year'], example['month'], example['heading']) == (
        int(row['year']), int(row['month']), int(row['northdeg']))
    assert example['latitude'] == float(row['lat']) and example['longitude'] == float(row['lon'])
    assert example['source_path'].decode() == index.image_paths[record].decode()


def test_source_is_picklable_and_feeds_grain_and_the_train_pipeline(built, synthetic_root):
  _, folders = built
  config = _config(synthetic_root)
  index, source = training_set.open_training_set(folders['gsv_cities'], config)
  clone = pickle.loads(pickle.dumps(source))
  assert clone[7] == source[7]
  dataset = grain.MapDataset.source(clone).map(len)
  assert dataset[7] == len(source[7])
  with pytest.raises(IndexError):
    source[len(source)]

  # The same batches in a worker process as in this one, and as the stored images say.
  batches = []
  for workers in (1, 0):
    with train_pipeline.make_train_iterator(index, config, seed=3, prepared=source,
                                            num_workers=workers) as it:
      batches.append([next(it) for _ in range(3)])
  for a, b in zip(*batches):
    np.testing.assert_array_equal(a['labels'], b['labels'])
    np.testing.assert_array_equal(a['images'], b['images'])
  # Without augmentation, a batch image is a stored image decoded (these are at the train size).
  stored = {source.load_array(record).tobytes() for record in range(len(source))}
  assert all(image.tobytes() in stored for image in batches[0][0]['images'].reshape(-1, *_SIZE, 3))


def test_undecodable_image_is_empty_and_named(tmp_path):
  root = tmp_path / 'data'
  synthetic.make_training_places(str(root), seed=1, num_train_places=4, images_per_place=4,
                                 image_size=(20, 24), layouts=('gsv_cities',))
  train_dir = str(root / 'gsv_cities')
  index = gsv_cities.build_place_index(train_dir, 'gsv_cities', _CITIES, 4,
                                       cache_dir=str(tmp_path / 'cache'))
  broken = 5
  with open(index.image_path(broken), 'r+b') as f:
    f.truncate(40)
  folder = training_set.build_training_set(
      train_dir, str(tmp_path / 'tfds'), layout='gsv_cities', cities=_CITIES,
      min_img_per_place=4, encoding=records.ImageEncoding((16, 16)))
  _, source = training_set.open_training_set(folder)
  assert source[broken] == b''
  with pytest.raises(errors.ImageDecodeError) as error:
    source.load_rgb(broken)
  assert index.image_path(broken) in str(error.value)
  assert source.load_array(broken + 1).shape == (16, 16, 3)
  meta, _ = records.read_npz(os.path.join(folder, training_set.PLACE_INDEX_FILE))
  assert [b['record'] for b in meta['bad_images']] == [broken]


class _Interrupt(Exception):
  pass


def test_interrupted_build_leaves_nothing_and_overwrite_rebuilds(synthetic_root, tmp_path,
                                                                monkeypatch):
  train_dir = os.path.join(str(synthetic_root), 'gsv_cities')
  data_dir = tmp_path / 'tfds'
  kwargs = dict(layout='gsv_cities', cities=_CITIES, min_img_per_place=4,
                encoding=records.ImageEncoding((8, 8)))
  encode = records.ImageEncoding.__call__
  calls = []

  def fail_after_ten(self, path):
    calls.append(path)
    if len(calls) > 10:
      raise _Interrupt()
    return encode(self, path)

  monkeypatch.setattr(records.ImageEncoding, '__call__', fail_after_ten)
  with pytest.raises(_Interrupt):
    training_set.build_training_set(train_dir, str(data_dir), **kwargs)
  name = training_set.training_set_name(**kwargs)
  folder = training_set.training_set_folder(str(data_dir), name)
  config_dir = os.path.dirname(folder)
  # The dataset appears complete or not at all (no partial folder is left either).
  assert not os.path.exists(folder)
  assert not os.path.isdir(config_dir) or os.listdir(config_dir) == []
  monkeypatch.setattr(records.ImageEncoding, '__call__', encode)
  assert training_set.build_training_set(train_dir, str(data_dir), **kwargs) == folder
  info = os.path.join(folder, 'dataset_info.json')
  mtime = os.stat(info).st_mtime_ns
  # Built already: reused as it is; with overwrite, built again.
  assert training_set.build_training_set(train_dir, str(data_dir), **kwargs) == folder
  assert os.stat(info).st_mtime_ns == mtime
  training_set.build_training_set(train_dir, str(data_dir), overwrite=True, **kwargs)
  assert os.stat(info).st_mtime_ns != mtime
  index = gsv_cities.build_place_index(train_dir, 'gsv_cities', _CITIES, 4,
                                       cache_dir=str(tmp_path / 'cache'))
  assert len(training_set.open_training_set(folder)[1]) == index.num_images


def test_bad_encodings_are_refused():
  with pytest.raises(ValueError, match='not both'):
    records.ImageEncoding((8, 8), short_side=8)
  with pytest.raises(ValueError, match='quality'):
    records.ImageEncoding((8, 8), quality=0)
  with pytest.raises(ValueError, match='subsampling'):
    records.ImageEncoding(short_side=8, subsampling='4:1:1')
  with pytest.raises(ValueError, match='image_size'):
    records.ImageEncoding((8, 0))


def test_config_mismatch_and_missing_folders_are_refused(built, synthetic_root, tmp_path):
  _, folders = built
  config = _config(synthetic_root)
  config.data.min_img_per_place = 3
  with pytest.raises(records.BuiltDatasetError, match='min_img_per_place is 3'):
    training_set.open_training_set(folders['gsv_cities'], config)
  config = _config(synthetic_root)
  config.data.cities = tuple(reversed(_CITIES))
  with pytest.raises(records.BuiltDatasetError, match='data.cities is'):
    training_set.open_training_set(folders['gsv_cities'], config)
  config = _config(synthetic_root, 'gsv_xs')
  with pytest.raises(records.BuiltDatasetError, match="data.train_layout is 'gsv_xs'"):
    training_set.open_training_set(folders['gsv_cities'], config)
  with pytest.raises(records.BuiltDatasetError, match='no dataset_info.json'):
    training_set.open_training_set(str(tmp_path))
  with pytest.raises(records.BuiltDatasetError, match='does not exist'):
    training_set.build_training_set(str(tmp_path / 'absent'), str(tmp_path / 'tfds'),
                                     layout='gsv_cities', cities=_CITIES, min_img_per_place=4,
                                     encoding=_ENCODING)


def test_benchmark_round_trip(synthetic_root, tmp_path):
  split_dir = os.path.join(str(synthetic_root), 'synthetic_val')
  folder = benchmark_set.build_benchmark(split_dir, str(tmp_path / 'tfds'))
  expected = benchmarks.load_benchmark(split_dir, use_cache=False)
  split, sources = benchmark_set.open_benchmark(folder)
  assert split.database_paths == expected.database_paths
  assert split.queries_paths == expected.queries_paths
  np.testing.assert_array_equal(split.database_utm, expected.database_utm)
  np.testing.assert_array_equal(split.queries_utm, expected.queries_utm)
  assert len(split.positives) == len(expected.positives) > 0
  for ours, theirs in zip(split.positives, expected.positives):
    np.testing.assert_array_equal(ours, theirs)
  for name, paths, utm in (('database', expected.database_paths, expected.database_utm),
                           ('queries', expected.queries_paths, expected.queries_utm)):
    source = sources[name]
    assert len(source) == len(paths)
    for record in (0, len(paths) - 1):
      with open(os.path.join(split_dir, paths[record]), 'rb') as f:
        assert source[record] == f.read()  # The files as they are.
      example = source.example(record)
      np.testing.assert_array_equal(example['utm'], utm[record])
    if name == 'queries':
      np.testing.assert_array_equal(source.example(0)['positives'], expected.positives[0])

  resized = benchmark_set.build_benchmark(split_dir, str(tmp_path / 'tfds'),
                                          encoding=records.ImageEncoding((16, 20)))
  assert resized != folder
  _, resized_sources = benchmark_set.open_benchmark(resized)
  assert resized_sources['queries'].load_array(0).shape == (16, 20, 3)


_WITHOUT_TENSORFLOW = """
import os, sys
from vpr_jax.cli import prepare  # The command that builds, and training that reads.
from vpr_jax.configs import default
from vpr_jax.data import synthetic
from vpr_jax.data.tfds import benchmark_set
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data.training import train_pipeline
from vpr_jax.training import setup
root, data_dir = sys.argv[1], sys.argv[2]
synthetic.make_synthetic_dataset(root, seed=0, num_train_places=6, images_per_place=4,
                                 num_eval_places=3, image_size=(20, 24))
folder = training_set.build_training_set(
    os.path.join(root, 'gsv_cities'), data_dir, layout='gsv_cities',
    cities=synthetic.DEFAULT_CITIES, min_img_per_place=4,
    encoding=records.ImageEncoding((16, 16)))
index, source = training_set.open_training_set(folder)
assert source.load_array(0).shape == (16, 16, 3)
config = default.get_config()
config.image_size = (16, 16)
config.data.cities = synthetic.DEFAULT_CITIES
config.data.prepared_dir = folder
config.data.places_per_batch, config.data.images_per_place = 2, 4
index, source = setup.load_training_places(config, root)
with train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0,
                                        prepared=source) as it:
  assert next(it)['images'].shape == (2, 4, 16, 16, 3)
bench = benchmark_set.build_benchmark(os.path.join(root, 'synthetic_val'), data_dir)
split, sources = benchmark_set.open_benchmark(bench)
assert sources['queries'].load_array(0).ndim == 3
print('tensorflow imported:', 'tensorflow' in sys.modules)
"""


def test_tensorflow_is_never_imported(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  result = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TENSORFLOW, str(tmp_path / 'data'), str(tmp_path / 'tfds')],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tensorflow imported: False' in result.stdout, result.stdout[-2000:]


def test_registered_builders_build_by_name(synthetic_root, tmp_path):
  """The path `tfds build` takes: the registered name and config, then `tfds.data_source`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'tfds')
  builder = tfds.builder('vpr_benchmark/resized_224', data_dir=data_dir,
                         file_format='array_record')
  assert 'manual' in builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.join(str(synthetic_root), 'synthetic_test')))
  queries = tfds.data_source('vpr_benchmark/resized_224', split='queries', data_dir=data_dir,
                             decoders={'image': tfds.decode.SkipDecoding()})
  _, sources = benchmark_set.open_benchmark(os.fspath(builder.data_dir))
  assert len(queries) == len(sources['queries'])
  assert queries[0]['image'] == sources['queries'][0]
  assert sources['queries'].load_array(0).shape == (224, 224, 3)


def test_a_build_from_other_files_is_not_reused(tmp_path):
  root = tmp_path / 'data'
  synthetic.make_training_places(str(root), seed=1, num_train_places=4, images_per_place=5,
                                 image_size=(20, 24), layouts=('gsv_cities',))
  train_dir = str(root / 'gsv_cities')
  kwargs = dict(layout='gsv_cities', cities=_CITIES, min_img_per_place=4,
                encoding=records.ImageEncoding((8, 8)))
  folder = training_set.build_training_set(train_dir, str(tmp_path / 'tfds'), **kwargs)
  index = gsv_cities.build_place_index(train_dir, 'gsv_cities', _CITIES, 4,
                                       cache_dir=str(tmp_path / 'cache'))
  training_set.check_built_from(folder, index)
  # Other places in the same layout, built with the same settings into the same data folder.
  other_root = tmp_path / 'other'
  synthetic.make_training_places(str(other_root), seed=2, num_train_places=3, images_per_place=5,
                                 image_size=(20, 24), layouts=('gsv_cities',))
  other_dir = str(other_root / 'gsv_cities')
  other = gsv_cities.build_place_index(other_dir, 'gsv_cities', _CITIES, 4,
                                       cache_dir=str(tmp_path / 'cache'))
  with pytest.raises(records.BuiltDatasetError, match='built from other files'):
    training_set.check_built_from(folder, other)
  with pytest.raises(records.BuiltDatasetError, match='built from other files'):
    training_set.build_training_set(other_dir, str(tmp_path / 'tfds'), **kwargs)
  rebuilt = training_set.build_training_set(other_dir, str(tmp_path / 'tfds'), overwrite=True,
                                             **kwargs)
  assert rebuilt == folder
  assert len(training_set.open_training_set(rebuilt)[1]) == other.num_images != index.num_images
