"""ResNet backbone: parity with torchvision (eval and train mode), crop, freeze, init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.conversion import mapping
from vpr_jax.models import resnet

STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4')


def randomised_torchvision_resnet(name: str, seed: int = 0, layers_to_crop=()):
  """torchvision ResNet (weights=None) with every weight, BN affine and BN running stat random."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  torchvision = pytest.importorskip('torchvision', reason='torchvision is the reference')
  torch.manual_seed(seed)
  net = getattr(torchvision.models, name)(weights=None)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  for i in layers_to_crop:
    setattr(net, f'layer{i}', None)
  return net


def torch_stage_outputs(net, x):
  """Per-stage outputs of a torchvision ResNet (as the family's backbone runs it), NHWC numpy."""
  outputs = {}
  y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
  outputs['stem'] = y
  for name in STAGES[1:]:
    layer = getattr(net, name)
    if layer is None:
      break
    y = layer(y)
    outputs[name] = y
  return {k: v.detach().permute(0, 2, 3, 1).numpy() for k, v in outputs.items()}


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _run_torch(name, depth, x):
  """torchvision (eval, train) stage outputs and the running stats after the train forward."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  net = randomised_torchvision_resnet(name, seed=depth)
  dtype = np.float32
  if x.dtype == torch.float64:
    net, dtype = net.double(), np.float64
  with torch.no_grad():
    eval_outputs = torch_stage_outputs(net.eval(), x)
    train_outputs = torch_stage_outputs(net.train(), x)
  stats = mapping.torchvision_resnet_to_flax(net.state_dict(), depth, (), dtype=dtype)
  return eval_outputs, train_outputs, stats['batch_stats']


def _run_flax(variables, depth, x, dtype, with_eval=True):
  """ResNet (eval, train) stage outputs and updated running stats, in one compiled program."""
  model = resnet.ResNet(depth=depth, dtype=dtype)

  def run(variables, x):
    eval_outputs = model.apply(variables, x, train=False) if with_eval else None
    train_outputs, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return eval_outputs, train_outputs, updates['batch_stats']

  with jax.default_matmul_precision('highest'):
    return jax.jit(run)(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))


def _stats_errors(ours, theirs):
  flat_ours = jax.tree_util.tree_leaves_with_path(ours)
  flat_theirs = dict(jax.tree_util.tree_leaves_with_path(theirs))
  assert len(flat_ours) == len(flat_theirs)
  return {jax.tree_util.keystr(path): relative_error(value, flat_theirs[path])
          for path, value in flat_ours}


@pytest.mark.parametrize('name,depth', [('resnet18', 18), ('resnet50', 50)])
def test_matches_torchvision(name, depth):
  """Per-stage features in eval and train mode, and the running stats after a train forward."""
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  initial = mapping.torchvision_resnet_to_flax(
      randomised_torchvision_resnet(name, seed=depth).state_dict(), depth, ())
  ref_eval, ref_train, ref_stats = _run_torch(name, depth, x)
  _, exact_train, exact_stats = _run_torch(name, depth, x.double())
  ours_eval, ours_train, ours_stats = _run_flax(initial, depth, x, jnp.float32)

  for stage in STAGES:
    assert ours_eval[stage].dtype == ours_train[stage].dtype == jnp.float32
    assert ours_eval[stage].shape == ref_eval[stage].shape, stage
    assert relative_error(ours_eval[stage], ref_eval[stage]) <= 1e-5, stage
    # Batch statistics of 2 images over 4x4 / 2x2 maps (layer3 / layer4 of ResNet-50 at 64x64)
    # amplify float32 rounding: torch's own float32 result is then ~3e-5 / ~1e-4 from its float64
    # one. Require ours to be as close to torch float32 as torch float32 is to the exact result;
    # the float64 pass below checks exact agreement.
    tolerance = max(1e-5, 2 * relative_error(ref_train[stage], exact_train[stage]))
    assert relative_error(ours_train[stage], ref_train[stage]) <= tolerance, stage
  np.testing.assert_array_equal(ours_eval['features'], ours_eval['layer4'])
  # torch updated its running statistics in place (momentum 0.1, unbiased variance).
  tolerance = max(1e-5, 2 * max(_stats_errors(ref_stats, exact_stats).values()))
  errors = _stats_errors(ours_stats, ref_stats)
  assert max(errors.values()) <= tolerance, errors
  assert not np.allclose(initial['batch_stats']['layer2']['1']['bn2']['var'],
                         ref_stats['layer2']['1']['bn2']['var'])

  if depth == 50:  # The deep train-mode stages, exactly (float32 cannot show it, see above).
    with jax.enable_x64(True):
      initial64 = jax.tree.map(lambda v: np.asarray(v, np.float64), initial)
      _, ours_train, ours_stats = _run_flax(initial64, depth, x.double(), jnp.float64,
                                            with_eval=False)
      for stage in STAGES:
        assert ours_train[stage].dtype == jnp.float64
        assert relative_error(ours_train[stage], exact_train[stage]) <= 1e-10, stage
      errors = _stats_errors(ours_stats, exact_stats)
      assert max(errors.values()) <= 1e-10, errors


@pytest.mark.parametrize('depth,crop,channels', [
    (18, (), 512), (18, (4,), 256), (18, (3, 4), 128), (34, (4,), 256),
    (50, (), 2048), (50, (4,), 1024), (101, (3, 4), 512)])
def test_out_channels(depth, crop, channels):
  assert resnet.resnet_out_channels(depth, crop) == channels


def test_crop_changes_output():
  x = jnp.zeros((1, 64, 64, 3))
  full = resnet.ResNet(depth=18)
  cropped = resnet.ResNet(depth=18, layers_to_crop=(4,))
  shapes = jax.eval_shape(lambda: full.init_with_output(jax.random.key(0), x))
  out_full, vars_full = shapes
  out_crop, vars_crop = jax.eval_shape(lambda: cropped.init_with_output(jax.random.key(0), x))
  assert out_full['features'].shape == (1, 2, 2, 512)
  # ResNet-18 with layer4 removed: 256 channels at 1/16 resolution.
  assert out_crop['features'].shape == (1, 4, 4, 256)
  assert 'layer4' not in out_crop and 'layer4' not in vars_crop['params']
  assert 'layer4' in vars_full['params']
  assert resnet.resnet_out_hw((224, 224), (4,)) == (14, 14)
  assert resnet.resnet_out_hw((320, 320), (4,)) == (20, 20)
  assert resnet.resnet_out_hw((64, 64), ()) == (2, 2)
  assert resnet.resnet_out_hw((480, 640), (4,)) == (30, 40)
  # Odd sizes round up at every stride-2 op, as torchvision's paddings do.
  odd = jax.eval_shape(lambda: cropped.init_with_output(jax.random.key(0),
                                                        jnp.zeros((1, 61, 75, 3))))[0]
  assert odd['features'].shape[1:3] == resnet.resnet_out_hw((61, 75), (4,)) == (4, 5)


def test_out_hw_matches_torchvision():
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  net = randomised_torchvision_resnet('resnet18', layers_to_crop=(4,)).eval()
  with torch.no_grad():
    out = torch_stage_outputs(net, torch.zeros(1, 3, 61, 75))
  assert out['layer3'].shape[1:3] == resnet.resnet_out_hw((61, 75), (4,))


SMALL_INPUT = (2, 16, 16, 3)


def random_variables(module, *args, seed: int = 0, **kwargs):
  """Random variables of the right structure without running flax init.

  (Compiling the PRNG programs of a whole ResNet init takes ~10 s on a small CPU.)
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if 'var' in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    if 'scale' in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 25
    return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def _grads(model, variables, x):
  def loss_fn(params):
    outputs, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                             train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.square(outputs['features']))
  return jax.grad(loss_fn)


