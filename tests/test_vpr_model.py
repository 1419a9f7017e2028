"""VPRModel: build from config, parameter counts, frozen masks, dtypes, descriptors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.configs import default
from tests.test_resnet import random_variables
from vpr_jax.models import aggregators
from vpr_jax.models import vpr_model


def small_config(aggregator='mixvpr', dtype='float32', image_size=(64, 64), **model_overrides):
  config = default.get_config()
  config.image_size = image_size
  config.model.aggregator = aggregator
  config.model.dtype = dtype
  config.model.convap_out_channels = 32
  config.model.mixvpr_out_channels = 32
  config.model.mixvpr_mix_depth = 2
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


def _images(shape=(2, 64, 64, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_seed_parameter_counts():
  config = default.get_config()
  model = vpr_model.build_model(config)
  shapes = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.key(0)))
  counts = vpr_model.count_parameters(shapes['params'], config.model.layers_to_freeze)
  # The seed prints backbone 2.8 M (683 K frozen) and MixVPR 454 K.
  assert counts == {'backbone': 2_782_784, 'aggregator': 454_660, 'frozen': 683_072,
                    'trainable': 2_782_784 + 454_660 - 683_072, 'total': 2_782_784 + 454_660}
  table = vpr_model.format_parameter_table(counts, config.model)
  for text in ('backbone', 'ResNet-18', '2.8 M', 'aggregator', 'MixVPR', '454 K', '683 K',
               'Trainable params', 'Non-trainable params', 'Total params'):
    assert text in table, text
  assert vpr_model.model_descriptor_dim(config.model, config.image_size) == 1024
  assert model.descriptor_dim == 1024


def test_parameter_counts_match_torchvision():
  torchvision = pytest.importorskip('torchvision', reason='torchvision is the reference')
  for depth, crop in ((18, (4,)), (50, (4,)), (34, ()), (101, (3, 4))):
    config = default.get_config()
    config.model.backbone = f'resnet{depth}'
    config.model.layers_to_crop = crop
    config.model.aggregator = 'avg'
    model = vpr_model.build_model(config)
    shapes = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.key(0)))
    counts = vpr_model.count_parameters(shapes['params'], 2)
    net = getattr(torchvision.models, f'resnet{depth}')(weights=None)
    kept = [net.conv1, net.bn1] + [getattr(net, f'layer{i}') for i in range(1, 5) if i not in crop]
    frozen = [net.conv1, net.bn1, net.layer1, net.layer2]
    numel = lambda modules: sum(p.numel() for m in modules for p in m.parameters())
    assert counts['backbone'] == numel(kept), depth
    assert counts['frozen'] == numel(frozen), depth


def test_human_readable_count():
  assert vpr_model.human_readable_count(2_782_784) == '2.8 M'
  assert vpr_model.human_readable_count(683_072) == '683 K'
  assert vpr_model.human_readable_count(454_660) == '454 K'
  assert vpr_model.human_readable_count(23_508_032) == '23.5 M'
  assert vpr_model.human_readable_count(512) == '512'
  assert vpr_model.human_readable_count(0) == '0'


def test_unknown_names():
  config = default.get_config()
  config.model.backbone = 'vgg16'
  with pytest.raises(ValueError, match='resnet18, resnet34, resnet50, resnet101'):
    vpr_model.build_model(config)
  config = default.get_config()
  config.model.aggregator = 'cosplace'
  with pytest.raises(ValueError, match='avg, gem, convap, mixvpr'):
    vpr_model.build_model(config)
  config = default.get_config()
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match='auto, float32, bfloat16'):
    vpr_model.build_model(config)


def test_resolve_dtype():
  assert vpr_model.resolve_dtype('float32') == jnp.float32
  assert vpr_model.resolve_dtype('bfloat16') == jnp.bfloat16
  expected = jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  assert vpr_model.resolve_dtype('auto') == expected


def test_frozen_param_mask():
  config = default.get_config()
  model = vpr_model.build_model(config)
  params = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.key(0)))['params']
  for level, frozen in ((-1, set()), (0, {'conv1', 'bn1'}),
                        (2, {'conv1', 'bn1', 'layer1', 'layer2'}),
                        (3, {'conv1', 'bn1', 'layer1', 'layer2', 'layer3'})):
    mask = vpr_model.frozen_param_mask(params, level)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    for name, subtree in mask['backbone'].items():
      assert all(leaf == (name in frozen) for leaf in jax.tree_util.tree_leaves(subtree)), name
    assert not any(jax.tree_util.tree_leaves(mask['aggregator']))
  with pytest.raises(ValueError, match='layers_to_freeze'):
    vpr_model.frozen_param_mask(params, 4)


@pytest.mark.parametrize('aggregator', aggregators.AGGREGATORS)
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_descriptors_are_float32_unit_norm(aggregator, dtype):
  config = small_config(aggregator, dtype)
  model = vpr_model.build_model(config)
  variables = random_variables(model, jnp.zeros((1, 64, 64, 3), jnp.uint8))
  images = _images()
  outputs = jax.jit(model.apply, static_argnames='train')(variables, images, train=False)
  descriptors = outputs['descriptors']
  assert descriptors.dtype == jnp.float32
  assert descriptors.shape == (2, model.descriptor_dim)
  np.testing.assert_allclose(np.linalg.norm(descriptors, axis=-1), 1.0, rtol=1e-5)
  assert outputs['features'].shape == (2, 4, 4, 256)
  assert outputs['features'].dtype == vpr_model.resolve_dtype(dtype)


def test_float_and_uint8_inputs_agree_and_train_mode_updates_stats():
  config = small_config('gem')
  model = vpr_model.build_model(config)
  variables = random_variables(model, jnp.zeros((1, 64, 64, 3), jnp.uint8))
  images = _images()

  @jax.jit
  def run(variables, images):
    from_uint8 = model.apply(variables, images)['descriptors']
    from_float = model.apply(variables, images.astype(jnp.float32))['descriptors']
    train, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    return from_uint8, from_float, train['descriptors'], updates

  from_uint8, from_float, train_descriptors, updates = run(variables, images)
  np.testing.assert_array_equal(from_uint8, from_float)
  np.testing.assert_allclose(np.linalg.norm(train_descriptors, axis=-1), 1.0, rtol=1e-5)
  # layers_to_freeze=2, freeze_bn_stats=False (the seed): even frozen BNs update their stats.
  assert not np.allclose(updates['batch_stats']['backbone']['bn1']['mean'],
                         variables['batch_stats']['backbone']['bn1']['mean'])


def test_frozen_layers_get_zero_gradient_through_model():
  config = small_config('mixvpr', freeze_bn_stats=True)
  model = vpr_model.build_model(config)
  variables = random_variables(model, jnp.zeros((1, 64, 64, 3), jnp.uint8))
  images = _images()
  targets = jax.random.normal(jax.random.key(0), (2, model.descriptor_dim))

  @jax.jit
  def grads_and_stats(params):
    def loss_fn(params):
      outputs, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                     images, train=True, mutable=['batch_stats'])
      return jnp.sum(outputs['descriptors'] * targets), updates
    return jax.grad(loss_fn, has_aux=True)(params)

  grads, updates = grads_and_stats(variables['params'])
  mask = vpr_model.frozen_param_mask(grads, config.model.layers_to_freeze)
  for frozen, grad in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(grads)):
    if frozen:
      assert np.all(grad == 0)
  assert np.any(grads['backbone']['layer3']['1']['conv2']['kernel'] != 0)
  assert np.any(grads['aggregator']['channel_proj']['kernel'] != 0)
  # freeze_bn_stats=True: frozen stages keep their running statistics.
  np.testing.assert_array_equal(updates['batch_stats']['backbone']['layer2']['0']['bn1']['var'],
                                variables['batch_stats']['backbone']['layer2']['0']['bn1']['var'])
  assert not np.allclose(updates['batch_stats']['backbone']['layer3']['0']['bn1']['var'],
                         variables['batch_stats']['backbone']['layer3']['0']['bn1']['var'])


def test_init_variables_structure_and_dtypes():
  config = small_config('convap', dtype='bfloat16', image_size=(32, 32))
  model = vpr_model.build_model(config)
  variables = vpr_model.init_variables(model, jax.random.key(0))
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'backbone', 'aggregator'}
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['bn1']['var'], 1.0)
  assert 'layer4' not in variables['params']['backbone']


def test_image_size_mismatch_for_mixvpr():
  config = small_config('mixvpr')
  model = vpr_model.build_model(config)
  with pytest.raises(ValueError, match='image size'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3), jnp.uint8)))
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64), jnp.uint8)))
