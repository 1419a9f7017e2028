"""Smoke tests of the benchmark scripts (tiny CPU runs)."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from vpr_jax.models import vpr_model

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(name):
  spec = importlib.util.spec_from_file_location(f'script_{name}',
                                                os.path.join(_REPO, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def bench_eval():
  return _load_script('bench_eval')


def test_bench_eval_tiny_run_writes_the_table(bench_eval, tmp_path, capsys):
  output = tmp_path / 'bench_eval.json'
  results = bench_eval.main(['--tiny', '--faiss_full', '--output', str(output)])
  printed = capsys.readouterr().out
  assert 'vpr_jax img/s' in printed and 'reference img/s' in printed and 'ratio' in printed
  saved = json.loads(output.read_text())
  assert saved['tiny'] is True
  problems = [f['problem'] for f in saved['faiss']]
  assert problems == ['2000x100x64', '27191x1000x1024']
  assert all(f['seconds'] > 0 for f in saved['faiss'])
  (row,) = saved['rows']
  assert row['config'] == 'mixvpr' and row['batch'] == 4 and row['image_size'] == [64, 64]
  assert row['vpr_jax_img_per_s'] > 0
  assert row['vpr_jax']['descriptor_dim'] == 256 * 4
  if importlib.util.find_spec('torch') is not None:
    assert row['reference_img_per_s'] > 0
    assert row['ratio'] == pytest.approx(row['vpr_jax_img_per_s'] / row['reference_img_per_s'])
  assert results['rows'][0]['config'] == 'mixvpr'


def test_torch_reference_has_the_same_architecture(bench_eval):
  """The PyTorch reference of the script and VPRModel have the same parameter count."""
  torch = pytest.importorskip('torch', reason='the reference forward is PyTorch')
  pytest.importorskip('torchvision', reason='the reference backbone is torchvision')
  config = bench_eval.load_config('configs/mixvpr.py')
  config.image_size = (64, 64)
  reference = bench_eval.build_torch_reference(config)
  torch_count = sum(p.numel() for p in reference.parameters())
  model = vpr_model.build_model(config)
  shapes = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.PRNGKey(0)))
  counts = vpr_model.count_parameters(shapes['params'])
  assert torch_count == counts['total']
  with torch.inference_mode():
    out = reference(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
  assert tuple(out.shape) == (2, 1024)
  np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_bench_eval_rejects_bad_arguments(bench_eval):
  with pytest.raises(SystemExit):
    bench_eval.parse_args(['--tiny', '--iters', '0'])
  with pytest.raises(FileNotFoundError, match='not_a_config'):
    bench_eval.load_config('configs/not_a_config.py')
