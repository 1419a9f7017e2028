"""`vpr_jax.export`: vpr_jax checkpoints -> the PyTorch files the family's own code loads.

torch is the oracle: every file written without torch is read by `torch.load(weights_only=True)`
and loaded with `strict=True` into PyTorch models written from the authors' definitions
(tests/torch_vpr_references.py, tests/test_aggregators.py), which must then give vpr_jax's
descriptors on real photos. Every packaged config is checked at full size (keys and shapes, on
torch's meta device); tiny versions of each model kind are checked in numbers.
"""

import collections
import json
import os
import runpy
import struct
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
from PIL import Image
import pytest

from tests import test_aggregators
from tests.test_vpr_model import small_config
from vpr_jax.checkpoints import orbax_states
from vpr_jax.cli import common
from vpr_jax.configs import boq_dinov2
from vpr_jax.configs import boq_r50
from vpr_jax.configs import salad_dinov2
from vpr_jax.conversion import converter
from vpr_jax.conversion import exporter
from vpr_jax.conversion import torch_reader
from vpr_jax.conversion import torch_writer
from vpr_jax.data.imaging import images as images_lib
from vpr_jax.models import vpr_model

torch = pytest.importorskip('torch', reason='torch is the reference implementation')
torchvision = pytest.importorskip('torchvision', reason='torchvision builds the ResNets')
refs = pytest.importorskip('tests.torch_vpr_references')
safetensors_torch = pytest.importorskip('safetensors.torch', reason='reads safetensors into torch')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SF_XS_MINI = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'data', 'real', 'sf_xs_mini')
# The bound for float32 CPU descriptors of the PyTorch model loaded from an export.
TOLERANCE = 2e-4
NUM_PHOTOS = 6


# ----------------------------------------------------------------------------------------------
# The torch zip format, written without torch.


def test_written_file_is_read_by_torch_and_by_the_reader(tmp_path):
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)  # A Flax HWIO kernel.
  state_dict = collections.OrderedDict([
      ('conv.weight', np.transpose(kernel, (3, 2, 0, 1))),  # A strided view, as exported.
      ('bn.num_batches_tracked', np.array(7, np.int64)),
      ('dust_bin', np.array(1.5, np.float32)),
      ('half', rng.standard_normal(5).astype(np.float16)),
      ('bf16', rng.standard_normal(4).astype(ml_dtypes.bfloat16)),
      ('empty', np.zeros((0, 3), np.float32)),
  ])
  checkpoint = {'state_dict': state_dict, 'epoch': 3, 'global_step': 2**40, 'lr': 1.25e-4,
                'flags': [True, False, None, 'ü', (1, -2)], 'hparams': {}}
  path = tmp_path / 'x.ckpt'
  with open(path, 'wb') as f:
    torch_writer.save(checkpoint, f)

  loaded = torch.load(path, weights_only=True)
  assert type(loaded['state_dict']) is collections.OrderedDict
  assert list(loaded['state_dict']) == list(state_dict)
  assert {k: loaded[k] for k in ('epoch', 'global_step', 'lr', 'flags', 'hparams')} == {
      'epoch': 3, 'global_step': 2**40, 'lr': 1.25e-4, 'flags': [True, False, None, 'ü', (1, -2)],
      'hparams': {}}
  for key, array in state_dict.items():
    tensor = loaded['state_dict'][key]
    assert tuple(tensor.shape) == array.shape and tensor.is_contiguous(), key
    if array.dtype == ml_dtypes.bfloat16:
      assert tensor.dtype == torch.bfloat16
      np.testing.assert_array_equal(tensor.float().numpy(), array.astype(np.float32))
    else:
      assert tensor.numpy().dtype == array.dtype, key
      np.testing.assert_array_equal(tensor.numpy(), array)
  # torch maps the records in place too: their data lie on 64-byte boundaries, as torch's own.
  mapped = torch.load(path, weights_only=True, mmap=True)
  np.testing.assert_array_equal(mapped['state_dict']['conv.weight'].numpy(),
                                state_dict['conv.weight'])
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      name_length, extra_length = struct.unpack('<HH', raw[info.header_offset + 26:
                                                           info.header_offset + 30])
      assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename

  # And the restricted reader gives back the same values.
  again = torch_reader.read_checkpoint(str(path))
  assert again['flags'] == checkpoint['flags'] and again['global_step'] == 2**40
  for key, array in state_dict.items():
    np.testing.assert_array_equal(again['state_dict'][key], array)


