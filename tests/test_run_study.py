"""scripts/run_study.py on the synthetic city with tiny settings: tables, JSON and plot."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_study_writes_tables_and_plot(tmp_path):
  out = tmp_path / 'study'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  env.pop('VPR_DATA_ROOT', None)
  cmd = [sys.executable, 'scripts/run_study.py', f'--out={out}', '--synthetic',
         '--entries=avg,mixvpr_triplet', '--max_steps=3']
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  with open(out / 'results.json') as f:
    results = json.load(f)
  assert set(results['results']) == {'avg', 'mixvpr_triplet'}
  for per_dataset in results['results'].values():
    assert set(per_dataset) == {'synthetic/synthetic_val', 'synthetic/synthetic_test'}
    for recall in per_dataset.values():
      assert 0.0 <= recall['1'] <= recall['5'] <= recall['20'] <= 100.0
  # Validation before training (epoch 0), then at each epoch end reached within the 3 steps.
  for curve in results['validation_r1'].values():
    assert curve and all(0.0 <= r1 <= 100.0 for _, r1 in curve)

  tables = (out / 'results.md').read_text()
  assert tables.count('### synthetic/synthetic_') == 2
  for name in ('avg', 'mixvpr_triplet'):
    row = next(line for line in tables.splitlines() if line.startswith(f'| {name} |'))
    assert len(row.strip('|').split('|')) == 6  # entry + R@1, 5, 10, 15, 20
  assert (out / 'val_r1.png').stat().st_size > 1000
