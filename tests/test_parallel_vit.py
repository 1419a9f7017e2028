"""The DINOv2 + SALAD train step: 8 devices (jit) equal 1, bfloat16 runs, non-finite steps skipped.

As tests/test_parallel.py does for the ResNet: the same global batch through the step jitted on
one device and on the 8 virtual CPU devices of tests/conftest.py gives the same loss, gradient
norm and parameters, SALAD's dropout included (its key is folded from the step's rng, so the
masks of the global batch do not depend on how it is split).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vpr_jax import losses
from vpr_jax import optim
from vpr_jax import parallel
from vpr_jax.configs import default
from vpr_jax.models import vpr_model
from vpr_jax.training import state as train_state
from vpr_jax.training import step as train_step_lib

P, K, SIZE = 8, 2, 42


def tiny_config(dtype='float32'):
  """A 2-block, 32-wide DINOv2 (3 x 3 patches), SALAD 4 x 8 + 8 with dropout, P=8 K=2."""
  config = default.get_config()
  config.image_size = (SIZE, SIZE)
  model = config.model
  model.backbone = 'dinov2_vits14'
  model.vit_embed_dim, model.vit_depth, model.vit_num_heads, model.vit_pretrained_grid = (
      32, 2, 2, 4)
  model.num_trainable_blocks = 1
  model.aggregator = 'salad'
  model.salad_num_clusters, model.salad_cluster_dim, model.salad_token_dim = 4, 8, 8
  model.salad_dropout = 0.3
  model.dtype = dtype
  config.data.places_per_batch = P
  config.data.images_per_place = K
  config.optim.optimizer = 'sgd'  # the update is linear in the gradient: a wrong scale shows
  config.optim.learning_rate = 0.1
  config.optim.warmup_steps = 0
  return config


def _batch(seed):
  rng = np.random.default_rng(seed)
  return parallel.flatten_places(
      {'images': rng.integers(0, 256, (P, K, SIZE, SIZE, 3), dtype=np.uint8),
       'labels': np.repeat(np.arange(P, dtype=np.int32)[:, None], K, axis=1)})


def _setup(config, mode):
  dp = parallel.DataParallel('jit', jax.devices()[:1] if mode == 'one' else None)
  model = vpr_model.build_model(config, bn_axis_name=dp.axis_name)
  variables = vpr_model.init_variables(model, jax.random.PRNGKey(0), config.image_size)
  frozen = vpr_model.model_frozen_param_mask(variables['params'], config.model)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=10, frozen_mask=frozen)
  state = jax.device_get(train_state.create_train_state(config, model, None, tx=tx,
                                                     variables=variables))
  loss_fn = losses.make_loss(config.loss.name, config.loss.params, config.loss.miner_name,
                             config.loss.miner_params)
  step = dp.compile_step(functools.partial(train_step_lib.train_step, model=model,
                                           loss_fn=loss_fn, schedule=schedule,
                                           axis_name=dp.axis_name))
  return dp, state, step


def _run(config, mode, state=None):
  dp, initial, step = _setup(config, mode)
  state = initial if state is None else state
  new_state, metrics = step(dp.replicate(state), dp.shard_batch(_batch(0)),
                            jax.random.PRNGKey(1))
  return initial, dp.to_host(new_state), dp.to_host(metrics)


def test_vit_salad_step_on_8_devices_equals_1():
  config = tiny_config()
  initial, one_state, one_metrics = _run(config, 'one')
  dp = parallel.DataParallel('jit')
  assert dp.num_devices == 8
  _, eight_state, eight_metrics = _run(config, 'jit')
  assert float(one_metrics['finite']) == 1.0
  np.testing.assert_allclose(eight_metrics['loss'], one_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(eight_metrics['grad_norm'], one_metrics['grad_norm'], rtol=1e-4)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), one_state.params,
                       initial.params)
  assert max(jax.tree.leaves(moved)) > 1e-3
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               eight_state.params, one_state.params)
  # Frozen: the token embedding and block 0 do not move; block 1 and SALAD do.
  assert moved['backbone']['pos_embed'] == 0.0 and moved['backbone']['blocks_0']['attn'][
      'qkv']['kernel'] == 0.0
  assert moved['backbone']['blocks_1']['attn']['qkv']['kernel'] > 0.0
  assert moved['aggregator']['score']['0']['kernel'] > 0.0


def test_dropout_is_on_in_training_and_off_in_evaluation():
  config = tiny_config()
  model = vpr_model.build_model(config)
  variables = vpr_model.init_variables(model, jax.random.PRNGKey(0))
  images = jnp.asarray(_batch(0)['images'][:4])
  train = lambda key: model.apply(variables, images, train=True, rngs={'dropout': key})
  a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
  assert np.abs(np.asarray(a['descriptors'] - b['descriptors'])).max() > 1e-3
  evaluated = model.apply(variables, images)['descriptors']
  np.testing.assert_array_equal(evaluated, model.apply(variables, images)['descriptors'])


def test_bfloat16_step_is_finite_and_close_to_float32():
  _, _, f32 = _run(tiny_config('float32'), 'one')
  _, _, bf16 = _run(tiny_config('bfloat16'), 'one')
  assert float(bf16['finite']) == 1.0
  np.testing.assert_allclose(bf16['loss'], f32['loss'], rtol=5e-2)


def test_nonfinite_step_is_skipped():
  config = tiny_config()
  _, state, _ = _setup(config, 'one')
  params = jax.tree.map(np.array, state.params)
  params['aggregator']['dust_bin'] = np.float32(np.nan)
  poisoned = state.replace(params=params)
  _, new_state, metrics = _run(config, 'jit', poisoned)
  assert float(metrics['finite']) == 0.0
  assert int(new_state.nonfinite_count) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.params, poisoned.params)
