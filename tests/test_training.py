"""The train step (non-finite handling) and the train-and-evaluate loop on synthetic data."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.configs import default
from vpr_jax import errors
from vpr_jax.checkpoints import orbax_states
from vpr_jax.checkpoints import run_config as run_config_lib
from vpr_jax.training import hooks
from vpr_jax.training import loop
from vpr_jax.training import programs
from vpr_jax.training import state as train_state
from vpr_jax import losses

BAD_LABEL = 999


def tiny_config():
  """ResNet-18 cut after layer2, a one-block MixVPR, 32x32 images, P=8 K=2, float32."""
  config = default.get_config()
  config.image_size = (32, 32)
  config.model.layers_to_crop = (3, 4)
  config.model.layers_to_freeze = 0
  config.model.dtype = 'float32'
  config.model.mixvpr_out_channels = 16
  config.model.mixvpr_mix_depth = 1
  config.model.mixvpr_out_rows = 2
  config.data.places_per_batch = 8
  config.data.images_per_place = 2
  config.optim.warmup_steps = 2
  return config


def run_config(synthetic_root, cache_dir):
  """The tiny model on the synthetic dataset: 24 places -> 3 steps per epoch."""
  config = tiny_config()
  config.data.root = str(synthetic_root)
  config.data.train_dir = 'gsv_cities'
  config.data.cities = ('SynthA', 'SynthB')
  config.data.val_datasets = ('synthetic_val',)
  config.data.cache_dir = str(cache_dir)
  config.data.num_workers = 0
  config.data.eval_batch_size = 16
  config.num_epochs = 2
  config.log_every_steps = 1
  return config


def nan_on_label(loss_fn, label):
  """A loss that is NaN whenever the batch holds `label` (one chosen step goes bad)."""

  def loss(descriptors, labels):
    value, metrics = loss_fn(descriptors, labels)
    return jnp.where(jnp.any(labels == label), jnp.nan, value), metrics

  return loss


def _records(workdir):
  with open(os.path.join(workdir, hooks.METRICS_FILENAME)) as f:
    return [json.loads(line) for line in f]


def test_unknown_names_fail_before_reading_data(tmp_path):
  for section, field, value in [('model', 'aggregator', 'cosplace'),
                                ('loss', 'name', 'ArcFaceLoss'),
                                ('optim', 'optimizer', 'lamb'),
                                (None, 'parallel', 'gspmd'),
                                (None, 'on_nonfinite', 'ignore')]:
    config = tiny_config()
    config.data.root = str(tmp_path / 'does_not_exist')
    (config[section] if section else config)[field] = value
    with pytest.raises(ValueError) as error:
      loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert value in str(error.value) and ('valid' in str(error.value).lower() or
                                          'expected' in str(error.value).lower()), error.value
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(synthetic_root, tmp_path):
  config = run_config(synthetic_root, tmp_path / 'cache')
  config.max_steps = 4
  uninterrupted = str(tmp_path / 'uninterrupted')
  summary = loop.train_and_evaluate(config, uninterrupted)
  assert summary['step'] == 4 and summary['best_step'] == 3

  resumed = str(tmp_path / 'resumed')
  config.max_steps = 2
  loop.train_and_evaluate(config, resumed)
  config.max_steps = 4  # a run-control field: resuming with it changed is allowed
  loop.train_and_evaluate(config, resumed)

  expected, got = _records(uninterrupted), _records(resumed)
  train_records = lambda records: [r for r in records if 'loss' in r]
  assert [r['step'] for r in train_records(got)] == [1, 2, 3, 4]
  np.testing.assert_allclose([r['loss'] for r in train_records(got)],
                             [r['loss'] for r in train_records(expected)], rtol=1e-6)
  np.testing.assert_allclose([r['b_acc'] for r in train_records(got)],
                             [r['b_acc'] for r in train_records(expected)])
  val = [r for r in got if 'recall' in r]
  assert len(val) == 1 and val[0]['step'] == 3 and val[0]['dataset'] == 'synthetic_val'
  assert set(val[0]['recall']) == {'1', '5', '10', '15', '20', '25'}
  assert val == [r for r in expected if 'recall' in r]
  for key in ('step', 'epoch', 'loss', 'b_acc', 'lr', 'images_per_sec'):
    assert key in train_records(got)[0]

  # Same final parameters, and the layout others rely on.
  _, a, _ = orbax_states.load_for_eval(uninterrupted, step=4)
  _, b, _ = orbax_states.load_for_eval(resumed, step=4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), a, b)
  assert orbax_states.load_for_eval(resumed)[2] == 3  # best by R@1: the only validation
  assert os.listdir(os.path.join(resumed, 'checkpoints', 'latest')) == ['4']
  assert os.path.isfile(os.path.join(resumed, 'config.json'))
  assert os.listdir(os.path.join(resumed, 'tb'))

  # A finished run does nothing when rerun; another configuration is refused, nothing written.
  assert loop.train_and_evaluate(config, resumed)['step'] == 4
  assert len(_records(resumed)) == len(got)
  config.optim.learning_rate = 1e-2
  with pytest.raises(errors.CheckpointMismatchError, match='optim.learning_rate'):
    loop.train_and_evaluate(config, resumed)
  assert run_config_lib.read_config(resumed).optim.learning_rate == 5e-4


def _bad_label_of_second_batch(config):
  """A place id in the second training batch, not in the first and not in the fourth."""
  from vpr_jax.data.training import gsv_cities  # pylint: disable=g-import-not-at-top
  from vpr_jax.data.training import train_pipeline  # pylint: disable=g-import-not-at-top
  index = gsv_cities.build_place_index(
      os.path.join(config.data.root, config.data.train_dir), config.data.train_layout,
      config.data.cities, config.data.min_img_per_place, cache_dir=config.data.cache_dir)
  with train_pipeline.make_train_iterator(index, config, seed=config.seed, num_workers=0) as it:
    batches = [next(it)['labels'] for _ in range(4)]
  return int(np.setdiff1d(batches[1], np.concatenate([batches[0], batches[3]]))[0])


def _check_step_skips_nonfinite(config, bad_label):
  """The compiled step of a run: a non-finite loss leaves the whole state as it was."""
  progs = programs.get_programs(config, steps_per_epoch=3)
  dp = progs.dp
  variables = progs.init(jax.random.PRNGKey(0))
  state = train_state.create_train_state(config, progs.model, None, tx=progs.tx,
                                         variables=variables)
  state = dp.replicate(jax.device_get(state))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(8, dtype=np.int32) + bad_label + 1, 2)
  bad_labels = labels.copy()
  bad_labels[:2] = bad_label
  run = lambda state, labels: progs.train_step(
      state, dp.shard_batch({'images': images, 'labels': labels}), jax.random.PRNGKey(0))

  state, metrics = run(state, labels)
  assert float(metrics['finite']) == 1.0
  before = dp.to_host(state)
  state, metrics = run(state, bad_labels)
  after = dp.to_host(state)
  assert float(metrics['finite']) == 0.0 and not np.isfinite(float(metrics['loss']))
  # Parameters, BatchNorm statistics and optimiser state are those from before the bad step.
  for field in ('params', 'batch_stats', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, field), getattr(before, field))
  assert int(after.step) == 2
  assert int(after.nonfinite_count) == 1 and int(after.first_nonfinite_step) == 1
  # The learning rate follows the applied updates (warmup: step index 1 -> lr * 2 / 2).
  np.testing.assert_allclose(float(metrics['lr']), float(progs.schedule(1)))
  state, metrics = run(state, labels)
  assert float(metrics['finite']) == 1.0
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), dp.to_host(state).params,
                       after.params)
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
def test_nonfinite_skip_and_stop(synthetic_root, tmp_path, monkeypatch):
  config = run_config(synthetic_root, tmp_path / 'cache')
  config.checkpoint_every_steps = 1
  config.eval_every_epochs = 2
  bad_label = _bad_label_of_second_batch(config)
  real_make_loss = losses.make_loss
  monkeypatch.setattr(programs.losses, 'make_loss',
                      lambda *args: nan_on_label(real_make_loss(*args), bad_label))
  # Steps compiled by other tests hold the real loss; these runs compile (once) the patched one.
  programs.clear_program_cache()
  try:
    _check_step_skips_nonfinite(config, bad_label)

    workdir = str(tmp_path / 'run')
    config.on_nonfinite = 'skip'
    config.max_steps = 1
    loop.train_and_evaluate(config, workdir)
    after_step1 = orbax_states.load_for_eval(workdir)[1]
    config.max_steps = 2
    assert loop.train_and_evaluate(config, workdir)['skipped_steps'] == 1
    after_step2 = orbax_states.load_for_eval(workdir)[1]
    jax.tree.map(np.testing.assert_array_equal, after_step2, after_step1)
    config.max_steps = 3
    loop.train_and_evaluate(config, workdir)
    records = _records(workdir)
    assert [r['loss'] is None for r in records] == [False, True, False]
    assert [r['skipped_steps'] for r in records] == [0, 1, 1]

    # 'stop' looks at the steps of its own run: the skipped step 2 does not stop a resumed run.
    config.on_nonfinite = 'stop'
    config.max_steps = 4
    assert loop.train_and_evaluate(config, workdir)['step'] == 4

    # A bad step stops the run with the step's number; the checkpoints are left as they were.
    workdir = str(tmp_path / 'stopped')
    config.max_steps = 3
    with pytest.raises(errors.NonFiniteError, match='at step 2 '):
      loop.train_and_evaluate(config, workdir)
    assert os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) == ['1']
    assert orbax_states.load_for_eval(workdir)[2] == 1
  finally:
    programs.clear_program_cache()
