"""End-to-end tests of `python -m vpr_jax.eval` on the synthetic benchmark."""

import csv
import json
import os
import subprocess
import sys

from absl import flags
import jax
import numpy as np
import pytest

from vpr_jax.checkpoints import orbax_states
from tests import e2e
from vpr_jax import errors
from vpr_jax.cli import common
from vpr_jax.cli import eval as eval_cli
from vpr_jax.configs import default
from vpr_jax.evaluation import descriptors
from vpr_jax.evaluation import evaluate
from vpr_jax.models import vpr_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  config = default.get_config()
  config.image_size = (32, 32)
  config.model.dtype = 'float32'
  config.model.mixvpr_out_channels = 16
  config.model.mixvpr_mix_depth = 1
  config.data.eval_batch_size = 8
  config.data.num_workers = 0
  config.data.val_datasets = ('synthetic_val',)
  return config


@pytest.fixture(scope='module')
def runs_dir(tmp_path_factory):
  """A runs folder with one run whose checkpoints/ holds randomly initialised variables."""
  runs = tmp_path_factory.mktemp('runs')
  config = tiny_config()
  model = vpr_model.build_model(config)
  variables = vpr_model.init_variables(model, jax.random.PRNGKey(0))
  orbax_states.save_inference_checkpoint(str(runs / 'run_a' / 'checkpoints'), config, variables)
  return runs


def test_dashed_flags_are_normalised():
  assert eval_cli.run  # the eval command's flags are defined (its import defines them)
  argv = ['eval', '--data-root=/x/my-data', '--save-descriptors', 'out-1.npz', '--only-failures',
          '--no-only-failures', '--noonly-failures', '--unknown-flag=1', '--output=a-b.json', '--',
          '--save-predictions']
  assert common.rewrite_argv(argv, flags.FLAGS) == [
      'eval', '--data_root=/x/my-data', '--save_descriptors', 'out-1.npz', '--only_failures',
      '--noonly_failures', '--noonly_failures', '--unknown-flag=1', '--output=a-b.json', '--',
      '--save-predictions']