def test_writer_refuses_what_torch_files_cannot_hold(tmp_path):
  with open(tmp_path / 'x.pth', 'wb') as f:
    with pytest.raises(TypeError, match='object'):
      torch_writer.save({'a': object()}, f)
    with pytest.raises(TypeError, match='keys must be strings'):
      torch_writer.save({1: np.zeros(1, np.float32)}, f)


# ----------------------------------------------------------------------------------------------
# Tiny models of every kind.


def _perturbed_variables(config, seed=0):
  """Initial variables plus noise, BatchNorm variances in [0.5, 1.5]: no value is trivial."""
  model = vpr_model.build_model(config)
  variables = jax.tree.map(np.asarray, vpr_model.init_variables(model, jax.random.key(seed)))
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    if path[-1].key == 'var':
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(perturb, variables)


def _family_config(aggregator):
  config = small_config(aggregator)  # ResNet-18 cropped after layer3, 64x64.
  config.model.netvlad_num_clusters = 8
  return config


TINY_VIT = {'vit_embed_dim': 64, 'vit_depth': 2, 'vit_num_heads': 2, 'vit_pretrained_grid': 4,
            'num_trainable_blocks': 1}


def _tiny(config_module, model_fields, **top):
  config = config_module.get_config()
  config.model.dtype = 'float32'
  for key, value in model_fields.items():
    config.model[key] = value
  for key, value in top.items():
    config[key] = value
  return config


def _tiny_vit_module():
  return refs.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2,
                                    num_heads=2)


TINY_MODELS = {
    # name: (config, the authors' torch model for the export)
    'salad': (lambda: _tiny(salad_dinov2, dict(TINY_VIT, salad_num_clusters=8,
                                               salad_cluster_dim=16, salad_token_dim=32),
                            eval_image_size=(70, 84)),
              lambda: refs.VPRModel(
                  refs.SaladDINOv2(_tiny_vit_module(), num_trainable_blocks=1, norm_layer=True,
                                   return_token=True),
                  refs.SALAD(num_channels=64, num_clusters=8, cluster_dim=16, token_dim=32))),
    'boq_dinov2': (lambda: _tiny(boq_dinov2, dict(TINY_VIT, boq_proj_channels=64,
                                                  boq_num_queries=4, boq_row_dim=4),
                                 eval_image_size=(70, 84)),
                   lambda: refs.VPRModel(
                       refs.BoQDinoV2(_tiny_vit_module(), unfreeze_n_blocks=1),
                       refs.BoQ(in_channels=64, proj_channels=64, num_queries=4, num_layers=2,
                                row_dim=4))),
    # BoQ's ResNet-18 (its released model is a ResNet-50, checked at full size below).
    'boq_resnet': (lambda: _tiny(boq_r50, dict(backbone='resnet18', boq_proj_channels=64,
                                               boq_num_queries=4, boq_row_dim=4),
                                 image_size=(64, 64), eval_image_size=(48, 64)),
                   lambda: refs.VPRModel(
                       refs.BoQResNet(torchvision.models.resnet18(weights=None)),
                       refs.BoQ(in_channels=256, proj_channels=64, num_queries=4, num_layers=2,
                                row_dim=4))),
}


def _gsv_cities_vpr_model(backbone_arch, pretrained, layers_to_crop, agg_arch, agg_config):
  """main.py's VPRModel(...) with helper.get_aggregator's classes (for the exported JSON's call)."""
  assert pretrained is False
  modules = test_aggregators.torch_reference_modules()
  aggregator = {'AVG': modules.AVG, 'GeM': modules.GeMPool, 'ConvAP': modules.ConvAP,
                'MixVPR': modules.MixVPR, 'NetVLAD': refs.NetVLAD}[agg_arch](**agg_config)
  return refs.GsvCitiesVPRModel(refs.GsvCitiesResNet(backbone_arch, layers_to_crop), aggregator)


