"""BoQ on DINOv2 and on ResNet-50 against the authors' PyTorch definitions and released layouts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.conversion import transformer_mapping
from vpr_jax.models import boq
from vpr_jax.models import dinov2
from vpr_jax.models import resnet

torch = pytest.importorskip('torch', reason='torch is the reference implementation')
torchvision = pytest.importorskip('torchvision', reason='torchvision builds the reference ResNet')
refs = pytest.importorskip('tests.torch_vpr_references')

BOQ_SIZES = dict(proj_channels=128, num_queries=8, num_layers=2, row_dim=4)


class BoQDinoModel(nn.Module):
  """DINOv2 (no final norm) + BoQ, named as the released `dinov2_12288.pth`."""

  def setup(self):
    self.backbone = dinov2.DinoV2(embed_dim=64, depth=2, num_heads=2, pretrained_grid=4,
                                  num_trainable_blocks=1, apply_final_norm=False)
    self.aggregator = boq.BoQ(**BOQ_SIZES)

  def __call__(self, x, train=False):
    return self.aggregator(self.backbone(x)['features'])


class BoQResNetModel(nn.Module):
  """ResNet-50 to layer3 + BoQ, named as the released `resnet50_16384.pth`."""

  def setup(self):
    self.backbone = resnet.ResNet(depth=50, layers_to_crop=(4,), layers_to_freeze=2)
    self.aggregator = boq.BoQ(**BOQ_SIZES)

  def __call__(self, x, train=False):
    return self.aggregator(self.backbone(x, train=train)['features'])


def _torch_boq(in_channels, seed):
  torch.manual_seed(seed)
  return refs.BoQ(in_channels=in_channels, proj_channels=BOQ_SIZES['proj_channels'],
                  num_queries=BOQ_SIZES['num_queries'], num_layers=BOQ_SIZES['num_layers'],
                  row_dim=BOQ_SIZES['row_dim'])


def _save_and_load(torch_model, path):
  torch.save(torch_model.state_dict(), path)
  loaded = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.numpy() for k, v in loaded.items()}


def test_boq_dinov2_descriptors_match_the_authors_model(tmp_path):
  torch.manual_seed(0)
  vit = refs.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2)
  torch_model = refs.VPRModel(refs.BoQDinoV2(vit, unfreeze_n_blocks=1), _torch_boq(64, 0))
  torch_model = refs.perturb_(torch_model.eval(), 0.1, 0)
  state_dict = _save_and_load(torch_model, tmp_path / 'dinov2_12288.pth')
  # The released file holds the final norm and the mask token, which BoQ does not use.
  assert {'backbone.dino.norm.weight', 'backbone.dino.mask_token'} <= set(state_dict)
  assert 'aggregator.boqs.1.cross_attn.in_proj_weight' in state_dict

  model = BoQDinoModel()
  image_hw = (70, 42)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_hw, 3)))
  variables = transformer_mapping.checkpoint_to_flax(state_dict, shapes, 'boq_dinov2')
  x = np.random.default_rng(0).normal(size=(2, 3, *image_hw)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x)).numpy()
  got, state = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                           mutable=['intermediates'])
  got = np.asarray(got)
  assert got.shape == (2, boq.descriptor_dim(128, 4)) == (2, 512)
  assert np.abs(got - want).max() <= 2e-4
  # The sown cross-attention maps equal the authors' (averaged over heads).
  with torch.no_grad():
    _, attns = torch_model.aggregator(torch_model.backbone(torch.from_numpy(x)))
  sown = state['intermediates']['aggregator']['boqs_1']['attention'][0]
  np.testing.assert_allclose(np.asarray(sown), attns[1].numpy(), atol=1e-5)


def test_boq_resnet50_descriptors_match_the_authors_model(tmp_path):
  torch.manual_seed(1)
  backbone = refs.BoQResNet(torchvision.models.resnet50(weights=None))
  assert backbone.out_channels == 1024
  torch_model = refs.VPRModel(backbone, _torch_boq(1024, 1))
  torch_model = refs.perturb_(torch_model.eval(), 0.05, 1)
  state_dict = _save_and_load(torch_model, tmp_path / 'resnet50_16384.pth')
  assert 'backbone.net.6.5.bn3.running_var' in state_dict
  assert 'backbone.net.4.0.downsample.0.weight' in state_dict

  model = BoQResNetModel()
  image_hw = (48, 64)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_hw, 3)))
  variables = transformer_mapping.checkpoint_to_flax(state_dict, shapes, 'boq_resnet')
  x = np.random.default_rng(1).normal(size=(2, 3, *image_hw)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x)).numpy()
  got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert got.shape == (2, 512)
  assert np.abs(got - want).max() <= 2e-4


def test_mismatched_checkpoint_lists_every_key():
  model = BoQDinoModel()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 42, 42, 3)))
  torch.manual_seed(0)
  vit = refs.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2)
  torch_model = refs.VPRModel(refs.BoQDinoV2(vit, unfreeze_n_blocks=1), _torch_boq(64, 0))
  state_dict = refs.numpy_state_dict(torch_model)
  del state_dict['aggregator.fc.bias']
  state_dict['aggregator.extra'] = np.zeros(3)
  state_dict['aggregator.boqs.0.queries'] = np.zeros((1, 9, 128))
  with pytest.raises(transformer_mapping.StateDictMismatchError) as error:
    transformer_mapping.checkpoint_to_flax(state_dict, shapes, 'boq_dinov2', source='f.pth')
  message = str(error.value)
  assert 'f.pth does not match the model (1 missing, 1 unexpected, 1 mis-shaped keys)' in message
  assert 'aggregator.fc.bias' in message and 'aggregator.extra' in message
  assert 'aggregator.boqs.0.queries: expected (1, 8, 128), found (1, 9, 128)' in message
  # Read with the wrong layout, the backbone keys are reported as missing / unexpected.
  with pytest.raises(transformer_mapping.StateDictMismatchError, match='backbone.model.blocks.0'):
    transformer_mapping.checkpoint_to_flax(refs.numpy_state_dict(torch_model), shapes, 'salad')


def test_boq_gradients_reach_the_queries_and_the_projection():
  module = boq.BoQ(proj_channels=64, num_queries=4, num_layers=2, row_dim=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 16)), jnp.float32)
  params = module.init(jax.random.key(0), x)['params']
  grads = jax.grad(lambda p: jnp.sum(module.apply({'params': p}, x)[0] *
                                     module.apply({'params': p}, x)[1]))(params)
  for name in ('proj_c', 'fc'):
    assert np.any(np.asarray(grads[name]['kernel']))
  assert np.any(np.asarray(grads['boqs_0']['queries']))
  assert np.any(np.asarray(grads['boqs_1']['encoder']['self_attn']['in_proj_kernel']))


def test_bfloat16_compute_stays_close_to_float32():
  module = boq.BoQ(proj_channels=128, num_queries=8, num_layers=2, row_dim=4)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 5, 32)), jnp.float32)
  params = module.init(jax.random.key(0), x)
  full = np.asarray(module.apply(params, x))
  half = boq.BoQ(proj_channels=128, num_queries=8, num_layers=2, row_dim=4,
                 dtype=jnp.bfloat16).apply(params, x)
  assert half.dtype == jnp.float32
  assert 0 < np.abs(np.asarray(half) - full).max() < 2e-2
