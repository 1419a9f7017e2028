"""scripts/profile_step.py: a tiny CPU run times both steps, split by kind and model part."""

import importlib.util
import json
import os

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
  spec = importlib.util.spec_from_file_location(
      'script_profile_step', os.path.join(_REPO, 'scripts', 'profile_step.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tiny_profile_splits_both_steps(tmp_path, capsys):
  pytest.importorskip('torch', reason='the PyTorch reference step')
  pytest.importorskip('pytorch_metric_learning', reason='the PyTorch reference step')
  output = tmp_path / 'profile.json'
  _load_script().main(['--image_size', '32', '--places_per_batch', '2', '--images_per_place',
                       '2', '--warmup', '1', '--steps', '1', '--output', str(output)])
  row = json.loads(output.read_text())['rows'][0]
  ours, reference = row['vpr_jax'], row['reference']
  for kinds in (ours['by_kind'], reference['by_kind']):
    assert kinds['convolution forward'] > 0 and kinds['convolution backward'] > 0
  # The seed freezes the stem, layer1 and layer2: only layer3 and the aggregator run backward.
  assert ours['by_part']['layer3 backward'] > 0 and ours['by_part']['aggregator backward'] > 0
  assert not any(part.startswith(('layer1 backward', 'layer2 backward', 'stem backward'))
                 for part in ours['by_part'])
  assert '| convolution forward |' in capsys.readouterr().out