def _photos(config):
  """The first real SF-XS photos at the eval size, resized as vpr_jax evaluates them (uint8)."""
  if not os.path.isdir(SF_XS_MINI):
    pytest.skip(f'real test photos not found at {SF_XS_MINI}')
  folder = os.path.join(SF_XS_MINI, 'database')
  names = sorted(os.listdir(folder))[:NUM_PHOTOS]
  options = images_lib.DecodeOptions(interpolation=config.data.eval_interpolation)
  size = vpr_model.eval_image_size(config)
  return np.stack([images_lib.load_resized_array(os.path.join(folder, n), size, options)
                   for n in names]), [os.path.join(folder, n) for n in names]


def _vpr_jax_descriptors(config, variables, pixels):
  model = vpr_model.build_model(config, image_size=vpr_model.eval_image_size(config))
  return np.asarray(jax.jit(model.apply)(variables, pixels)['descriptors'])


def _torch_descriptors(model, pixels):
  x = pixels.astype(np.float32) / 255.0
  x = (x - np.asarray(vpr_model.IMAGENET_MEAN, np.float32)) / np.asarray(vpr_model.IMAGENET_STD,
                                                                          np.float32)
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _export(tmp_path, config, variables, name, export_format=None, step=0):
  checkpoint = orbax_states.save_inference_checkpoint(str(tmp_path / 'checkpoint'), config,
                                                      variables)
  out = tmp_path / name
  info = exporter.export_checkpoint(checkpoint, str(out), export_format=export_format)
  assert json.loads((tmp_path / (name + '.json')).read_text()) == info
  return out, info


def _assert_round_trip(tmp_path, config, variables, out):
  """convert(export(x)) holds bit-identical variables."""
  back_dir = tmp_path / 'back'
  converter.convert_checkpoint(config, str(out), str(back_dir))
  _, back, _ = orbax_states.load_for_eval(str(back_dir))
  flat, flat_back = (jax.tree_util.tree_flatten_with_path(v)[0] for v in (variables, back))
  assert [p for p, _ in flat] == [p for p, _ in flat_back]
  for (path, a), (_, b) in zip(flat, flat_back):
    assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), path


@pytest.mark.parametrize('aggregator', ['avg', 'gem', 'convap', 'mixvpr', 'netvlad'])
def test_gsv_cities_export_loads_strictly_and_gives_the_descriptors(aggregator, tmp_path):
  config = _family_config(aggregator)
  variables = _perturbed_variables(config)
  out, info = _export(tmp_path, config, variables, 'model.ckpt')
  assert info['format'] == 'lightning' and info['layout'] == 'family'

  checkpoint = torch.load(out, weights_only=True)
  state_dict = checkpoint['state_dict']
  assert all(t.dtype in (torch.float32, torch.int64) for t in state_dict.values())
  # The model the JSON names, built by the authors' constructor, loads the file strictly.
  code = info['pytorch_model']['code']
  torch_model = eval(code, {'VPRModel': _gsv_cities_vpr_model})  # pylint: disable=eval-used
  torch_model.load_state_dict(state_dict, strict=True)
  torch_model.eval()
  counters = [k for k in state_dict if k.endswith('num_batches_tracked')]
  assert len(counters) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in torch_model.modules())
  np.testing.assert_array_equal(
      torch_model.backbone.model.layer2[0].downsample[1].running_var.numpy(),
      variables['batch_stats']['backbone']['layer2']['0']['downsample_bn']['var'])

  pixels, paths = _photos(config)
  ours = _vpr_jax_descriptors(config, variables, pixels)
  theirs = _torch_descriptors(torch_model, pixels)
  assert ours.shape == theirs.shape == (NUM_PHOTOS, info['descriptor_size'])
  assert np.abs(ours - theirs).max() <= TOLERANCE
  # The JSON's torchvision transform, applied to the photo files, feeds it the same input.
  transform = eval(info['eval_transform']['torchvision'],  # pylint: disable=eval-used
                   {'T': torchvision.transforms})
  batch = torch.stack([transform(Image.open(p).convert('RGB')) for p in paths])
  with torch.no_grad():
    assert np.abs(ours - torch_model(batch).numpy()).max() <= TOLERANCE
  _assert_round_trip(tmp_path, config, variables, out)