def _count_convs(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count('conv_general_dilated')


def test_frozen_stages_get_no_gradient():
  x = jax.random.normal(jax.random.key(1), SMALL_INPUT)
  model = resnet.ResNet(depth=18, layers_to_crop=(4,), layers_to_freeze=2)
  variables = random_variables(model, x)
  grads = jax.jit(_grads(model, variables, x))(variables['params'])
  for name in ('conv1', 'bn1', 'layer1', 'layer2'):
    assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(grads[name])), name
  assert all(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads['layer3']))


def test_freezing_removes_backward_convolutions():
  x = jax.ShapeDtypeStruct(SMALL_INPUT, jnp.float32)
  counts = []
  for freeze in (-1, 0, 1, 2, 3):
    model = resnet.ResNet(depth=18, layers_to_freeze=freeze)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    grad_fn = lambda variables, x: _grads(model, variables, x)(variables['params'])
    counts.append(_count_convs(grad_fn, variables, x))
  # Every frozen stage drops its weight-gradient (and input-gradient) convolutions, so the
  # backward pass does not run through it.
  assert all(a > b for a, b in zip(counts, counts[1:])), counts


def test_freeze_bn_stats_keeps_running_stats():
  x = jax.random.normal(jax.random.key(1), SMALL_INPUT) * 3.0 + 1.0
  kwargs = dict(depth=18, layers_to_crop=(4,), layers_to_freeze=2)
  frozen_bn = resnet.ResNet(freeze_bn_stats=True, **kwargs)
  seed_like = resnet.ResNet(**kwargs)
  assert frozen_bn.frozen_bn_stages() == ('conv1', 'bn1', 'layer1', 'layer2')
  assert seed_like.frozen_bn_stages() == ()
  variables = random_variables(frozen_bn, x)

  @jax.jit
  def run(variables):
    train_outputs, updates = frozen_bn.apply(variables, x, train=True, mutable=['batch_stats'])
    eval_outputs = frozen_bn.apply(variables, x, train=False)
    _, seed_updates = seed_like.apply(variables, x, train=True, mutable=['batch_stats'])
    return train_outputs, updates, eval_outputs, seed_updates

  outputs, updates, eval_outputs, seed_updates = run(variables)
  old, new = variables['batch_stats'], updates['batch_stats']
  for name in ('bn1', 'layer1', 'layer2'):
    for a, b in zip(jax.tree_util.tree_leaves(old[name]), jax.tree_util.tree_leaves(new[name])):
      np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(old['layer3']),
                                                    jax.tree_util.tree_leaves(new['layer3'])))
  # Frozen stages compute exactly what eval mode computes.
  np.testing.assert_allclose(outputs['layer2'], eval_outputs['layer2'], rtol=1e-6, atol=1e-6)
  # The default (the seed's) keeps updating the frozen stages' running statistics.
  assert not np.allclose(seed_updates['batch_stats']['bn1']['mean'], old['bn1']['mean'])


