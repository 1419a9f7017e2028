"""Prepared training data: ArrayRecord shards + place index, atomic/resumable writing, reading."""

import os
import pickle
import subprocess
import sys

import grain
import numpy as np
import pytest

from vpr_jax import errors
from vpr_jax.configs import default as default_config
from vpr_jax.data import gsv_cities
from vpr_jax.data import images
from vpr_jax.data import prepared
from vpr_jax.data import synthetic

_CITIES = synthetic.DEFAULT_CITIES
_SIZE = (24, 32)


def _index(root, cache_dir):
  return gsv_cities.build_place_index(os.path.join(root, 'gsv_cities'), 'gsv_cities', _CITIES,
                                      min_img_per_place=4, cache_dir=str(cache_dir))


def _config(root, **data):
  config = default_config.get_config()
  config.data.root = str(root)
  config.data.train_dir = 'gsv_cities'
  config.data.cities = _CITIES
  config.image_size = _SIZE
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


@pytest.fixture(scope='module')
def prepared_dir(synthetic_root, tmp_path_factory):
  """The synthetic training set prepared at 24x32, 5 images per shard, 2 worker processes."""
  index = _index(synthetic_root, tmp_path_factory.mktemp('cache'))
  out = tmp_path_factory.mktemp('prep') / 'gsv_24x32'
  lines = []
  info = prepared.prepare_training_data(index, str(out), image_size=_SIZE, quality=95,
                                        records_per_shard=5, num_workers=2,
                                        progress=lines.append)
  return out, index, info, lines


def test_prepared_index_and_records_match_the_source(prepared_dir):
  out, index, info, lines = prepared_dir
  assert not os.path.exists(str(out) + prepared.PARTIAL_SUFFIX)
  assert info['num_bad_images'] == 0
  assert len(info['shards']) == -(-index.num_images // 5)
  assert info['images_per_second_this_run'] > 0
  assert any('images/s' in line for line in lines)

  loaded = prepared.load_prepared_index(str(out))
  for name in ('image_paths', 'image_dates', 'image_lats', 'place_offsets', 'place_ids',
               'place_cities'):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name), err_msg=name)
  assert loaded.cities == index.cities and loaded.layout == index.layout
  assert loaded.root == index.root
  assert loaded.fingerprint != index.fingerprint

  source = prepared.PreparedSource(str(out))
  assert len(source) == index.num_images
  for record in (0, 4, 5, index.num_images - 1):  # Both sides of a shard boundary.
    resized = images.resize(images.load_rgb(index.image_path(record)), _SIZE)
    # The record is the train transform's resize of its source, encoded at quality 95...
    assert source[record] == prepared.encode_jpeg(resized, 95, '4:2:0'), record
    got = source.load_array(record)
    assert got.shape == (*_SIZE, 3) and got.dtype == np.uint8
    # ... which only the JPEG loss separates from the resized source (tiny noisy images).
    assert np.abs(got.astype(np.int32) - images.to_uint8_array(resized)).mean() < 8.0, record
    assert source.source_path(record) == index.image_path(record)


def test_read_place_and_pickled_source_in_grain(prepared_dir):
  out, index, _, _ = prepared_dir
  source = prepared.PreparedSource(str(out))
  place = 3
  records = source.place_records(place)
  np.testing.assert_array_equal(records, index.place_images(place))
  all_bytes = source.read_place(place)
  assert all_bytes == [source[int(r)] for r in records]
  assert source.read_place(place, which=[2, 0]) == [all_bytes[2], all_bytes[0]]

  clone = pickle.loads(pickle.dumps(source))
  assert clone[7] == source[7]
  dataset = grain.MapDataset.source(clone).map(lambda data: len(data))
  assert dataset[7] == len(source[7])
  with pytest.raises(IndexError):
    source[len(source)]


class _DecodeRecord:
  """grain map: record number -> decoded image (module level, so worker processes unpickle it)."""

  def __init__(self, source):
    self.source = source

  def __call__(self, record):
    return self.source.load_array(int(record))


