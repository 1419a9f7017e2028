"""The authors' released SALAD / BoQ files (and a family NetVLAD) -> `vpr_jax.convert` -> eval.

For each model, a random PyTorch model built from the authors' definitions
(`tests/torch_vpr_references.py`), at tiny sizes, is saved as the released file is laid out,
converted by `python -m vpr_jax.convert` (a subprocess, as a user runs it) and evaluated by
`vpr_jax.evaluation.evaluate.evaluate` on a synthetic benchmark; the descriptors must equal the
PyTorch model's on the same resized images.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from vpr_jax import errors
from vpr_jax.conversion import converter
from vpr_jax.data.imaging import images as images_lib
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.evaluation import evaluate
from vpr_jax.models import vpr_model

torch = pytest.importorskip('torch', reason='torch is the reference implementation')
torchvision = pytest.importorskip('torchvision', reason='torchvision builds the ResNets')
refs = pytest.importorskip('tests.torch_vpr_references')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 2e-4

# Tiny ViT (width 64, 2 blocks, 2 heads, a 4 x 4 learned position grid) for the DINOv2 models.
TINY_VIT = ("  config.model.vit_embed_dim = 64\n  config.model.vit_depth = 2\n"
            "  config.model.vit_num_heads = 2\n  config.model.vit_pretrained_grid = 4\n")


def _tiny_vit():
  return refs.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2,
                                    num_heads=2)


class FamilyResNet18(torch.nn.Module):
  """The family's cropped ResNet-18 (conv1 .. layer3) under `backbone.model`."""

  def __init__(self):
    super().__init__()
    self.model = torchvision.models.resnet18(weights=None)
    self.model.layer4 = None
    self.model.fc = None

  def forward(self, x):
    m = self.model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer3(m.layer2(m.layer1(x)))


def _salad():
  model = refs.VPRModel(
      refs.SaladDINOv2(_tiny_vit(), num_trainable_blocks=1, norm_layer=True, return_token=True),
      refs.SALAD(num_channels=64, num_clusters=8, cluster_dim=16, token_dim=32))
  config = ('salad_dinov2', TINY_VIT + "  config.model.num_trainable_blocks = 1\n"
            "  config.model.salad_num_clusters = 8\n  config.model.salad_cluster_dim = 16\n"
            "  config.model.salad_token_dim = 32\n  config.eval_image_size = (70, 84)\n")
  return model, config, 'dino_salad.ckpt', False


def _boq_dinov2():
  model = refs.VPRModel(
      refs.BoQDinoV2(_tiny_vit(), unfreeze_n_blocks=1),
      refs.BoQ(in_channels=64, proj_channels=64, num_queries=4, num_layers=2, row_dim=4))
  config = ('boq_dinov2', TINY_VIT + "  config.model.num_trainable_blocks = 1\n"
            "  config.model.boq_proj_channels = 64\n  config.model.boq_num_queries = 4\n"
            "  config.model.boq_row_dim = 4\n  config.eval_image_size = (70, 84)\n")
  return model, config, 'dinov2_12288.pth', False


def _boq_resnet50():
  model = refs.VPRModel(
      refs.BoQResNet(torchvision.models.resnet50(weights=None)),
      refs.BoQ(in_channels=1024, proj_channels=64, num_queries=4, num_layers=2, row_dim=4))
  config = ('boq_r50', "  config.image_size = (64, 64)\n  config.eval_image_size = (48, 64)\n"
            "  config.model.boq_proj_channels = 64\n  config.model.boq_num_queries = 4\n"
            "  config.model.boq_row_dim = 4\n")
  return model, config, 'resnet50_16384.pth', False


def _netvlad_r18():
  model = refs.VPRModel(FamilyResNet18(), refs.NetVLAD(clusters_num=8, dim=256))
  config = ('netvlad_r18', "  config.image_size = (48, 64)\n"
            "  config.model.netvlad_num_clusters = 8\n")
  return model, config, 'netvlad.ckpt', True


MODELS = {'salad': _salad, 'boq_dinov2': _boq_dinov2, 'boq_resnet': _boq_resnet50,
          'netvlad': _netvlad_r18}


def _write_config(tmp_path, base: str, body: str):
  path = tmp_path / 'config.py'
  path.write_text(f'from vpr_jax.configs import {base}\n\n\ndef get_config():\n'
                  f'  config = {base}.get_config()\n  config.model.dtype = "float32"\n'
                  f'  config.data.num_workers = 0\n{body}  return config\n')
  return path


