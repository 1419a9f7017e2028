"""`python -m vpr_jax.prepare` with mistakes: one line naming the value, status 1, no output."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import e2e

CITIES = ('SynthA', 'SynthB')  # The synthetic dataset of tests/conftest.py.


def _command(tmp_path, data_root, *args, out=None):
  out = out or tmp_path / 'prepared'
  return [sys.executable, '-m', 'vpr_jax.prepare',
             f'--config={os.path.join(e2e.REPO_ROOT, "configs", "default.py")}', f'--out={out}',
             f'--data_root={data_root}', '--config.data.train_dir=gsv_cities',
             f'--config.data.cities={CITIES!r}', f'--config.data.cache_dir={tmp_path / "cache"}',
             '--num_workers=0', *args]


def _run(tmp_path, data_root, *args, out=None):
  command = _command(tmp_path, data_root, *args, out=out)
  env = dict(os.environ, PYTHONPATH=e2e.REPO_ROOT, JAX_PLATFORMS='cpu')
  env.pop('VPR_DATA_ROOT', None)
  return subprocess.run(command, cwd=e2e.REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


BAD_ARGUMENTS = {
    'image size zero': (['--image_size=0,0'], "--image_size must be H,W (two positive integers), "
                        "got '0,0'"),
    'image size three values': (['--image_size=32,32,3'], "got '32,32,3'"),
    'image size not numbers': (['--image_size=a,b'], "got 'a,b'"),
    'config image size zero': (['--config.image_size=(0, 0)'],
                               'config image_size must be (H, W), two positive integers, got '
                               '(0, 0)'),
    'size and short side': (['--image_size=8,8', '--short_side=8'],
                            'give --image_size or --short_side, not both'),
    'image size above the bound': (['--image_size=100000,100000'],
                                   '--image_size must be at most 8192 pixels a side (the bound on '
                                   'prepared images: one RGB image of that size already takes '
                                   '192 MiB in every worker), got 100000,100000'),
    'short side above the bound': (['--short_side=8193'], '--short_side must be at most 8192'),
    'config image size above the bound': (['--config.image_size=(9000, 64)'],
                                          'config image_size must be at most 8192'),
    'short side negative': (['--short_side=-3'], '--short_side must be a positive integer, got -3'),
    'quality zero': (['--image_size=8,8', '--quality=0'], '--quality must be in 1..100, got 0'),
    'negative workers': (['--image_size=8,8', '--num_workers=-2'],
                         '--num_workers must be -1 (one per CPU core), 0 (this process only) or '
                         'a positive number, got -2'),
    'empty shards': (['--image_size=8,8', '--records_per_shard=0'],
                     '--records_per_shard must be a positive integer, got 0'),
    'stray argument': (['--image_size=8,8', 'extra'], 'unexpected arguments: extra'),
}


def _single_error_line(result):
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize('case', list(BAD_ARGUMENTS))
def test_bad_argument_is_one_line(case, synthetic_root, tmp_path):
  args, message = BAD_ARGUMENTS[case]
  line = _single_error_line(_run(tmp_path, synthetic_root, *args))
  assert line.startswith('ConfigError: ') and message in line, line
  assert sorted(os.listdir(tmp_path)) == []  # Not even the place index cache.


def test_missing_training_folder(tmp_path):
  line = _single_error_line(_run(tmp_path, tmp_path, '--image_size=8,8'))
  assert line == (f"DatasetError: Training folder {str(tmp_path / 'gsv_cities')!r} does not "
                  'exist.'), line
  assert not (tmp_path / 'prepared').exists()


def test_missing_data_root(tmp_path):
  line = _single_error_line(_run(tmp_path, tmp_path / 'nowhere', '--image_size=8,8'))
  assert line.startswith('DatasetNotFoundError: ') and str(tmp_path / 'nowhere') in line, line


def test_out_is_a_file(synthetic_root, tmp_path):
  out = tmp_path / 'prepared'
  out.write_text('mine')
  line = _single_error_line(_run(tmp_path, synthetic_root, '--image_size=8,8', out=out))
  assert line == f"OutputPathError: --out {str(out)!r} is a file; expected a folder.", line
  line = _single_error_line(_run(tmp_path, synthetic_root, '--image_size=8,8',
                                 out=out / 'inside'))
  assert line == (f"OutputPathError: --out {str(out / 'inside')!r}: {str(out)!r} is a file, "
                  'not a folder.'), line
  assert out.read_text() == 'mine'


def test_builds_a_tfds_dataset_and_prints_its_folder(synthetic_root, tmp_path):
  """The last line of stdout is the built dataset, which TFDS and training open."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vpr_jax.data.tfds import records  # pylint: disable=g-import-not-at-top
  from vpr_jax.data.tfds import training_set  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'tfds'
  args = ['--image_size=16,20', '--quality=90', '--records_per_shard=40']
  result = _run(tmp_path, synthetic_root, *args, out=out)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'images/s' in result.stdout
  folder = result.stdout.strip().splitlines()[-1]
  assert os.path.isfile(os.path.join(folder, 'dataset_info.json'))
  assert folder.startswith(str(out) + os.sep)
  builder = tfds.builder_from_directory(folder)
  num_images = builder.info.splits['train'].num_examples
  assert len(builder.info.splits['train'].filenames) == -(-num_images // 40)
  index, source = training_set.open_training_set(folder)
  assert index.num_images == num_images == len(source)
  assert source.load_array(0).shape == (16, 20, 3)
  meta, _ = records.read_npz(os.path.join(folder, training_set.PLACE_INDEX_FILE))
  assert meta['encoding']['quality'] == 90 and meta['bad_images'] == []

  # The same settings again: reused, the same folder printed; --overwrite builds it again.
  mtime = os.stat(os.path.join(folder, 'dataset_info.json')).st_mtime_ns
  again = _run(tmp_path, synthetic_root, *args, out=out)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Already built' in again.stdout
  assert again.stdout.strip().splitlines()[-1] == folder
  assert os.stat(os.path.join(folder, 'dataset_info.json')).st_mtime_ns == mtime
  rebuilt = _run(tmp_path, synthetic_root, *args, '--overwrite', out=out)
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert rebuilt.stdout.strip().splitlines()[-1] == folder
  assert os.stat(os.path.join(folder, 'dataset_info.json')).st_mtime_ns != mtime


def test_builds_benchmarks_and_prints_their_folders(synthetic_root, tmp_path):
  from vpr_jax.data.evaluation import benchmarks  # pylint: disable=g-import-not-at-top
  from vpr_jax.data.tfds import benchmark_set  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'tfds'
  test_dir = os.path.join(str(synthetic_root), 'synthetic_test')
  result = _run(tmp_path, synthetic_root, '--benchmark=synthetic_val,' + test_dir,
                '--image_size=16,20', out=out)
  assert result.returncode == 0, result.stderr[-3000:]
  folders = result.stdout.strip().splitlines()[-2:]
  assert 'images/s' in result.stdout and len(set(folders)) == 2
  for folder, split_dir in zip(folders, ('synthetic_val', 'synthetic_test')):
    split, sources = benchmark_set.open_benchmark(folder)
    expected = benchmarks.load_benchmark(os.path.join(str(synthetic_root), split_dir),
                                         use_cache=False)
    assert split.queries_paths == expected.queries_paths
    assert sources['database'].load_array(0).shape == (16, 20, 3)
  # Without a size: the files as they are.
  result = _run(tmp_path, synthetic_root, '--benchmark=synthetic_val', out=out)
  assert result.returncode == 0, result.stderr[-3000:]
  folder = result.stdout.strip().splitlines()[-1]
  assert folder not in folders
  split, sources = benchmark_set.open_benchmark(folder)
  with open(os.path.join(split.root, split.database_paths[0]), 'rb') as f:
    assert sources['database'][0] == f.read()
  missing = _single_error_line(_run(tmp_path, synthetic_root, '--benchmark=nowhere', out=out))
  assert missing.startswith('DatasetNotFoundError: ') and 'nowhere' in missing, missing


def test_a_list_file_that_runs_code_is_refused_and_never_run(tmp_path):
  marker = tmp_path / 'PWNED'
  split = tmp_path / 'split'
  e2e.write_hostile_split(str(split), str(marker))
  out = tmp_path / 'tfds'
  line = _single_error_line(_run(tmp_path, tmp_path, f'--benchmark={split}', out=out))
  assert line.startswith('UnsafeArrayFileError: ') and 'x_gt.npy' in line, line
  assert not marker.exists()
  assert not out.exists() or not any(out.rglob('dataset_info.json'))


@pytest.mark.parametrize('signal_number', [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_while_building_is_one_line(signal_number, synthetic_root, tmp_path):
  """Ctrl-C reaches the whole process group (the workers too): one line, status 128 + signal."""
  out = tmp_path / 'prepared'
  # Upscaled to 4096 x 4096, the 96 images take long enough (seconds) to be interrupted.
  command = _command(tmp_path, synthetic_root, '--image_size=4096,4096', '--num_workers=2',
                     out=out)
  env = dict(os.environ, PYTHONPATH=e2e.REPO_ROOT, JAX_PLATFORMS='cpu')
  env.pop('VPR_DATA_ROOT', None)
  process = subprocess.Popen(command, cwd=e2e.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    assert process.stdout.readline().startswith('Preparing 96 images')
    time.sleep(2.0)  # the workers have started and are encoding
    if signal_number == signal.SIGINT:
      os.killpg(process.pid, signal_number)  # what a terminal's Ctrl-C does
    else:
      process.send_signal(signal_number)  # what a scheduler does: the main process only
    stdout, stderr = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  assert process.returncode == 128 + signal_number, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert 'KeyboardInterrupt' not in stderr, stderr[-3000:]
  name = signal.Signals(signal_number).name
  assert stderr.strip().splitlines()[-1] == (
      f'Stopped by {name}: nothing was built (a dataset appears only when complete); run the '
      'same command to start over.'), stderr[-3000:]
  assert 'Done:' not in stdout
  built = [folder for folder, _, names in os.walk(out) if 'dataset_info.json' in names]
  assert built == []
