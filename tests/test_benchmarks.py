"""Tests for vpr_jax.data.evaluation.benchmarks: positives, the seed's SF-XS ground truth, errors."""

import json
import logging
import lzma
import os
import pathlib
import shutil

import numpy as np
import pytest

from vpr_jax import errors
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.evaluation import positives_cache
from vpr_jax.data.evaluation import registry
from vpr_jax.data import roots
from vpr_jax.data import synthetic

SEED_GT_FILE = pathlib.Path(__file__).parent / 'data' / 'sfxs_val_seed_gt.json.xz'


@pytest.fixture(scope='module')
def seed_sfxs_val():
  """The seed's SF-XS val lists and ground truth (from sfxs_val_{dbImages,qImages,gt}.npy)."""
  with lzma.open(SEED_GT_FILE, 'rt') as f:
    data = json.load(f)
  offsets = data['gt_offsets']
  gt = [data['gt_flat'][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
  return data['database'], data['queries'], gt


def _touch_split(split_dir, database, queries):
  for relative in list(database) + list(queries):
    path = os.path.join(split_dir, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, 'wb').close()


def _name(east, north):
  return f'@{east:010.2f}@{north:010.2f}@10@S@037.00000@-122.00000@pano@@000@@@@201901@@.jpg'


def test_positives_radius_is_inclusive():
  database = np.array([[0.0, 0.0], [25.0, 0.0], [0.0, -25.0], [15.0, 20.0], [25.01, 0.0],
                       [-7.0, 24.0], [100.0, 100.0], [17.67, 17.67]])
  queries = np.array([[0.0, 0.0], [100.0, 100.0], [500.0, 500.0]])
  positives = benchmarks.compute_positives(database, queries, radius_m=25.0)
  # Exactly 25 m away ((25, 0), (0, -25), (15, 20), (-7, 24)) is in; 25.01 m is out.
  assert positives[0].tolist() == [0, 1, 2, 3, 5, 7]
  assert positives[1].tolist() == [6]
  assert positives[2].tolist() == []
  assert all(p.dtype == np.int64 for p in positives)
  wider = benchmarks.compute_positives(database, queries, radius_m=25.01)
  assert wider[0].tolist() == [0, 1, 2, 3, 4, 5, 7]
  assert benchmarks.compute_positives(database, queries[:0]) == []
  assert [p.tolist() for p in benchmarks.compute_positives(database[:0], queries)] == [[]] * 3


def test_positives_match_brute_force():
  rng = np.random.default_rng(0)
  database = rng.uniform(0, 300, size=(400, 2)) + [548000.0, 4174000.0]
  queries = rng.uniform(0, 300, size=(50, 2)) + [548000.0, 4174000.0]
  positives = benchmarks.compute_positives(database, queries, 25.0)
  dist = np.linalg.norm(queries[:, None] - database[None], axis=-1)
  for i in range(len(queries)):
    assert positives[i].tolist() == np.flatnonzero(dist[i] <= 25.0).tolist()


def test_seed_sfxs_val_ground_truth_is_reproduced(seed_sfxs_val):
  database, queries, gt = seed_sfxs_val
  assert (len(database), len(queries)) == (8015, 7993)
  positives = benchmarks.compute_positives(
      benchmarks.parse_utm_list(database, 'seed database'),
      benchmarks.parse_utm_list(queries, 'seed queries'), radius_m=25.0)
  for i, (ours, theirs) in enumerate(zip(positives, gt)):
    assert set(ours.tolist()) == set(theirs), f'query {i}: {queries[i]}'
  # Facts about the seed's files, relied on by the docs: every query has a positive, each list is
  # in ascending database-index order, and all positives of a query are at one UTM point (the
  # crops of one panorama), so the lists carry no distance order.
  assert all(len(g) > 0 for g in gt)
  assert all(g == sorted(g) for g in gt)
  assert database != sorted(database) and queries != sorted(queries)


def test_seed_sfxs_val_through_load_benchmark(seed_sfxs_val, tmp_path):
  database, queries, gt = seed_sfxs_val
  split_dir = tmp_path / 'sf_xs' / 'val'
  _touch_split(split_dir, database, queries)
  bench = benchmarks.load_benchmark('sf_xs_val', str(tmp_path))
  assert bench.database_paths == sorted(database) and bench.queries_paths == sorted(queries)
  assert bench.num_without_positives == 0 and bench.source == 'names'
  db_position = {p: i for i, p in enumerate(database)}
  q_position = {p: i for i, p in enumerate(queries)}
  for q, positives in zip(bench.queries_paths, bench.positives):
    assert {db_position[bench.database_paths[j]] for j in positives} == set(gt[q_position[q]])

  # With the seed's precomputed files in the split folder, they define order and ground truth.
  np.save(split_dir / 'sfxs_val_dbImages.npy', np.array(database))
  np.save(split_dir / 'sfxs_val_qImages.npy', np.array(queries))
  gt_array = np.empty(len(gt), dtype=object)
  gt_array[:] = gt
  np.save(split_dir / 'sfxs_val_gt.npy', gt_array, allow_pickle=True)
  bench = benchmarks.load_benchmark('sf_xs_val', str(tmp_path))
  assert bench.database_paths == database and bench.queries_paths == queries
  assert [p.tolist() for p in bench.positives] == gt
  assert bench.source.endswith('sfxs_val') and bench.radius_m is None
  assert not np.isnan(bench.database_utm).any()


def test_synthetic_split_has_the_known_answer(synthetic_root):
  summary = json.loads((synthetic_root / synthetic.SUMMARY_FILE).read_text())
  for split in synthetic.BENCHMARK_SPLITS:
    bench = benchmarks.load_benchmark(split, str(synthetic_root))
    expected = summary['benchmarks'][split]
    assert bench.database_paths == expected['database']
    assert bench.queries_paths == expected['queries']
    assert [p.tolist() for p in bench.positives] == expected['positives']
    assert bench.image_paths == expected['database'] + expected['queries']
    assert bench.database_utm.shape == (16, 2) and bench.queries_utm.shape == (8, 2)


def test_queries_without_positives_are_counted(tmp_path):
  synthetic.make_benchmark_split(str(tmp_path), 'my_split', seed=0, num_places=3,
                                 num_places_without_database=2, image_size=(16, 16))
  bench = benchmarks.load_benchmark(str(tmp_path / 'my_split'))
  assert bench.num_queries == 5 and bench.num_without_positives == 2
  assert bench.summary()['num_without_positives'] == 2


def test_registry_names():
  assert registry.REGISTRY['sf_xs_val'].folder == 'sf_xs/val'
  assert registry.REGISTRY['sf_xs_test'].folder == 'sf_xs/test'
  assert registry.REGISTRY['tokyo_xs'].folder == 'tokyo_xs/test'
  assert registry.REGISTRY['synthetic_val'].folder == 'synthetic_val'
  assert registry.REGISTRY['synthetic_test'].folder == 'synthetic_test'


def test_data_root_from_argument_then_environment(tmp_path, monkeypatch):
  monkeypatch.delenv(roots.DATA_ROOT_ENV, raising=False)
  with pytest.raises(benchmarks.DatasetNotFoundError, match='VPR_DATA_ROOT'):
    roots.resolve_data_root('')
  monkeypatch.setenv(roots.DATA_ROOT_ENV, str(tmp_path))
  assert roots.resolve_data_root('') == str(tmp_path)
  assert roots.resolve_data_root(None) == str(tmp_path)
  other = tmp_path / 'other'
  other.mkdir()
  assert roots.resolve_data_root(str(other)) == str(other)  # The argument wins.
  with pytest.raises(benchmarks.DatasetNotFoundError, match='not a folder'):
    roots.resolve_data_root(str(tmp_path / 'nowhere'))


def test_registered_name_from_environment(synthetic_root, monkeypatch):
  monkeypatch.setenv(roots.DATA_ROOT_ENV, str(synthetic_root))
  bench = benchmarks.load_benchmark('synthetic_test')
  assert bench.root == str(synthetic_root / 'synthetic_test')
  assert bench.name == 'synthetic_test'


def test_paths_absolute_and_relative_to_the_data_root(synthetic_root, monkeypatch):
  by_path = benchmarks.load_benchmark(str(synthetic_root / 'synthetic_val'))
  relative = benchmarks.load_benchmark('synthetic_val/', str(synthetic_root))
  assert by_path.database_paths == relative.database_paths
  monkeypatch.chdir(synthetic_root)
  monkeypatch.delenv(roots.DATA_ROOT_ENV, raising=False)
  from_cwd = benchmarks.load_benchmark(os.path.join('.', 'synthetic_val'))
  assert from_cwd.root == str(synthetic_root / 'synthetic_val')
  assert from_cwd.database_paths == by_path.database_paths


def test_registered_name_without_root_is_a_clear_error(monkeypatch):
  monkeypatch.delenv(roots.DATA_ROOT_ENV, raising=False)
  with pytest.raises(benchmarks.DatasetNotFoundError, match='VPR_DATA_ROOT'):
    benchmarks.load_benchmark('sf_xs_val')


def test_missing_dataset_names_the_path_and_layout(tmp_path):
  with pytest.raises(benchmarks.DatasetNotFoundError) as info:
    benchmarks.load_benchmark('tokyo_xs', str(tmp_path))
  message = str(info.value)
  assert str(tmp_path / 'tokyo_xs' / 'test') in message
  assert 'database' in message and 'queries' in message and '@UTM_east@UTM_north' in message
  with pytest.raises(benchmarks.DatasetNotFoundError) as info:
    benchmarks.load_benchmark('no_such_set', str(tmp_path))
  assert 'sf_xs_val' in str(info.value) and str(tmp_path / 'no_such_set') in str(info.value)


def test_missing_queries_folder(tmp_path):
  (tmp_path / 'split' / 'database').mkdir(parents=True)
  with pytest.raises(benchmarks.DatasetNotFoundError, match='no queries folder'):
    benchmarks.load_benchmark(str(tmp_path / 'split'))


def test_empty_folder_is_malformed(tmp_path):
  _touch_split(tmp_path / 'split', [f'database/{_name(0, 0)}'], [])
  (tmp_path / 'split' / 'queries').mkdir()
  (tmp_path / 'split' / 'queries' / 'readme.txt').write_text('no images here')
  with pytest.raises(benchmarks.MalformedDatasetError, match='no images') as info:
    benchmarks.load_benchmark(str(tmp_path / 'split'))
  assert str(tmp_path / 'split' / 'queries') in str(info.value)


def test_unparsable_name_is_named(tmp_path):
  _touch_split(tmp_path / 'split', [f'database/{_name(0, 0)}', 'database/IMG_0001.jpg'],
               [f'queries/{_name(1, 1)}'])
  with pytest.raises(benchmarks.MalformedDatasetError, match='database/IMG_0001.jpg'):
    benchmarks.load_benchmark(str(tmp_path / 'split'))


def test_order_is_sorted_and_recursive(tmp_path):
  database = [f'database/b/{_name(5, 0)}', f'database/{_name(3, 0)}', f'database/a/{_name(9, 0)}']
  _touch_split(tmp_path / 'split', database, [f'queries/{_name(0, 0)}'])
  bench = benchmarks.load_benchmark(str(tmp_path / 'split'), use_cache=False)
  assert bench.database_paths == sorted(database)
  assert bench.positives[0].tolist() == [0, 1, 2]  # 9, 3 and 5 m away.


def test_cache_is_written_used_and_falls_back(tmp_path, monkeypatch):
  split_dir = tmp_path / 'split'
  _touch_split(split_dir, [f'database/{_name(0, 0)}', f'database/{_name(30, 0)}'],
               [f'queries/{_name(1, 0)}'])
  first = benchmarks.load_benchmark(str(split_dir))
  cached = list((split_dir / '.vpr_jax_cache').glob('positives_*.npz'))
  assert len(cached) == 1
  # A cached answer is used as is (here: tampered with, to see that it is read).
  np.savez_compressed(cached[0], flat=np.array([1]), offsets=np.array([0, 1]))
  assert benchmarks.load_benchmark(str(split_dir)).positives[0].tolist() == [1]
  assert benchmarks.load_benchmark(str(split_dir), use_cache=False).positives[0].tolist() == [0]
  # Another radius is another key.
  assert benchmarks.load_benchmark(str(split_dir), radius_m=40.0).positives[0].tolist() == [0, 1]
  assert first.positives[0].tolist() == [0]

  # An unwritable split folder: the user cache directory is used instead.
  other = tmp_path / 'other'
  _touch_split(other, [f'database/{_name(0, 0)}'], [f'queries/{_name(1, 0)}'])
  (other / '.vpr_jax_cache').write_text('a file where the cache folder would go')
  monkeypatch.setenv(positives_cache.CACHE_DIR_ENV, str(tmp_path / 'user_cache'))
  benchmarks.load_benchmark(str(other))
  assert len(list((tmp_path / 'user_cache' / 'benchmarks').glob('positives_*.npz'))) == 1


def test_precomputed_lists_are_checked(tmp_path):
  split_dir = tmp_path / 'split'
  database, queries = [f'database/{_name(0, 0)}'], [f'queries/{_name(1, 0)}']
  _touch_split(split_dir, database, queries)
  np.save(split_dir / 'x_dbImages.npy', np.array(database + ['database/missing.jpg']))
  np.save(split_dir / 'x_qImages.npy', np.array(queries))
  gt = np.empty(1, dtype=object)
  gt[:] = [[0]]
  np.save(split_dir / 'x_gt.npy', gt, allow_pickle=True)
  with pytest.raises(benchmarks.MalformedDatasetError, match='missing.jpg'):
    benchmarks.load_benchmark(str(split_dir))
  np.save(split_dir / 'x_dbImages.npy', np.array(database))
  gt[:] = [[3]]
  np.save(split_dir / 'x_gt.npy', gt, allow_pickle=True)
  with pytest.raises(benchmarks.MalformedDatasetError, match='x_gt.npy'):
    benchmarks.load_benchmark(str(split_dir))
  # Ignoring the lists falls back to the names.
  bench = benchmarks.load_benchmark(str(split_dir), use_precomputed=False, use_cache=False)
  assert bench.positives[0].tolist() == [0] and bench.source == 'names'


# The real SF-XS mini set (40 real images, 20 places seen in two years).

REAL_SF_XS_MINI = (pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'real'
                   / 'sf_xs_mini')


@pytest.fixture
def real_sf_xs_mini(tmp_path):
  """A data root whose sf_xs/val is a copy of the real mini set (the original is read-only)."""
  if not (REAL_SF_XS_MINI / 'database').is_dir():
    pytest.skip(f'the real SF-XS mini set is not at {REAL_SF_XS_MINI}')
  shutil.copytree(REAL_SF_XS_MINI, tmp_path / 'root' / 'sf_xs' / 'val')
  return tmp_path / 'root'


def test_real_sf_xs_mini_through_the_registry(real_sf_xs_mini):
  bench = benchmarks.load_benchmark('sf_xs_val', str(real_sf_xs_mini))
  assert (bench.num_database, bench.num_queries) == (20, 20)
  assert bench.num_without_positives == 0 and bench.num_queries_in_database == 0
  # Brute force over the names: each query has exactly one database image within 25 m, 0-7 m
  # away, from another panorama taken no later (one pair shares the month 201412).
  distances = np.linalg.norm(bench.queries_utm[:, None] - bench.database_utm[None], axis=-1)
  for q, positives in enumerate(bench.positives):
    assert positives.tolist() == np.flatnonzero(distances[q] <= 25.0).tolist()
    assert len(positives) == 1 and distances[q, positives[0]] <= 7.0
    database_fields = bench.database_paths[positives[0]].split('@')
    query_fields = bench.queries_paths[q].split('@')
    assert database_fields[7] != query_fields[7] and database_fields[13] <= query_fields[13]
  assert sorted(int(p[0]) for p in bench.positives) == list(range(20))
  again = benchmarks.load_benchmark('sf_xs_val', str(real_sf_xs_mini))
  assert [p.tolist() for p in again.positives] == [p.tolist() for p in bench.positives]


# Mistakes that give one line, not a traceback or wrong numbers.


def test_utm_out_of_range_is_named(tmp_path):
  # 1e308 is finite, but its squared distances overflow the k-d tree.
  bad = '@1e308@4177604.74@10@S@037.74468@-122.50057@pano@@0@@@@201104@@.jpg'
  _touch_split(tmp_path / 'split', [f'database/{_name(0, 0)}', f'database/{bad}'],
               [f'queries/{_name(1, 1)}'])
  with pytest.raises(benchmarks.MalformedDatasetError,
                     match=r"UTM_east '1e308' in the file name 'database/@1e308.*finite number of "
                           r"metres within \+-1e\+08"):
    benchmarks.load_benchmark(str(tmp_path / 'split'))
  with pytest.raises(ValueError, match='UTM_north'):
    benchmarks.parse_utm('@0.0@-2e8@10@S@0@0@p@@0@@@@201104@@.jpg')


@pytest.mark.parametrize('radius', [-5.0, float('nan'), float('inf'), 'far'])
def test_bad_radius_is_refused(tmp_path, radius):
  _touch_split(tmp_path / 'split', [f'database/{_name(0, 0)}'], [f'queries/{_name(1, 1)}'])
  pattern = (r'positive radius \(data.positive_radius_m\) is .*: expected a finite number of '
             r'metres >= 0')
  with pytest.raises(benchmarks.InvalidRadiusError, match=pattern):
    benchmarks.load_benchmark(str(tmp_path / 'split'), radius_m=radius)
  with pytest.raises(benchmarks.InvalidRadiusError, match=pattern):
    benchmarks.compute_positives(np.zeros((1, 2)), np.zeros((1, 2)), radius)
  # Printed as one line by the entry points, as every user error.
  assert issubclass(benchmarks.InvalidRadiusError, errors.UserError)


def test_zero_radius_is_allowed():
  positives = benchmarks.compute_positives(np.array([[0.0, 0.0], [1.0, 0.0]]),
                                           np.array([[0.0, 0.0]]), 0.0)
  assert positives[0].tolist() == [0]


def test_queries_that_are_database_images_are_counted_and_warned(tmp_path, caplog):
  shared = [_name(0, 0), _name(50, 0)]
  _touch_split(tmp_path / 'split', [f'database/{n}' for n in shared + [_name(100, 0)]],
               [f'queries/{n}' for n in shared + [_name(200, 0)]])
  with caplog.at_level(logging.WARNING):
    bench = benchmarks.load_benchmark(str(tmp_path / 'split'), use_cache=False)
  assert bench.num_queries_in_database == 2
  assert bench.summary()['num_queries_in_database'] == 2
  assert [p.tolist() for p in bench.positives] == [[0], [1], []]  # Still evaluated as queries.
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('2 of 3 queries have the file name of a database image' in w for w in warnings), (
      warnings)
