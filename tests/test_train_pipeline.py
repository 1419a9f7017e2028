"""The grain training pipeline: sampling, order, sharding, determinism, resume, bad images."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from vpr_jax import errors
from vpr_jax.configs import default
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.imaging import images
from vpr_jax.data.training import train_pipeline
from vpr_jax.data.multiprocess import workers

SIZE = 16
# city -> {place_id: number of images}; 12 places with 4 to 7 images.
CITIES = {
    'Alpha': {0: 4, 1: 5, 2: 6, 3: 7, 4: 4, 5: 5, 6: 6},
    'Beta': {0: 7, 1: 4, 2: 5, 3: 6, 4: 4},
}


def _xs_name(place_field, year, month, panoid):
  return (f'@0550986.41@4178983.29@10@S@037.75000@-122.41000@{panoid}@@090@@@@{year:04d}'
          f'{month:02d}@{place_field}@.jpg')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  """GSV-XS layout; every image is a uniform grey of its own level, so batches can be traced."""
  root = str(tmp_path_factory.mktemp('train_xs'))
  level = 3
  for city, places in CITIES.items():
    os.makedirs(os.path.join(root, city.lower()))
    for place_id, count in places.items():
      for v in range(count):
        # Distinct dates per place: "most recent" is well defined.
        name = _xs_name(f'{place_id}_{city}', 2010 + v, 1 + (3 * v) % 12, f'{city}{place_id}v{v}')
        path = os.path.join(root, city.lower(), name)
        # Quality 100 keeps a uniform grey block exact.
        Image.new('RGB', (SIZE, SIZE), (level, level, level)).save(path, quality=100)
        level += 2
  assert level < 256
  return root


def _index(root, cache_tag='a'):
  return gsv_cities.build_place_index(root, 'gsv_xs', list(CITIES), 4,
                                      cache_dir=os.path.join(root, '..', f'cache_{cache_tag}'))


@pytest.fixture(scope='module')
def index(data_root):
  return _index(data_root)


@pytest.fixture(scope='module')
def level_to_image(index):
  """Grey level -> flat image number in the index."""
  mapping = {}
  for image in range(index.num_images):
    level = int(np.asarray(images.load_rgb(index.image_path(image)))[0, 0, 0])
    assert level not in mapping
    mapping[level] = image
  return mapping


def _config(**data):
  config = default.get_config()
  config.image_size = (SIZE, SIZE)
  config.num_epochs = 2
  config.data.cities = tuple(CITIES)
  config.data.places_per_batch = 4
  config.data.images_per_place = 3
  config.data.augment = 'none'
  config.data.num_workers = 0
  config.data.prefetch_buffer_size = 2
  for key, value in data.items():
    config.data[key] = value
  return config


def _take(iterator, n):
  # Copies: with workers the arrays live in shared memory released with the iterator.
  return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _traced(batch, level_to_image):
  """[P, K] flat image numbers of a batch (augmentation off)."""
  levels = batch['images'][:, :, 0, 0, 0].astype(int)
  return np.vectorize(level_to_image.__getitem__)(levels)


def _place_of_image(index):
  return np.repeat(np.arange(index.num_places), index.images_per_place)


def test_batches_shapes_labels_and_samples(index, level_to_image):
  config = _config()
  assert train_pipeline.steps_per_epoch(index, config) == 3
  it = train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0)
  assert (it.steps_per_epoch, it.num_steps, it.places_per_batch) == (3, 6, 4)
  place_of_image = _place_of_image(index)
  for batch in _take(it, 6):
    assert batch['images'].shape == (4, 3, SIZE, SIZE, 3) and batch['images'].dtype == np.uint8
    assert batch['labels'].shape == (4, 3) and batch['labels'].dtype == np.int32
    assert batch['num_bad_images'].shape == () and int(batch['num_bad_images']) == 0
    # Uniform images stay uniform without augmentation.
    assert np.all(batch['images'] == batch['images'][:, :, :1, :1, :1])
    traced = _traced(batch, level_to_image)
    for row, labels in zip(traced, batch['labels']):
      assert len(set(row)) == 3, 'images of a place are drawn without replacement'
      places = place_of_image[row]
      assert np.all(places == places[0])
      np.testing.assert_array_equal(labels, index.place_ids[places[0]])
  with pytest.raises(StopIteration):
    next(it)


def test_each_place_once_per_epoch_in_city_blocks(index):
  it = train_pipeline.make_train_iterator(index, _config(), seed=3, num_workers=0)
  epochs = [np.concatenate([b['labels'][:, 0] for b in _take(it, 3)]) for _ in range(2)]
  city_of = {pid: city for pid, city in zip(index.place_ids, index.place_cities)}
  for labels in epochs:
    np.testing.assert_array_equal(np.sort(labels), np.sort(index.place_ids))
    cities = [city_of[label] for label in labels]
    assert cities == sorted(cities), 'each city is one block, in config order'
  assert not np.array_equal(epochs[0], epochs[1]), 'a new order every epoch'


def test_incomplete_last_batch_dropped(index):
  config = _config(places_per_batch=5)
  assert train_pipeline.steps_per_epoch(index, config) == 2
  it = train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0)
  leftovers = []
  for _ in range(2):
    labels = np.concatenate([b['labels'][:, 0] for b in _take(it, 2)])
    assert len(set(labels)) == 10
    leftovers.append(set(index.place_ids) - set(labels))
  assert all(len(left) == 2 for left in leftovers)


def test_epoch_orders(index):
  for shuffle_all in (False, True):
    orders = [train_pipeline.epoch_place_order(index, 0, e, shuffle_all) for e in range(3)]
    for order in orders:
      np.testing.assert_array_equal(np.sort(order), np.arange(index.num_places))
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[2],
                                  train_pipeline.epoch_place_order(index, 0, 2, shuffle_all))
  blocks = train_pipeline.epoch_place_order(index, 5, 0, False)
  np.testing.assert_array_equal(np.sort(blocks[:7]), np.arange(7))
  mixed = [train_pipeline.epoch_place_order(index, s, 0, True) for s in range(5)]
  assert any(np.any(index.place_cities[m[:7]] == 1) for m in mixed)


def test_shuffle_all_mixes_cities(index):
  it = train_pipeline.make_train_iterator(index, _config(shuffle_all=True), seed=1, num_workers=0)
  labels = np.concatenate([b['labels'][:, 0] for b in _take(it, 3)])
  np.testing.assert_array_equal(np.sort(labels), np.sort(index.place_ids))
  expected = index.place_ids[train_pipeline.epoch_place_order(index, 1, 0, True)]
  np.testing.assert_array_equal(labels, expected)


def test_deterministic_from_seed_and_fresh_each_epoch(index, level_to_image):
  config = _config()
  first = _take(train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0), 6)
  again = _take(train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0), 6)
  _assert_same_batches(first, again)
  other = _take(train_pipeline.make_train_iterator(index, config, seed=1, num_workers=0), 3)
  assert not all(np.array_equal(a['labels'], b['labels']) for a, b in zip(first, other))
  samples = [{}, {}]
  for step, batch in enumerate(first):
    for row, label in zip(_traced(batch, level_to_image), batch['labels'][:, 0]):
      samples[step // 3][int(label)] = set(row)
  assert samples[0].keys() == samples[1].keys()
  assert any(samples[0][p] != samples[1][p] for p in samples[0]), 'a fresh draw every epoch'


def test_most_recent_images(index, level_to_image):
  it = train_pipeline.make_train_iterator(index, _config(random_sample_from_each_place=False),
                                         seed=0, num_workers=0)
  place_of_image = _place_of_image(index)
  for batch in _take(it, 6):
    for row in _traced(batch, level_to_image):
      members = index.place_images(place_of_image[row[0]])
      newest = members[np.argsort(-index.image_dates[members])[:3]]
      assert list(row) == list(newest)


def test_resume_gives_the_same_batches(index):
  config = _config(augment='randaugment')
  it = train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  assert state['next_step'] == 3
  expected = _take(it, 2)
  resumed = train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0)
  resumed.set_state(state)
  assert resumed.epoch == 1
  _assert_same_batches(_take(resumed, 2), expected)
  # Restoring an earlier state rewinds a running iterator.
  it.set_state(state)
  _assert_same_batches(_take(it, 2), expected)


def test_randaugment_deterministic_and_applied(index):
  augmented = _take(train_pipeline.make_train_iterator(
      index, _config(augment='randaugment'), seed=0, num_workers=0), 3)
  again = _take(train_pipeline.make_train_iterator(
      index, _config(augment='randaugment'), seed=0, num_workers=0), 3)
  _assert_same_batches(augmented, again)
  plain = _take(train_pipeline.make_train_iterator(index, _config(), seed=0, num_workers=0), 3)
  for a, p in zip(augmented, plain):
    np.testing.assert_array_equal(a['labels'], p['labels'])
  assert any(not np.array_equal(a['images'], p['images']) for a, p in zip(augmented, plain))


def test_process_shards_make_up_the_global_batch(index):
  config = _config()
  whole = _take(train_pipeline.make_train_iterator(index, config, seed=2, num_workers=0), 6)
  shards = [_take(train_pipeline.make_train_iterator(index, config, seed=2, process_index=i,
                                                     process_count=2, num_workers=0), 6)
            for i in range(2)]
  for step in range(6):
    assert shards[0][step]['labels'].shape == (2, 3)
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(
          np.concatenate([shards[0][step][key], shards[1][step][key]]), whole[step][key])
  for epoch in range(2):
    seen = [set(np.concatenate([b['labels'][:, 0] for b in shard[3 * epoch:3 * epoch + 3]]))
            for shard in shards]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(index.place_ids)


@pytest.mark.slow
def test_two_worker_processes(index):
  config = _config(augment='randaugment')
  reference = _take(train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0), 4)
  with train_pipeline.make_train_iterator(index, config, seed=0, num_workers=2) as it:
    assert it.num_workers == 2
    first = _take(it, 2)
    state = it.get_state()
  _assert_same_batches(first, reference[:2])
  with train_pipeline.make_train_iterator(index, config, seed=0, num_workers=2) as resumed:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), reference[2:])


def _corrupt(path):
  with open(path, 'wb') as f:
    f.write(b'\xff\xd8 not really a jpeg')


def test_bad_images_replaced_counted_and_named(tmp_path, caplog):
  root = str(tmp_path / 'xs')
  os.makedirs(os.path.join(root, 'alpha'))
  for place_id, count in {0: 4, 1: 4, 2: 4, 3: 4}.items():
    for v in range(count):
      level = 10 + 20 * place_id + 4 * v
      name = _xs_name(f'{place_id}_Alpha', 2010 + v, 1, f'p{place_id}v{v}')
      Image.new('RGB', (SIZE, SIZE), (level,) * 3).save(os.path.join(root, 'alpha', name),
                                                       quality=100)
  index = gsv_cities.build_place_index(root, 'gsv_xs', ['Alpha'], 4)
  # Place 2 keeps two good images: each epoch both bad ones are tried, and one good one is reused.
  bad_paths = [index.image_path(i) for i in index.place_images(2)[:2]]
  for path in bad_paths:
    _corrupt(path)
  config = _config(cities=('Alpha',), places_per_batch=4, max_bad_image_fraction=0.2)
  caplog.set_level(logging.WARNING)
  it = train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0)
  for batch in _take(it, 2):
    assert int(batch['num_bad_images']) == 2
    row = int(np.flatnonzero(batch['labels'][:, 0] == index.place_ids[2])[0])
    levels = batch['images'][row, :, 0, 0, 0]
    assert set(levels) == {58, 62}  # the two good images of place 2
  assert it.get_state()['bad_images'] == 4
  for path in bad_paths:
    assert path in caplog.text

  strict = train_pipeline.make_train_iterator(index, _config(cities=('Alpha',),
                                                             max_bad_image_fraction=0.01),
                                              seed=0, num_workers=0)
  with pytest.raises(train_pipeline.TooManyBadImagesError,
                     match='2 of 14 training image reads .*0.01'):
    next(strict)

  for path in [index.image_path(i) for i in index.place_images(2)[2:]]:
    _corrupt(path)
  broken = train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0)
  with pytest.raises(errors.ImageDecodeError, match='none of the 4 images of place 2'):
    next(broken)


def test_errors(index, data_root):
  with pytest.raises(ValueError, match='divisible by the number of processes'):
    train_pipeline.make_train_iterator(index, _config(), seed=0, process_count=3)
  with pytest.raises(ValueError, match='process_index=2'):
    train_pipeline.make_train_iterator(index, _config(), seed=0, process_index=2, process_count=2)
  # A user mistake (one line from the entry points), naming what to change.
  with pytest.raises(gsv_cities.DatasetError, match='images_per_place=5 exceeds.*smallest has 4'):
    train_pipeline.make_train_iterator(index, _config(images_per_place=5), seed=0)
  with pytest.raises(ValueError, match='fewer than data.places_per_batch=13'):
    train_pipeline.make_train_iterator(index, _config(places_per_batch=13), seed=0)
  with pytest.raises(ValueError, match='num_workers'):
    train_pipeline.make_train_iterator(index, _config(), seed=0, num_workers=-2)
  with pytest.raises(ValueError, match='data.augment'):
    train_pipeline.make_train_iterator(index, _config(augment='autoaugment'), seed=0)
  it = train_pipeline.make_train_iterator(index, _config(), seed=0, num_workers=0)
  state = it.get_state()
  other_seed = train_pipeline.make_train_iterator(index, _config(), seed=1, num_workers=0)
  with pytest.raises(ValueError, match='seed: saved 0, now 1'):
    other_seed.set_state(state)
  other_batch = train_pipeline.make_train_iterator(index, _config(places_per_batch=2), seed=0)
  with pytest.raises(ValueError, match='places_per_batch'):
    other_batch.set_state(state)
  with pytest.raises(ValueError, match='version'):
    it.set_state({'next_step': 0})
  with pytest.raises(ValueError, match='outside'):
    it.set_state(dict(state, next_step=99))


def test_resolve_num_workers():
  assert workers.resolve_num_workers(0) == 0
  assert workers.resolve_num_workers(3) == 3
  assert 1 <= workers.resolve_num_workers(-1) <= 16


def test_synthetic_gsv_cities_end_to_end(synthetic_root):
  index = gsv_cities.build_place_index(os.path.join(synthetic_root, 'gsv_cities'), 'gsv_cities',
                                       ['SynthA', 'SynthB'], 4,
                                       cache_dir=str(synthetic_root / 'cache_pipeline'))
  config = _config(cities=('SynthA', 'SynthB'), places_per_batch=8, images_per_place=4,
                   augment='randaugment')
  config.image_size = (32, 40)
  it = train_pipeline.make_train_iterator(index, config, seed=0, num_workers=0)
  assert it.steps_per_epoch == 3
  batch = next(it)
  assert batch['images'].shape == (8, 4, 32, 40, 3)
  assert np.all(batch['labels'] == batch['labels'][:, :1])


def test_bench_script_smoke(tmp_path):
  output = tmp_path / 'bench.json'
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'scripts', 'bench_pipeline.py')
  completed = subprocess.run(
      [sys.executable, script, '--workers', '0,1', '--batch-memory', 'reuse,new', '--decoders',
       'pil,turbo', '--num-batches', '2', '--synthetic-places', '8', '--source-size', '48,64',
       '--image-size', '32', '--output', str(output)],
      capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr
  assert 'img/s' in completed.stdout
  report = json.loads(output.read_text())
  assert report['synthetic'] and report['num_places'] == 8
  runs = {(r['decoder'], r['workers'], r['batch_memory']): r for r in report['results']}
  # The batch memory only matters with workers: in process, one run per decoder.
  assert sorted(runs) == sorted((d, w, m) for d in ('pil', 'turbo')
                                for w, m in ((0, None), (1, 'reuse'), (1, 'new')))
  for (decoder, workers, memory), result in runs.items():
    assert result['images'] == 2 * 8 * 4 and result['images_per_second'] > 0
    assert result['source'] == 'original' and result['decoder'] == decoder
    if workers:
      # Every worker run is compared with Pillow through a new segment per batch (the path
      # before libjpeg-turbo and batch slots).
      assert result['speedup_vs_pil_new_memory'] > 0
    else:
      assert 'speedup_vs_pil_new_memory' not in result
  assert {r['decoder'] for r in report['raw_decode']} == {'pil', 'turbo'}
