"""The field's benchmarks by name: the gsv-cities family's list files and the downloader layout.

The oracle is the family's own code, written out here: its loaders (amaralibey/gsv-cities,
`dataloaders/val/*Dataset.py`: images `DATASET_ROOT + listed path`, database then queries, MSLS's
queries `qImages[qIdx]` with positives `pIdx`) and `get_validation_recalls`
(`utils/validation.py`), fed with the same descriptors and the family's ground truth read by
numpy itself. The list files are the real ones (`../shared/data/family_lists`).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import faiss
import jax
import numpy as np
from PIL import Image
import pytest

from tests import test_training
from vpr_jax import errors
from vpr_jax.checkpoints import orbax_states
from vpr_jax.configs import default
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.evaluation import catalog
from vpr_jax.data.evaluation import registry
from vpr_jax.data.tfds import benchmark_set
from vpr_jax.data.tfds import records
from vpr_jax.evaluation import evaluate
from vpr_jax.evaluation import search
from vpr_jax.models import vpr_model
from vpr_jax.training import setup

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILY_LISTS = REPO_ROOT.parent / 'shared' / 'data' / 'family_lists'
K_VALUES = [1, 5, 10, 15, 20, 25]


# ------------------------------------------------------------------------------------------------
# The family's code (gsv-cities), as the oracle.


def family_get_validation_recalls(r_list, q_list, k_values, gt):
  """gsv-cities utils/validation.py get_validation_recalls (CPU index, no printing).

  np.in1d (deprecated in numpy 2) is np.isin with the same semantics.
  """
  faiss_index = faiss.IndexFlatL2(r_list.shape[1])
  faiss_index.add(r_list)
  _, predictions = faiss_index.search(q_list, max(k_values))
  correct_at_k = np.zeros(len(k_values))
  for q_idx, pred in enumerate(predictions):
    for i, n in enumerate(k_values):
      if np.any(np.isin(pred[:n], gt[q_idx])):
        correct_at_k[i:] += 1
        break
  correct_at_k = correct_at_k / len(predictions)
  return dict(zip(k_values, correct_at_k))


def family_dataset(gt_root, folder, prefix, msls=False):
  """What the family's dataset classes hold: (images in order, num_references, ground truth)."""
  base = os.path.join(gt_root, folder, prefix)
  db_images = np.load(base + '_dbImages.npy')
  q_images = np.load(base + '_qImages.npy')
  if msls:
    q_images = q_images[np.load(base + '_qIdx.npy')]
    ground_truth = np.load(base + '_pIdx.npy', allow_pickle=True)
  else:
    ground_truth = np.load(base + '_gt.npy', allow_pickle=True)
  return list(np.concatenate((db_images, q_images))), len(db_images), ground_truth