@pytest.mark.parametrize('name', sorted(TINY_MODELS))
def test_salad_and_boq_exports_load_into_the_authors_models(name, tmp_path):
  make_config, make_torch = TINY_MODELS[name]
  config = make_config()
  variables = _perturbed_variables(config)
  out, info = _export(tmp_path, config, variables, 'model.pth')
  assert info['layout'] == name and info['format'] == name.split('_')[0]
  torch.manual_seed(0)
  torch_model = make_torch().eval()
  state_dict = torch.load(out, weights_only=True)
  torch_model.load_state_dict(state_dict, strict=True)
  if name != 'boq_resnet':
    assert set(info['filled_in']) >= {f'backbone.{"model" if name == "salad" else "dino"}.'
                                      'mask_token'}
  pixels, _ = _photos(config)
  ours = _vpr_jax_descriptors(config, variables, pixels)
  theirs = _torch_descriptors(torch_model, pixels)
  assert ours.shape == theirs.shape == (NUM_PHOTOS, info['descriptor_size'])
  assert np.abs(ours - theirs).max() <= TOLERANCE
  _assert_round_trip(tmp_path, config, variables, out)

  # safetensors: the same keys and values, read into the same model.
  tensors_file = tmp_path / 'model.safetensors'
  exporter.export_checkpoint(str(tmp_path / 'checkpoint'), str(tensors_file),
                             export_format='safetensors')
  from_tensors = safetensors_torch.load_file(str(tensors_file))
  assert sorted(from_tensors) == sorted(state_dict)
  for key, tensor in state_dict.items():
    assert torch.equal(from_tensors[key], tensor), key
  torch_model.load_state_dict(from_tensors, strict=True)


def test_num_batches_tracked_counts_the_training_steps(tmp_path):
  """A training checkpoint's step in every BatchNorm that training updates; 0 where frozen."""
  config = _family_config('gem')
  config.model.freeze_bn_stats = True  # stem .. layer2 keep their statistics.
  variables = _perturbed_variables(config)
  state_dict, filled = exporter.export_state_dict(config, variables, 'family', step=250)
  assert not filled
  counters = {k: int(v) for k, v in state_dict.items() if k.endswith('num_batches_tracked')}
  assert counters['backbone.model.bn1.num_batches_tracked'] == 0
  assert counters['backbone.model.layer2.0.downsample.1.num_batches_tracked'] == 0
  assert counters['backbone.model.layer3.1.bn2.num_batches_tracked'] == 250


# ----------------------------------------------------------------------------------------------
# Every packaged config at full size: the keys and shapes that a strict load checks.


def _full_size_torch_model(config):
  mc = config.model
  h, w, c = vpr_model.backbone_output_shape(mc, config.image_size)
  name = vpr_model.aggregator_name(mc)
  if vpr_model.is_vit(mc):
    dim, depth, heads, _ = vpr_model.vit_spec(mc)
    vit = refs.DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=dim, depth=depth,
                                     num_heads=heads)
    if name == 'salad':
      return refs.VPRModel(refs.SaladDINOv2(vit, int(mc.num_trainable_blocks)), refs.SALAD(
          c, int(mc.salad_num_clusters), int(mc.salad_cluster_dim), int(mc.salad_token_dim)))
    return refs.VPRModel(refs.BoQDinoV2(vit, int(mc.num_trainable_blocks)), refs.BoQ(
        c, int(mc.boq_proj_channels), int(mc.boq_num_queries), int(mc.boq_num_layers),
        int(mc.boq_row_dim)))
  if name == 'boq':
    return refs.VPRModel(refs.BoQResNet(getattr(torchvision.models, mc.backbone)(weights=None)),
                         refs.BoQ(c, int(mc.boq_proj_channels), int(mc.boq_num_queries),
                                  int(mc.boq_num_layers), int(mc.boq_row_dim)))
  code = exporter.pytorch_constructor(config, 'family')['code']
  del h, w
  return eval(code, {'VPRModel': _gsv_cities_vpr_model})  # pylint: disable=eval-used