def test_grain_worker_processes_read_the_shards(prepared_dir):
  out, index, _, _ = prepared_dir
  source = prepared.PreparedSource(str(out))
  records = list(range(0, index.num_images, 3))
  dataset = (grain.MapDataset.source(records).map(_DecodeRecord(source))
             .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
             .mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
  decoded = list(dataset)
  assert len(decoded) == len(records)
  for record, image in zip(records, decoded):
    np.testing.assert_array_equal(image, source.load_array(record))


def test_undecodable_source_is_an_empty_record_that_names_the_file(tmp_path):
  root = tmp_path / 'data'
  synthetic.make_training_places(str(root), seed=1, num_train_places=4, images_per_place=4,
                                 image_size=(20, 24), layouts=('gsv_cities',))
  index = _index(root, tmp_path / 'cache')
  broken = 5
  with open(index.image_path(broken), 'r+b') as f:
    f.truncate(40)
  info = prepared.prepare_training_data(index, str(tmp_path / 'prep'), image_size=(16, 16),
                                        records_per_shard=100, progress=lambda _: None)
  assert info['num_bad_images'] == 1
  assert info['bad_images'][0]['record'] == broken
  assert info['bad_images'][0]['path'] == index.image_paths[broken].decode()
  source = prepared.PreparedSource(str(tmp_path / 'prep'))
  assert source[broken] == b''
  with pytest.raises(errors.ImageDecodeError) as error:
    source.load_rgb(broken)
  assert index.image_path(broken) in str(error.value)
  assert source.load_array(broken + 1).shape == (16, 16, 3)


class _Interrupt(Exception):
  pass


def test_interrupted_preparation_resumes_and_is_atomic(synthetic_root, tmp_path):
  index = _index(synthetic_root, tmp_path / 'cache')
  out = str(tmp_path / 'prep')

  def stop_after_first_shard(line):
    if line.startswith('shard 1/'):
      raise _Interrupt()

  kwargs = dict(image_size=(16, 16), records_per_shard=40)
  with pytest.raises(_Interrupt):
    prepared.prepare_training_data(index, out, progress=stop_after_first_shard, **kwargs)
  assert not os.path.exists(out)
  partial = out + prepared.PARTIAL_SUFFIX
  first = os.path.join(partial, prepared.shard_name(0, -(-index.num_images // 40)))
  assert os.path.isfile(first)
  with pytest.raises(prepared.PreparedDataError, match='unfinished preparation'):
    prepared.read_info(out)
  # Other parameters must not mix with the finished shard.
  with pytest.raises(prepared.PreparedDataError, match='other parameters'):
    prepared.prepare_training_data(index, out, image_size=(16, 16), records_per_shard=40,
                                   quality=80, progress=lambda _: None)
  mtime = os.stat(first).st_mtime_ns
  lines = []
  prepared.prepare_training_data(index, out, progress=lines.append, **kwargs)
  assert not os.path.exists(partial)
  assert not any(line.startswith('shard 1/') for line in lines)  # Kept, not rewritten.
  assert os.stat(os.path.join(out, os.path.basename(first))).st_mtime_ns == mtime
  assert len(prepared.PreparedSource(out)) == index.num_images

  with pytest.raises(prepared.PreparedDataError, match='not empty'):
    prepared.prepare_training_data(index, out, progress=lambda _: None, **kwargs)
  info = prepared.prepare_training_data(index, out, overwrite=True, image_size=(8, 8),
                                        records_per_shard=1000, progress=lambda _: None)
  assert info['image_size'] == [8, 8]
  assert prepared.PreparedSource(out).load_array(0).shape == (8, 8, 3)


def test_short_side_follows_torchvision_resize():
  transforms = pytest.importorskip('torchvision.transforms',
                                   reason='torchvision defines the Resize(int) size rule')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for width, height, side in ((640, 480, 256), (480, 640, 224), (333, 101, 50), (64, 64, 32)):
    img = Image.new('RGB', (width, height))
    expected = transforms.Resize(side)(img).size
    assert prepared.resized_size(width, height, None, side) == expected
  assert prepared.resized_size(640, 480, (224, 200), None) == (200, 224)


def test_open_prepared_checks_the_config(prepared_dir, synthetic_root):
  out, index, _, _ = prepared_dir
  loaded, source = prepared.open_prepared(str(out), _config(synthetic_root))
  assert loaded.num_places == index.num_places and len(source) == index.num_images
  with pytest.raises(prepared.PreparedDataError, match='data.cities'):
    prepared.open_prepared(str(out), _config(synthetic_root, cities=('SynthB', 'SynthA')))
  with pytest.raises(prepared.PreparedDataError, match='min_img_per_place'):
    prepared.open_prepared(str(out), _config(synthetic_root, min_img_per_place=2))
  with pytest.raises(prepared.PreparedDataError, match='does not exist'):
    prepared.PreparedSource(str(out) + '_missing')


def test_bad_arguments_raise(prepared_dir, tmp_path):
  _, index, _, _ = prepared_dir
  with pytest.raises(ValueError, match='exactly one'):
    prepared.prepare_training_data(index, str(tmp_path / 'x'))
  with pytest.raises(ValueError, match='quality'):
    prepared.prepare_training_data(index, str(tmp_path / 'x'), image_size=(8, 8), quality=0)
  with pytest.raises(ValueError, match='subsampling'):
    prepared.prepare_training_data(index, str(tmp_path / 'x'), short_side=8, subsampling='4:1:1')


def test_cli_prepares_from_a_config(synthetic_root, tmp_path):
  out = tmp_path / 'cli_prep'
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, '-m', 'vpr_jax.prepare', '--config', os.path.join(repo, 'configs',
                                                                          'default.py'),
         f'--out={out}', f'--data_root={synthetic_root}', '--config.data.train_dir=gsv_cities',
         f'--config.data.cities={_CITIES!r}', f'--config.data.cache_dir={tmp_path / "cache"}',
         '--image_size=16,20', '--num_workers=0', '--quality=90']
  result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'images/s' in result.stdout
  source = prepared.PreparedSource(str(out))
  assert source.load_array(0).shape == (16, 20, 3)
  assert prepared.read_info(str(out))['quality'] == 90