def assert_same_recall(ours, family, num_queries):
  for k in K_VALUES:
    # Same hit counts; ours is a percent, the family's a fraction.
    assert round(ours[k] * num_queries / 100) == round(family[k] * num_queries), (k, ours, family)
    assert ours[k] == pytest.approx(100 * family[k], abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Layouts.


def copy_real_lists(gt_root, folder, files):
  (gt_root / folder).mkdir(parents=True, exist_ok=True)
  for name in files:
    shutil.copy(FAMILY_LISTS / folder / name, gt_root / folder / name)


def write_images(images_dir, paths, seed=0, like=None):
  """8x8 JPEGs at the listed paths; `like[i]`: make image i a noisy copy of image like[i]."""
  rng = np.random.default_rng(seed)
  pixels = {}
  for i, path in enumerate(paths):
    if like is not None and like.get(i) in pixels:
      base = pixels[like[i]].astype(np.int16) + rng.integers(-20, 21, (8, 8, 3))
      image = np.clip(base, 0, 255).astype(np.uint8)
    else:
      image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pixels[i] = image
    target = images_dir / path
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(target, quality=95)


def correlated_descriptors(num_database, positives, seed=0, dim=32):
  """Normalised descriptors where a query lies near one of its positives (varied ranks)."""
  rng = np.random.default_rng(seed)
  database = rng.normal(size=(num_database, dim)).astype(np.float32)
  queries = rng.normal(size=(len(positives), dim)).astype(np.float32)
  for q, pos in enumerate(positives):
    if len(pos):
      queries[q] = database[int(rng.choice(pos))] + rng.uniform(0.2, 2.0) * queries[q]
  normalise = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return normalise(database), normalise(queries)


def tiny_config():
  config = default.get_config()
  config.image_size = (32, 32)
  config.model.dtype = 'float32'
  config.model.mixvpr_out_channels = 16
  config.model.mixvpr_mix_depth = 1
  # ResNet-18 cut after layer2 (the demo's): 1,214 SPED images embed in seconds on a CPU.
  config.model.layers_to_crop = (3, 4)
  config.data.eval_batch_size = 128
  config.data.num_workers = 0
  return config


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  config = tiny_config()
  model = vpr_model.build_model(config)
  variables = vpr_model.init_variables(model, jax.random.PRNGKey(0))
  out = tmp_path_factory.mktemp('ckpt') / 'tiny'
  orbax_states.save_inference_checkpoint(str(out), config, variables)
  return str(out)


def test_the_real_family_lists_are_there():
  # CI has ../shared beside the clone: their absence is a failure, not a skip.
  for folder, name in (('SPED', 'SPED_gt.npy'), ('CrossSeason', 'CrossSeason_gt.npy'),
                       ('msls_val', 'msls_val_pIdx.npy')):
    assert (FAMILY_LISTS / folder / name).is_file(), FAMILY_LISTS


# ------------------------------------------------------------------------------------------------
# Real lists, every format, against the family's recall (descriptors given).


@pytest.mark.parametrize('name, folder, prefix', [
    ('sped', 'SPED', 'SPED'),                  # gt: int64 [607, 1]
    ('crossseason', 'CrossSeason', 'CrossSeason'),  # gt: object array of int64 arrays
])
def test_real_lists_give_the_family_recall(name, folder, prefix, tmp_path):
  gt_root = tmp_path / 'ground_truth'
  copy_real_lists(gt_root, folder, [f'{prefix}_{k}.npy' for k in ('dbImages', 'qImages', 'gt')])
  spec = registry.REGISTRY[name]
  (tmp_path / spec.folder).mkdir()
  bench = benchmarks.load_benchmark(name, str(tmp_path), check_files=False)
  images, num_references, ground_truth = family_dataset(gt_root, folder, prefix)
  assert bench.image_paths == images and bench.num_database == num_references
  assert bench.root == str(tmp_path / spec.folder) and bench.radius_m is None

  database, queries = correlated_descriptors(bench.num_database, bench.positives)
  _, predictions = search.search(database, queries, max(K_VALUES))
  ours = search.recall_at_n(predictions, bench.positives, K_VALUES, bench.num_database)
  family = family_get_validation_recalls(database, queries, K_VALUES, ground_truth)
  assert_same_recall(ours, family, bench.num_queries)
  assert 0 < ours[1] < ours[25]  # a test that can fail: neither all hits nor all misses


def test_real_msls_lists_give_the_family_queries_and_recall(tmp_path):
  gt_root = tmp_path / 'ground_truth'
  copy_real_lists(gt_root, 'msls_val', ['msls_val_qImages.npy', 'msls_val_qIdx.npy',
                                        'msls_val_pIdx.npy'])
  # The stored copy lacks msls_val_dbImages.npy: a database list as long as pIdx needs.
  p_idx = np.load(FAMILY_LISTS / 'msls_val' / 'msls_val_pIdx.npy', allow_pickle=True)
  num_database = max(int(np.max(p)) for p in p_idx if len(p)) + 1
  np.save(gt_root / 'msls_val' / 'msls_val_dbImages.npy',
          np.array([f'train_val/cph/database/images/{i:06d}.jpg' for i in range(num_database)]))
  (tmp_path / 'msls_val').mkdir()
  bench = benchmarks.load_benchmark('msls_val', str(tmp_path), check_files=False)
  images, num_references, ground_truth = family_dataset(gt_root, 'msls_val', 'msls_val',
                                                        msls=True)
  assert bench.image_paths == images and bench.num_database == num_references
  assert bench.num_queries == 740  # qImages[qIdx]: 740 of the 747 listed queries

  database, queries = correlated_descriptors(bench.num_database, bench.positives, dim=16)
  _, predictions = search.search(database, queries, max(K_VALUES))
  ours = search.recall_at_n(predictions, bench.positives, K_VALUES, bench.num_database)
  family = family_get_validation_recalls(database, queries, K_VALUES, ground_truth)
  assert_same_recall(ours, family, bench.num_queries)
  assert 0 < ours[1] < ours[25]


# ------------------------------------------------------------------------------------------------
# End to end: images at the listed paths, evaluated by name.


def _sped_root(tmp_path):
  """<root>/sped/<listed paths> (8x8 images) and <root>/ground_truth/SPED/ (the real lists)."""
  copy_real_lists(tmp_path / 'ground_truth', 'SPED',
                  ['SPED_dbImages.npy', 'SPED_qImages.npy', 'SPED_gt.npy'])
  db = np.load(FAMILY_LISTS / 'SPED' / 'SPED_dbImages.npy')
  queries = np.load(FAMILY_LISTS / 'SPED' / 'SPED_qImages.npy')
  gt = np.load(FAMILY_LISTS / 'SPED' / 'SPED_gt.npy')
  like = {len(db) + q: int(gt[q][0]) for q in range(len(queries)) if q % 2 == 0}
  write_images(tmp_path / 'sped', list(db) + list(queries), like=like)


def _msls_root(tmp_path):
  """A small MSLS val in the family's format (lists in the image folder): qIdx skips queries,
  pIdx is an object array, one query has no positive."""
  folder = tmp_path / 'msls_val'
  db = [f'train_val/sf/database/images/{i:03d}.jpg' for i in range(30)]
  q_images = [f'train_val/sf/query/images/q{i:03d}.jpg' for i in range(12)]
  q_idx = np.array([0, 2, 3, 5, 7, 8, 9, 11], np.int64)
  p_idx = np.empty(len(q_idx), dtype=object)
  for i, q in enumerate(q_idx):
    p_idx[i] = np.array([q, q + 12], np.int64) if i != 3 else np.zeros(0, np.int64)
  folder.mkdir()
  np.save(folder / 'msls_val_dbImages.npy', np.array(db))
  np.save(folder / 'msls_val_qImages.npy', np.array(q_images))
  np.save(folder / 'msls_val_qIdx.npy', q_idx)
  np.save(folder / 'msls_val_pIdx.npy', p_idx, allow_pickle=True)
  like = {30 + q: int(q) for q in q_idx}
  write_images(folder, db + q_images, seed=1, like=like)


def test_family_sets_evaluate_by_name_with_the_family_recall(checkpoint, tmp_path):
  _sped_root(tmp_path)
  _msls_root(tmp_path)
  results = evaluate.evaluate(checkpoint, ['sped', 'msls_val'], str(tmp_path), batch_size=128,
                              num_workers=0, output=str(tmp_path / 'out.json'),
                              print_fn=lambda line: None)
  assert [r.dataset for r in results] == ['sped', 'msls_val']
  sped, msls = results
  for result, (folder, prefix, is_msls) in ((sped, ('SPED', 'SPED', False)),
                                            (msls, ('msls_val', 'msls_val', True))):
    gt_root = tmp_path / 'ground_truth' if not is_msls else tmp_path
    images, num_references, ground_truth = family_dataset(gt_root, folder, prefix, is_msls)
    assert result.benchmark.image_paths == [str(p) for p in images]
    family = family_get_validation_recalls(result.database_descriptors,
                                           result.query_descriptors, K_VALUES, ground_truth)
    assert_same_recall(result.recall, family, result.num_queries)
  assert msls.num_queries == 8 and msls.queries_without_positives == 1
  assert sped.recall[1] > 10  # half the queries are noisy copies of their positive
  written = json.loads((tmp_path / 'out.json').read_text())
  assert [r['dataset'] for r in written] == ['sped', 'msls_val']


# ------------------------------------------------------------------------------------------------
# The downloader layout: 25 m positives, variant query folders.


def _name(east, north, tag=''):
  return f'@{east:.2f}@{north:.2f}@10@S@37.0@-122.0@{tag}@.jpg'


def _downloader_split(split_dir, database_dir='database', queries_dirs=('queries',)):
  database = [f'{database_dir}/{_name(10.0 * i, 0.0, "d")}' for i in range(12)]
  write_images(split_dir, database, seed=2)
  for j, queries_dir in enumerate(queries_dirs):
    # Query i at 10 i + 24 m east: within 25 m of database images i, i+1, i+2 (and i-?).
    queries = [f'{queries_dir}/{_name(10.0 * i + 24.0 + j * 0.5, 0.0, "q")}' for i in range(4)]
    write_images(split_dir, queries, seed=3 + j)


def test_downloader_sets_by_name_with_25_m_positives(tmp_path):
  _downloader_split(tmp_path / 'st_lucia' / 'images' / 'test')
  _downloader_split(tmp_path / 'svox' / 'images' / 'test', 'gallery',
                    ('queries_night', 'queries_snow'))
  _downloader_split(tmp_path / 'sf_xl' / 'processed' / 'test', 'database',
                    ('queries_night', 'queries_occlusion'))
  st_lucia = benchmarks.load_benchmark('st_lucia', str(tmp_path), use_cache=False)
  assert st_lucia.radius_m == 25.0 and st_lucia.num_database == 12
  east = st_lucia.database_utm[:, 0]
  for q, positives in enumerate(st_lucia.positives):
    expected = np.flatnonzero(np.abs(east - st_lucia.queries_utm[q, 0]) <= 25.0)
    np.testing.assert_array_equal(positives, expected)
  for name, prefix in (('svox_night', 'queries_night/'), ('svox_snow', 'queries_snow/'),
                       ('sf_xl_night', 'queries_night/'),
                       ('sf_xl_occlusion', 'queries_occlusion/')):
    bench = benchmarks.load_benchmark(name, str(tmp_path), use_cache=False)
    assert all(p.startswith(prefix) for p in bench.queries_paths), name
    assert bench.num_queries == 4 and bench.num_database == 12
  # Where the downloader's own scripts put a set: beside the list set's ref/ and query/.
  _downloader_split(tmp_path / 'sped' / 'images' / 'test')
  sped_vpr = benchmarks.load_benchmark('sped_vpr', str(tmp_path), use_cache=False)
  assert sped_vpr.root == str(tmp_path / 'sped' / 'images' / 'test')
  with pytest.raises(errors.DatasetNotFoundError, match=r"msls/images/val' nor .*msls/val' does "
                     r"not exist"):
    benchmarks.load_benchmark('msls', str(tmp_path))
  svox = benchmarks.load_benchmark('svox_night', str(tmp_path), use_cache=False)
  assert all(p.startswith('gallery/') for p in svox.database_paths)
  with pytest.raises(errors.DatasetNotFoundError, match='no queries_rain folder'):
    benchmarks.load_benchmark('svox_rain', str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Groups and the listing.


def test_all_available_skips_the_absent_sets_with_one_line_each(tmp_path):
  _downloader_split(tmp_path / 'st_lucia' / 'images' / 'test')
  _msls_root(tmp_path)
  (tmp_path / 'sped').mkdir()  # a folder without lists is not available
  lines = []
  names = catalog.expand_names(['all_available', 'st_lucia'], str(tmp_path), print_fn=lines.append)
  assert names == ['msls_val', 'st_lucia']
  assert len(lines) == len(registry.REGISTRY) - 2
  assert all(line.startswith('Skipping ') and '\n' not in line for line in lines)
  (sped_line,) = [line for line in lines if line.startswith('Skipping sped:')]
  assert 'SPED_dbImages.npy' in sped_line and str(tmp_path / 'ground_truth' / 'SPED') in sped_line
  assert catalog.expand_names(['family'], str(tmp_path)) == list(registry.GROUPS['family'])
  with pytest.raises(errors.DatasetNotFoundError, match='all_available: no registered'):
    catalog.expand_names(['all_available'], str(tmp_path / 'sped'), print_fn=lines.append)


def test_listing_names_every_set_its_folder_presence_and_size(tmp_path):
  _msls_root(tmp_path)
  lines = []
  rows = catalog.list_datasets(str(tmp_path), print_fn=lines.append)
  assert [r.name for r in rows] == registry.names()
  (msls_line,) = [line for line in lines if line.startswith('msls_val ')]
  assert 'present: 30 database + 8 queries' in msls_line
  (pitts_line,) = [line for line in lines if line.startswith('pitts30k_test ')]
  assert 'missing' in pitts_line and str(tmp_path / 'pittsburgh') in pitts_line
  assert 'pitts30k_test_gt.npy' in pitts_line
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS='cpu')
  for command in (['vpr_jax.datasets'], ['vpr_jax.eval', '--list_datasets']):
    run = subprocess.run([sys.executable, '-m', *command, f'--data-root={tmp_path}'],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == lines, command


# ------------------------------------------------------------------------------------------------
# Every registered list set, by name, with generated lists of each format in the ground-truth
# folder laid out as gsv-cities' datasets/.

GT_FORMATS = ('object_arrays', 'object_lists', 'int64_column')


def _write_family_lists(gt_root, images_root, spec, gt_format, num_database=20, num_queries=9):
  """Lists (in `gt_root/<list_dir>/`) and 8x8 images (in `images_root/<folder>/`) for `spec`."""
  folder = gt_root / spec.list_dir
  folder.mkdir(parents=True, exist_ok=True)
  database = [f'ref/{i:07d}.jpg' for i in range(num_database)]
  queries = [f'query/{i:07d}.jpg' for i in range(num_queries)]
  if gt_format == 'int64_column':  # SPED's and ESSEX's: one positive per query, [N, 1]
    gt = np.arange(num_queries, dtype=np.int64)[:, None] * 2
  else:
    gt = np.empty(num_queries, dtype=object)
    for q in range(num_queries):
      positives = [] if q == 4 else [2 * q, 2 * q + 1]  # query 4: no positive
      gt[q] = np.array(positives, np.int64) if gt_format == 'object_arrays' else positives
  np.save(folder / f'{spec.prefix}_dbImages.npy', np.array(database))
  if spec.kind == registry.MSLS_LISTS:
    extra = [f'query/x{i}.jpg' for i in range(3)]  # listed, not used (not in qIdx)
    np.save(folder / f'{spec.prefix}_qImages.npy', np.array(extra + queries))
    np.save(folder / f'{spec.prefix}_qIdx.npy', np.arange(3, 3 + num_queries))
    np.save(folder / f'{spec.prefix}_pIdx.npy', gt, allow_pickle=True)
  else:
    np.save(folder / f'{spec.prefix}_qImages.npy', np.array(queries))
    np.save(folder / f'{spec.prefix}_gt.npy', gt, allow_pickle=gt.dtype == object)
  first = {num_database + q: int(np.ravel(gt[q])[0]) for q in range(num_queries)
           if len(np.ravel(gt[q]))}
  write_images(images_root / spec.folder, database + queries, like=first)
  return gt


LIST_SPECS = [spec for spec in registry.REGISTRY.values() if spec.kind != registry.FOLDERS]


@pytest.mark.parametrize('index', range(len(LIST_SPECS)), ids=[s.name for s in LIST_SPECS])
def test_every_family_set_loads_by_name_with_the_family_recall(index, tmp_path):
  spec = LIST_SPECS[index]
  gt_format = GT_FORMATS[index % len(GT_FORMATS)]
  gt = _write_family_lists(tmp_path / 'gsv-cities' / 'datasets', tmp_path, spec, gt_format)
  bench = benchmarks.load_benchmark(spec.name, str(tmp_path),
                                    ground_truth_dir='gsv-cities/datasets')
  assert bench.root == str(tmp_path / spec.folder)
  images, num_references, ground_truth = family_dataset(
      tmp_path / 'gsv-cities' / 'datasets', spec.list_dir, spec.prefix,
      msls=spec.kind == registry.MSLS_LISTS)
  assert bench.image_paths == images and bench.num_database == num_references
  assert bench.num_without_positives == sum(len(np.ravel(g)) == 0 for g in gt)
  database, queries = correlated_descriptors(bench.num_database, bench.positives, seed=index)
  _, predictions = search.search(database, queries, max(K_VALUES))
  ours = search.recall_at_n(predictions, bench.positives, K_VALUES, bench.num_database)
  assert_same_recall(ours, family_get_validation_recalls(database, queries, K_VALUES,
                                                         ground_truth), bench.num_queries)


# ------------------------------------------------------------------------------------------------
# Mistakes: one line naming the file and what was expected; nothing cached.


def _sped_lists(tmp_path, where='ground_truth'):
  spec = registry.REGISTRY['sped']
  _write_family_lists(tmp_path / where, tmp_path, spec, 'int64_column')
  return tmp_path / where / 'SPED'


def _one_line_error(error_type, pattern, *args, **kwargs):
  with pytest.raises(error_type, match=pattern) as info:
    benchmarks.load_benchmark(*args, **kwargs)
  assert '\n' not in str(info.value)
  return str(info.value)


def test_mistakes_in_family_sets_are_one_line_naming_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv('VPR_JAX_CACHE_DIR', str(tmp_path / 'user_cache'))
  root = str(tmp_path)
  message = _one_line_error(errors.DatasetNotFoundError, 'does not exist', 'sped', root)
  assert str(tmp_path / 'sped') in message and 'SPED_gt.npy' in message

  lists = _sped_lists(tmp_path)
  assert benchmarks.load_benchmark('sped', root).num_queries == 9
  gt = (lists / 'SPED_gt.npy').read_bytes()

  (lists / 'SPED_gt.npy').unlink()
  _one_line_error(errors.DatasetNotFoundError, r'holds SPED_dbImages.npy, SPED_qImages.npy but '
                  r'not SPED_gt.npy', 'sped', root)
  (lists / 'SPED_gt.npy').write_bytes(gt[:len(gt) - 20])
  _one_line_error(errors.ArrayFileError, r"SPED_gt\.npy.*truncated", 'sped', root)
  np.save(lists / 'SPED_gt.npy', np.arange(8)[:, None])
  _one_line_error(errors.MalformedDatasetError, r"SPED_gt\.npy' has 8 entries but "
                  r".*SPED_qImages\.npy' gives 9 queries", 'sped', root)
  np.save(lists / 'SPED_gt.npy', np.full((9, 1), 20))
  _one_line_error(errors.MalformedDatasetError, r"SPED_gt\.npy': query 0 lists database index "
                  r"20; there are 20 database images", 'sped', root)
  np.save(lists / 'SPED_gt.npy', np.ones((9, 1)) * 0.5)
  _one_line_error(errors.MalformedDatasetError, 'expected per-query lists of database indices',
                  'sped', root)
  (lists / 'SPED_gt.npy').write_bytes(gt)
  (tmp_path / 'sped' / 'query' / '0000003.jpg').unlink()
  _one_line_error(errors.MalformedDatasetError, r"SPED_qImages\.npy' lists 'query/0000003.jpg', "
                  r"which is not in .*\(1 of 9 listed images are missing\)", 'sped', root)
  np.save(lists / 'SPED_qImages.npy', np.array(['../outside.jpg'] * 9))
  _one_line_error(errors.MalformedDatasetError, 'not a path inside the image folder', 'sped',
                  root)
  np.save(lists / 'SPED_qImages.npy', np.arange(9))
  _one_line_error(errors.MalformedDatasetError, 'expected a 1-D array of image paths', 'sped',
                  root)


def test_mistakes_in_msls_lists_name_the_file(tmp_path):
  spec = registry.REGISTRY['msls_val']
  _write_family_lists(tmp_path / 'ground_truth', tmp_path, spec, 'object_arrays')
  lists = tmp_path / 'ground_truth' / 'msls_val'
  np.save(lists / 'msls_val_qIdx.npy', np.array([0, 1, 12]))
  _one_line_error(errors.MalformedDatasetError, r"msls_val_qIdx\.npy': index 12 is outside the "
                  r"12 queries", 'msls_val', str(tmp_path))
  np.save(lists / 'msls_val_qIdx.npy', np.array([0, 1]))
  _one_line_error(errors.MalformedDatasetError, r"msls_val_pIdx\.npy' has 9 entries but "
                  r".*msls_val_qIdx\.npy' gives 2 queries", 'msls_val', str(tmp_path))


def test_a_failed_load_caches_nothing(tmp_path, monkeypatch):
  user_cache = tmp_path / 'user_cache'
  monkeypatch.setenv('VPR_JAX_CACHE_DIR', str(user_cache))
  split = tmp_path / 'st_lucia' / 'images' / 'test'
  _downloader_split(split)
  bad = split / 'queries' / 'no_coordinates.jpg'
  shutil.copy(next((split / 'queries').iterdir()), bad)
  _one_line_error(errors.MalformedDatasetError, 'no_coordinates.jpg', 'st_lucia', str(tmp_path))
  assert not (split / '.vpr_jax_cache').exists() and not user_cache.exists()
  bad.unlink()
  benchmarks.load_benchmark('st_lucia', str(tmp_path))
  assert len(list((split / '.vpr_jax_cache').iterdir())) == 1


# ------------------------------------------------------------------------------------------------
# Prepared benchmarks (python -m vpr_jax.prepare --benchmark) evaluate as their folders do.


def test_a_prepared_benchmark_gives_the_descriptors_of_its_folder(checkpoint, tmp_path):
  _msls_root(tmp_path)
  _downloader_split(tmp_path / 'st_lucia' / 'images' / 'test')
  root = str(tmp_path)
  built = {}
  for name in ('msls_val', 'st_lucia'):
    split = benchmarks.load_benchmark(name, root, use_cache=False)
    built[name] = benchmark_set.build_benchmark(
        split.root, str(tmp_path / 'tfds'), benchmark=split,
        name=benchmark_set.benchmark_name(split.root, 25.0, records.ImageEncoding(), split))
  quiet = lambda line: None
  from_folders = evaluate.evaluate(checkpoint, ['msls_val', 'st_lucia'], root, print_fn=quiet)
  # A built folder given as --dataset, and names read through data.prepared_benchmarks.
  from_built = evaluate.evaluate(checkpoint, [built['msls_val'],
                                             os.path.relpath(built['st_lucia'], root)], root,
                                 print_fn=quiet)
  config = orbax_states.load_for_eval(checkpoint)[0]
  config.data.prepared_benchmarks = (built['msls_val'], os.path.relpath(built['st_lucia'], root))
  by_name = catalog.load_benchmarks(['msls_val', 'st_lucia'], root, 25.0,
                                    prepared=config.data.prepared_benchmarks)
  assert all(bench.image_reader is not None for bench in by_name)
  from_config = evaluate.evaluate(checkpoint, ['msls_val', 'st_lucia'], root, config=config,
                                  print_fn=quiet)
  for folder, built_set, named in zip(from_folders, from_built, from_config):
    for other in (built_set, named):
      assert other.benchmark.image_reader is not None and other.benchmark.name == folder.dataset
      np.testing.assert_array_equal(other.database_descriptors, folder.database_descriptors)
      np.testing.assert_array_equal(other.query_descriptors, folder.query_descriptors)
      assert other.recall == folder.recall
      assert all(np.array_equal(a, b) for a, b in zip(other.benchmark.positives,
                                                      folder.benchmark.positives))
  with pytest.raises(errors.BuiltDatasetError, match='built with positives within 25 m'):
    catalog.load_benchmarks([built['st_lucia']], root, 30.0)


def test_training_validates_on_registered_family_sets(synthetic_root, tmp_path):
  """data.val_datasets takes every registered name, as gsv-cities validates on msls_val."""
  for name in ('gsv_cities', 'synthetic_val'):
    os.symlink(synthetic_root / name, tmp_path / name)
  _msls_root(tmp_path)
  config = test_training.run_config(tmp_path, tmp_path / 'cache')
  config.data.val_datasets = ('synthetic_val', 'msls_val')
  run = setup.setup_run(config, str(tmp_path / 'run'))
  try:
    assert run.evaluator.names == ['synthetic_val', 'msls_val']
    # Evaluator.run is evaluate_dataset, as in test_family_sets_evaluate_by_name_...
    assert run.evaluator.benchmarks[1].num_queries == 8
  finally:
    run.close()
  config.data.val_datasets = ('nordland',)
  with pytest.raises(errors.DatasetNotFoundError, match='nordland'):
    setup.setup_run(config, str(tmp_path / 'other'))
  assert not (tmp_path / 'other').exists()


def test_listing_under_a_data_root_that_does_not_exist_is_refused(tmp_path):
  with pytest.raises(errors.DatasetNotFoundError):
    catalog.list_datasets(str(tmp_path / 'nope'), print_fn=lambda line: None)
