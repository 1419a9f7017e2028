"""Checkpoints: inference save/load, best-N + latest retention, resume checks, failure safety."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.configs import default
from vpr_jax import errors
from vpr_jax.checkpoints import orbax_states
from vpr_jax.checkpoints import run_config
from vpr_jax.checkpoints import runs


def _variables(width=4):
  return {
      'params': {'conv': {'kernel': np.arange(3 * width, dtype=np.float32).reshape(3, width)},
                 'gem': {'p': np.float32(3.0)}},
      'batch_stats': {'bn': {'mean': np.ones(width, np.float32), 'var': np.full(width, 2.0,
                                                                                  np.float32)}},
  }


def _train_item(step=0):
  return {'step': jnp.int32(step), 'opt_state': {'mu': jnp.zeros(4), 'count': jnp.int32(step)},
          'rng': jax.random.key_data(jax.random.PRNGKey(step))}


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_config_json_round_trip():
  config = default.get_config()
  restored = run_config.config_from_json(run_config.config_to_json(config))
  assert restored == config
  assert isinstance(restored.model.layers_to_crop, tuple)
  assert isinstance(restored.data.cities, tuple)


def test_config_json_records_the_version_of_its_names(tmp_path):
  config = default.get_config()
  run_config.write_config(str(tmp_path), config)
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)[run_config.CONFIG_VERSION_KEY] == run_config.CONFIG_VERSION
  assert run_config.read_config(str(tmp_path)) == config  # the version is not a config field
  newer = json.loads(run_config.config_to_json(config))
  newer[run_config.CONFIG_VERSION_KEY] = run_config.CONFIG_VERSION + 1
  (tmp_path / 'config.json').write_text(json.dumps(newer))
  with pytest.raises(errors.CheckpointMismatchError,
                     match=f'{run_config.CONFIG_VERSION_KEY} is {run_config.CONFIG_VERSION + 1}'):
    run_config.read_config(str(tmp_path))


def _old_checkpoint(directory, optimizer):
  """A checkpoint folder as versions before config versions left it: config.json without one."""
  old = default.get_config()
  old.optim.optimizer = optimizer
  os.makedirs(os.path.join(directory, 'latest', '3'))
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    f.write(run_config.config_to_json(old))


def _with_optimizer(name):
  config = default.get_config()
  config.optim.optimizer = name
  return config


def test_an_older_adam_checkpoint_is_not_resumed_as_adamw(tmp_path):
  """'adam' of a config.json without a version was torch's L2 Adam: never resumed as AdamW."""
  directory = str(tmp_path / 'checkpoints')
  _old_checkpoint(directory, 'adam')
  config_text = open(os.path.join(directory, 'config.json')).read()
  assert run_config.read_config(directory).optim.optimizer == 'adam_l2'
  with pytest.raises(errors.CheckpointMismatchError) as error:
    orbax_states.TrainCheckpointer(directory, _with_optimizer('adam'))
  message = str(error.value)
  assert '\n' not in message
  assert "optim.optimizer='adam'" in message and '--config.optim.optimizer=adam_l2' in message
  assert open(os.path.join(directory, 'config.json')).read() == config_text
  # Another optimiser is the ordinary difference; the checkpoint's own one resumes.
  with pytest.raises(errors.CheckpointMismatchError,
                     match="optim.optimizer: checkpoint 'adam_l2', this run 'adamw'"):
    run_config.check_resumable(directory, _with_optimizer('adamw'))
  assert run_config.check_resumable(directory, _with_optimizer('adam_l2')) == []

  # Names that kept their meaning resume as before; a config.json of today says what 'adam' is.
  unchanged = str(tmp_path / 'unchanged')
  _old_checkpoint(unchanged, 'adamw')
  assert run_config.check_resumable(unchanged, _with_optimizer('adamw')) == []
  current = str(tmp_path / 'current')
  run_config.write_config(current, _with_optimizer('adam'))
  os.makedirs(os.path.join(current, 'latest', '3'))
  assert run_config.check_resumable(current, _with_optimizer('adam')) == []
  with pytest.raises(errors.CheckpointMismatchError, match="checkpoint 'adam', this run 'adam_l2'"):
    run_config.check_resumable(current, _with_optimizer('adam_l2'))