def _torch_descriptors(model, pixels: np.ndarray) -> np.ndarray:
  x = pixels.astype(np.float32) / 255.0
  x = (x - np.asarray(vpr_model.IMAGENET_MEAN, np.float32)) / np.asarray(
      vpr_model.IMAGENET_STD, np.float32)
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _convert(tmp_path, config_path, weights, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  env.pop('XLA_FLAGS', None)
  out = tmp_path / 'converted'
  result = subprocess.run(
      [sys.executable, '-m', 'vpr_jax.convert', f'--config={config_path}',
       f'--torch-checkpoint={weights}', f'--out={out}', *extra],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  return result, out


@pytest.mark.slow
@pytest.mark.parametrize('layout', sorted(MODELS))
def test_released_file_converts_and_evaluates_as_the_pytorch_model(layout, synthetic_root,
                                                                   tmp_path):
  torch.manual_seed(0)
  torch_model, (base, body), filename, lightning = MODELS[layout]()
  torch_model = refs.perturb_(torch_model.eval(), 0.05, 0)
  weights = tmp_path / filename
  state_dict = torch_model.state_dict()
  # The released SALAD / BoQ files are bare state dicts; the family saves Lightning checkpoints.
  torch.save({'state_dict': state_dict} if lightning else state_dict, weights)
  config_path = _write_config(tmp_path, base, body)

  result, out = _convert(tmp_path, config_path, weights)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Total params' in result.stdout

  results = evaluate.evaluate(str(out), ['synthetic_val'], str(synthetic_root), batch_size=4,
                              num_workers=0, print_fn=lambda line: None)
  config = evaluate.orbax_states.load_for_eval(str(out))[0]
  size = vpr_model.eval_image_size(config)
  interpolation = config.data.eval_interpolation
  bench = benchmarks.load_benchmark('synthetic_val', str(synthetic_root))
  paths = list(bench.database_paths) + list(bench.queries_paths)
  options = images_lib.DecodeOptions(interpolation=interpolation)
  pixels = np.stack([images_lib.load_resized_array(os.path.join(bench.root, p), size, options)
                     for p in paths])
  want = _torch_descriptors(torch_model, pixels)
  got = np.concatenate([results[0].database_descriptors, results[0].query_descriptors])
  assert got.shape == want.shape == (len(paths), vpr_model.model_descriptor_dim(config.model,
                                                                                size))
  assert np.abs(got - want).max() <= TOLERANCE


def test_layouts_are_detected_from_the_keys():
  torch.manual_seed(0)
  for layout in ('salad', 'boq_dinov2', 'boq_resnet'):
    state_dict = MODELS[layout]()[0].state_dict()
    assert converter.detect_kind({k: v.numpy() for k, v in state_dict.items()}) == layout
  state_dict = _netvlad_r18()[0].state_dict()
  assert converter.detect_kind({'state_dict': {k: v.numpy() for k, v in state_dict.items()}}
                              ) == 'family'


def test_a_file_of_another_model_lists_the_keys(tmp_path):
  """A SALAD file given with the BoQ-DINOv2 config: one line naming the missing/unexpected keys."""
  torch.manual_seed(0)
  torch_model, _, filename, _ = _salad()
  weights = tmp_path / filename
  torch.save(torch_model.state_dict(), weights)
  config_path = _write_config(tmp_path, *_boq_dinov2()[1])
  result, out = _convert(tmp_path, config_path, weights, '--layout=boq_dinov2')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert 'backbone.dino.' in result.stderr and 'aggregator.dust_bin' in result.stderr
  assert not out.exists()


def test_resnet_file_with_a_vit_config_is_refused(tmp_path):
  torch.manual_seed(0)
  torch_model, _, filename, _ = _boq_resnet50()
  weights = tmp_path / filename
  torch.save(torch_model.state_dict(), weights)
  config = _load_config(_write_config(tmp_path, *_salad()[1]))
  with pytest.raises(errors.CheckpointMismatchError, match='boq_resnet layout'):
    converter.convert_checkpoint(config, str(weights), str(tmp_path / 'out'))


def _load_config(path):
  spec = importlib.util.spec_from_file_location('test_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
