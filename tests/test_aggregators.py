"""Aggregators against PyTorch modules written from the gsv-cities family's definitions."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vpr_jax.configs import default
from vpr_jax.conversion import mapping
from vpr_jax.models import aggregators


def torch_reference_modules():
  """The family's aggregators as PyTorch modules (NCHW input), with the family's parameter names."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  nn, F = torch.nn, torch.nn.functional

  class AVG(nn.Module):

    def __init__(self):
      super().__init__()
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
      return F.normalize(self.avgpool(x).flatten(1), p=2, dim=1)

  class GeMPool(nn.Module):

    def __init__(self, p=3, eps=1e-6):
      super().__init__()
      self.p = nn.Parameter(torch.ones(1) * p)
      self.eps = eps

    def forward(self, x):
      x = F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1)))
      return F.normalize(x.pow(1.0 / self.p).flatten(1), p=2, dim=1)

  class ConvAP(nn.Module):

    def __init__(self, in_channels, out_channels=512, s1=2, s2=2):
      super().__init__()
      self.channel_pool = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
      self.AAP = nn.AdaptiveAvgPool2d((s1, s2))

    def forward(self, x):
      return F.normalize(self.AAP(self.channel_pool(x)).flatten(1), p=2, dim=1)

  class FeatureMixerLayer(nn.Module):

    def __init__(self, in_dim, mlp_ratio=1):
      super().__init__()
      self.mix = nn.Sequential(
          nn.LayerNorm(in_dim),
          nn.Linear(in_dim, int(in_dim * mlp_ratio)),
          nn.ReLU(),
          nn.Linear(int(in_dim * mlp_ratio), in_dim),
      )
      for m in self.modules():
        if isinstance(m, nn.Linear):
          nn.init.trunc_normal_(m.weight, std=0.02)
          if m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, x):
      return x + self.mix(x)

  class MixVPR(nn.Module):

    def __init__(self, in_channels, in_h, in_w, out_channels, mix_depth, mlp_ratio, out_rows,
                 row_proj_bias=True):
      super().__init__()
      hw = in_h * in_w
      self.mix = nn.Sequential(*[FeatureMixerLayer(hw, mlp_ratio) for _ in range(mix_depth)])
      self.channel_proj = nn.Linear(in_channels, out_channels)
      self.row_proj = nn.Linear(hw, out_rows, bias=row_proj_bias)

    def forward(self, x):
      x = self.mix(x.flatten(2))
      x = self.channel_proj(x.permute(0, 2, 1)).permute(0, 2, 1)
      x = self.row_proj(x)
      return F.normalize(x.flatten(1), p=2, dim=-1)

  return types.SimpleNamespace(AVG=AVG, GeMPool=GeMPool, ConvAP=ConvAP, MixVPR=MixVPR)


