"""DINOv2 backbone and torch-exact bicubic resampling against the hub's PyTorch definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.conversion import transformer_mapping
from vpr_jax.data.imaging import bicubic_weights
from vpr_jax.models import dinov2
from vpr_jax.models import torch_resize

torch = pytest.importorskip('torch', reason='torch is the reference implementation')
refs = pytest.importorskip('tests.torch_vpr_references')
F = torch.nn.functional


@pytest.mark.parametrize('in_size,out_size,scale,antialias', [
    (37, 16, 16.1 / 37, False),  # The hub's default: downsample with an offset scale factor.
    (37, 23, 23.1 / 37, False),
    (4, 7, 7.1 / 4, False),  # Upsampling.
    (9, 5, None, False),  # Size given, no scale factor.
    (37, 16, None, True),  # Register models: size given, antialiased.
    (5, 11, None, True),
])
def test_bicubic_matrix_matches_torch_interpolate(in_size, out_size, scale, antialias):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, in_size, in_size + 2)).astype(np.float32)
  out_w = out_size + 3
  if scale is None:
    kwargs = {'size': (out_size, out_w)}
    scale_w = None
  else:
    scale_w = (out_w + 0.1) / (in_size + 2)
    kwargs = {'scale_factor': (scale, scale_w)}
  want = F.interpolate(torch.from_numpy(x), mode='bicubic', antialias=antialias,
                       **kwargs).numpy()
  assert want.shape[-2:] == (out_size, out_w)
  got = torch_resize.resize_bicubic(jnp.asarray(x.transpose(0, 2, 3, 1)), (out_size, out_w),
                                    None if scale is None else (scale, scale_w), antialias)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-5, rtol=0)


def test_offset_scale_factor_is_not_a_plain_resize():
  # The reason for following torch exactly: the offset changes the sampling positions.
  with_offset = bicubic_weights.bicubic_matrix(37, 16, 16.1 / 37)
  plain = bicubic_weights.bicubic_matrix(37, 16)
  assert np.abs(with_offset - plain).max() > 1e-2


def _torch_vit(seed=0, **kwargs):
  torch.manual_seed(seed)
  model = refs.DinoVisionTransformer(**kwargs).eval()
  return refs.perturb_(model, 0.1, seed)


def _flax_params(module, torch_model, image_hw):
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, *image_hw, 3), jnp.float32))['params']
  return transformer_mapping.dinov2_hub_to_flax(refs.numpy_state_dict(torch_model), shapes)


TINY = dict(patch_size=14, embed_dim=64, depth=2, num_heads=2)


@pytest.mark.parametrize('variant,image_hw', [
    ({}, (42, 70)),  # Grid 3x5 from the learned 4x4: offset bicubic interpolation.
    ({}, (56, 56)),  # The learned grid: no interpolation.
    ({'num_register_tokens': 2, 'interpolate_offset': 0.0, 'interpolate_antialias': True},
     (28, 42)),
    ({'ffn_layer': 'swiglu'}, (70, 42)),
])
def test_dinov2_matches_hub_vit(variant, image_hw):
  torch_model = _torch_vit(img_size=56, **TINY, **variant)
  module = dinov2.DinoV2(
      embed_dim=64, depth=2, num_heads=2, pretrained_grid=4,
      ffn='swiglu' if variant.get('ffn_layer') == 'swiglu' else 'mlp',
      num_register_tokens=variant.get('num_register_tokens', 0),
      interpolate_offset=variant.get('interpolate_offset', 0.1),
      interpolate_antialias=variant.get('interpolate_antialias', False))
  params = _flax_params(module, torch_model, image_hw)
  x = np.random.default_rng(1).normal(size=(2, 3, *image_hw)).astype(np.float32)
  with torch.no_grad():
    want = torch_model.forward_features(torch.from_numpy(x))
  got = module.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  h0, w0 = image_hw[0] // 14, image_hw[1] // 14
  want_patches = want['x_norm_patchtokens'].numpy().reshape(2, h0, w0, 64)
  np.testing.assert_allclose(np.asarray(got['features']), want_patches, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(got['class_token']), want['x_norm_clstoken'].numpy(),
                             atol=1e-4, rtol=1e-4)
  if variant.get('num_register_tokens'):
    np.testing.assert_allclose(np.asarray(got['register_tokens']),
                               want['x_norm_regtokens'].numpy(), atol=1e-4, rtol=1e-4)


def test_without_final_norm_returns_prenorm_tokens():
  torch_model = _torch_vit(img_size=56, **TINY)
  module = dinov2.DinoV2(embed_dim=64, depth=2, num_heads=2, pretrained_grid=4,
                         apply_final_norm=False)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 42, 42, 3)))['params']
  assert 'norm' not in shapes
  params = transformer_mapping.dinov2_hub_to_flax(refs.numpy_state_dict(torch_model), shapes)
  x = np.random.default_rng(2).normal(size=(1, 3, 42, 42)).astype(np.float32)
  with torch.no_grad():
    want = torch_model.forward_features(torch.from_numpy(x))['x_prenorm'].numpy()
  got = module.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got['features']).reshape(1, 9, 64), want[:, 1:],
                             atol=1e-4, rtol=1e-4)


def test_freezing_cuts_gradients_and_masks_the_embedding_and_first_blocks():
  module = dinov2.DinoV2(embed_dim=32, depth=3, num_heads=2, pretrained_grid=2,
                         num_trainable_blocks=1)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 3)), jnp.float32)
  params = module.init(jax.random.key(0), x)['params']

  def loss(p):
    out = module.apply({'params': p}, x)
    return jnp.sum(out['features'] ** 2) + jnp.sum(out['class_token'])

  grads = jax.grad(loss)(params)
  mask = dinov2.frozen_param_mask(params, num_trainable_blocks=1, depth=3)
  for path, frozen in jax.tree_util.tree_leaves_with_path(mask):
    grad = grads
    for key in path:
      grad = grad[key.key]
    top = path[0].key
    assert frozen == (top in ('patch_embed', 'cls_token', 'pos_embed', 'blocks_0', 'blocks_1'))
    if frozen:
      assert not np.any(np.asarray(grad)), path
  assert np.any(np.asarray(grads['blocks_2']['mlp']['fc1']['kernel']))
  assert np.any(np.asarray(grads['norm']['scale']))
  whole = dinov2.frozen_param_mask({'backbone': params, 'aggregator': {'w': 0}}, -1, 3)
  assert not any(jax.tree_util.tree_leaves(whole))


def test_image_size_must_be_a_multiple_of_the_patch():
  module = dinov2.DinoV2(embed_dim=32, depth=1, num_heads=2, pretrained_grid=2)
  with pytest.raises(ValueError, match='multiple of the patch size 14'):
    module.init(jax.random.key(0), jnp.zeros((1, 30, 28, 3)))


def test_hub_architectures():
  assert dinov2.arch_spec('dinov2_vitb14') == (768, 12, 12, 'mlp')
  assert dinov2.swiglu_hidden_features(1536, 4.0) == 4096  # The hub's ViT-g/14 w3 input width.
  model = dinov2.dinov2('dinov2_vits14', num_trainable_blocks=4)
  assert (model.embed_dim, model.depth, model.num_heads) == (384, 12, 6)
  with pytest.raises(ValueError, match='Unknown DINOv2 model'):
    dinov2.arch_spec('dinov2_vith14')
