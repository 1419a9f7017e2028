"""Tests of vpr_jax.evaluation and vpr_jax.visualize: Recall@N, search, embedding, files, sheets."""

import csv
import dataclasses
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vpr_jax.evaluation import benchmark_eval

from vpr_jax.evaluation import descriptors

from vpr_jax.evaluation import outputs

from vpr_jax.evaluation import search
from vpr_jax import visualize


def brute_force_recall(predictions, positives, ns):
  """The family's per-query loop, written plainly: a hit within the first N predictions."""
  recall = {}
  for n in ns:
    count = 0
    for q in range(len(predictions)):
      if any(int(p) in set(int(x) for x in positives[q]) for p in predictions[q][:n]):
        count += 1
    recall[n] = 100.0 * count / len(predictions)
  return recall


@dataclasses.dataclass
class FakeBenchmark:
  name: str
  root: str
  database_paths: list
  queries_paths: list
  database_utm: np.ndarray
  queries_utm: np.ndarray
  positives: list


def random_case(rng, num_queries, num_database, k, empty_share=0.2):
  predictions = np.stack([rng.permutation(num_database)[:k] for _ in range(num_queries)])
  positives = []
  for _ in range(num_queries):
    if rng.random() < empty_share:
      positives.append(np.zeros(0, np.int64))
    else:
      positives.append(rng.choice(num_database, size=rng.integers(1, 6), replace=False))
  return predictions, positives


# ------------------------------------------------------------------------------------------------
# Recall@N.

@pytest.mark.parametrize('seed,num_database', [(0, 200), (1, 40), (2, 30)])
def test_recall_matches_per_query_loop(seed, num_database):
  rng = np.random.default_rng(seed)
  predictions, positives = random_case(rng, num_queries=300, num_database=num_database, k=25)
  # Make hits frequent enough that every N differs.
  for q in range(0, 300, 3):
    if positives[q].size:
      predictions[q, rng.integers(0, 25)] = positives[q][0]
  ns = search.RECALL_NS
  got = search.recall_at_n(predictions, positives, ns, num_database=num_database)
  want = brute_force_recall(predictions, positives, ns)
  assert list(got) == list(ns)
  for n in ns:
    assert got[n] == pytest.approx(want[n], abs=1e-9)
  assert got[1] < got[25]


def test_recall_hand_made_case():
  # 5 queries, database of 10, top-4 predictions.
  predictions = np.array([
      [3, 1, 2, 0],   # positive 3 at rank 1
      [5, 6, 7, 8],   # positive 8 at rank 4
      [0, 1, 2, 3],   # positives 9: never found
      [4, 2, 9, 1],   # no positives at all (still in the denominator)
      [9, 7, 4, 5],   # positives {7, 5}: first at rank 2
  ])
  positives = [np.array([3]), np.array([8]), np.array([9]), np.array([], np.int64),
               np.array([7, 5])]
  recall = search.recall_at_n(predictions, positives, ns=(1, 2, 3, 4))
  assert recall == {1: 20.0, 2: 40.0, 3: 40.0, 4: 60.0}


def test_recall_small_database_uses_all_predictions(caplog):
  # Database of 3 images: R@5 .. R@25 are R@3.
  predictions = np.array([[2, 0, 1], [0, 1, 2], [1, 2, 0], [0, 2, 1]])
  positives = [np.array([1]), np.array([0]), np.array([], np.int64), np.array([2])]
  with caplog.at_level(logging.WARNING):
    recall = search.recall_at_n(predictions, positives, num_database=3)
  assert recall == {1: 25.0, 5: 75.0, 10: 75.0, 15: 75.0, 20: 75.0, 25: 75.0}
  assert 'Only 3 predictions per query' in caplog.text
  assert brute_force_recall(predictions, positives, (1, 3, 25)) == {1: 25.0, 3: 75.0, 25: 75.0}


def test_recall_without_any_positive_is_zero_and_warns(caplog):
  predictions = np.tile(np.arange(25), (4, 1))
  positives = [np.zeros(0, np.int64)] * 4
  with caplog.at_level(logging.WARNING):
    recall = search.recall_at_n(predictions, positives)
  assert all(v == 0.0 for v in recall.values())
  assert 'No query has a positive' in caplog.text


def test_recall_rejects_bad_input():
  with pytest.raises(ValueError, match='needs 25 predictions'):
    search.recall_at_n(np.zeros((2, 5), np.int64), [np.array([0])] * 2, num_database=100)
  with pytest.raises(ValueError, match='2 entries for 3 queries'):
    search.recall_at_n(np.zeros((3, 25), np.int64), [np.array([0])] * 2)
  with pytest.raises(ValueError, match='negative'):
    search.recall_at_n(np.zeros((1, 25), np.int64), [np.array([-1])])