def test_cli_end_to_end(synthetic_root, runs_dir, tmp_path):
  checkpoint = runs_dir / 'run_a'
  out = tmp_path / 'out'
  env = dict(os.environ, JAX_PLATFORMS='cpu', VPR_JAX_CACHE_DIR=str(tmp_path / 'cache'),
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  command = [
      sys.executable, '-m', 'vpr_jax.eval', f'--checkpoint={checkpoint}',
      '--dataset', 'synthetic_val', '--data-root', str(synthetic_root), '--batch-size=8',
      '--num-workers=0', f'--output={out}/results.json', f'--save-descriptors={out}/desc.npz',
      f'--save-predictions={out}/pred.csv', '--visualize=3', '--only-failures',
      f'--visualize-dir={out}/sheets']
  run = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=240)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'Performance on synthetic_val' in run.stdout
  assert 'Recall@K' in run.stdout

  record = json.loads((out / 'results.json').read_text())
  assert record['dataset'] == 'synthetic_val'
  assert record['num_database'] == 16 and record['num_queries'] == 8
  assert record['queries_without_positives'] == 0
  assert list(record['recall']) == ['1', '5', '10', '15', '20', '25']
  assert record['step'] == 0 and record['image_size'] == [32, 32]
  assert record['checkpoint'] == str(checkpoint)

  with np.load(out / 'desc.npz') as data:
    assert data['database'].shape[0] == 16 and data['queries'].shape[0] == 8
    assert data['database'].dtype == np.float32 and data['queries'].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(data['queries'], axis=1), 1.0, atol=1e-5)
    db_paths, q_paths = data['database_paths'].tolist(), data['queries_paths'].tolist()
  assert all(p.startswith('database/') for p in db_paths) and db_paths == sorted(db_paths)
  assert all(p.startswith('queries/') for p in q_paths)
  split_dir = synthetic_root / 'synthetic_val'
  assert all((split_dir / p).is_file() for p in db_paths + q_paths)

  with open(out / 'pred.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8 * 16  # top-25 clamped to the 16 database images
  # The recall in the JSON follows from the CSV's correct column.
  correct = np.zeros((8, 16), bool)
  for row in rows:
    assert row['query'] == q_paths[int(row['query_index'])]
    assert row['database'] == db_paths[int(row['database_index'])]
    correct[int(row['query_index']), int(row['rank']) - 1] = row['correct'] == '1'
    assert (float(row['distance_m']) <= 25.0) == (row['correct'] == '1')
  for n, value in record['recall'].items():
    found = correct[:, :min(int(n), 16)].any(axis=1)
    assert value == pytest.approx(100.0 * found.mean())

  sheets = sorted(os.listdir(out / 'sheets' / 'synthetic_val'))
  failures = int(round(8 * (1 - record['recall']['1'] / 100)))
  assert len(sheets) == min(3, failures)
  assert all(name.endswith('.png') for name in sheets)


def test_evaluate_defaults_to_latest_run(synthetic_root, runs_dir, monkeypatch, tmp_path):
  monkeypatch.setenv('VPR_RUNS_DIR', str(runs_dir))
  monkeypatch.setenv('VPR_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  printed = []
  cached_before = set(descriptors._EMBED_CACHE)  # pylint: disable=protected-access
  results = evaluate.evaluate(None, ['synthetic_val', 'synthetic_test'], str(synthetic_root),
                              output=str(tmp_path / 'both.json'),
                              save_descriptors_to=str(tmp_path / 'd.npz'),
                              print_fn=printed.append)
  assert printed[0].startswith(f'Checkpoint: {runs_dir / "run_a"} (step 0)')
  assert [r.dataset for r in results] == ['synthetic_val', 'synthetic_test']
  assert sum('Performance on' in line for line in printed) == 2
  records = json.loads((tmp_path / 'both.json').read_text())
  assert [r['dataset'] for r in records] == ['synthetic_val', 'synthetic_test']
  assert (tmp_path / 'd_synthetic_val.npz').is_file()
  assert (tmp_path / 'd_synthetic_test.npz').is_file()
  # One jitted forward pass, compiled once, served both datasets.
  cache = descriptors._EMBED_CACHE  # pylint: disable=protected-access
  new_entries = [cache[key][1] for key in set(cache) - cached_before]
  assert len(new_entries) == 1
  assert new_entries[0]._cache_size() == 1  # pylint: disable=protected-access


def test_evaluate_without_any_run_says_where_it_looked(monkeypatch, tmp_path):
  monkeypatch.setenv('VPR_RUNS_DIR', str(tmp_path / 'empty_runs'))
  with pytest.raises(FileNotFoundError, match='no run with a checkpoint under'):
    evaluate.evaluate(None, ['synthetic_val'])


def _eval_subprocess(checkpoint, dataset, data_root, cwd, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('VPR_DATA_ROOT', None)
  command = [sys.executable, '-m', 'vpr_jax.eval', f'--checkpoint={checkpoint}',
             f'--dataset={dataset}', f'--data_root={data_root}', '--num_workers=0', *extra]
  return subprocess.run(command, cwd=str(cwd), env=env, capture_output=True, text=True,
                        timeout=240)


def test_a_list_file_that_runs_code_is_refused_and_never_run(runs_dir, tmp_path):
  """A split folder (or the family's ground-truth folder) whose *_gt.npy pickles os.system."""
  marker = tmp_path / 'PWNED'
  e2e.write_hostile_split(str(tmp_path / 'split'), str(marker))
  # The same file as a registered family set's ground truth.
  e2e.write_hostile_split(str(tmp_path / 'sped'), str(marker), prefix='SPED')
  run = _eval_subprocess(runs_dir / 'run_a', tmp_path / 'split', tmp_path, tmp_path)
  assert run.returncode == 1, (run.returncode, run.stdout[-2000:], run.stderr[-3000:])
  assert 'Traceback' not in run.stderr, run.stderr[-3000:]
  lines = [line for line in run.stderr.splitlines()
           if line.strip() and not line.startswith(('I1', 'W1'))]
  assert len(lines) == 1, run.stderr[-3000:]
  assert lines[0].startswith('UnsafeArrayFileError: ') and 'x_gt.npy' in lines[0], lines[0]
  assert 'system' in lines[0] and 'Performance on' not in run.stdout
  # The registered name takes the same path (in this process: the CLI layer is the same).
  with pytest.raises(errors.UnsafeArrayFileError, match=r"SPED_gt\.npy' is refused"):
    evaluate.evaluate(str(runs_dir / 'run_a'), ['sped'], str(tmp_path), num_workers=0,
                      print_fn=lambda line: None)
  assert not marker.exists()
