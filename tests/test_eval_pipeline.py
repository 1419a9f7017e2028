"""Tests for vpr_jax.data.evaluation.eval_pipeline: fixed shapes, padding, order, errors, worker processes."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vpr_jax import errors
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.evaluation import eval_pipeline
from vpr_jax.data.imaging import images

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGE_SIZE = (24, 32)


@pytest.fixture(scope='module')
def eval_set(synthetic_root):
  bench = benchmarks.load_benchmark('synthetic_val', str(synthetic_root))
  return bench.root, bench.image_paths  # 16 database + 8 query images.


def _collect(batches):
  batches = list(batches)
  return batches, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_fixed_shapes_padding_and_order(eval_set):
  root, paths = eval_set
  batches, joined = _collect(eval_pipeline.make_eval_iterator(root, paths, IMAGE_SIZE, 10))
  assert len(batches) == eval_pipeline.num_batches(len(paths), 10) == 3
  for batch in batches:
    assert batch['images'].shape == (10, *IMAGE_SIZE, 3) and batch['images'].dtype == np.uint8
    assert batch['mask'].shape == (10,) and batch['mask'].dtype == bool
    assert batch['index'].shape == (10,) and batch['index'].dtype == np.int32
  num = len(paths)
  np.testing.assert_array_equal(joined['index'][:num], np.arange(num))
  assert (joined['index'][num:] == -1).all()
  assert joined['mask'][:num].all() and not joined['mask'][num:].any()
  assert (joined['images'][num:] == 0).all()
  for i in (0, 7, num - 1):
    expected = images.load_resized_array(os.path.join(root, paths[i]), IMAGE_SIZE)
    np.testing.assert_array_equal(joined['images'][i], expected)


def test_exact_multiple_has_no_padding_and_threads_keep_order(eval_set):
  root, paths = eval_set
  reference, joined = _collect(eval_pipeline.make_eval_iterator(root, paths, IMAGE_SIZE, 8,
                                                                num_threads=0))
  threaded, joined_threaded = _collect(eval_pipeline.make_eval_iterator(
      root, paths, IMAGE_SIZE, 8, num_threads=3, prefetch_batches=1))
  assert len(reference) == 3 and joined['mask'].all()
  for key in joined:
    np.testing.assert_array_equal(joined[key], joined_threaded[key])


def test_random_access_dataset(eval_set):
  root, paths = eval_set
  dataset = eval_pipeline.make_eval_dataset(root, paths, IMAGE_SIZE, 5)
  assert len(dataset) == 5
  last = dataset[4]
  assert last['index'].tolist() == [20, 21, 22, 23, -1]


def test_bad_arguments(eval_set):
  root, paths = eval_set
  with pytest.raises(ValueError, match='batch_size'):
    eval_pipeline.make_eval_dataset(root, paths, IMAGE_SIZE, 0)
  with pytest.raises(ValueError, match='no images'):
    eval_pipeline.make_eval_dataset(root, [], IMAGE_SIZE, 4)
  with pytest.raises(ValueError, match='num_workers'):
    eval_pipeline.make_eval_iterator(root, paths, IMAGE_SIZE, 4, num_workers=-1)


@pytest.fixture(scope='module')
def broken_set(eval_set, tmp_path_factory):
  root, paths = eval_set
  broken_root = tmp_path_factory.mktemp('broken') / 'split'
  shutil.copytree(root, broken_root)
  bad = paths[13]
  (broken_root / bad).write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
  return str(broken_root), paths, bad


def test_undecodable_image_is_an_error_naming_the_file(broken_set):
  root, paths, bad = broken_set
  with pytest.raises(errors.ImageDecodeError) as info:
    list(eval_pipeline.make_eval_iterator(root, paths, IMAGE_SIZE, 4))
  assert info.value.path == os.path.join(root, bad)


def test_worker_processes_give_the_same_batches_and_errors(eval_set, broken_set):
  root, paths = eval_set
  _, joined = _collect(eval_pipeline.make_eval_iterator(root, paths, IMAGE_SIZE, 5))
  _, joined_workers = _collect(eval_pipeline.make_eval_iterator(root, paths, IMAGE_SIZE, 5,
                                                                num_workers=2))
  for key in joined:
    np.testing.assert_array_equal(joined[key], joined_workers[key])

  broken_root, paths, bad = broken_set
  with pytest.raises(errors.ImageDecodeError) as info:
    list(eval_pipeline.make_eval_iterator(broken_root, paths, IMAGE_SIZE, 5, num_workers=2))
  assert bad in str(info.value)


_WORKER_SCRIPT = '''
import os
import sys

from absl import flags
import numpy as np

from vpr_jax.data.evaluation import eval_pipeline


def main():
  flags.FLAGS.mark_as_parsed()
  root = sys.argv[1]
  paths = sorted(os.path.join('database', p) for p in os.listdir(os.path.join(root, 'database')))
  seen = sum(int(np.asarray(b['mask']).sum())
             for b in eval_pipeline.make_eval_iterator(root, paths, (16, 16), 4, num_workers=2))
  print(seen, len(paths))


if __name__ == '__main__':
  main()
'''


def test_worker_shared_memory_is_released_before_exit(synthetic_root, tmp_path):
  """No "leaked shared_memory objects" warning after a pipeline with worker processes."""
  script = tmp_path / 'run_workers.py'
  script.write_text(_WORKER_SCRIPT)
  result = subprocess.run(
      [sys.executable, str(script), os.path.join(str(synthetic_root), 'synthetic_val')],
      capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  seen, total = result.stdout.split()
  assert seen == total and int(total) > 0
  assert 'leaked shared_memory' not in result.stderr, result.stderr[-3000:]