def test_hit_matrix_never_matches_missing_predictions():
  # FAISS marks missing neighbours with -1; with pair encoding they must not alias other pairs.
  predictions = np.array([[0, -1], [4, -1]])
  positives = [np.array([0]), np.array([4, 9])]
  hits = search.hit_matrix(predictions, positives)
  np.testing.assert_array_equal(hits, [[True, False], [True, False]])


# ------------------------------------------------------------------------------------------------
# Search.

def test_search_matches_numpy_l2_argsort():
  rng = np.random.default_rng(0)
  database = rng.normal(size=(300, 16)).astype(np.float32) * rng.uniform(0.5, 3, (300, 1))
  queries = rng.normal(size=(40, 16)).astype(np.float32)
  distances, predictions = search.search(database, queries, k=25)
  assert predictions.dtype == np.int64 and distances.dtype == np.float32
  assert predictions.shape == distances.shape == (40, 25)
  db = database / np.linalg.norm(database, axis=1, keepdims=True)
  qs = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  l2 = ((qs[:, None, :].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
  np.testing.assert_array_equal(predictions, np.argsort(l2, axis=1)[:, :25])
  np.testing.assert_allclose(distances, np.sort(l2, axis=1)[:, :25], atol=1e-5)
  # Same ranking as inner product on the normalised descriptors.
  np.testing.assert_array_equal(predictions, np.argsort(-qs @ db.T, axis=1)[:, :25])


def test_search_clamps_k_and_rejects_bad_descriptors():
  rng = np.random.default_rng(1)
  distances, predictions = search.search(rng.normal(size=(7, 4)), rng.normal(size=(3, 4)), 25)
  assert predictions.shape == (3, 7)
  assert sorted(predictions[0].tolist()) == list(range(7))
  with pytest.raises(ValueError, match='NaN'):
    search.search(np.full((3, 4), np.nan), np.ones((2, 4)), 2)
  with pytest.raises(ValueError, match='Descriptor sizes differ'):
    search.search(np.ones((3, 4)), np.ones((2, 5)), 2)


# ------------------------------------------------------------------------------------------------
# Embedding with a stand-in model.

class StandInModel(nn.Module):
  """Mean colour per image quarter through a Dense layer; BatchNorm to exercise batch_stats."""
  dim: int = 8

  @nn.compact
  def __call__(self, images, train=False):
    x = images.astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    x = x.reshape(b, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4)).reshape(b, -1)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dense(self.dim)(x)
    return {'descriptors': x / jnp.linalg.norm(x, axis=-1, keepdims=True)}


def test_embed_fn_sharded_matches_apply_and_is_cached():
  model = StandInModel()
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(0), images)
  mesh = descriptors.eval_mesh(16)
  assert mesh.devices.size == jax.local_device_count()
  embed = descriptors.make_embed_fn(model, mesh)
  assert descriptors.make_embed_fn(model, mesh) is embed
  placed = descriptors.replicate(variables, mesh)
  out = embed(placed, images)
  assert out.dtype == jnp.float32 and out.shape == (16, 8)
  assert len(out.sharding.device_set) == mesh.devices.size
  want = model.apply(variables, images, train=False)['descriptors']
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
  embed(placed, images[::-1].copy())
  assert embed._cache_size() == 1  # pylint: disable=protected-access
  # A batch that does not divide by the devices falls back to one device.
  assert jax.local_device_count() == 8  # tests/conftest.py
  assert descriptors.eval_mesh(6).devices.size == 1


# ------------------------------------------------------------------------------------------------
# Table.

def test_format_recall_table_looks_like_the_seed():
  recall = {1: 76.27, 5: 83.5, 10: 86.6, 15: 88.43, 20: 89.42, 25: 90.0}
  table = outputs.format_recall_table('sf_xs_val', recall)
  expected = '\n'.join([
      '+----------------------------------------------------------+',
      '|                 Performance on sf_xs_val                 |',
      '+----------+-------+-------+-------+-------+-------+-------+',
      '|    K     |   1   |   5   |   10  |   15  |   20  |   25  |',
      '+----------+-------+-------+-------+-------+-------+-------+',
      '| Recall@K | 76.27 | 83.50 | 86.60 | 88.43 | 89.42 | 90.00 |',
      '+----------+-------+-------+-------+-------+-------+-------+',
  ])
  assert table == expected
  # A long name widens the table instead of breaking the frame.
  lines = outputs.format_recall_table('a_very_long_dataset_name_' * 3, {1: 1.0}).splitlines()
  assert len({len(line) for line in lines}) == 1


