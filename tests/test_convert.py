"""PyTorch checkpoint conversion: torchvision backbones, family checkpoints, errors, CLI."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import e2e
from tests.test_aggregators import torch_aggregator
from tests.test_resnet import randomised_torchvision_resnet
from tests.test_vpr_model import small_config
from vpr_jax import errors
from vpr_jax.checkpoints import orbax_states
from vpr_jax.conversion import converter
from vpr_jax.conversion import mapping
from vpr_jax.conversion import torch_files
from vpr_jax.models import vpr_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def family_torch_model(config, seed=0):
  """A gsv-cities-family model: `backbone.model` (torchvision ResNet, cropped) + `aggregator`."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  mc = config.model
  depth = vpr_model.backbone_depth(mc)
  h, w, c = vpr_model.backbone_output_shape(mc, config.image_size)

  class Backbone(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.model = randomised_torchvision_resnet(f'resnet{depth}', seed, mc.layers_to_crop)
      self.model.avgpool = None
      self.model.fc = None

    def forward(self, x):
      m = self.model
      x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
      for i in range(1, 5):
        if getattr(m, f'layer{i}') is not None:
          x = getattr(m, f'layer{i}')(x)
      return x

  class VPRModel(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.backbone = Backbone()
      self.aggregator = torch_aggregator(mc, c, (h, w), seed)

    def forward(self, images_uint8_nhwc):
      x = torch.from_numpy(images_uint8_nhwc).permute(0, 3, 1, 2).float() / 255.0
      mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
      std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
      return self.aggregator(self.backbone((x - mean) / std))

  return VPRModel().eval()


def _images(seed=0, size=(64, 64)):
  return np.random.default_rng(seed).integers(0, 256, (2,) + tuple(size) + (3,), dtype=np.uint8)


def _descriptors(config, variables, images):
  model = vpr_model.build_model(config)
  with jax.default_matmul_precision('highest'):
    return np.asarray(jax.jit(model.apply)(variables, images)['descriptors'])


def _torch_descriptors(torch_model, images):
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  with torch.no_grad():
    return torch_model(images).numpy()


@pytest.mark.parametrize('aggregator', ['avg', 'gem', 'convap', 'mixvpr'])
def test_family_checkpoint_matches_reference(aggregator, tmp_path):
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  config = small_config(aggregator)
  torch_model = family_torch_model(config)
  path = tmp_path / 'model.ckpt'
  torch.save({'state_dict': torch_model.state_dict(), 'epoch': 3, 'global_step': 100}, path)

  state_dict = torch_files.load_torch_state_dict(str(path))
  assert mapping.detect_kind(state_dict) == 'family'
  variables = mapping.family_checkpoint_to_flax(state_dict, config, source=str(path))
  images = _images()
  ours = _descriptors(config, variables, images)
  expected = _torch_descriptors(torch_model, images)
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_dataparallel_prefix_and_bare_state_dict():
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  del torch
  config = small_config('gem')
  torch_model = family_torch_model(config, seed=3)
  state_dict = {'module.' + k: v for k, v in torch_model.state_dict().items()}
  variables = mapping.family_checkpoint_to_flax(state_dict, config)
  images = _images(1)
  np.testing.assert_allclose(_descriptors(config, variables, images),
                             _torch_descriptors(torch_model, images), atol=1e-5, rtol=0)


def test_torchvision_state_dict_ignores_fc_and_cropped_layers():
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  net = randomised_torchvision_resnet('resnet18', seed=5).eval()
  state_dict = net.state_dict()
  assert 'fc.weight' in state_dict and 'layer4.0.conv1.weight' in state_dict
  assert mapping.detect_kind(state_dict) == 'torchvision'
  variables = mapping.torchvision_resnet_to_flax(state_dict, 18, (4,))
  assert 'layer4' not in variables['params']
  np.testing.assert_array_equal(variables['params']['layer1']['0']['conv1']['kernel'],
                                state_dict['layer1.0.conv1.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      variables['batch_stats']['layer2']['0']['downsample_bn']['var'],
      state_dict['layer2.0.downsample.1.running_var'].numpy())

  # Placed into a whole model, the backbone computes torchvision's layer3.
  config = small_config('avg')
  model = vpr_model.build_model(config)
  abstract = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.key(0)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  full = mapping.with_backbone(zeros, variables)
  images = _images(2)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
       - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    expected = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
  with jax.default_matmul_precision('highest'):
    features = model.apply(full, images)['features']
  expected = expected.permute(0, 2, 3, 1).numpy()
  assert np.abs(features - expected).max() <= 1e-5 * np.abs(expected).max()


def test_mismatches_are_listed_together():
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  config = small_config('mixvpr')
  state_dict = dict(family_torch_model(config).state_dict())
  del state_dict['backbone.model.layer2.1.bn2.running_var']
  del state_dict['aggregator.channel_proj.bias']
  state_dict['aggregator.extra.weight'] = torch.zeros(3)
  state_dict['backbone.model.layer4.0.conv1.weight'] = torch.zeros(512, 256, 3, 3)
  state_dict['aggregator.mix.0.mix.1.weight'] = torch.zeros(5, 7)
  with pytest.raises(errors.StateDictMismatchError) as info:
    mapping.family_checkpoint_to_flax(state_dict, config, source='bad.ckpt')
  error = info.value
  assert isinstance(error, ValueError)
  assert isinstance(error, errors.CheckpointMismatchError)
  assert error.missing == ['aggregator.channel_proj.bias',
                           'backbone.model.layer2.1.bn2.running_var']
  assert error.unexpected == ['aggregator.extra.weight', 'backbone.model.layer4.0.conv1.weight']
  assert error.mismatched == [('aggregator.mix.0.mix.1.weight', (16, 16), (5, 7))]
  message = str(error)
  for text in ('bad.ckpt', 'missing', 'unexpected', 'mis-shaped',
               'backbone.model.layer2.1.bn2.running_var', 'aggregator.extra.weight',
               'aggregator.mix.0.mix.1.weight: expected (16, 16), found (5, 7)'):
    assert text in message, text


def test_torchvision_depth_mismatch():
  pytest.importorskip('torch', reason='torch is the reference implementation')
  state_dict = randomised_torchvision_resnet('resnet18').state_dict()
  with pytest.raises(errors.StateDictMismatchError, match='missing') as info:
    mapping.torchvision_resnet_to_flax(state_dict, 50, (4,), source='resnet18.pth')
  assert 'layer1.0.conv3.weight' in info.value.missing
  assert ('layer1.0.conv1.weight', (64, 64, 1, 1), (64, 64, 3, 3)) in info.value.mismatched
  assert 'resnet18.pth' in str(info.value)


def test_detect_kind_and_loading_errors(tmp_path):
  with pytest.raises(ValueError, match='Cannot tell'):
    mapping.detect_kind({'encoder.weight': np.zeros(1)})
  with pytest.raises(FileNotFoundError, match='nothing.pth'):
    torch_files.load_torch_state_dict(str(tmp_path / 'nothing.pth'))
  pytest.importorskip('torch', reason='torch reads the files')
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='garbage.pth'):
    torch_files.load_torch_state_dict(str(garbage))


def test_convert_checkpoint_writes_loadable_checkpoint(tmp_path):
  """MixVPR saved without a row_proj bias (the keys decide), saved bare."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  config = small_config('mixvpr')
  reference_config = small_config('mixvpr', mixvpr_row_proj_bias=False)
  torch_model = family_torch_model(reference_config, seed=1)
  path = tmp_path / 'mixvpr.pth'
  torch.save(torch_model.state_dict(), path)

  out = tmp_path / 'converted'
  saved_config, _ = converter.convert_checkpoint(config, str(path), str(out))
  assert saved_config.model.mixvpr_row_proj_bias is False
  assert config.model.mixvpr_row_proj_bias is True  # The caller's config is left alone.
  loaded_config, variables, _ = orbax_states.load_for_eval(str(out))
  assert loaded_config.model.mixvpr_row_proj_bias is False
  images = _images(4)
  np.testing.assert_allclose(_descriptors(loaded_config, variables, images),
                             _torch_descriptors(torch_model, images), atol=1e-5, rtol=0)


def test_nothing_written_on_failure(tmp_path):
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  config = small_config('convap')
  state_dict = family_torch_model(config).state_dict()
  del state_dict['aggregator.channel_pool.bias']
  path = tmp_path / 'broken.ckpt'
  torch.save({'state_dict': state_dict}, path)
  out = tmp_path / 'out'
  with pytest.raises(errors.StateDictMismatchError, match='aggregator.channel_pool.bias'):
    converter.convert_checkpoint(config, str(path), str(out))
  assert not out.exists()
  assert os.listdir(tmp_path) == ['broken.ckpt']


def gem_config_file(folder) -> str:
  """A config file of the seed's ResNet-18 with GeM at 64x64, float32 (for the CLI tests)."""
  config_file = folder / 'config.py'
  config_file.write_text(
      'from vpr_jax.configs import default\n\n\n'
      'def get_config():\n'
      '  config = default.get_config()\n'
      '  config.image_size = (64, 64)\n'
      "  config.model.aggregator = 'gem'\n"
      "  config.model.dtype = 'float32'\n"
      '  return config\n')
  return config_file


def test_cli_torchvision_backbone(tmp_path):
  """`python -m vpr_jax.convert` with an ImageNet-style torchvision file, loaded back for eval."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  net = randomised_torchvision_resnet('resnet18', seed=7)
  weights = tmp_path / 'resnet18-test.pth'
  torch.save(net.state_dict(), weights)
  config_file = gem_config_file(tmp_path)
  out = tmp_path / 'checkpoint'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      [sys.executable, '-m', 'vpr_jax.convert', f'--config={config_file}',
       '--torch-checkpoint', str(weights), f'--out={out}', '--kind=auto'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'backbone' in result.stdout and 'Total params' in result.stdout
  assert 'randomly initialised' in result.stderr

  config, variables, _ = orbax_states.load_for_eval(str(out))
  assert config.model.aggregator == 'gem' and tuple(config.image_size) == (64, 64)
  np.testing.assert_array_equal(variables['params']['aggregator']['p'], [3.0])
  np.testing.assert_array_equal(
      variables['batch_stats']['backbone']['layer3']['1']['bn2']['mean'],
      net.state_dict()['layer3.1.bn2.running_mean'].numpy())

  # A second run refuses to overwrite and leaves the checkpoint as it was.
  again = subprocess.run(
      [sys.executable, '-m', 'vpr_jax.convert', f'--config={config_file}',
       f'--torch_checkpoint={weights}', f'--out={out}'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and 'not empty' in again.stderr
  assert orbax_states.load_for_eval(str(out))[0].model.aggregator == 'gem'


def test_overwrite_replaces_only_a_converted_checkpoint(tmp_path):
  """--overwrite never deletes what the converter did not write: such a folder is refused."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  config = small_config('gem')
  path = tmp_path / 'gem.pth'
  torch.save(family_torch_model(config, seed=1).state_dict(), path)
  out = tmp_path / 'converted'
  converter.convert_checkpoint(config, str(path), str(out))
  converted = sorted(os.listdir(out))

  # A converted checkpoint alone is replaced.
  torch.save(family_torch_model(config, seed=2).state_dict(), path)
  converter.convert_checkpoint(config, str(path), str(out), overwrite=True)
  assert sorted(os.listdir(out)) == converted

  # With a file of the user's beside it, or anywhere inside it: refused before any work,
  # nothing touched.
  for notes in (out / 'notes.txt', out / 'latest' / 'notes.txt', out / 'latest' / '0' / 'n.txt'):
    notes.write_text('keep me')
    before = e2e.file_snapshot(str(out))
    relative = re.escape(os.path.relpath(notes, out))
    with pytest.raises(errors.OutputPathError, match=rf'did not write \({relative}\)'):
      converter.convert_checkpoint(config, str(path), str(out), overwrite=True)
    assert e2e.file_snapshot(str(out)) == before
    notes.unlink()

  # A training workdir (metrics, checkpoints/...) given as --out by mistake.
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'metrics.jsonl').write_text('{"step": 1}\n')
  (workdir / 'config.json').write_text('{}')
  with pytest.raises(errors.OutputPathError,
                     match=r'not a checkpoint written by this version\) \(config.json, '
                     r'metrics.jsonl\)'):
    converter.convert_checkpoint(config, str(path), str(workdir), overwrite=True)
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'metrics.jsonl']
  assert sorted(os.listdir(tmp_path)) == ['converted', 'gem.pth', 'run']


