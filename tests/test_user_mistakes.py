"""A careless user's mistakes, end to end: each is refused in one line, or handled without loss.

Two trainers on one workdir, SIGTERM / SIGINT in the middle of a run, unusable config values,
wrong --checkpoint paths, result files that cannot be written, a training set or synthetic data
that changed under a run. Related: test_bad_input (broken datasets), test_prepare_cli
(vpr_jax.prepare), test_workdir_lock and test_preemption (the pieces alone).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import e2e
from vpr_jax import errors
from vpr_jax import fileio
from vpr_jax.checkpoints import orbax_states
from vpr_jax.checkpoints import run_config
from vpr_jax.configs import default
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.training import train_pipeline
from vpr_jax.evaluation import evaluate
from vpr_jax.models import vpr_model
from vpr_jax.training import loop
from vpr_jax.training import setup


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return e2e.data_root(tmp_path_factory)


def _one_line(stderr: str) -> str:
  """The one line a refused command prints (absl's INFO log lines, e.g. the devices, aside)."""
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines()
           if line.strip() and not re.match(r'I\d{4} ', line)]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


# ------------------------------------------------------------------------------------------------
# One trainer per workdir; signals save and stop.


@pytest.mark.slow
def test_second_trainer_on_the_same_workdir_stops_at_once(data_root, tmp_path, tmp_path_factory):
  workdir = str(tmp_path / 'run')
  markers = str(tmp_path / 'markers')
  env = e2e.subprocess_env(tmp_path_factory, VPR_TEST_MARKER_DIR=markers,
                           VPR_TEST_PAUSE_AFTER_STEP='2')
  first = e2e.start_train(workdir, data_root, e2e.tiny_overrides(), env, 'first')
  try:
    e2e.wait_for_file(os.path.join(markers, 'paused_at_2'), first)
    records = e2e.read_metrics(workdir)
    second = subprocess.run(
        e2e.train_command(workdir, data_root, e2e.tiny_overrides()), cwd=e2e.REPO_ROOT,
        env=e2e.subprocess_env(tmp_path_factory), capture_output=True, text=True,
        timeout=e2e.RUN_TIMEOUT_S)
    assert second.returncode == 1
    line = _one_line(second.stderr)
    assert line.startswith('WorkdirLockedError: ') and f'pid {first.pid}' in line, line
    # The second trainer wrote nothing: the first one's log is as it left it.
    assert e2e.read_metrics(workdir) == records
  finally:
    first.kill()
    first.wait()


@pytest.mark.slow
@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_the_rerun_resumes(signal_number, data_root, tmp_path,
                                                             tmp_path_factory):
  workdir = str(tmp_path / 'run')
  overrides = e2e.tiny_overrides(max_steps=40, checkpoint_every_steps=100)
  env = e2e.subprocess_env(tmp_path_factory, VPR_TEST_SLOW_STEP_S='0.3')
  run = e2e.start_train(workdir, data_root, overrides, env, 'signalled')
  try:
    e2e.wait_for_file(os.path.join(workdir, 'metrics.jsonl'), run)
    while not any(r.get('step', 0) >= 3 for r in e2e.train_records(workdir)):
      assert run.poll() is None, e2e.output_of(run)[-3000:]
    run.send_signal(signal_number)
    e2e.wait_or_kill(run, e2e.RUN_TIMEOUT_S)
  finally:
    if run.poll() is None:
      run.kill()
  output = e2e.output_of(run)
  assert run.returncode == 128 + signal_number, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  name = signal.Signals(signal_number).name
  stopped = [line for line in output.splitlines() if line.startswith(f'Stopped by {name}')]
  assert len(stopped) == 1, output[-3000:]
  step = int(stopped[0].split('after step ')[1].split(':')[0])
  assert 3 <= step < 40
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) == [str(step)]
  if signal_number == signal.SIGTERM:
    status, output = e2e.run_train(workdir, data_root, overrides,
                                   e2e.subprocess_env(tmp_path_factory), 'resumed')
    assert status == 0, output[-3000:]
    assert f'at step {step}.' in output
    assert [r['step'] for r in e2e.train_records(workdir)] == list(range(1, 41))


