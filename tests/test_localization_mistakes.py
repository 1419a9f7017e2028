"""`vpr_jax.index` / `vpr_jax.localize` with a careless or hostile user: one line, nothing lost.

Flags refused before any image is embedded, links that lead nowhere, two builds into one folder,
the user's own files in an index folder, and index folders damaged or swapped by someone else:
each file is named, nothing in it is unpickled, and rebuilding into a new folder is the advice.
Related: test_localization (what an index does when all is well), test_user_mistakes.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import e2e
from tests.test_localization import BATCH
from tests.test_localization import SF_XS_MINI
from tests.test_localization import checkpoints  # noqa: F401  pylint: disable=unused-import
from tests.test_localization import run_cli
from vpr_jax import errors
from vpr_jax.cli import localize as localize_cli
from vpr_jax.localization import build
from vpr_jax.localization import localizer as localizer_lib
from vpr_jax.localization import store
from vpr_jax.training import workdir_lock

pytestmark = pytest.mark.skipif(
    not os.path.isdir(SF_XS_MINI),
    reason=f'real test photos not found at {SF_XS_MINI} (../shared/data/real/sf_xs_mini)')

REBUILD_ADVICE = 'rebuild the index into a new folder'


def _build(checkpoint, images, out, **kwargs):
  return build.build_index(checkpoint, str(images), str(out), batch_size=BATCH,
                           show_progress=False, print_fn=kwargs.pop('print_fn', lambda _: None),
                           **kwargs)


@pytest.fixture(scope='module')
def database(tmp_path_factory):
  """The 20 database photos of sf_xs_mini, and a folder holding the first 10 of them."""
  root = tmp_path_factory.mktemp('photos')
  shutil.copytree(os.path.join(SF_XS_MINI, 'database'), root / 'all')
  (root / 'half').mkdir()
  for name in sorted(os.listdir(root / 'all'))[:10]:
    shutil.copy(root / 'all' / name, root / 'half' / name)
  return root


@pytest.fixture(scope='module')
def built(checkpoints, database, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """{'all': index of 20 photos, 'half': index of 10}, built once; copy before breaking."""
  root = tmp_path_factory.mktemp('indexes')
  for name in ('all', 'half'):
    _build(checkpoints[0], database / name, root / name)
  return {name: root / name for name in ('all', 'half')}


def _copy(built, tmp_path, name='all'):  # pylint: disable=redefined-outer-name
  index = tmp_path / f'index_{name}'
  shutil.copytree(built[name], index)
  return index


def _one_line(proc, error_type):
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'{error_type}: '), last
  return last


# ------------------------------------------------------------------------------------------------
# Flags and folders, refused before any image is embedded.


@pytest.mark.parametrize('kwargs, message', [
    ({'batch_size': -3}, '--batch_size must be a positive integer, got -3'),
    ({'batch_size': 0}, '--batch_size must be a positive integer, got 0'),
    ({'num_workers': -5}, '--num_workers must be -1 (automatic) or >= 0, got -5'),
    ({'part_size': 0}, '--part_size must be a positive integer, got 0'),
    ({'nprobe': -1}, '--nprobe must be a positive integer, got -1'),
])
def test_unusable_numbers_are_refused_before_any_work(kwargs, message, database, tmp_path):
  out = tmp_path / 'index'
  with pytest.raises(errors.ConfigError) as error:
    build.build_index('no checkpoint needed', str(database / 'all'), str(out),
                      show_progress=False, **kwargs)
  assert str(error.value) == message + "."
  assert not out.exists()


def test_cli_bad_faiss_factory_is_refused_before_embedding(checkpoints, database, tmp_path):
  out = tmp_path / 'index'
  last = _one_line(run_cli('vpr_jax.index', [f'--checkpoint={checkpoints[0]}', '--images',
                                             database / 'all', '--out', out,
                                             '--faiss=IVF16,Bogus99'], tmp_path),
                   'FaissIndexError')
  assert "--faiss 'IVF16,Bogus99'" in last, last
  assert not out.exists()  # no part was embedded: the folder the lock made is gone again


@pytest.mark.parametrize('link', ['dangling', 'loop'])
def test_a_link_that_leads_nowhere_is_one_line(link, checkpoints, database, tmp_path):
  images = tmp_path / 'photos'
  shutil.copytree(database / 'half', images)
  path = images / f'{link}.jpg'
  os.symlink(tmp_path / 'gone.jpg' if link == 'dangling' else path, path)
  out = tmp_path / 'index'
  with pytest.raises(errors.ImageFolderError) as error:
    _build(checkpoints[0], images, out)
  assert str(error.value).startswith(f'a symbolic link under --images cannot be read: '
                                     f'{str(path)!r}'), error.value
  assert not out.exists()


def test_cli_symbolic_link_loop_is_one_line(checkpoints, database, tmp_path):
  images = tmp_path / 'photos'
  shutil.copytree(database / 'half', images)
  os.symlink('self.jpg', images / 'self.jpg')
  last = _one_line(run_cli('vpr_jax.index', [f'--checkpoint={checkpoints[0]}', '--images',
                                             images, '--out', tmp_path / 'index'], tmp_path),
                   'ImageFolderError')
  assert 'self.jpg' in last and 'Too many levels of symbolic links' in last, last


def test_localize_checks_its_outputs_before_the_work(built, tmp_path, capsys):
  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  photo = os.path.join(SF_XS_MINI, 'queries', sorted(os.listdir(os.path.join(SF_XS_MINI,
                                                                            'queries')))[0])
  output = tmp_path / 'out.json'
  for kwargs, message in [
      ({'sheet': str(a_file)}, f"--sheet {str(a_file)!r} is a file; expected a folder."),
      ({'sheet': str(a_file / 'sheets')}, 'is a file, not a folder'),
      ({'output': '/proc/x.json'}, "--output '/proc/x.json': folder '/proc' is not writable"),
  ]:
    call = dict({'output': str(output), 'sheet': None}, **kwargs)
    with pytest.raises(errors.OutputPathError) as error:
      localize_cli.localize(str(built['all']), [photo], 3, call['output'], call['sheet'])
    assert message in str(error.value)
    assert not capsys.readouterr().out  # refused before a photo was embedded
  assert not output.exists() and a_file.read_text() == 'mine'


# ------------------------------------------------------------------------------------------------
# One build at a time; the user's files survive an update.


def test_a_second_build_into_the_same_folder_stops_at_once(checkpoints, database, built,
                                                           tmp_path):
  index = _copy(built, tmp_path)
  before = {name: (index / name).read_bytes() for name in os.listdir(index)}
  with workdir_lock.WorkdirLock(str(index), what='index folder'):  # a build in progress
    with pytest.raises(errors.WorkdirLockedError) as error:
      _build(checkpoints[0], database / 'half', index)
  assert f'index folder {str(index)!r} is in use by pid {os.getpid()}' in str(error.value)
  assert {name: (index / name).read_bytes() for name in os.listdir(index)} == before

  # The lock of a killed build is stale: the next build takes it over.
  (index / workdir_lock.LOCK_FILENAME).write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': 999999999, 'start_time': '2026-01-01T00:00:00Z'}))
  stats = _build(checkpoints[0], database / 'half', index)
  assert (stats.num_images, stats.removed) == (10, 10)
  assert not (index / workdir_lock.LOCK_FILENAME).exists()


def test_an_update_keeps_the_users_files_and_counts_changes_apart(checkpoints, database,
                                                                  built, tmp_path):
  images = tmp_path / 'photos'
  shutil.copytree(database / 'all', images)
  index = _copy(built, tmp_path)
  mine = {'desc.npz': b'descriptors saved by vpr_jax.eval', 'notes.index': b'notes',
          'my.npy': b'mine', 'faiss-old.index': b'a name like ours, not ours'}
  for name, data in mine.items():
    (index / name).write_bytes(data)
  names = sorted(os.listdir(images))
  os.remove(images / names[0])
  with open(images / names[1], 'ab') as f:  # changed: appended bytes, same pixels
    f.write(b'\0')
  printed = []
  stats = _build(checkpoints[0], images, index, print_fn=printed.append)
  assert (stats.embedded, stats.changed, stats.removed, stats.reused) == (1, 1, 1, 18)
  assert '1 embedded (1 of them changed since the last build)' in printed[0]
  assert ', 1 removed;' in printed[0]
  for name, data in mine.items():
    assert (index / name).read_bytes() == data, name
  assert not (index / 'descriptors-1.npy').exists() and (index / 'descriptors-2.npy').exists()


# ------------------------------------------------------------------------------------------------
# Damaged, swapped or hostile index files.


def _pickled_npz(index, marker):
  files = store.read_manifest(str(index))['files']
  path = index / files['images']
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  arrays['paths'] = np.array([e2e.PickleMarker(marker)] * len(arrays['paths']), dtype=object)
  np.savez(path, **arrays)
  return files['images']


def _pickled_npy(index, marker):
  name = store.read_manifest(str(index))['files']['descriptors']
  np.save(index / name, np.array([e2e.PickleMarker(marker)], dtype=object), allow_pickle=True)
  return name


def _edit_manifest(edit):
  def damage(index, marker):
    del marker
    path = index / store.MANIFEST_FILENAME
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return store.MANIFEST_FILENAME
  return damage


def _without(field):
  return _edit_manifest(lambda m: {k: v for k, v in m.items() if k != field})


def _file_damage(kind, how):
  def damage(index, marker):
    del marker
    name = store.read_manifest(str(index))['files'][kind]
    path = index / name
    if how == 'truncated':
      path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif how == 'random':
      path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
      path.unlink()
    return name
  return damage


def _swapped_faiss(source):
  def damage(index, marker):
    del marker
    name = store.read_manifest(str(index))['files']['faiss']
    shutil.copy(index.parent / f'index_{source}' / name, index / name)
    return name
  return damage


DAMAGED = {
    'manifest is a JSON list': (_edit_manifest(lambda m: [m]), 'a JSON list'),
    'manifest without fingerprint': (_without('fingerprint'), "field 'fingerprint' is None"),
    'manifest without files': (_without('files'), "field 'files' is None"),
    'generation not a number': (_edit_manifest(lambda m: dict(m, generation='one')),
                                "field 'generation' is 'one'"),
    'files outside the folder': (_edit_manifest(lambda m: dict(
        m, files=dict(m['files'], faiss='../../elsewhere.index'))),
                                 "files.faiss is '../../elsewhere.index'"),
    'FAISS file truncated': (_file_damage('faiss', 'truncated'), 'RuntimeError'),
    'FAISS file random': (_file_damage('faiss', 'random'), 'RuntimeError'),
    'FAISS file missing': (_file_damage('faiss', 'missing'), 'RuntimeError'),
    'FAISS file of a smaller index': (
        _swapped_faiss('half'), '10 vectors of dimension 64, the manifest says 20 of dimension 64'),
    'images npz truncated': (_file_damage('images', 'truncated'),
                             'not a readable .npz archive'),
    'images npz pickled': (_pickled_npz, 'UnsafeArrayFileError'),
}


@pytest.mark.parametrize('case', list(DAMAGED))
def test_a_damaged_index_is_refused_naming_the_file(case, built, tmp_path):
  index = _copy(built, tmp_path)
  _copy(built, tmp_path, 'half')
  marker = tmp_path / 'unpickled'
  damage, why = DAMAGED[case]
  name = damage(index, marker)
  with pytest.raises(errors.DamagedIndexError) as error:
    localizer_lib.Localizer.from_index(str(index))
  message = str(error.value)
  assert message.startswith(f'index file {index / name} is damaged (') and why in message, message
  assert REBUILD_ADVICE in message and '\n' not in message
  assert not marker.exists()


def test_a_faiss_file_of_a_bigger_index_is_refused(built, tmp_path):
  index = _copy(built, tmp_path, 'half')
  _copy(built, tmp_path, 'all')
  name = _swapped_faiss('all')(index, None)
  with pytest.raises(errors.DamagedIndexError, match=f'{name} is damaged \\(20 vectors of '
                     'dimension 64, the manifest says 10 of dimension 64'):
    localizer_lib.Localizer.from_index(str(index))


@pytest.mark.parametrize('damage', ['truncated descriptors', 'pickled descriptors'])
def test_a_rebuild_over_damaged_descriptors_is_refused(damage, checkpoints, database, built,
                                                       tmp_path):
  index = _copy(built, tmp_path)
  marker = tmp_path / 'unpickled'
  if damage == 'pickled descriptors':
    name = _pickled_npy(index, marker)
  else:
    name = _file_damage('descriptors', 'truncated')(index, marker)
  before = {n: (index / n).read_bytes() for n in os.listdir(index)}
  with pytest.raises(errors.DamagedIndexError, match=f'{name} is damaged') as error:
    _build(checkpoints[0], database / 'half', index)
  assert REBUILD_ADVICE in str(error.value)
  assert {n: (index / n).read_bytes() for n in os.listdir(index)} == before
  assert not marker.exists()


def test_cli_localize_with_a_swapped_faiss_file_is_one_line(built, tmp_path):
  index = _copy(built, tmp_path)
  _copy(built, tmp_path, 'half')
  name = _swapped_faiss('half')(index, None)
  photo = os.path.join(SF_XS_MINI, 'queries', sorted(os.listdir(os.path.join(SF_XS_MINI,
                                                                            'queries')))[0])
  last = _one_line(run_cli('vpr_jax.localize', ['--index', index, '--output',
                                                tmp_path / 'out.json', photo], tmp_path),
                   'DamagedIndexError')
  assert f'{index / name} is damaged' in last and REBUILD_ADVICE in last, last
  assert not (tmp_path / 'out.json').exists()


# ------------------------------------------------------------------------------------------------
# Ctrl-C.


def test_cli_ctrl_c_while_indexing_is_one_line(checkpoints, database, tmp_path):
  """The terminal's Ctrl-C reaches the decoding workers too: they leave it to the command."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  process = subprocess.Popen(
      [sys.executable, '-m', 'vpr_jax.index', f'--checkpoint={checkpoints[0]}',
       f'--images={database / "all"}', f'--out={tmp_path / "index"}', '--batch-size=2',
       '--num-workers=1'],
      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)
  try:
    seen = ''
    while 'Embedding' not in seen:  # the progress bar: the worker is starting
      character = process.stderr.read(1)
      assert character, seen[-3000:]
      seen += character
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  stderr = seen + stderr
  assert process.returncode == 130, stderr[-3000:]
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
      'Stopped by SIGINT: the parts embedded so far are saved; run the same command to resume.')
  assert not (tmp_path / 'index' / store.MANIFEST_FILENAME).exists()

