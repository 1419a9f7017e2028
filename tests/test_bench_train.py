"""Smoke tests of the training benchmarks (tiny CPU runs) and what they check in the train step.

scripts/bench_train.py runs several modes in one process; each mode is a script of its own
(scripts/bench_train_<mode>.py) sharing scripts/bench_train_common.py.
"""

import importlib.util
import json
import os

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODE_SCRIPTS = {'compute': 'bench_train_compute', 'augment': 'bench_train_augment',
                 'pipeline': 'bench_train_pipeline', 'end_to_end': 'bench_train_end_to_end',
                 'eval': 'bench_train_eval'}


def _load_script(name):
  spec = importlib.util.spec_from_file_location(f'script_{name}',
                                                os.path.join(_REPO, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def bench_train():
  return _load_script('bench_train')


def test_tiny_run_measures_every_mode(bench_train, tmp_path, capsys):
  output = tmp_path / 'bench_train.json'
  # One device and no augmentation: the compute and end-to-end modes share one compiled step.
  bench_train.main(['--tiny', '--num_devices', '1', '--augment', 'none',
                    '--workdir', str(tmp_path / 'work'), '--output', str(output)])
  printed = capsys.readouterr().out
  for header in ('vpr_jax img/s', 'reference img/s', 'ratio', 'compute-only img/s'):
    assert header in printed
  saved = json.loads(output.read_text())
  assert saved['env']['backend'] == 'cpu' and saved['env']['jax']

  (row,) = saved['compute']
  assert row['config'] == 'mixvpr' and row['batch'] == 8 and row['image_size'] == [32, 32]
  step = row['vpr_jax']
  assert step['img_per_s'] > 0 and step['finite'] and step['num_devices'] == 1
  # The state is donated: XLA aliases it into the new state, and JAX did not refuse any buffer.
  assert step['donation_warnings'] == []
  assert step['compiled_memory']['alias_bytes'] > 0.9 * step['compiled_memory']['argument_bytes']
  # Seed recipe (ResNet-18 cut after layer3, stages 0-2 frozen): 15 convolutions forward, and
  # backward only through layer3 (5 weight gradients, 3 input gradients: the inputs of its first
  # block come from the frozen layer2).
  assert step['hlo_convolutions'] == 15 + 5 + 3
  assert step['gflop_per_image'] > 0
  if bench_train.bench_train_compute.bench_train_reference.reference_available()[0]:
    eager = row['reference']['eager']
    assert eager['img_per_s'] > 0 and eager['dtype'] == 'float32'
    assert row['ratio'] == pytest.approx(step['img_per_s'] / row['reference_img_per_s'])

  runs = {(r['mode'], r['source']): r for r in saved['end_to_end']}
  assert set(runs) == {(mode, source) for mode in ('pipeline', 'end_to_end')
                       for source in ('original', 'prepared')}
  for r in runs.values():
    assert r['img_per_s'] > 0 and r['batch'] == 8
    assert r['ratio_to_compute'] == pytest.approx(r['img_per_s'] / step['img_per_s'])
  assert runs['end_to_end', 'prepared']['finite']
  assert saved['data']['original']['synthetic'] and saved['data']['prepared_32x32']
  (augment,) = saved['augment']
  assert augment['img_per_s'] > 0 and augment['num_ops'] == 3
  (evaluation,) = saved['eval']
  assert evaluation['img_per_s'] > 0 and evaluation['images'] == 2 * 8


def test_no_backward_through_frozen_stages(bench_train):
  """Convolutions in the lowered step: forward + weight and input gradients of trained stages."""
  compute = bench_train.bench_train_compute
  counts = {}
  for freeze in (-1, 2, 3):
    config = bench_train.bench_train_common.bench_eval.load_config('configs/mixvpr.py')
    config.image_size = (32, 32)
    config.data.places_per_batch, config.data.images_per_place = 2, 2
    config.model.layers_to_freeze = freeze
    text = compute.lower_train_step(config, compute.jax.devices()[:1]).as_text()
    counts[freeze] = text.count('stablehlo.convolution')
  # 15 forward; nothing frozen: 15 weight + 14 input gradients (not the image's).
  assert counts == {-1: 15 + 15 + 14, 2: 15 + 5 + 3, 3: 15}


def test_bad_arguments_are_refused(bench_train):
  common = bench_train.bench_train_common
  with pytest.raises(SystemExit):
    bench_train.parse_args(['--modes', 'compute,fast'])
  with pytest.raises(SystemExit):
    bench_train.parse_args(['--tiny', '--steps', '0'])
  with pytest.raises(SystemExit):
    bench_train.parse_args(['--num_devices', '0'])
  with pytest.raises(FileNotFoundError, match='not_a_config'):
    common.bench_config('configs/not_a_config.py', bench_train.parse_args(['--tiny']))


@pytest.mark.parametrize('mode', sorted(_MODE_SCRIPTS))
def test_mode_script_takes_the_flags_of_its_mode(bench_train, mode):
  """A mode script parses as `bench_train.py --modes MODE` does, and has no --modes of its own."""
  script = _load_script(_MODE_SCRIPTS[mode])
  argv = ['--tiny', '--num_devices', '1', '--threaded_prefetch', '--sources', 'prepared']
  alone = script.bench_train_common.parse_args(argv, mode=mode, description=script.__doc__)
  assert vars(alone) == vars(bench_train.parse_args(argv + ['--modes', mode]))
  with pytest.raises(SystemExit):
    script.bench_train_common.parse_args(['--modes', mode], mode=mode)
  with pytest.raises(SystemExit):
    script.bench_train_common.parse_args(['--tiny', '--steps', '0'], mode=mode)


def test_modes_run_in_a_fixed_order(bench_train):
  """Compute first (the data modes compare with it), then augment, then one data loop."""
  runners = bench_train.mode_runners(['eval', 'pipeline', 'augment', 'compute'])
  assert runners[:2] == [bench_train.bench_train_compute.run, bench_train.bench_train_augment.run]
  assert runners[2].keywords['source_runs'] == [bench_train.bench_train_pipeline.run_source,
                                                bench_train.bench_train_eval.run_source]
  assert bench_train.mode_runners(['compute']) == [bench_train.bench_train_compute.run]


def test_augment_script_runs_its_mode_alone(tmp_path, capsys):
  output = tmp_path / 'augment.json'
  results = _load_script('bench_train_augment').main(
      ['--tiny', '--steps', '1', '--workdir', str(tmp_path / 'work'), '--output', str(output)])
  assert 'device RandAugment alone' in capsys.readouterr().out
  saved = json.loads(output.read_text())
  assert saved['args']['modes'] == ['augment'] and list(saved['args'])[0] == 'modes'
  assert saved['compute'] == [] and saved['end_to_end'] == [] and saved['eval'] == []
  (augment,) = saved['augment']
  assert augment['img_per_s'] > 0 and augment['num_ops'] == 3 and augment['batch'] == 8
  assert results['augment'][0]['config'] == 'mixvpr'