def test_a_signal_while_the_stopped_command_exits_keeps_its_status(tmp_path):
  """A second Ctrl-C that lands while the exit unwinds (clean-up code still running) must not
  turn the command's status into death by SIGINT (-2): it ends the process with the same one."""
  code = ('import os, signal, time\n'
          'from vpr_jax.cli import common\n'
          'try:\n'
          '  common.exit_with_status_after_a_signal(130)\n'
          'finally:\n'
          '  os.kill(os.getpid(), signal.SIGINT)\n'
          '  time.sleep(5)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 130, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_a_second_ctrl_c_before_the_first_step_is_one_line(data_root, tmp_path, tmp_path_factory):
  workdir = str(tmp_path / 'run')
  run = e2e.start_train(workdir, data_root, e2e.tiny_overrides(),
                        e2e.subprocess_env(tmp_path_factory), 'interrupted',
                        module='vpr_jax.train')
  try:
    # The lock is taken just before the stop handlers are installed, well before the first step.
    e2e.wait_for_file(os.path.join(workdir, '.lock'), run)
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)  # handled: stop after the current step
    # The second one as soon as the first is acknowledged (two signals sent before the handler
    # ran would be merged into one by the interpreter).
    deadline = time.monotonic() + 60
    while ('SIGINT received' not in e2e.output_of(run) and run.poll() is None
           and time.monotonic() < deadline):
      time.sleep(0.01)
    run.send_signal(signal.SIGINT)  # at once
    e2e.wait_or_kill(run, 60)
  finally:
    if run.poll() is None:
      run.kill()
  output = e2e.output_of(run)
  assert run.returncode == 130, output[-3000:]
  assert 'Traceback' not in output and 'KeyboardInterrupt' not in output, output[-3000:]
  at_once = ('Stopped by SIGINT: stopped at once, without saving; run the same command to resume '
             'from the last checkpoint.')
  # On a fast machine the first stop (before any step: nothing to compute, a small checkpoint)
  # can finish before the second signal lands; the command then ends as the first one said.
  saved = 'Stopped by SIGINT after step 0: checkpoint saved in '
  last = output.strip().splitlines()[-1]
  assert last == at_once or last.startswith(saved), output[-3000:]


# ------------------------------------------------------------------------------------------------
# Config values, refused before any work with the field, the value and what is allowed.


def _tiny_config(data_root, **changes):
  config = e2e.make_config(e2e.tiny_overrides(**changes))
  config.data.root = data_root
  return config