def test_a_checkpoint_from_before_sync_batch_norm_resumes_synced(tmp_path):
  """A config.json of version 2 has no sync_batch_norm: its runs synchronised batch statistics."""
  directory = str(tmp_path / 'checkpoints')
  run_config.write_config(directory, default.get_config())
  path = os.path.join(directory, 'config.json')
  with open(path) as f:
    fields = json.load(f)
  del fields['sync_batch_norm']
  fields[run_config.CONFIG_VERSION_KEY] = 2
  with open(path, 'w') as f:
    json.dump(fields, f)
  os.makedirs(os.path.join(directory, 'latest', '3'))
  assert run_config.read_config(directory).sync_batch_norm is True
  assert run_config.check_resumable(directory, default.get_config()) == []
  per_device = default.get_config()
  per_device.sync_batch_norm = False
  with pytest.raises(errors.CheckpointMismatchError,
                     match='sync_batch_norm: checkpoint True, this run False'):
    run_config.check_resumable(directory, per_device)


def test_inference_checkpoint_round_trip_and_no_overwrite(tmp_path):
  config = default.get_config()
  out = tmp_path / 'converted'
  variables = _variables()
  orbax_states.save_inference_checkpoint(str(out), config, variables)
  # The temporary folder was renamed into place; nothing else left next to it.
  assert sorted(os.listdir(tmp_path)) == ['converted']
  loaded_config, loaded, step = orbax_states.load_for_eval(str(out))
  assert step == 0 and loaded_config == config
  _assert_trees_equal(loaded, variables)
  assert isinstance(loaded['params']['conv']['kernel'], np.ndarray)

  with pytest.raises(errors.OutputPathError, match='not empty'):
    orbax_states.save_inference_checkpoint(str(out), config, _variables(width=5))
  _assert_trees_equal(orbax_states.load_for_eval(str(out))[1], variables)

  # An existing empty directory is fine; overwrite=True replaces a full one.
  empty = tmp_path / 'empty'
  empty.mkdir()
  orbax_states.save_inference_checkpoint(str(empty), config, variables)
  orbax_states.save_inference_checkpoint(str(out), config, _variables(width=5), overwrite=True)
  assert orbax_states.load_for_eval(str(out))[1]['params']['conv']['kernel'].shape == (3, 5)


def test_inference_checkpoint_failure_writes_nothing(tmp_path):
  config = default.get_config()
  with pytest.raises(ValueError, match='batch_stats'):
    orbax_states.save_inference_checkpoint(str(tmp_path / 'out'), config,
                                            {'params': _variables()['params']})
  assert os.listdir(tmp_path) == []


