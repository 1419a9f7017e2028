"""Training on prepared data: the same batches (places, order, labels) as on the original JPEGs."""

import os

import numpy as np
import pytest

from vpr_jax.configs import default as default_config
from vpr_jax.training import setup
from vpr_jax.data import gsv_cities
from vpr_jax.data import prepared
from vpr_jax.data import synthetic
from vpr_jax.data import train_pipeline

_CITIES = synthetic.DEFAULT_CITIES
_SIZE = (32, 32)
# Mean absolute difference (in intensity levels) that JPEG quality 95 adds to these tiny, noisy
# synthetic images (measured: up to ~9); another view of the same place differs by >= 24.
_MAX_MEAN_ABS_DIFF = 12.0


def _config(root, cache_dir, **data):
  config = default_config.get_config()
  config.image_size = _SIZE
  config.num_epochs = 2
  config.data.root = str(root)
  config.data.train_dir = 'gsv_cities'
  config.data.cities = _CITIES
  config.data.cache_dir = str(cache_dir)
  config.data.places_per_batch = 8
  config.data.images_per_place = 4
  config.data.augment = 'none'
  config.data.num_workers = 0
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


@pytest.fixture(scope='module')
def prepared_setup(synthetic_root, tmp_path_factory):
  """The synthetic training set and its preparation at the training size, under the data root."""
  cache_dir = tmp_path_factory.mktemp('cache')
  config = _config(synthetic_root, cache_dir)
  index = gsv_cities.build_place_index(os.path.join(str(synthetic_root), 'gsv_cities'),
                                       'gsv_cities', _CITIES, 4, cache_dir=str(cache_dir))
  out = os.path.join(str(tmp_path_factory.mktemp('prep')), 'gsv_32')
  prepared.prepare_training_data(index, out, image_size=_SIZE, records_per_shard=7,
                                 progress=lambda _: None)
  return config, index, out


def _batches(index, config, num, **kwargs):
  with train_pipeline.make_train_iterator(index, config, seed=3, **kwargs) as it:
    return [next(it) for _ in range(num)]


def test_prepared_batches_match_the_originals(prepared_setup):
  config, index, out = prepared_setup
  prepared_index, source = prepared.open_prepared(out, config)
  steps = train_pipeline.steps_per_epoch(index, config)
  num = steps + 1  # Into the second epoch: a new place order and new image draws.
  original = _batches(index, config, num)
  # One worker process: the source travels pickled and opens the shards there.
  from_prepared = _batches(prepared_index, config, num, prepared=source, num_workers=1)
  assert len(from_prepared) == num
  for step, (a, b) in enumerate(zip(original, from_prepared)):
    assert b['images'].shape == (8, 4, *_SIZE, 3) and b['images'].dtype == np.uint8
    np.testing.assert_array_equal(b['labels'], a['labels'], err_msg=f'step {step}')
    assert int(b['num_bad_images']) == 0
    # Image by image: each prepared image is closest to the original at its own position (the
    # same view, re-encoded), and close in absolute terms.
    flat_a = a['images'].reshape(32, 1, -1).astype(np.int32)
    flat_b = b['images'].reshape(1, 32, -1).astype(np.int32)
    distances = np.abs(flat_a - flat_b).mean(axis=-1)  # [original, prepared]
    np.testing.assert_array_equal(distances.argmin(axis=0), np.arange(32), err_msg=f'step {step}')
    assert np.diag(distances).max() < _MAX_MEAN_ABS_DIFF, (step, np.diag(distances).max())
    # ... and not the original pixels: the records were read, not the source files.
    assert np.diag(distances).min() > 0, step


def test_prepared_randaugment_keeps_order_and_labels(prepared_setup):
  config, index, out = prepared_setup
  config = _config(config.data.root, config.data.cache_dir, augment='randaugment')
  prepared_index, source = prepared.open_prepared(out, config)
  original = _batches(index, config, 2)
  from_prepared = _batches(prepared_index, config, 2, prepared=source)
  for a, b in zip(original, from_prepared):
    np.testing.assert_array_equal(b['labels'], a['labels'])
    assert b['images'].shape == a['images'].shape
    # The same ops drawn from the same generator: geometric ops move the same pixels.
    diff = np.abs(a['images'].astype(np.int32) - b['images'].astype(np.int32))
    assert diff.mean() < 2 * _MAX_MEAN_ABS_DIFF


def test_source_of_another_index_is_refused(prepared_setup, synthetic_root, tmp_path):
  config, index, out = prepared_setup
  _, source = prepared.open_prepared(out, config)
  smaller = gsv_cities.build_place_index(os.path.join(str(synthetic_root), 'gsv_cities'),
                                         'gsv_cities', _CITIES[:1], 4,
                                         cache_dir=str(tmp_path / 'cache'))
  with pytest.raises(ValueError, match='same prepared folder'):
    train_pipeline.make_train_iterator(smaller, config, seed=0, prepared=source)


def test_training_reads_the_prepared_folder(prepared_setup):
  """A run opens data.prepared_dir (relative to data.root) instead of the image folders."""
  config, index, out = prepared_setup
  config = _config(config.data.root, config.data.cache_dir,
                   prepared_dir=os.path.relpath(out, config.data.root),
                   train_dir='does_not_exist', val_datasets=('synthetic_val',))
  seen_index, source = setup.load_training_places(config, config.data.root)
  assert isinstance(source, prepared.PreparedSource)
  assert os.path.samefile(source.directory, out)
  np.testing.assert_array_equal(seen_index.place_ids, index.place_ids)
  assert seen_index.fingerprint.startswith('prepared-')