def test_init_follows_torchvision():
  torch = pytest.importorskip('torch', reason='torch is the reference implementation')
  torchvision = pytest.importorskip('torchvision', reason='torchvision is the reference')
  torch.manual_seed(0)
  reference = torchvision.models.resnet50(weights=None).layer3[0]
  block = resnet.Bottleneck(features=256, stride=2, downsample=True)
  variables = jax.jit(block.init, static_argnums=2)(
      jax.random.key(0), jnp.zeros((1, 4, 4, 512)), False)
  params, stats = variables['params'], variables['batch_stats']
  pairs = [(params['conv1']['kernel'], reference.conv1.weight),
           (params['conv2']['kernel'], reference.conv2.weight),
           (params['conv3']['kernel'], reference.conv3.weight),
           (params['downsample_conv']['kernel'], reference.downsample[0].weight)]
  for ours, theirs in pairs:
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.transpose(2, 3, 1, 0).shape
    # kaiming_normal_(fan_out): only the spread (not the draws) can be compared.
    assert abs(ours.std() / theirs.std() - 1) < 0.05
    assert abs(ours.mean()) < 0.05 * ours.std()
  for name in ('bn1', 'bn2', 'bn3', 'downsample_bn'):
    torch_bn = reference.downsample[1] if name == 'downsample_bn' else getattr(reference, name)
    # zero_init_residual is False in torchvision: bn3 starts at 1 too.
    np.testing.assert_array_equal(params[name]['scale'], torch_bn.weight.detach().numpy())
    np.testing.assert_array_equal(params[name]['bias'], torch_bn.bias.detach().numpy())
    np.testing.assert_array_equal(stats[name]['mean'], torch_bn.running_mean.numpy())
    np.testing.assert_array_equal(stats[name]['var'], torch_bn.running_var.numpy())


