"""Data parallelism: pmap and jit over 8 CPU devices compute the single-device step exactly."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from vpr_jax.configs import default
from vpr_jax import losses
from vpr_jax import optim
from vpr_jax import parallel
from vpr_jax.errors import ConfigError
from vpr_jax.training import state as train_state
from vpr_jax.training import step as train_step_lib
from vpr_jax.models import vpr_model

P, K, SIZE = 8, 2, 32


def tiny_config():
  """ResNet-18 cut after layer2, a one-block MixVPR, 32x32 images, P=8 K=2, float32."""
  config = default.get_config()
  config.image_size = (SIZE, SIZE)
  config.model.layers_to_crop = (3, 4)
  config.model.layers_to_freeze = 0  # the stem stays frozen; layer1/layer2 BatchNorms train
  config.model.dtype = 'float32'
  config.model.mixvpr_out_channels = 16
  config.model.mixvpr_mix_depth = 1
  config.model.mixvpr_out_rows = 2
  config.data.places_per_batch = P
  config.data.images_per_place = K
  # SGD: the update is linear in the gradient, so a gradient off by any factor shows.
  config.optim.optimizer = 'sgd'
  config.optim.learning_rate = 0.1
  config.optim.warmup_steps = 0
  return config


class _CountingLoss:
  """The seed's loss; counts how often it is traced (once per compilation)."""

  def __init__(self, config):
    self.fn = losses.make_loss(config.loss.name, config.loss.params, config.loss.miner_name,
                               config.loss.miner_params)
    self.traces = 0

  def __call__(self, descriptors, labels):
    self.traces += 1
    return self.fn(descriptors, labels)


def _batch(seed):
  rng = np.random.default_rng(seed)
  return {'images': rng.integers(0, 256, (P, K, SIZE, SIZE, 3), dtype=np.uint8),
          'labels': np.repeat(np.arange(P, dtype=np.int32)[:, None] + 10 * seed, K, axis=1)}


@pytest.fixture(scope='module')
def setup():
  config = tiny_config()
  model = vpr_model.build_model(config)
  variables = vpr_model.init_variables(model, jax.random.PRNGKey(0), config.image_size)
  frozen = vpr_model.frozen_param_mask(variables['params'], config.model.layers_to_freeze)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=10, frozen_mask=frozen)
  state = jax.device_get(train_state.create_train_state(config, model, None, tx=tx,
                                                     variables=variables))
  rng = jax.random.PRNGKey(1)
  reference_loss = _CountingLoss(config)
  step = jax.jit(functools.partial(train_step_lib.train_step, model=model, loss_fn=reference_loss,
                                   schedule=schedule))
  new_state, metrics = step(state, parallel.flatten_places(_batch(0)), rng)
  return dict(config=config, state=state, schedule=schedule, rng=rng,
              expected=jax.device_get((new_state, metrics)), compiled={})


def _parallel_step(setup, mode):
  """The step compiled for `mode` (cached: the no-recompile test reuses it)."""
  if mode not in setup['compiled']:
    dp = parallel.DataParallel(mode)
    model = vpr_model.build_model(setup['config'], bn_axis_name=dp.axis_name)
    loss = _CountingLoss(setup['config'])
    step = dp.compile_step(functools.partial(
        train_step_lib.train_step, model=model, loss_fn=loss, schedule=setup['schedule'],
        axis_name=dp.axis_name))
    setup['compiled'][mode] = (dp, step, loss)
  return setup['compiled'][mode]


@pytest.mark.parametrize('mode', ['pmap', 'jit'])
def test_matches_single_device(setup, mode):
  dp, step, _ = _parallel_step(setup, mode)
  assert dp.num_devices == 8
  state = dp.replicate(setup['state'])
  new_state, metrics = step(state, dp.shard_batch(parallel.flatten_places(_batch(0))),
                            setup['rng'])
  new_state, metrics = dp.to_host(new_state), dp.to_host(metrics)
  expected_state, expected_metrics = setup['expected']
  np.testing.assert_allclose(metrics['loss'], expected_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['b_acc'], expected_metrics['b_acc'], rtol=1e-6)
  np.testing.assert_allclose(metrics['grad_norm'], expected_metrics['grad_norm'], rtol=1e-4)
  # The step moved the parameters visibly (lr 0.1), so a wrong gradient scale would show.
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), expected_state.params,
                       setup['state'].params)
  assert max(jax.tree.leaves(moved)) > 1e-3
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               new_state.params, expected_state.params)
  # Running statistics of the global batch (per-device statistics would differ by far more).
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               new_state.batch_stats, expected_state.batch_stats)
  assert int(new_state.step) == 1