def _convert_cli(tmp_path, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
      [sys.executable, '-m', 'vpr_jax.convert', f'--config={gem_config_file(tmp_path)}',
       *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_an_out_it_cannot_replace_in_one_line(tmp_path):
  """--out a file; --overwrite over a checkpoint with a file of the user's inside latest/."""
  weights = tmp_path / 'weights.pth'
  weights.write_bytes(b'never read: the output is checked first')
  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  result = _convert_cli(tmp_path, f'--torch-checkpoint={weights}', f'--out={a_file}')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"OutputPathError: --out {str(a_file)!r} is a file; expected a folder.")
  assert a_file.read_text() == 'mine'

  # A converted checkpoint (as the converter leaves it) with the user's notes in latest/.
  out = tmp_path / 'converted'
  orbax_states.save_inference_checkpoint(str(out), small_config('gem'),
                                         vpr_model.init_variables(
                                             vpr_model.build_model(small_config('gem')),
                                             jax.random.key(0)))
  (out / 'latest' / 'notes.txt').write_text('mine')
  before = e2e.file_snapshot(str(out))
  result = _convert_cli(tmp_path, f'--torch-checkpoint={weights}', f'--out={out}', '--overwrite')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('OutputPathError: ') and 'did not write (latest/notes.txt)' in last, last
  assert e2e.file_snapshot(str(out)) == before