# ------------------------------------------------------------------------------------------------
# Result files and sheets.

def write_images(folder, names, seed):
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for name in names:
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
        os.path.join(folder, name))


@pytest.fixture
def small_result(tmp_path):
  """An EvalResult on a 6-image database / 4-query set with hand-placed UTM coordinates."""
  database_paths = [f'database/@{100 + 10 * i}@{200}@10@S@@.jpg' for i in range(6)]
  queries_paths = [f'queries/@{100 + 20 * i}@{200}@10@S@@.jpg' for i in range(3)] + [
      'queries/@900@900@10@S@@.jpg']
  write_images(tmp_path / 'database', [os.path.basename(p) for p in database_paths], 0)
  write_images(tmp_path / 'queries', [os.path.basename(p) for p in queries_paths], 1)
  database_utm = np.array([[100.0 + 10 * i, 200.0] for i in range(6)])
  queries_utm = np.array([[100.0 + 20 * i, 200.0] for i in range(3)] + [[900.0, 900.0]])
  distances_m = np.linalg.norm(queries_utm[:, None] - database_utm[None], axis=-1)
  positives = [np.flatnonzero(d <= 25.0) for d in distances_m]
  benchmark = FakeBenchmark('tiny', str(tmp_path), database_paths, queries_paths, database_utm,
                            queries_utm, positives)
  rng = np.random.default_rng(0)
  database = rng.normal(size=(6, 8)).astype(np.float32)
  queries = rng.normal(size=(4, 8)).astype(np.float32)
  distances, predictions = search.search(database, queries, 25)
  result = benchmark_eval.EvalResult(
      dataset='tiny', num_database=6, num_queries=4, queries_without_positives=1,
      recall=search.recall_at_n(predictions, positives, num_database=6),
      database_descriptors=database, query_descriptors=queries, predictions=predictions,
      distances=distances, correct=search.hit_matrix(predictions, positives),
      benchmark=benchmark)
  return result


def test_write_json_one_and_several(small_result, tmp_path):
  path = tmp_path / 'out' / 'results.json'
  outputs.write_json(str(path), [small_result], {'checkpoint': 'ckpt', 'step': 3})
  record = json.loads(path.read_text())
  assert {'dataset', 'num_database', 'num_queries', 'queries_without_positives',
          'recall', 'checkpoint', 'step'} <= set(record)
  assert record['dataset'] == 'tiny' and record['num_database'] == 6
  assert record['num_queries'] == 4 and record['queries_without_positives'] == 1
  assert list(record['recall']) == ['1', '5', '10', '15', '20', '25']
  assert record['recall']['1'] == pytest.approx(small_result.recall[1])
  outputs.write_json(str(path), [small_result, small_result])
  assert [r['dataset'] for r in json.loads(path.read_text())] == ['tiny', 'tiny']
  assert os.listdir(path.parent) == ['results.json']  # no temporary files left


def test_save_descriptors(small_result, tmp_path):
  path = tmp_path / 'desc.npz'
  outputs.save_descriptors(str(path), small_result)
  with np.load(path) as data:  # allow_pickle=False: strings must be unicode arrays
    assert data['database'].dtype == np.float32 and data['database'].shape == (6, 8)
    assert data['queries'].dtype == np.float32 and data['queries'].shape == (4, 8)
    np.testing.assert_array_equal(data['queries'], small_result.query_descriptors)
    assert data['database_paths'].dtype.kind == 'U'
    assert data['database_paths'].tolist() == small_result.benchmark.database_paths
    assert data['queries_paths'].tolist() == small_result.benchmark.queries_paths
  assert outputs.per_dataset_path('d/x.npz', 'sf_xs/val', 2) == 'd/x_sf_xs_val.npz'
  assert outputs.per_dataset_path('d/x.npz', 'sf_xs_val', 1) == 'd/x.npz'


def test_save_predictions_csv(small_result, tmp_path):
  path = tmp_path / 'pred.csv'
  outputs.save_predictions(str(path), [small_result])
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(outputs.PREDICTION_COLUMNS)
  assert len(rows) == 4 * 6  # every query, k clamped to the database size
  benchmark = small_result.benchmark
  for row in rows:
    q, d = int(row['query_index']), int(row['database_index'])
    assert row['query'] == benchmark.queries_paths[q]
    assert row['database'] == benchmark.database_paths[d]
    assert small_result.predictions[q, int(row['rank']) - 1] == d
    metres = np.linalg.norm(benchmark.queries_utm[q] - benchmark.database_utm[d])
    assert float(row['distance_m']) == pytest.approx(metres, abs=0.01)
    assert row['correct'] == str(int(metres <= 25.0))