@pytest.mark.parametrize('config_name', common.packaged_config_names())
def test_every_packaged_config_exports_the_authors_keys_and_shapes(config_name):
  config = runpy.run_path(common.resolve_config_path(config_name))['get_config']()
  model = vpr_model.build_model(config)
  abstract = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.key(0)))
  # Zero-stride views stand for the weights: no memory for a ViT-B.
  variables = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)
  layout = exporter.model_layout(config)
  state_dict, _ = exporter.export_state_dict(config, variables, layout)
  with torch.device('meta'):
    expected = _full_size_torch_model(config).state_dict()
  assert {k: tuple(v.shape) for k, v in state_dict.items()} == {
      k: tuple(v.shape) for k, v in expected.items()}
  assert {k: str(v.dtype) for k, v in state_dict.items()} == {
      k: str(v.dtype).replace('torch.', '') for k, v in expected.items()}
  assert config_name in exporter.packaged_config_names(config)


# ----------------------------------------------------------------------------------------------
# The command line, and bad input.


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'vpr_jax.export', *map(str, args)], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(result, *texts):
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  for text in texts:
    assert text in lines[0], (text, lines[0])


def test_cli_writes_an_export_and_refuses_bad_input_in_one_line(tmp_path):
  gem = _family_config('gem')
  checkpoint = orbax_states.save_inference_checkpoint(str(tmp_path / 'gem'), gem,
                                                      _perturbed_variables(gem))
  out = tmp_path / 'exports' / 'gem.ckpt'
  result = _run('--checkpoint', checkpoint, '--out', out)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Load with: model.load_state_dict(torch.load(' in result.stdout
  info = json.loads((tmp_path / 'exports' / 'gem.ckpt.json').read_text())
  assert info['format'] == 'lightning' and info['descriptor_size'] == 256
  torch.load(out, weights_only=True)
  before = out.read_bytes()

  # An existing file without --overwrite: refused, untouched.
  _one_line_error(_run('--checkpoint', checkpoint, '--out', out), 'OutputPathError',
                  'already exists', '--overwrite')
  assert out.read_bytes() == before
  # --overwrite replaces an earlier export (the library call under the CLI) ...
  exporter.export_checkpoint(checkpoint, str(out), export_format='pth', overwrite=True)
  assert isinstance(torch.load(out, weights_only=True), collections.OrderedDict)
  # ... but never a file it did not write.
  mine = tmp_path / 'exports' / 'mine.pth'
  mine.write_bytes(b'my own file')
  _one_line_error(_run('--checkpoint', checkpoint, '--out', mine, '--overwrite'),
                  'OutputPathError', 'not written by vpr_jax.export')
  assert mine.read_bytes() == b'my own file'
  # A path that cannot be written: under a file.
  _one_line_error(_run('--checkpoint', checkpoint, '--out', mine / 'x.ckpt'), 'OutputPathError',
                  'is a file, not a folder')

  # A SALAD model asked for the gsv-cities layout: one line, nothing written.
  salad_config = TINY_MODELS['salad'][0]()
  salad = orbax_states.save_inference_checkpoint(str(tmp_path / 'salad'), salad_config,
                                                 _perturbed_variables(salad_config))
  refused = tmp_path / 'exports' / 'salad.ckpt'
  _one_line_error(_run('--checkpoint', salad, '--out', refused, '--format', 'lightning'),
                  'ExportFormatError', '--format lightning', 'dinov2_vitb14 + salad',
                  '--format salad')
  assert sorted(os.listdir(tmp_path / 'exports')) == ['gem.ckpt', 'gem.ckpt.json', 'mine.pth']
