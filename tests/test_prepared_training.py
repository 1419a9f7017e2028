"""Training on prepared data (a built TFDS dataset): the same batches as on the original JPEGs."""

import json
import os

import numpy as np
import pytest

from vpr_jax.configs import default as default_config
from vpr_jax.data.training import gsv_cities
from vpr_jax.data import synthetic
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data.training import train_pipeline
from vpr_jax.training import setup

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
  """The synthetic training set and its TFDS build at the training size (3 ArrayRecord files)."""
  cache_dir = tmp_path_factory.mktemp('cache')
  config = _config(synthetic_root, cache_dir)
  train_dir = os.path.join(str(synthetic_root), 'gsv_cities')
  index = gsv_cities.build_place_index(train_dir, 'gsv_cities', _CITIES, 4,
                                       cache_dir=str(cache_dir))
  folder = training_set.build_training_set(
      train_dir, str(tmp_path_factory.mktemp('tfds')), layout='gsv_cities', cities=_CITIES,
      min_img_per_place=4, encoding=records.ImageEncoding(_SIZE), num_shards=3)
  return config, index, folder


def _batches(index, config, num, **kwargs):
  with train_pipeline.make_train_iterator(index, config, seed=3, **kwargs) as it:
    return [next(it) for _ in range(num)]


def test_prepared_batches_match_the_originals(prepared_setup):
  config, index, folder = prepared_setup
  prepared_index, source = training_set.open_training_set(folder, config)
  assert len(os.listdir(folder)) > 3 and sum('array_record' in f for f in os.listdir(folder)) == 3
  steps = train_pipeline.steps_per_epoch(index, config)
  num = steps + 1  # Into the second epoch: a new place order and new image draws.
  original = _batches(index, config, num)
  # One worker process: the source travels pickled and opens the records there.
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


def test_prepared_resume_gives_the_same_batches(prepared_setup):
  """A run restored from the iterator state continues with exactly the uninterrupted batches."""
  config, _, folder = prepared_setup
  config = _config(config.data.root, config.data.cache_dir, augment='randaugment')
  index, source = training_set.open_training_set(folder, config)
  with train_pipeline.make_train_iterator(index, config, seed=5, prepared=source) as it:
    for _ in range(3):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]  # Across the epoch boundary.
  assert state['next_step'] == 3
  # A new process would open the dataset again: so does the resumed iterator.
  index, source = training_set.open_training_set(folder, config)
  with train_pipeline.make_train_iterator(index, config, seed=5, prepared=source,
                                          num_workers=1) as resumed:
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a['labels'], b['labels'])
    np.testing.assert_array_equal(a['images'], b['images'])


def test_prepared_randaugment_keeps_order_and_labels(prepared_setup):
  config, index, folder = prepared_setup
  config = _config(config.data.root, config.data.cache_dir, augment='randaugment')
  prepared_index, source = training_set.open_training_set(folder, config)
  original = _batches(index, config, 2)
  from_prepared = _batches(prepared_index, config, 2, prepared=source)
  for a, b in zip(original, from_prepared):
    np.testing.assert_array_equal(b['labels'], a['labels'])
    assert b['images'].shape == a['images'].shape
    # The same ops drawn from the same generator: geometric ops move the same pixels.
    diff = np.abs(a['images'].astype(np.int32) - b['images'].astype(np.int32))
    assert diff.mean() < 2 * _MAX_MEAN_ABS_DIFF


def test_source_of_another_index_is_refused(prepared_setup, synthetic_root, tmp_path):
  config, _, folder = prepared_setup
  _, source = training_set.open_training_set(folder, config)
  smaller = gsv_cities.build_place_index(os.path.join(str(synthetic_root), 'gsv_cities'),
                                         'gsv_cities', _CITIES[:1], 4,
                                         cache_dir=str(tmp_path / 'cache'))
  with pytest.raises(ValueError, match='same built dataset'):
    train_pipeline.make_train_iterator(smaller, config, seed=0, prepared=source)


def test_training_reads_the_prepared_folder(prepared_setup):
  """A run opens data.prepared_dir (relative to data.root) instead of the image folders."""
  config, index, folder = prepared_setup
  config = _config(config.data.root, config.data.cache_dir,
                   prepared_dir=os.path.relpath(folder, config.data.root),
                   train_dir='does_not_exist', val_datasets=('synthetic_val',))
  seen_index, source = setup.load_training_places(config, config.data.root)
  assert isinstance(source, training_set.TrainingSource)
  assert os.path.samefile(source.directory, folder)
  np.testing.assert_array_equal(seen_index.place_ids, index.place_ids)
  assert seen_index.fingerprint.startswith('tfds-')


def test_training_refuses_a_dataset_built_for_other_cities(prepared_setup):
  config, _, folder = prepared_setup
  config = _config(config.data.root, config.data.cache_dir, prepared_dir=folder,
                   cities=tuple(reversed(_CITIES)))
  with pytest.raises(records.BuiltDatasetError, match='data.cities'):
    setup.load_training_places(config, config.data.root)