@pytest.mark.parametrize('only_failures', [False, True])
def test_visualize_writes_sheets_with_border_colours(small_result, tmp_path, only_failures):
  tile = (40, 50)
  out = tmp_path / 'sheets'
  written = visualize.visualize_predictions(small_result, str(out), 3, top_k=5,
                                            only_failures=only_failures, tile_size=tile)
  selected = visualize.select_queries(small_result.correct, 3, only_failures)
  assert len(written) == len(selected) == len(os.listdir(out))
  if only_failures:
    assert not small_result.correct[selected, 0].any()
  for path, q in zip(written, selected):
    image = np.asarray(Image.open(path).convert('RGB'))
    left, top, _, _ = visualize.tile_box(0, tile)
    assert tuple(image[top + 1, left + 1]) == visualize.QUERY_COLOR
    for rank in range(5):
      left, top, right, bottom = visualize.tile_box(rank + 1, tile)
      want = (visualize.POSITIVE_COLOR if small_result.correct[q, rank]
              else visualize.NEGATIVE_COLOR)
      assert tuple(image[top + 1, left + 1]) == want
      assert tuple(image[bottom - 2, right - 2]) == want
  # A sheet with both colours exists among the queries near the database.
  assert small_result.correct[:3].any() and (~small_result.correct[:3]).any()


# ------------------------------------------------------------------------------------------------
# Through the real input pipeline and benchmark loader.

def test_compute_descriptors_keeps_path_order_and_drops_padding(tmp_path):
  from vpr_jax.data.imaging import images as images_lib
  names = [f'{i:02d}.jpg' for i in range(11)]
  write_images(tmp_path, names, seed=3)
  paths = names[::-1]  # not the sorted order
  model = StandInModel()
  variables = model.init(jax.random.PRNGKey(1), np.zeros((1, 16, 16, 3), np.uint8))
  got = descriptors.compute_descriptors(model, variables, str(tmp_path), paths, (16, 16),
                                       batch_size=8)  # 8 devices, 2 batches, 5 padded rows
  assert got.shape == (11, 8) and got.dtype == np.float32
  pixels = np.stack([images_lib.load_resized_array(tmp_path / p, (16, 16)) for p in paths])
  want = model.apply(variables, pixels, train=False)['descriptors']
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


def test_recall_known_by_construction(tmp_path, caplog):
  """Queries are byte copies of database images: R@1 = 100 - share of queries without positive."""
  from vpr_jax.data.evaluation import benchmarks
  split = tmp_path / 'copies'
  rng = np.random.default_rng(7)
  for sub in ('database', 'queries'):
    (split / sub).mkdir(parents=True)
  database_files = []
  for i in range(6):  # 100 m apart: each query's only positive is its own copy
    name = f'@{500000 + 100 * i:.2f}@{4180000:.2f}@10@S@37.7@-122.4@@.jpg'
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
        split / 'database' / name, quality=95)
    database_files.append(name)
  for i in range(4):
    (split / 'queries' / database_files[i]).write_bytes(
        (split / 'database' / database_files[i]).read_bytes())
  # A copy of database image 5 taken 9 km away: its top-1 is that image, which is not a positive.
  far = f'@{509000:.2f}@{4189000:.2f}@10@S@37.8@-122.3@@.jpg'
  (split / 'queries' / far).write_bytes((split / 'database' / database_files[5]).read_bytes())
  benchmark = benchmarks.load_benchmark(str(split), radius_m=25.0, use_cache=False)
  assert benchmark.num_without_positives == 1

  model = StandInModel()
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.uint8))
  with caplog.at_level(logging.WARNING):
    result = benchmark_eval.evaluate_dataset(model, variables, benchmark, (16, 16), batch_size=8)
  assert result.num_database == 6 and result.num_queries == 5
  assert result.queries_without_positives == 1
  assert result.recall == {n: 80.0 for n in search.RECALL_NS}
  assert result.predictions.shape == (5, 6)  # k clamped to the database size
  # Each query's nearest database image is its byte copy, at descriptor distance ~0.
  copies = [benchmark.database_paths.index(p.replace('queries/', 'database/'))
            for p in benchmark.queries_paths if p != f'queries/{far}']
  top1 = [result.predictions[q, 0] for q, p in enumerate(benchmark.queries_paths)
          if p != f'queries/{far}']
  assert top1 == copies
  assert np.all(result.distances[:, 0] < 1e-6)
  assert 'Only 6 predictions per query' in caplog.text