def test_bfloat16_compute_float32_state():
  x = jax.random.normal(jax.random.key(1), SMALL_INPUT)
  model = resnet.ResNet(depth=18, layers_to_crop=(4,), dtype=jnp.bfloat16)
  reference = resnet.ResNet(depth=18, layers_to_crop=(4,))
  variables = random_variables(model, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(
      jax.eval_shape(model.init, jax.random.key(0), x)))

  @jax.jit
  def run(variables):
    outputs, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    # Eval mode for the comparison: train-mode BN over 2 images of 1x1 (layer3 at 16x16) maps
    # them to +-1 and magnifies any rounding difference.
    return outputs, updates, model.apply(variables, x), reference.apply(variables, x)

  outputs, updates, eval_outputs, expected = run(variables)
  assert outputs['features'].dtype == eval_outputs['features'].dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updates))
  assert relative_error(eval_outputs['features'], expected['features']) < 0.05


def test_bad_arguments():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  init = lambda model: jax.eval_shape(model.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='depth'):
    init(resnet.ResNet(depth=19))
  with pytest.raises(ValueError, match='layers_to_crop'):
    init(resnet.ResNet(depth=18, layers_to_crop=(3,)))
  with pytest.raises(ValueError, match='layers_to_freeze'):
    init(resnet.ResNet(depth=18, layers_to_freeze=4))
  with pytest.raises(ValueError, match='depth'):
    resnet.resnet_out_channels(152)


def test_batch_norm_cross_device_statistics_under_pmap():
  if jax.local_device_count() < 2:
    pytest.skip('needs 2 devices (tests/conftest.py sets 8 CPU devices)')
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)) * 2.0 + 1.0
  variables = {'params': {'scale': jnp.full((5,), 1.5), 'bias': jnp.full((5,), 0.2)},
               'batch_stats': {'mean': jnp.zeros(5), 'var': jnp.ones(5)}}
  whole = resnet.BatchNorm()
  expected, expected_updates = whole.apply(variables, x, train=True, mutable=['batch_stats'])

  sharded = resnet.BatchNorm(axis_name='batch')
  replicated = jax.tree.map(lambda v: jnp.stack([v, v]), variables)
  outputs, updates = jax.pmap(
      lambda v, x: sharded.apply(v, x, train=True, mutable=['batch_stats']),
      axis_name='batch', devices=jax.local_devices()[:2])(replicated, x.reshape(2, 2, 3, 3, 5))
  np.testing.assert_allclose(outputs.reshape(x.shape), expected, rtol=1e-5, atol=1e-6)
  for key in ('mean', 'var'):  # Unbiased over all 4 images, identical on both devices.
    np.testing.assert_allclose(updates['batch_stats'][key][0],
                               expected_updates['batch_stats'][key], rtol=1e-6)
    np.testing.assert_array_equal(updates['batch_stats'][key][0], updates['batch_stats'][key][1])


def test_batch_norm_one_pass_statistics_of_bfloat16_inputs():
  """bf16 inputs get the statistics in one pass (E[x^2] - E[x]^2 in float32): the same mean and
  variance as the float64 two-pass statistics of the same (exactly representable) values, far
  within bf16's own resolution (2^-8), also with a mean 8 standard deviations from zero."""
  x = (jax.random.normal(jax.random.key(2), (16, 9, 9, 6)) * 0.5 + 4.0).astype(jnp.bfloat16)
  variables = {'params': {'scale': jnp.ones(6), 'bias': jnp.zeros(6)},
               'batch_stats': {'mean': jnp.zeros(6), 'var': jnp.ones(6)}}
  _, updates = resnet.BatchNorm(momentum=0.0, dtype=jnp.bfloat16).apply(
      variables, x, train=True, mutable=['batch_stats'])
  values = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, 6)
  np.testing.assert_allclose(updates['batch_stats']['mean'], values.mean(0), rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'], values.var(0, ddof=1), rtol=2e-4)


def _bottleneck(x, variables, **kwargs):
  """Output, updated running statistics and gradients (params, input) of a train-mode
  stride-1 Bottleneck with a widening downsample (both fold points)."""
  block = resnet.Bottleneck(features=8, downsample=True, **kwargs)

  def loss(params, x):
    out, updates = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                               True, mutable=['batch_stats'])
    weights = jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))
    return jnp.sum(out * weights), (out, updates['batch_stats'])

  (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables['params'], x)
  return out, stats, grads