def test_best_retention_by_r1_and_latest(tmp_path):
  config = default.get_config()
  checkpointer = orbax_states.TrainCheckpointer(str(tmp_path / 'checkpoints'), config,
                                                 keep_best=3)
  r1_by_step = {10: 40.0, 20: 70.0, 30: 55.0, 40: 20.0, 50: 60.0}
  for step, r1 in r1_by_step.items():
    variables = _variables()
    variables['params']['gem']['p'] = np.float32(step)
    checkpointer.save(step, variables=variables, train=_train_item(step),
                      data_iterator_state=json.dumps({'step': step}).encode(), r1=r1,
                      info={'epoch': step // 10})
  checkpointer.save(55, variables=_variables(), train=_train_item(55),
                    data_iterator_state={'next_index': 55})
  assert checkpointer.best.all_steps() == [20, 30, 50]
  assert checkpointer.latest.all_steps() == [55]
  assert checkpointer.best_step() == 20
  assert checkpointer.latest_step() == 55

  restored = checkpointer.restore(_variables(), _train_item())
  assert restored['step'] == 55
  assert restored['data_iterator_state'] == {'next_index': 55}
  _assert_trees_equal(restored['train'], _train_item(55))
  restored = checkpointer.restore(_variables(), _train_item(), step=30)
  assert restored['data_iterator_state'] == b'{"step": 30}'
  assert restored['info']['epoch'] == 3 and restored['info']['r1'] == 55.0
  assert float(restored['variables']['params']['gem']['p']) == 30.0
  checkpointer.close()

  # load_for_eval takes the workdir and picks the best step by R@1.
  _, variables, step = orbax_states.load_for_eval(str(tmp_path))
  assert step == 20 and float(variables['params']['gem']['p']) == 20.0
  assert orbax_states.load_for_eval(str(tmp_path / 'checkpoints'), step=55)[2] == 55
  with pytest.raises(ValueError, match='No step 7'):
    orbax_states.load_for_eval(str(tmp_path), step=7)
  assert runs.find_latest_run(str(tmp_path.parent)) == str(tmp_path)


def test_resume_with_other_config_or_structure_fails_and_writes_nothing(tmp_path):
  config = default.get_config()
  directory = str(tmp_path / 'checkpoints')
  checkpointer = orbax_states.TrainCheckpointer(directory, config)
  checkpointer.save(5, variables=_variables(), train=_train_item(5))
  checkpointer.close()
  before = sorted(os.listdir(os.path.join(directory, 'latest')))
  config_text = open(os.path.join(directory, 'config.json')).read()

  other = default.get_config()
  other.model.aggregator = 'gem'
  other.optim.learning_rate = 1e-3
  other.max_steps = 100  # run-control fields may change
  with pytest.raises(errors.CheckpointMismatchError) as error:
    orbax_states.TrainCheckpointer(directory, other)
  message = str(error.value)
  assert 'model.aggregator' in message and 'optim.learning_rate' in message
  assert 'max_steps' not in message
  assert open(os.path.join(directory, 'config.json')).read() == config_text

  checkpointer = orbax_states.TrainCheckpointer(directory, config)
  with pytest.raises(errors.CheckpointMismatchError) as error:
    checkpointer.restore(_variables(width=6), _train_item())
  assert 'params/conv/kernel' in str(error.value) and '(3, 6)' in str(error.value)
  assert sorted(os.listdir(os.path.join(directory, 'latest'))) == before


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  config = default.get_config()
  directory = str(tmp_path / 'checkpoints')
  checkpointer = orbax_states.TrainCheckpointer(directory, config)
  checkpointer.save(5, variables=_variables(), train=_train_item(5))

  # A record that cannot be written is refused before anything reaches the disk.
  with pytest.raises(TypeError, match='info'):
    checkpointer.save(6, variables=_variables(), train=_train_item(6), info={'bad': object()})
  assert sorted(os.listdir(os.path.join(directory, 'latest'))) == ['5']

  # A write that fails inside orbax: the previous latest step survives and stays readable.
  original = orbax_states.ocp.JsonCheckpointHandler.async_save

  def failing_save(self, directory, *args, **kwargs):
    if 'data_iterator' in str(directory):
      raise OSError('disk full')
    return original(self, directory, *args, **kwargs)

  monkeypatch.setattr(orbax_states.ocp.JsonCheckpointHandler, 'async_save', failing_save)
  with pytest.raises(OSError, match='disk full'):
    checkpointer.save(6, variables=_variables(), train=_train_item(6))
  monkeypatch.undo()
  assert checkpointer.latest.all_steps() == [5]
  _assert_trees_equal(checkpointer.restore(_variables(), _train_item())['train'], _train_item(5))
  checkpointer.close()


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
  config = default.get_config()
  directory = str(tmp_path / 'checkpoints')
  checkpointer = orbax_states.TrainCheckpointer(directory, config)
  checkpointer.save(5, variables=_variables(), train=_train_item(5))
  checkpointer.close()
  # What a process killed during the save of step 6 leaves behind: an uncommitted temporary folder.
  latest = os.path.join(directory, 'latest')
  os.makedirs(os.path.join(latest, '6.orbax-checkpoint-tmp', 'variables'))
  with open(os.path.join(latest, '6.orbax-checkpoint-tmp', 'variables', 'partial'), 'w') as f:
    f.write('x')

  checkpointer = orbax_states.TrainCheckpointer(directory, config)
  assert checkpointer.latest_step() == 5
  _assert_trees_equal(checkpointer.restore(_variables(), _train_item())['train'], _train_item(5))
  checkpointer.save(7, variables=_variables(), train=_train_item(7))
  checkpointer.close()
  assert sorted(os.listdir(latest)) == ['7']


def test_truncated_checkpoint_raises_clear_error(tmp_path):
  out = tmp_path / 'converted'
  orbax_states.save_inference_checkpoint(str(out), default.get_config(), _variables())
  data_files = [os.path.join(root, name)
                for root, _, names in os.walk(out / 'latest' / '0' / 'variables')
                for name in names if os.path.basename(root) == 'd']
  assert data_files
  for path in data_files:
    with open(path, 'r+b') as f:
      f.truncate(3)
  with pytest.raises(errors.CheckpointMismatchError, match='truncated'):
    orbax_states.load_for_eval(str(out))


def test_missing_checkpoint_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    orbax_states.load_for_eval(str(tmp_path))
