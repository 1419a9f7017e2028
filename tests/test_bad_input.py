"""Bad input seen from the entry points: `vpr_jax.train` / `train_and_evaluate` and evaluation.

The unit tests of each module check the messages of every kind of bad file (test_images,
test_gsv_cities, test_benchmarks, test_train_pipeline, test_checkpointing, test_convert,
test_evaluation). Here the question is what a run does with them: it stops before any training
step with one error naming the file (and line), and leaves nothing behind in its workdir; bad
training images are skipped, counted and named while the run goes on, up to
data.max_bad_image_fraction; a checkpoint that does not fit is refused without being touched; and
evaluation of awkward sets gives numbers and warnings, not a crash.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests import e2e
from vpr_jax import errors
from vpr_jax.checkpoints import orbax_states
from vpr_jax.evaluation import evaluate
from vpr_jax.training import loop
from vpr_jax.data.training import gsv_cities
from vpr_jax.data import synthetic
from vpr_jax.data.training import train_pipeline

TRAIN_DIR = os.path.join('synthetic', 'gsv_cities')


@pytest.fixture(scope='module')
def clean_root(tmp_path_factory):
  return e2e.data_root(tmp_path_factory)


@pytest.fixture
def data_copy(clean_root, tmp_path):
  """A private copy of the synthetic dataset, free to break."""
  root = str(tmp_path / 'data')
  shutil.copytree(clean_root, root)
  return root


def _config(root, **changes):
  config = e2e.make_config(e2e.tiny_overrides(**changes))
  config.data.root = root
  return config


def _csv_path(root, city='SynthA'):
  return os.path.join(root, TRAIN_DIR, 'Dataframes', f'{city}.csv')


def _edit_csv(root, edit, city='SynthA'):
  path = _csv_path(root, city)
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(edit(rows))
  return path


def _set(rows, row, column, value):
  rows[row][column] = value
  return rows


def _duplicate_place(root):
  """Adds a row (and its image) that gives place 0 a second entry for the panorama of line 2."""
  clash = {}

  def edit(rows):
    clash['row'] = list(rows[1])
    clash['row'][1], clash['row'][2] = '1999', '7'
    return rows + [clash['row']]

  path = _edit_csv(root, edit)
  place_id, year, month, northdeg, city, lat, lon, panoid = clash['row']
  images = os.path.join(root, TRAIN_DIR, 'Images', city)
  name = (f'{city}_{int(place_id):07d}_{int(year):04d}_{int(month):02d}_{int(northdeg):03d}_'
          f'{lat}_{lon}_{panoid}.jpg')
  shutil.copy(os.path.join(images, sorted(os.listdir(images))[0]), os.path.join(images, name))
  return path


# (name, how to break the copy -> (config changes, regex the error must match)).
def _missing_train_dir(root):
  return {'data__train_dir': 'synthetic/no_such_folder'}, r'no_such_folder.*does not exist'


def _empty_train_dir(root):
  os.makedirs(os.path.join(root, 'synthetic', 'empty'))
  return {'data__train_dir': 'synthetic/empty'}, r'synthetic/empty.*Dataframes'


def _csv_missing_column(root):
  path = _edit_csv(root, lambda rows: [r[:3] + r[4:] for r in rows])
  return {}, re.escape(path) + r": missing columns \['northdeg'\]"


def _csv_bad_value(root):
  path = _edit_csv(root, lambda rows: _set(rows, 3, 0, 'seven'))
  return {}, re.escape(path) + ', line 4: place_id must be an integer'


def _csv_bad_month(root):
  path = _edit_csv(root, lambda rows: _set(rows, 5, 2, '13'))
  return {}, re.escape(path) + r', line 6: month must be in \[1, 12\], got 13'


def _duplicate_place_id(root):
  path = _duplicate_place(root)
  return {}, r'Conflicting entries for place 0 .*' + re.escape(os.path.basename(path))


def _xs_name_does_not_parse(root):
  bad = os.path.join(root, 'synthetic', 'gsv_xs', 'syntha', 'holiday.jpg')
  shutil.copy(os.path.join(root, 'synthetic', 'synthetic_val', 'queries',
                           sorted(os.listdir(os.path.join(root, 'synthetic', 'synthetic_val',
                                                          'queries')))[0]), bad)
  return ({'data__train_layout': 'gsv_xs', 'data__train_dir': 'synthetic/gsv_xs'},
          re.escape(bad) + '.* does not parse')


def _city_absent(root):
  return {'data__cities': ('SynthA', 'Atlantis')}, r"Atlantis.*Cities found there: \['SynthA', " \
      r"'SynthB'\]"


def _val_set_absent(root):
  return ({'data__val_datasets': ('synthetic/synthetic_val', 'synthetic/no_such_split')},
          r'no_such_split')


def _val_set_empty(root):
  split = os.path.join(root, 'synthetic', 'empty_split')
  os.makedirs(os.path.join(split, 'database'))
  os.makedirs(os.path.join(split, 'queries'))
  return {'data__val_datasets': ('synthetic/empty_split',)}, r'empty_split'


def _backbone_weights_absent(root):
  return {'model__backbone_weights': 'weights/resnet18.pth'}, r'weights/resnet18.pth'


BROKEN_DATASETS = {
    'missing train dir': _missing_train_dir,
    'empty train dir': _empty_train_dir,
    'csv missing column': _csv_missing_column,
    'csv bad value': _csv_bad_value,
    'csv bad month': _csv_bad_month,
    'duplicate place id': _duplicate_place_id,
    'file name does not parse': _xs_name_does_not_parse,
    'city absent': _city_absent,
    'validation set absent': _val_set_absent,
    'validation set empty': _val_set_empty,
    'backbone weights absent': _backbone_weights_absent,
}


@pytest.mark.parametrize('case', list(BROKEN_DATASETS))
def test_broken_dataset_stops_before_training_and_writes_nothing(case, data_copy, tmp_path):
  changes, pattern = BROKEN_DATASETS[case](data_copy)
  workdir = tmp_path / 'run'
  with pytest.raises((ValueError, FileNotFoundError), match=pattern):
    loop.train_and_evaluate(_config(data_copy, **changes), str(workdir))
  assert not workdir.exists(), sorted(os.listdir(workdir))


def test_cli_reports_the_file_and_line_and_writes_nothing(data_copy, tmp_path, tmp_path_factory):
  path = _edit_csv(data_copy, lambda rows: _set(rows, 3, 5, 'north'))
  workdir = tmp_path / 'run'
  status, output = e2e.run_train(str(workdir), data_copy, e2e.tiny_overrides(),
                                 e2e.subprocess_env(tmp_path_factory), 'cli',
                                 module='vpr_jax.train', timeout=120)
  assert status != 0
  last = e2e.final_error(output)
  assert 'DatasetError' in last and f'{path}, line 4: lat must be a number' in last, output[-3000:]
  assert not workdir.exists()


# Mistakes that used to give a traceback (link loop, UTM overflow, K) or silently wrong numbers
# (a NaN radius: no positive, recalls of 0). Each is an error the entry points print as one line.
def _symbolic_link_loop(root):
  loop = os.path.join(root, TRAIN_DIR, 'Images', 'SynthA', 'loop.jpg')
  os.symlink('loop.jpg', loop)
  return {}, re.escape(repr(loop)) + ' is a symbolic link loop'


def _utm_overflow(root):
  queries = os.path.join(root, 'synthetic', 'synthetic_val', 'queries')
  first = sorted(os.listdir(queries))[0]
  fields = first.split('@')
  fields[1] = '1e308'
  os.rename(os.path.join(queries, first), os.path.join(queries, '@'.join(fields)))
  return {}, r"UTM_east '1e308' in the file name 'queries/@1e308@.*expected a finite number"


def _radius(value):

  def breaks(root):
    del root
    return ({'data__positive_radius_m': value},
            r'data.positive_radius_m must be a finite number of metres >= 0')

  return breaks


def _images_per_place_above_every_place(root):
  return ({'data__images_per_place': 64},
          r'images_per_place=64 exceeds the images of every place.*largest place has')


USER_MISTAKES = {
    'symbolic link loop': _symbolic_link_loop,
    'UTM value 1e308': _utm_overflow,
    'negative radius': _radius(-25.0),
    'NaN radius': _radius(float('nan')),
    'K above every place': _images_per_place_above_every_place,
}


@pytest.mark.parametrize('case', list(USER_MISTAKES))
def test_user_mistakes_are_one_line_errors(case, data_copy, tmp_path):
  changes, pattern = USER_MISTAKES[case](data_copy)
  workdir = tmp_path / 'run'
  with pytest.raises(errors.UserError, match=pattern):
    loop.train_and_evaluate(_config(data_copy, **changes), str(workdir))
  assert not workdir.exists(), sorted(os.listdir(workdir))


# ------------------------------------------------------------------------------------------------
# Bad training images.


def _first_batch_places(root, config):
  index = gsv_cities.build_place_index(os.path.join(root, TRAIN_DIR), 'gsv_cities',
                                       tuple(config.data.cities), config.data.min_img_per_place)
  with train_pipeline.make_train_iterator(index, config, seed=config.seed, num_workers=0) as it:
    labels = next(it)['labels'][:, 0]
  positions = {int(label): p for p, label in enumerate(index.place_ids)}
  return index, [positions[int(label)] for label in labels]


def _first_used_image(index, place):
  order = train_pipeline.place_image_order(index, place, np.random.default_rng(0), False)
  return index.image_path(int(order[0]))


def _break_images(root, config):
  """Replaces the most recent image of six places of the first batch; returns the bad paths."""
  index, places = _first_batch_places(root, config)
  paths = [_first_used_image(index, place) for place in places[:6]]
  zero_byte, truncated, not_an_image, gray, cmyk, rgba = paths
  with open(zero_byte, 'wb'):
    pass
  with open(truncated, 'rb') as f:
    data = f.read()
  with open(truncated, 'wb') as f:
    f.write(data[:len(data) // 3])
  with open(not_an_image, 'w') as f:
    f.write('place_id,year,month\n')
  original = Image.open(gray).convert('RGB')
  original.convert('L').save(gray, format='JPEG')
  original.convert('CMYK').save(cmyk, format='JPEG')
  rgba_image = original.convert('RGBA')
  rgba_image.putalpha(128)
  rgba_image.save(rgba, format='PNG')  # a PNG behind a .jpg name
  return [zero_byte, truncated, not_an_image], [gray, cmyk, rgba]


@pytest.fixture(scope='module')
def bad_images_run(clean_root, tmp_path_factory):
  """A 6-step run on a copy of the dataset with three undecodable and three odd images."""
  base = tmp_path_factory.mktemp('bad_images')
  root = str(base / 'data')
  shutil.copytree(clean_root, root)
  overrides = e2e.tiny_overrides(data__random_sample_from_each_place=False,
                                 data__max_bad_image_fraction=0.5)
  undecodable, odd = _break_images(root, _config(root, **overrides))
  workdir = str(base / 'run')
  status, output = e2e.run_train(workdir, root, overrides, e2e.subprocess_env(tmp_path_factory),
                                 'bad_images')
  return dict(root=root, overrides=overrides, workdir=workdir, status=status, output=output,
              undecodable=undecodable, odd=odd)


def _iterator_state(workdir, step):
  folder = os.path.join(workdir, 'checkpoints', 'latest', str(step), 'data_iterator')
  for name in os.listdir(folder):
    try:
      with open(os.path.join(folder, name)) as f:
        encoded = json.load(f)
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
      continue
    return orbax_states.decode_iterator_state(encoded)
  raise AssertionError(f'No JSON in {folder}')


def test_bad_images_are_skipped_counted_and_named(bad_images_run):
  run = bad_images_run
  assert run['status'] == 0, run['output'][-4000:]
  records = e2e.train_records(run['workdir'])
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r['loss']) for r in records)
  warnings = [line for line in run['output'].splitlines()
              if 'Skipping undecodable training image' in line]
  for path in run['undecodable']:
    assert any(path in line for line in warnings), path
  # Grayscale, CMYK and a PNG with alpha decode (to RGB): never reported.
  for path in run['odd']:
    assert path not in run['output']
  assert _iterator_state(run['workdir'], 6)['bad_images'] == 3


def test_too_many_bad_images_stop_the_run(bad_images_run, tmp_path, tmp_path_factory):
  run = bad_images_run
  overrides = dict(run['overrides'], **{'data.max_bad_image_fraction': 0.01})
  workdir = tmp_path / 'strict'
  status, output = e2e.run_train(str(workdir), run['root'], overrides,
                                 e2e.subprocess_env(tmp_path_factory), 'strict', timeout=120)
  assert status != 0
  last = e2e.final_error(output)
  assert 'TooManyBadImagesError' in last, output[-3000:]
  assert re.search(r'3 of 19 training image reads failed .*step 1.*max_bad_image_fraction=0.01',
                   last), last
  # It stopped at the first batch: no step was taken, nothing was checkpointed.
  assert not (workdir / 'metrics.jsonl').exists() or not e2e.train_records(str(workdir))
  latest = workdir / 'checkpoints' / 'latest'
  assert not latest.exists() or not os.listdir(latest)


# ------------------------------------------------------------------------------------------------
# Checkpoints that do not fit.


def test_checkpoint_of_another_architecture_is_refused_untouched(bad_images_run):
  run = bad_images_run
  before = e2e.file_snapshot(run['workdir'])
  config = _config(run['root'], **{k.replace('.', '__'): v for k, v in run['overrides'].items()})
  config.model.aggregator = 'gem'
  config.model.layers_to_crop = (4,)
  with pytest.raises(errors.CheckpointMismatchError) as error:
    loop.train_and_evaluate(config, run['workdir'])
  message = str(error.value)
  assert 'model.aggregator' in message and "'mixvpr'" in message and "'gem'" in message
  assert 'model.layers_to_crop' in message
  assert e2e.file_snapshot(run['workdir']) == before

  # Evaluating the checkpoint with that architecture lists the variables that do not fit.
  with pytest.raises(errors.CheckpointMismatchError) as error:
    evaluate.evaluate(run['workdir'], ['synthetic/synthetic_val'], run['root'], config=config,
                        print_fn=lambda line: None)
  message = str(error.value)
  assert 'aggregator' in message and 'layer3' in message, message


def test_truncated_checkpoint_is_refused_untouched(bad_images_run, tmp_path):
  run = bad_images_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(run['workdir'], workdir)
  variables_dir = os.path.join(workdir, 'checkpoints', 'latest', '6', 'variables')
  data_files = [os.path.join(folder, name) for folder, _, names in os.walk(variables_dir)
                for name in names if os.path.basename(folder) == 'd']
  assert data_files
  for path in data_files:
    with open(path, 'r+b') as f:
      f.truncate(5)
  before = e2e.file_snapshot(workdir)
  config = _config(run['root'], **{k.replace('.', '__'): v for k, v in run['overrides'].items()})
  with pytest.raises(errors.CheckpointMismatchError, match=r'latest/6.*truncated'):
    loop.train_and_evaluate(config, workdir)
  assert e2e.file_snapshot(workdir) == before
  with pytest.raises(errors.CheckpointMismatchError, match='truncated'):
    orbax_states.load_for_eval(workdir)


def test_torch_backbone_with_foreign_keys_is_refused_before_writing(clean_root, tmp_path):
  torch = pytest.importorskip('torch', reason='torch writes the reference checkpoint format')
  torchvision = pytest.importorskip('torchvision', reason='the reference ResNet-18 state dict')
  state_dict = torchvision.models.resnet18(weights=None).state_dict()
  del state_dict['layer1.0.bn1.running_mean']
  state_dict['layer2.0.extra.weight'] = torch.zeros(3)
  state_dict['layer1.0.conv1.weight'] = torch.zeros(64, 64, 1, 1)
  weights = tmp_path / 'resnet18_edited.pth'
  torch.save(state_dict, weights)
  workdir = tmp_path / 'run'
  with pytest.raises(errors.CheckpointMismatchError) as error:
    loop.train_and_evaluate(_config(clean_root, model__backbone_weights=str(weights)),
                                str(workdir))
  message = str(error.value)
  for text in ('resnet18_edited.pth', 'layer1.0.bn1.running_mean', 'layer2.0.extra.weight',
               'layer1.0.conv1.weight'):
    assert text in message, message
  assert not workdir.exists()


# ------------------------------------------------------------------------------------------------
# Evaluation of awkward sets.


def test_eval_without_positives_and_small_database(bad_images_run, tmp_path, caplog):
  root = str(tmp_path / 'sets')
  # A database of 2 images, each the positive of 2 queries.
  synthetic.make_benchmark_split(root, 'small_database', num_places=2, database_per_place=1,
                                 queries_per_place=2, image_size=(32, 32))
  # The same images with the queries moved 5 km east: no query has a positive.
  shutil.copytree(os.path.join(root, 'small_database'), os.path.join(root, 'no_positives'))
  queries = os.path.join(root, 'no_positives', 'queries')
  for name in os.listdir(queries):
    fields = name.split('@')
    fields[1] = f'{float(fields[1]) + 5000:010.2f}'
    os.rename(os.path.join(queries, name), os.path.join(queries, '@'.join(fields)))
  printed = []
  output = tmp_path / 'results.json'
  results = evaluate.evaluate(bad_images_run['workdir'], ['no_positives', 'small_database'],
                                root, output=str(output), print_fn=printed.append)
  text = '\n'.join(printed)
  no_positives, small = results
  assert no_positives.queries_without_positives == no_positives.num_queries == 4
  assert all(value == 0.0 for value in no_positives.recall.values())
  assert '4 of 4 queries have no positive within 25 m' in text
  assert 'No query has a positive in the database' in caplog.text
  assert small.num_database == 2 and small.predictions.shape == (4, 2)
  recall = small.recall
  assert list(recall) == [1, 5, 10, 15, 20, 25]
  assert recall[5] == recall[10] == recall[25] == 100.0  # each query's positive is in its top 2
  assert 0.0 <= recall[1] <= 100.0
  assert text.count('The database has only 2 images') == 2
  assert 'predictions per query' in caplog.text
  records = json.loads(output.read_text())
  assert [r['recall']['25'] for r in records] == [0.0, 100.0]
  assert all(np.isfinite(v) for r in records for v in r['recall'].values())


def test_cli_prints_one_line_error_without_traceback(tmp_path):
  """A missing benchmark: the command says what was tried and expected, and nothing else."""
  env = dict(os.environ, VPR_DATA_ROOT=str(tmp_path))
  proc = subprocess.run(
      [sys.executable, '-m', 'vpr_jax.train', '--config=configs/mixvpr.py',
       f'--workdir={tmp_path / "run"}'],
      cwd=e2e.REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('DatasetNotFoundError: ') and f'{tmp_path}/sf_xs/val' in last, last
  assert not (tmp_path / 'run').exists()


def test_a_validation_list_that_runs_code_is_refused_and_never_run(data_copy, tmp_path):
  marker = tmp_path / 'PWNED'
  e2e.write_hostile_split(os.path.join(data_copy, 'synthetic', 'hostile'), str(marker))
  workdir = tmp_path / 'run'
  with pytest.raises(errors.UnsafeArrayFileError, match=r"x_gt\.npy' is refused: its pickle "
                     r"names (posix|os)\.system"):
    loop.train_and_evaluate(_config(data_copy, data__val_datasets=('synthetic/hostile',)),
                            str(workdir))
  assert not marker.exists()
  assert not workdir.exists()
