"""Optimisers and schedules against torch.optim (the reference the recipes were tuned with)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vpr_jax.configs import default
from vpr_jax import optim


def _config(**optim_overrides):
  config = default.get_config()
  config.num_epochs = 4
  for key, value in optim_overrides.items():
    config.optim[key] = value
  return config


def _torch_lr_sequence(torch, config, steps_per_epoch, num_steps):
  """Learning rates the PyTorch family applies: the seed's warmup hook + an epoch scheduler."""
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=config.optim.learning_rate)
  if config.optim.schedule == 'multistep':
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=list(config.optim.milestones), gamma=config.optim.gamma)
  else:
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=config.num_epochs * steps_per_epoch)
  lrs = []
  for step in range(num_steps):
    if step < config.optim.warmup_steps:  # Lightning optimizer_step hook of the seed
      for group in opt.param_groups:
        group['lr'] = min(1.0, (step + 1) / config.optim.warmup_steps) * config.optim.learning_rate
    lrs.append(opt.param_groups[0]['lr'])
    opt.step()
    if config.optim.schedule == 'multistep':
      if (step + 1) % steps_per_epoch == 0:
        scheduler.step()
    else:
      scheduler.step()
  return np.array(lrs)


def test_multistep_schedule_matches_torch():
  torch = pytest.importorskip('torch', reason='torch is the reference for the schedule')
  config = _config(warmup_steps=4, milestones=(1, 2, 3), gamma=0.3)
  steps_per_epoch = 6
  schedule = optim.make_schedule(config.optim, steps_per_epoch, config.num_epochs)
  ours = np.array([schedule(step) for step in range(24)])
  np.testing.assert_allclose(ours, _torch_lr_sequence(torch, config, steps_per_epoch, 24),
                             rtol=1e-6)
  # The seed: 600 warmup steps, 625 steps per epoch, milestones (5, 10, 15, 25).
  seed = default.get_config()
  schedule = optim.make_schedule(seed.optim, 625, seed.num_epochs)
  np.testing.assert_allclose(float(schedule(0)), 5e-4 / 600, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(599)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(5 * 625 - 1)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(5 * 625)), 5e-4 * 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(25 * 625)), 5e-4 * 0.3 ** 4, rtol=1e-6)


def test_linear_schedule_matches_torch_linear_lr():
  """SALAD's LinearLR(start_factor=1, end_factor=0.2, total_iters=N), stepped every step."""
  torch = pytest.importorskip('torch', reason='torch is the reference for the schedule')
  config = _config(schedule='linear', warmup_steps=0, linear_end_factor=0.2, linear_steps=10,
                   learning_rate=6e-5)
  schedule = optim.make_schedule(config.optim, steps_per_epoch=5, num_epochs=config.num_epochs)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.AdamW([param], lr=6e-5)
  scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.2,
                                                total_iters=10)
  want = []
  for _ in range(15):
    want.append(opt.param_groups[0]['lr'])
    opt.step()
    scheduler.step()
  ours = np.array([schedule(step) for step in range(15)])
  np.testing.assert_allclose(ours, want, rtol=1e-5)
  assert ours[-1] == pytest.approx(6e-5 * 0.2, rel=1e-5)


def test_cosine_and_constant_schedules():
  torch = pytest.importorskip('torch', reason='torch is the reference for the schedule')
  config = _config(warmup_steps=0, schedule='cosine')
  schedule = optim.make_schedule(config.optim, 5, config.num_epochs)
  ours = np.array([schedule(step) for step in range(20)])
  np.testing.assert_allclose(ours, _torch_lr_sequence(torch, config, 5, 20), rtol=1e-5,
                             atol=1e-12)
  constant = optim.make_schedule(_config(warmup_steps=2, schedule='constant').optim, 5, 4)
  np.testing.assert_allclose([float(constant(s)) for s in (0, 1, 2, 100)],
                             [2.5e-4, 5e-4, 5e-4, 5e-4], rtol=1e-6)


def _run_both(torch, name, dtype, num_steps):
  config = _config(optimizer=name, learning_rate=0.01, weight_decay=0.1, momentum=0.9,
                   warmup_steps=0, schedule='constant')
  rng = np.random.default_rng(0)
  init = rng.normal(size=(4, 3)).astype(dtype)
  grads = [rng.normal(size=(4, 3)).astype(dtype) for _ in range(num_steps)]

  tx, _ = optim.make_optimizer(config, steps_per_epoch=10)
  params = {'w': jnp.asarray(init)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({'w': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)

  weight = torch.nn.Parameter(torch.tensor(init))
  if name in ('adamw', 'adam'):
    # The family's configure_optimizers builds AdamW for optimizer='adam'.
    opt = torch.optim.AdamW([weight], lr=0.01, weight_decay=0.1)
  elif name == 'adam_l2':
    opt = torch.optim.Adam([weight], lr=0.01, weight_decay=0.1)
  else:
    opt = torch.optim.SGD([weight], lr=0.01, momentum=0.9, weight_decay=0.1)
  for g in grads:
    weight.grad = torch.tensor(g)
    opt.step()
  assert params['w'].dtype == dtype
  return np.asarray(params['w']), weight.detach().numpy()


@pytest.mark.parametrize('name', ['adamw', 'adam', 'adam_l2', 'sgd'])
def test_one_step_matches_torch_optim(name):
  torch = pytest.importorskip('torch', reason='torch.optim is the reference optimiser')
  ours, theirs = _run_both(torch, name, np.float32, num_steps=1)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize('name', ['adamw', 'adam', 'adam_l2', 'sgd'])
def test_several_steps_match_torch_optim_in_float64(name):
  # float64 removes rounding noise, so momentum, bias correction and decay order are what is
  # compared over several steps.
  torch = pytest.importorskip('torch', reason='torch.optim is the reference optimiser')
  with jax.enable_x64(True):
    ours, theirs = _run_both(torch, name, np.float64, num_steps=4)
  # atol: the learning rate is a float32 value (0.01 to 7 digits) even here.
  np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=5e-9)


def test_frozen_parameters_get_no_update_no_decay_no_state():
  config = _config(optimizer='adamw', weight_decay=0.5, warmup_steps=0, schedule='constant')
  params = {'backbone': {'conv1': {'kernel': jnp.ones((2, 2))}},
            'aggregator': {'dense': {'kernel': jnp.ones((2, 2))}}}
  mask = {'backbone': {'conv1': {'kernel': True}}, 'aggregator': {'dense': {'kernel': False}}}
  tx, _ = optim.make_optimizer(config, steps_per_epoch=10, frozen_mask=mask)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['backbone']['conv1']['kernel'], 1.0)
  assert np.all(np.asarray(new['aggregator']['dense']['kernel']) < 1.0)
  # Optimiser state (Adam moments) exists only for trained parameters.
  state_sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, 'size') and x.ndim)
  assert state_sizes == 2 * 4


@pytest.mark.parametrize('field,value', [('optimizer', 'lamb'), ('schedule', 'poly')])
def test_unknown_names_list_choices(field, value):
  config = _config(**{field: value})
  with pytest.raises(ValueError, match='valid choices'):
    optim.make_optimizer(config, steps_per_epoch=10)


def test_schedule_is_jittable():
  schedule = optim.make_schedule(_config(warmup_steps=3).optim, 4, 4)
  jitted = jax.jit(schedule)
  np.testing.assert_allclose([float(jitted(s)) for s in range(6)],
                             [float(schedule(s)) for s in range(6)], rtol=1e-7)