@pytest.mark.parametrize('changes, pattern', [
    ({'optim__learning_rate': float('nan')}, r'optim.learning_rate must be a finite number > 0'),
    ({'optim__learning_rate': float('inf')}, r'optim.learning_rate must be a finite number > 0'),
    ({'image_size': (0, 0)}, r'image_size must be two positive integers'),
    ({'image_size': (-32, 32)}, r'image_size must be two positive integers'),
    ({'image_size': (32, 32, 32)}, r'image_size must be two positive integers'),
    ({'data__places_per_batch': 0}, r'data.places_per_batch must be a positive integer'),
    ({'data__places_per_batch': -4}, r'data.places_per_batch must be a positive integer'),
    ({'data__positive_radius_m': -1.0}, r'data.positive_radius_m must be a finite number'),
    ({'data__positive_radius_m': float('nan')}, r'data.positive_radius_m must be a finite'),
    ({'data__num_workers': -2}, r'data.num_workers must be -1 \(automatic\) or >= 0'),
    ({'data__eval_batch_size': 0}, r'data.eval_batch_size must be >= 1'),
    ({'optim__milestones': (10, 5)}, r'optim.milestones must be increasing'),
])
def test_unusable_config_values_are_refused_before_any_work(changes, pattern, data_root,
                                                            tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(errors.ConfigError, match=pattern):
    loop.train_and_evaluate(_tiny_config(data_root, **changes), str(workdir))
  assert not workdir.exists()


def test_unknown_config_field_is_one_line_with_close_matches(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'vpr_jax.train', '--config', 'demo',
       '--config.optim.learnin_rate=0.1', f'--workdir={tmp_path / "run"}'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 1
  line = _one_line(result.stderr)
  assert line.startswith('ConfigError: --config.optim.learnin_rate: optim has no field '
                         "'learnin_rate' (did you mean learning_rate?)"), line
  assert not (tmp_path / 'run').exists()


def test_workdir_that_is_a_file_is_refused(data_root, tmp_path):
  workdir = tmp_path / 'run'
  workdir.write_text('my notes')
  with pytest.raises(errors.WorkdirNotUsableError, match='is a file'):
    loop.train_and_evaluate(_tiny_config(data_root), str(workdir))
  assert workdir.read_text() == 'my notes'


def test_changed_synthetic_settings_are_refused_not_silently_reused(data_root):
  config = _tiny_config(data_root, data__synthetic__num_train_places=50)
  with pytest.raises(errors.DatasetError, match=r'data.synthetic.num_train_places=50 \(on disk: '
                     r'48\)'):
    setup.maybe_make_synthetic_data(config, data_root)


def test_a_run_that_failed_before_its_first_checkpoint_never_blocks_its_rerun(tmp_path):
  checkpoint_dir = str(tmp_path / 'run' / 'checkpoints')
  failed = default.get_config()
  failed.optim.learning_rate = 1e9
  run_config.write_config(checkpoint_dir, failed)  # all that a run failing early leaves
  os.makedirs(os.path.join(checkpoint_dir, 'latest'))
  assert run_config.check_resumable(checkpoint_dir, default.get_config()) == []
  # With a completed step, another configuration is still refused.
  os.makedirs(os.path.join(checkpoint_dir, 'latest', '3'))
  with pytest.raises(errors.CheckpointMismatchError, match='optim.learning_rate'):
    run_config.check_resumable(checkpoint_dir, default.get_config())


def test_a_changed_training_set_is_named_on_resume(synthetic_root, tmp_path):
  config = default.get_config()
  config.data.places_per_batch, config.data.images_per_place = 4, 2
  config.data.num_workers = 0
  config.data.augment = 'none'
  config.image_size = (16, 16)
  root = os.path.join(str(synthetic_root), 'gsv_cities')
  cities = tuple(sorted(os.path.splitext(name)[0]
                        for name in os.listdir(os.path.join(root, 'Dataframes'))))
  both = gsv_cities.build_place_index(root, 'gsv_cities', cities, 2,
                                      cache_dir=str(tmp_path / 'cache'))
  one = gsv_cities.build_place_index(root, 'gsv_cities', cities[:1], 2,
                                     cache_dir=str(tmp_path / 'cache'))
  config.data.cities = cities
  with train_pipeline.make_train_iterator(both, config, seed=0) as it:
    state = it.get_state()
  config.data.cities = cities[:1]
  with train_pipeline.make_train_iterator(one, config, seed=0) as it:
    with pytest.raises(errors.DatasetError,
                       match=rf'num_places {both.num_places} -> {one.num_places}'):
      it.set_state(state)


# ------------------------------------------------------------------------------------------------
# Evaluation: wrong --checkpoint paths, flags and result files, found before the work.


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  config = e2e.make_config(e2e.tiny_overrides())
  model = vpr_model.build_model(config)
  variables = vpr_model.init_variables(model, jax.random.PRNGKey(0))
  out = tmp_path_factory.mktemp('ckpt') / 'converted'
  orbax_states.save_inference_checkpoint(str(out), config, variables)
  return str(out)


def _checkpoint_paths(tmp_path):
  a_file = tmp_path / 'file.txt'
  a_file.write_text('x')
  (tmp_path / 'random').mkdir()
  (tmp_path / 'random' / 'notes.md').write_text('x')
  killed = tmp_path / 'killed' / 'checkpoints'
  run_config.write_config(str(killed), default.get_config())
  (killed / 'latest').mkdir()
  empty = tmp_path / 'empty' / 'checkpoints'
  (empty / 'latest' / '0').mkdir(parents=True)
  (empty / 'config.json').write_text('')
  return {'missing': (tmp_path / 'nowhere', 'does not exist'),
          'a file': (a_file, 'No checkpoint in'),
          'a random folder': (tmp_path / 'random', 'No checkpoint in'),
          'killed before its first checkpoint': (tmp_path / 'killed',
                                                 'holds no completed checkpoint step'),
          'empty config.json': (tmp_path / 'empty', 'is not valid JSON')}


def test_wrong_checkpoint_paths_are_user_errors(tmp_path):
  for case, (path, message) in _checkpoint_paths(tmp_path).items():
    with pytest.raises(errors.UserError, match=message):
      evaluate.evaluate(str(path), ['synthetic_val'])
    assert case


@pytest.mark.parametrize('kwargs, pattern', [
    ({'batch_size': 0}, r'--batch_size must be a positive integer, got 0'),
    ({'batch_size': -8}, r'--batch_size must be a positive integer'),
    ({'num_workers': -3}, r'--num_workers must be -1'),
    ({'visualize': -1}, r'--visualize must be >= 0'),
])
def test_bad_eval_flags_are_refused(kwargs, pattern, checkpoint):
  with pytest.raises(errors.ConfigError, match=pattern):
    evaluate.evaluate(checkpoint, ['synthetic_val'], **kwargs)


def test_unwritable_result_paths_are_found_before_the_evaluation(checkpoint, tmp_path):
  folder = tmp_path / 'a_folder'
  folder.mkdir()
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  printed = []
  for kwargs, pattern in [({'output': str(folder)}, 'is a folder'),
                          ({'save_predictions_to': str(a_file / 'p.csv')}, 'is a file'),
                          ({'save_descriptors_to': str(folder)}, 'is a folder')]:
    with pytest.raises(errors.OutputPathError, match=pattern):
      evaluate.evaluate(checkpoint, ['nowhere_dataset'], print_fn=printed.append, **kwargs)
  assert not printed  # refused before the checkpoint was even loaded


def test_result_files_get_the_umask_permissions(tmp_path):
  previous = os.umask(0o022)
  try:
    path = tmp_path / 'results.json'
    fileio.atomic_write(path, json.dumps({'recall': {}}))
    assert (os.stat(path).st_mode & 0o777) == 0o644
    os.umask(0o002)
    fileio.atomic_write(path, b'\x00')
    assert (os.stat(path).st_mode & 0o777) == 0o664
  finally:
    os.umask(previous)


# ------------------------------------------------------------------------------------------------
# Hostile files beside the data: never unpickled (the marker file shows it).


def _hostile_npz(path, marker, **arrays):
  np.savez(path, meta=np.array([e2e.PickleMarker(marker)], dtype=object), **arrays)


def test_a_pickled_place_index_cache_is_ignored_and_rebuilt(synthetic_root, tmp_path, caplog):
  root = os.path.join(str(synthetic_root), 'gsv_cities')
  cache = tmp_path / 'cache'
  cities = ('SynthA', 'SynthB')
  built = gsv_cities.build_place_index(root, 'gsv_cities', cities, 2, cache_dir=str(cache))
  (cache_file,) = cache.iterdir()
  marker = tmp_path / 'unpickled'
  _hostile_npz(cache_file, marker, image_paths=built.image_paths)
  rebuilt = gsv_cities.build_place_index(root, 'gsv_cities', cities, 2, cache_dir=str(cache))
  assert 'Ignoring unreadable place index cache' in caplog.text
  np.testing.assert_array_equal(rebuilt.image_paths, built.image_paths)
  assert not marker.exists()


def test_a_pickled_prepared_table_is_refused_in_one_line(tmp_path):
  path = tmp_path / training_set.PLACE_INDEX_FILE
  marker = tmp_path / 'unpickled'
  _hostile_npz(path, marker)
  with pytest.raises(errors.BuiltDatasetError,
                     match=re.escape(f'{path} cannot be read: {str(path)!r} (array \'meta\') is '
                                     'refused: its pickle names posix.system')):
    records.read_npz(str(path))
  assert not marker.exists()