@pytest.mark.parametrize('mode', ['pmap', 'jit'])
def test_step_compiles_once(setup, mode):
  dp, step, loss = _parallel_step(setup, mode)
  state = dp.replicate(setup['state'])
  for seed in range(3):
    state, _ = step(state, dp.shard_batch(parallel.flatten_places(_batch(seed))), setup['rng'])
  jax.block_until_ready(state)
  assert loss.traces == 1
  assert int(dp.to_host(state.step)) == 3


def test_batch_sizes_and_flatten():
  sizes = parallel.batch_sizes(100, 4)
  assert (sizes.images_global, sizes.images_per_device) == (400, 50)
  assert 'global 100 places x 4 = 400 images' in sizes.describe()
  with pytest.raises(ValueError, match='multiple of 8'):
    parallel.batch_sizes(5, 3)
  flat = parallel.flatten_places(_batch(0))
  assert flat['images'].shape == (P * K, SIZE, SIZE, 3) and flat['labels'].shape == (P * K,)
  np.testing.assert_array_equal(flat['labels'][:4], [0, 0, 1, 1])


def test_unknown_mode_lists_choices():
  with pytest.raises(ValueError, match='valid choices: jit, pmap'):
    parallel.DataParallel('gspmd')


def test_sync_batch_norm_must_be_a_bool():
  config = tiny_config()
  parallel.check_config(config)
  assert config.sync_batch_norm is True  # The default: the one-device semantics.
  # A config file of one's own may define the field with another type.
  fields = config.to_dict()
  fields['sync_batch_norm'] = 'no'
  with pytest.raises(ConfigError, match="sync_batch_norm must be True or False, got 'no'"):
    parallel.check_config(ml_collections.ConfigDict(fields))


def test_distributed_initialization_from_environment(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_STEP_ID',
               'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(name, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'localhost:1234')
  with pytest.raises(ValueError, match='JAX_NUM_PROCESSES'):
    parallel.maybe_initialize_distributed()
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  assert parallel.maybe_initialize_distributed() is True
  assert calls == [{'coordinator_address': 'localhost:1234', 'num_processes': 2, 'process_id': 1}]


def _train_forward(model, variables, images):
  outputs, mutated = model.apply(variables, images, train=True, mutable=['batch_stats'])
  return outputs['features'], mutated['batch_stats']


@pytest.mark.parametrize('mode', ['pmap', 'jit'])
def test_sync_batch_norm_false_normalises_each_device_alone(mode):
  """sync_batch_norm=False: each device's features are the one-device forward of its own images
  (per-device BatchNorm statistics, as PyTorch DDP), and the running statistics move by the mean
  over devices; True (the default) gives the one-device result of the whole batch."""
  config = tiny_config()
  images = parallel.flatten_places(_batch(0))['images']
  single = vpr_model.build_model(config)
  variables = jax.device_get(vpr_model.init_variables(single, jax.random.PRNGKey(0),
                                                      config.image_size))
  forward = jax.jit(functools.partial(_train_forward, single))
  shards = [jax.device_get(forward(variables, shard)) for shard in np.split(images, 8)]
  whole = jax.device_get(forward(variables, images))
  per_device = (np.concatenate([features for features, _ in shards]),
                jax.tree.map(lambda *s: np.mean(s, axis=0), *[stats for _, stats in shards]))

  for sync, expected in ((False, per_device), (True, whole)):
    config.sync_batch_norm = sync
    dp = parallel.DataParallel(mode)
    model = vpr_model.build_model(config, bn_axis_name=dp.axis_name, bn_sync=sync,
                                  bn_groups=8 if (mode == 'jit' and not sync) else 1)
    if mode == 'jit':
      run = jax.jit(functools.partial(_train_forward, model))
      features, stats = jax.device_get(run(dp.replicate(variables),
                                           dp.shard_batch({'images': images})['images']))
    else:
      run = jax.pmap(functools.partial(_train_forward, model), axis_name=parallel.BATCH_AXIS,
                     in_axes=(None, 0))
      features, stats = jax.device_get(run(variables, images.reshape((8, -1) + images.shape[1:])))
      features, stats = features.reshape((-1,) + features.shape[2:]), dp.to_host(stats)
    np.testing.assert_allclose(features, expected[0], rtol=1e-4, atol=1e-4)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), stats,
                 expected[1])
  # The two settings differ visibly on this batch (so the test tells them apart).
  assert np.max(np.abs(per_device[0] - whole[0])) > 1e-2