def torch_aggregator(model_config, in_channels, in_hw, seed=0):
  """The reference module for `model_config`, with every parameter randomised."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  ref = torch_reference_modules()
  torch.manual_seed(seed)
  name = model_config.aggregator
  if name == 'avg':
    module = ref.AVG()
  elif name == 'gem':
    module = ref.GeMPool(p=model_config.gem_p, eps=model_config.gem_eps)
  elif name == 'convap':
    s1, s2 = model_config.convap_pool_size
    module = ref.ConvAP(in_channels, model_config.convap_out_channels, s1, s2)
  else:
    module = ref.MixVPR(in_channels, in_hw[0], in_hw[1], model_config.mixvpr_out_channels,
                        model_config.mixvpr_mix_depth, model_config.mixvpr_mlp_ratio,
                        model_config.mixvpr_out_rows, model_config.mixvpr_row_proj_bias)
  with torch.no_grad():
    for param in module.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return module.eval()


def small_model_config(aggregator: str, **overrides) -> ml_collections.ConfigDict:
  config = default.get_model_config()
  config.aggregator = aggregator
  config.dtype = 'float32'
  config.convap_out_channels = 16
  config.mixvpr_out_channels = 12
  config.mixvpr_mix_depth = 2
  config.mixvpr_mlp_ratio = 2
  config.mixvpr_out_rows = 3
  for key, value in overrides.items():
    config[key] = value
  return config


def _compare(model_config, features_nchw, tolerance=1e-5):
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  _, c, h, w = features_nchw.shape
  module = torch_aggregator(model_config, c, (h, w))
  with torch.no_grad():
    expected = module(torch.from_numpy(features_nchw)).numpy()
  variables = mapping.aggregator_to_flax(module.state_dict(), model_config, c, (h, w))
  ours_module = aggregators.make_aggregator(model_config, (h, w))
  with jax.default_matmul_precision('highest'):
    ours = ours_module.apply(variables, jnp.asarray(features_nchw.transpose(0, 2, 3, 1)))
  assert ours.dtype == jnp.float32
  assert ours.shape == expected.shape == (
      features_nchw.shape[0], aggregators.descriptor_dim(model_config, c, (h, w)))
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(ours, expected, atol=tolerance, rtol=0)
  return module, variables


def _features(shape, seed=0, positive=False):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return np.abs(x) if positive else x


def test_avg_matches_reference():
  _compare(small_model_config('avg'), _features((2, 8, 5, 7)))


def test_gem_matches_reference():
  # Negative values exercise the clamp; the reference's p is randomised away from 3.
  module, variables = _compare(small_model_config('gem'), _features((2, 8, 5, 7)))
  assert variables['params']['p'].shape == (1,)
  np.testing.assert_allclose(variables['params']['p'], module.p.detach().numpy())


def test_gem_gradient_of_p_matches_reference():
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  config = small_model_config('gem')
  x = _features((2, 6, 4, 3), positive=True) + 0.1
  module = torch_aggregator(config, 6, (4, 3))
  weights = torch.from_numpy(_features((2, 6), seed=1))
  loss = (module(torch.from_numpy(x)) * weights).sum()
  loss.backward()
  variables = mapping.aggregator_to_flax(module.state_dict(), config, 6, (4, 3))
  gem = aggregators.make_aggregator(config, (4, 3))
  loss_fn = lambda params: jnp.sum(
      gem.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1))) * weights.numpy())
  grads = jax.grad(loss_fn)(variables['params'])
  np.testing.assert_allclose(grads['p'], module.p.grad.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('in_hw,pool', [((4, 4), (2, 2)), ((7, 5), (2, 2)), ((7, 5), (3, 3)),
                                        ((3, 5), (2, 4))])
def test_convap_matches_reference(in_hw, pool):
  config = small_model_config('convap', convap_pool_size=pool)
  _compare(config, _features((2, 8) + in_hw))


@pytest.mark.parametrize('in_size,out_size', [(7, 2), (5, 3), (7, 3), (4, 4), (3, 5), (14, 4)])
def test_adaptive_pool_matches_torch(in_size, out_size):
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  x = _features((1, 2, in_size, in_size + 1))
  expected = torch.nn.functional.adaptive_avg_pool2d(
      torch.from_numpy(x), (out_size, out_size + 1)).numpy()
  ours = aggregators.adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)),
                                       (out_size, out_size + 1))
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, atol=1e-6)


@pytest.mark.parametrize('row_proj_bias', [True, False])
def test_mixvpr_matches_reference(row_proj_bias):
  # A non-square map checks the h * W + w token order; mlp_ratio 2 the hidden width.
  config = small_model_config('mixvpr', mixvpr_row_proj_bias=row_proj_bias)
  module, variables = _compare(config, _features((2, 8, 4, 3)))
  assert ('bias' in variables['params']['row_proj']) == row_proj_bias
  assert variables['params']['mix_0']['fc1']['kernel'].shape == (12, 24)


def test_mixvpr_init_matches_reference_distributions():
  config = small_model_config('mixvpr', mixvpr_mix_depth=1, mixvpr_mlp_ratio=1,
                              mixvpr_out_channels=64)
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  torch.manual_seed(0)
  reference = torch_reference_modules().MixVPR(128, 14, 14, 64, 1, 1, 4)
  module = aggregators.make_aggregator(config, (14, 14))
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 14, 14, 128)))['params']
  mixer, ref_mixer = params['mix_0'], reference.mix[0].mix
  np.testing.assert_array_equal(mixer['norm']['scale'], ref_mixer[0].weight.detach().numpy())
  np.testing.assert_array_equal(mixer['norm']['bias'], ref_mixer[0].bias.detach().numpy())
  for ours, theirs in ((mixer['fc1'], ref_mixer[1]), (mixer['fc2'], ref_mixer[3])):
    kernel, weight = np.asarray(ours['kernel']), theirs.weight.detach().numpy()
    assert kernel.shape == weight.T.shape
    assert abs(kernel.std() / weight.std() - 1) < 0.03  # std 0.02
    assert np.abs(kernel).max() < 2.0
    np.testing.assert_array_equal(ours['bias'], theirs.bias.detach().numpy())  # zeros
  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
  for name, fan_in in (('channel_proj', 128), ('row_proj', 196)):
    ours, theirs = params[name], getattr(reference, name)
    kernel, weight = np.asarray(ours['kernel']), theirs.weight.detach().numpy()
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(kernel).max() <= bound and np.abs(weight).max() <= bound
    assert abs(kernel.std() / weight.std() - 1) < 0.1
    assert np.abs(ours['bias']).max() <= bound and np.abs(ours['bias']).max() > bound / 4


def test_convap_init_bounds():
  config = small_model_config('convap', convap_out_channels=256)
  module = aggregators.make_aggregator(config, (4, 4))
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))['params']
  kernel, bias = params['channel_pool']['kernel'], params['channel_pool']['bias']
  assert kernel.shape == (1, 1, 64, 256)
  assert float(jnp.abs(kernel).max()) <= 1 / 8 and float(jnp.abs(kernel).max()) > 0.12
  assert float(jnp.abs(bias).max()) <= 1 / 8


def test_gem_init():
  module = aggregators.make_aggregator(small_model_config('gem', gem_p=3.0), (2, 2))
  params = module.init(jax.random.key(0), jnp.ones((1, 2, 2, 4)))['params']
  np.testing.assert_array_equal(params['p'], [3.0])


def test_seed_mixvpr_parameter_count():
  config = default.get_model_config()  # 256 x 14 x 14 -> 256 channels x 4 rows, depth 5.
  module = aggregators.make_aggregator(config, (14, 14))
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 14, 14, 256)))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
  assert count == 454_660  # The seed's "454 K".
  assert aggregators.descriptor_dim(config, 256, (14, 14)) == 1024
  pytest.importorskip('torch', reason='torch is the reference implementation')
  reference = torch_reference_modules().MixVPR(256, 14, 14, 256, 5, 1, 4)
  assert count == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize('name', aggregators.AGGREGATORS)
def test_bfloat16_gives_float32_unit_descriptors(name):
  config = small_model_config(name)
  x = jnp.asarray(_features((2, 4, 4, 8), positive=True))
  f32 = aggregators.make_aggregator(config, (4, 4))
  bf16 = aggregators.make_aggregator(config, (4, 4), dtype=jnp.bfloat16)
  variables = f32.init(jax.random.key(0), x)
  expected = f32.apply(variables, x)
  ours = bf16.apply(variables, x.astype(jnp.bfloat16))
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ours, expected, atol=0.03)


def test_zero_features_give_finite_descriptors():
  x = jnp.zeros((1, 4, 4, 8))
  module = aggregators.make_aggregator(small_model_config('avg'), (4, 4))
  out = module.apply({}, x)
  assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_errors():
  with pytest.raises(ValueError, match='avg, gem, convap, mixvpr'):
    aggregators.make_aggregator(small_model_config('netvlad'), (4, 4))
  with pytest.raises(ValueError, match='avg, gem, convap, mixvpr'):
    aggregators.descriptor_dim(small_model_config('netvlad'), 8, (4, 4))
  module = aggregators.make_aggregator(small_model_config('mixvpr'), (4, 4))
  with pytest.raises(ValueError, match='image size'):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 5, 4, 8)))


def test_mixvpr_gradients_match_reference_autograd():
  """Gradients of MixVPR (the LayerNorm affine folded into fc1, 2-D mixer rows) against torch
  autograd of the reference module in float64: within 4x the error of the reference's own
  float32 autograd, for every parameter and the input."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  config = small_model_config('mixvpr')
  features = _features((2, 8, 4, 3))
  reference = torch_aggregator(config, 8, (4, 3))
  with torch.no_grad():  # LayerNorm affine away from (1, 0), so the fold is exercised.
    for layer in reference.mix:
      layer.mix[0].weight.add_(torch.linspace(-0.5, 0.5, layer.mix[0].weight.numel()))
      layer.mix[0].bias.add_(torch.linspace(-0.3, 0.3, layer.mix[0].bias.numel()))
  weights = np.random.default_rng(1).standard_normal(
      (2, aggregators.descriptor_dim(config, 8, (4, 3))))

  def torch_gradients(dtype):
    module = reference.to(dtype)
    x = torch.tensor(features, dtype=dtype, requires_grad=True)
    module.zero_grad()
    (module(x) * torch.tensor(weights, dtype=dtype)).sum().backward()
    grads = {name: p.grad.numpy().astype(np.float64) for name, p in module.named_parameters()}
    return grads, x.grad.numpy().transpose(0, 2, 3, 1).astype(np.float64)

  exact, exact_x = torch_gradients(torch.float64)
  torch32, torch32_x = torch_gradients(torch.float32)
  variables = mapping.aggregator_to_flax(reference.to(torch.float32).state_dict(), config, 8,
                                         (4, 3))
  module = aggregators.make_aggregator(config, (4, 3))
  loss = lambda v, x: jnp.sum(module.apply(v, x) * weights.astype(np.float32))
  with jax.default_matmul_precision('highest'):
    grads, grad_x = jax.grad(loss, argnums=(0, 1))(
        variables, jnp.asarray(features.transpose(0, 2, 3, 1)))
  params = grads['params']
  pairs = [(exact_x, torch32_x, np.asarray(grad_x))]
  torch_names = {'norm': 'mix.0', 'fc1': 'mix.1', 'fc2': 'mix.3'}
  for i in range(int(config.mixvpr_mix_depth)):
    for layer, torch_layer in torch_names.items():
      for leaf, torch_leaf in (('scale', 'weight'), ('kernel', 'weight'), ('bias', 'bias')):
        if leaf in params[f'mix_{i}'][layer]:
          name = f'mix.{i}.{torch_layer}.{torch_leaf}'
          flip = (lambda a: a.T) if leaf == 'kernel' else (lambda a: a)
          pairs.append((flip(exact[name]), flip(torch32[name]),
                        np.asarray(params[f'mix_{i}'][layer][leaf])))
  for layer in ('channel_proj', 'row_proj'):
    pairs.append((exact[f'{layer}.weight'].T, torch32[f'{layer}.weight'].T,
                  np.asarray(params[layer]['kernel'])))
    pairs.append((exact[f'{layer}.bias'], torch32[f'{layer}.bias'],
                  np.asarray(params[layer]['bias'])))
  assert len(pairs) == 1 + 6 * int(config.mixvpr_mix_depth) + 4
  for expected, float32_reference, value in pairs:
    budget = 4 * np.max(np.abs(float32_reference - expected)) + 1e-7
    assert np.max(np.abs(value - expected)) <= budget