def test_bottleneck_batch_norm_folded_into_widening_convs():
  """conv3 -> bn3 and the stride-1 downsample folded into one convolution each (statistics from
  the conv input): in float64 the same output, running statistics and gradients as conv then
  BatchNorm, to float64 rounding; in bf16 (folded by default) within bf16 rounding of it."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(3), (6, 5, 5, 16), jnp.float64) + 0.5
    block = resnet.Bottleneck(features=8, downsample=True, dtype=jnp.float64)
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64),
                             random_variables(block, x, False))
    folded = _bottleneck(x, variables, dtype=jnp.float64, fold_batch_norm=True)
    plain = _bottleneck(x, variables, dtype=jnp.float64, fold_batch_norm=False)
    for ours, theirs in zip(jax.tree.leaves(folded), jax.tree.leaves(plain)):
      np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    # out, 4 x 2 running statistics, 12 parameter gradients and the input gradient.
    assert len(jax.tree.leaves(folded)) == 1 + 8 + 12 + 1
  x32 = np.asarray(x, np.float32)
  variables32 = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
  bf16 = _bottleneck(x32.astype(jnp.bfloat16), variables32, dtype=jnp.bfloat16)
  assert relative_error(bf16[0], plain[0]) < 0.03
  for ours, theirs in zip(jax.tree.leaves(bf16[1]), jax.tree.leaves(plain[1])):
    assert relative_error(ours, theirs) < 0.02


def test_bfloat16_resnet50_folds_the_widening_batch_norms(monkeypatch):
  """Train mode in bf16: conv3 of every block and layer1's downsample (3 + 4 + 6 + 1 = 14 in a
  ResNet-50 cropped after layer3) take their statistics from the conv input; float32 and eval
  mode none."""
  calls = []
  original = resnet.conv1x1_output_moments
  monkeypatch.setattr(resnet, 'conv1x1_output_moments',
                      lambda *args: calls.append(args[0].shape) or original(*args))
  x = jnp.ones((2, 32, 32, 3))
  for dtype, train, expected in ((jnp.bfloat16, True, 14), (jnp.float32, True, 0),
                                 (jnp.bfloat16, False, 0)):
    model = resnet.ResNet(depth=50, layers_to_crop=(4,), layers_to_freeze=2, dtype=dtype)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    calls.clear()
    jax.eval_shape(lambda v: model.apply(v, x, train=train, mutable=['batch_stats']), variables)
    assert len(calls) == expected


def test_folded_batch_norm_under_pmap_uses_the_global_batch():
  """The folded BatchNorm of 8 devices under pmap (moments averaged over the devices) gives the
  one-device, unfolded result of the whole batch and the same running statistics."""
  x = np.asarray(jax.random.normal(jax.random.key(4), (16, 5, 5, 16)) + 0.5, np.float32)
  plain = resnet.Bottleneck(features=8, downsample=True, fold_batch_norm=False)
  variables = random_variables(plain, x[:1], False)
  expected, expected_stats = plain.apply(variables, x, True, mutable=['batch_stats'])
  folded = resnet.Bottleneck(features=8, downsample=True, fold_batch_norm=True,
                             bn_axis_name='devices')
  run = jax.pmap(lambda v, x: folded.apply(v, x, True, mutable=['batch_stats']),
                 axis_name='devices', in_axes=(None, 0))
  out, stats = run(variables, x.reshape((8, 2) + x.shape[1:]))
  np.testing.assert_allclose(np.asarray(out).reshape(x.shape[:-1] + (32,)), expected,
                             rtol=1e-4, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               jax.tree.map(lambda a: a[0], stats), expected_stats)
