"""The demo config learns: a short run of `python -m vpr_jax.train --config configs/demo.py`.

The full demo (README) trains for 4 epochs on 1,000 synthetic places; this test trains the same
config for one epoch (31 steps) and asserts that validation R@1 on the held-out
places rises well above the untrained model's, and that the prediction sheets are written.
"""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_recall_rises(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, VPR_DATA_ROOT=str(tmp_path / 'data'), PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  os.makedirs(env['VPR_DATA_ROOT'])
  cmd = [sys.executable, '-m', 'vpr_jax.train', '--config=configs/demo.py',
         f'--workdir={workdir}',
         '--config.num_epochs=1',
         '--config.visualize_queries=3']
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  val = [r for r in records if 'recall' in r]
  assert val[0]['step'] == 0, val
  untrained, trained = val[0]['recall']['1'], val[-1]['recall']['1']
  assert trained >= untrained + 15.0, (untrained, trained, val)
  sheets = os.listdir(workdir / 'predictions' / 'synthetic_synthetic_val')
  assert len([s for s in sheets if s.endswith('.png')]) == 3
