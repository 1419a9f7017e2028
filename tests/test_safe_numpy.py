"""safe_numpy: the field's list files load as numpy loads them; code in a pickle never runs."""

import io
import os
import pathlib
import pickle
import zipfile

import numpy as np
from numpy.lib import format as npy_format
import pytest

from vpr_jax import safe_numpy
from vpr_jax.errors import ArrayFileError
from vpr_jax.errors import UnsafeArrayFileError

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
REAL_LIST_FILES = sorted(SHARED_DATA.glob('family_lists/*/*.npy')) + sorted(
    SHARED_DATA.glob('seed_ground_truth/*.npy'))


class _RunsCode:
  """Pickles as a call of os.system: what a hostile list file holds."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _assert_same(ours, reference):
  assert ours.shape == reference.shape and ours.dtype == reference.dtype
  if reference.dtype != object:
    np.testing.assert_array_equal(ours, reference)
    return
  for mine, theirs in zip(ours.flat, reference.flat):
    assert type(mine) is type(theirs)
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    assert np.asarray(mine).dtype == np.asarray(theirs).dtype


def test_the_real_list_files_are_all_there():
  # CI has ../shared beside the clone: a missing folder is a failure, not a skip.
  names = {p.name for p in REAL_LIST_FILES}
  assert {'SPED_gt.npy', 'CrossSeason_gt.npy', 'msls_val_pIdx.npy', 'msls_val_qIdx.npy',
          'sfxs_val_gt.npy'} <= names, SHARED_DATA


@pytest.mark.parametrize('path', REAL_LIST_FILES, ids=lambda p: p.name)
def test_real_list_files_load_as_numpy_loads_them(path):
  # The reference: numpy's own unpickling of these (trusted, shipped) files.
  _assert_same(safe_numpy.load_npy(path), np.load(path, allow_pickle=True))


def _object_array(items, shape=None):
  array = np.empty(len(items), dtype=object)
  for i, item in enumerate(items):
    array[i] = item
  return array if shape is None else array.reshape(shape)


@pytest.mark.parametrize('array', [
    _object_array([[1, 2, 3], [], [np.int64(7), np.int32(8)], (4, 5)]),
    _object_array([np.array([1, 2], np.int64), np.zeros(0, np.int64), np.array([3], np.int32)]),
    _object_array([np.array([1.5, 2.5], '>f8'), 'a string', b'bytes', 3, 2.5, True]),
    _object_array([np.array(['x', 'yz'])] * 4, shape=(2, 2)),
    np.asfortranarray(_object_array([[1], [2], [3], [4], [5], [6]], shape=(2, 3))),
], ids=['lists', 'int_arrays', 'mixed', 'two_d', 'fortran'])
def test_object_arrays_of_plain_data_round_trip(array, tmp_path):
  path = tmp_path / 'x.npy'
  np.save(path, array, allow_pickle=True)
  _assert_same(safe_numpy.load_npy(path), np.load(path, allow_pickle=True))


@pytest.mark.parametrize('array', [
    np.arange(12, dtype='>i4').reshape(3, 4), np.asfortranarray(np.ones((2, 3))),
    np.array(['ref/0.jpg', 'query/1.jpg']), np.array([b'a', b'bc']), np.zeros((0, 1), np.int64),
    np.array([True, False])])
def test_plain_arrays_load_without_pickle(array, tmp_path):
  path = tmp_path / 'x.npy'
  np.save(path, array, allow_pickle=False)
  _assert_same(safe_numpy.load_npy(path), array)
  _assert_same(np.asarray(safe_numpy.load_npy(path, mmap_mode='r')), array)


def test_code_in_an_object_array_is_refused_and_never_run(tmp_path):
  marker = tmp_path / 'PWNED'
  path = tmp_path / 'x_gt.npy'
  np.save(path, _object_array([[1], _RunsCode(marker)]), allow_pickle=True)
  with pytest.raises(UnsafeArrayFileError, match=r"x_gt\.npy.*(posix|os)\.system") as info:
    safe_numpy.load_npy(path)
  assert '\n' not in str(info.value)
  assert not marker.exists()
  # The file is hostile indeed: numpy's own unpickling runs the command.
  np.load(path, allow_pickle=True)
  assert marker.exists()


def test_a_pickle_that_is_not_an_array_is_refused(tmp_path):
  marker = tmp_path / 'PWNED'
  path = tmp_path / 'x.npy'
  # A valid object-array header followed by a pickle of anything: what a hand-made file can be.
  with open(path, 'wb') as f:
    npy_format.write_array_header_1_0(f, {'descr': '|O', 'fortran_order': False, 'shape': (1,)})
    pickle.dump(_RunsCode(marker), f, protocol=3)
  with pytest.raises(UnsafeArrayFileError, match='system'):
    safe_numpy.load_npy(path)
  with open(path, 'wb') as f:
    npy_format.write_array_header_1_0(f, {'descr': '|O', 'fortran_order': False, 'shape': (1,)})
    pickle.dump({'a': 1}, f, protocol=3)
  with pytest.raises(UnsafeArrayFileError, match='dict'):
    safe_numpy.load_npy(path)
  assert not marker.exists()


@pytest.mark.parametrize('element, pattern', [
    ({'a': 1}, 'dict'), ({1, 2}, 'set'), ([[1, 2]], 'list'), (['a', 'b'], 'str'),
    (np.array([{}], dtype=object), 'dict'), (np.zeros(2, [('a', 'i4')]), 'dtype'),
    (np.array(['2020-01-01'], 'datetime64[D]'), 'dtype'),
])
def test_elements_that_are_not_plain_data_are_refused(element, pattern, tmp_path):
  path = tmp_path / 'x.npy'
  np.save(path, _object_array([element, [1]]), allow_pickle=True)
  with pytest.raises(UnsafeArrayFileError, match=pattern):
    safe_numpy.load_npy(path)


def test_structured_dtype_with_objects_is_refused(tmp_path):
  path = tmp_path / 'x.npy'
  np.save(path, np.zeros(2, [('a', 'O')]), allow_pickle=True)
  with pytest.raises(UnsafeArrayFileError, match='structured'):
    safe_numpy.load_npy(path)


def test_missing_truncated_and_foreign_files_are_one_line(tmp_path):
  with pytest.raises(ArrayFileError, match='does not exist'):
    safe_numpy.load_npy(tmp_path / 'missing.npy')
  path = tmp_path / 'gt.npy'
  np.save(path, _object_array([[1, 2], [3]] * 50), allow_pickle=True)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ArrayFileError, match=r"gt\.npy.*truncated") as info:
    safe_numpy.load_npy(path)
  assert '\n' not in str(info.value)
  plain = tmp_path / 'db.npy'
  np.save(plain, np.arange(1000))
  plain.write_bytes(plain.read_bytes()[:300])
  with pytest.raises(ArrayFileError, match=r"db\.npy"):
    safe_numpy.load_npy(plain)
  text = tmp_path / 'notes.npy'
  text.write_text('not an array')
  with pytest.raises(ArrayFileError, match='not a readable .npy'):
    safe_numpy.load_npy(text)


def test_header_shape_must_match_the_data(tmp_path):
  path = tmp_path / 'x.npy'
  buffer = io.BytesIO()
  pickle.dump(_object_array([[1], [2]]), buffer, protocol=3)
  with open(path, 'wb') as f:
    npy_format.write_array_header_1_0(f, {'descr': '|O', 'fortran_order': False, 'shape': (3,)})
    f.write(buffer.getvalue())
  with pytest.raises(ArrayFileError, match=r'shape \(3,\).*\(2,\)'):
    safe_numpy.load_npy(path)


def test_npz_members_by_the_same_rules(tmp_path):
  path = tmp_path / 'x.npz'
  np.savez(path, flat=np.arange(3), names=np.array(['a', 'b']), gt=_object_array([[1], []]))
  arrays = safe_numpy.load_npz(path)
  assert list(arrays) == ['flat', 'names', 'gt']
  np.testing.assert_array_equal(arrays['flat'], np.arange(3))
  assert arrays['gt'][0] == [1] and arrays['gt'][1] == []
  assert list(safe_numpy.load_npz(path, keys=['names'])) == ['names']
  with pytest.raises(ArrayFileError, match="no array 'other'"):
    safe_numpy.load_npz(path, keys=['other'])

  marker = tmp_path / 'PWNED'
  hostile = tmp_path / 'hostile.npz'
  np.savez(hostile, ok=np.arange(2), bad=_object_array([_RunsCode(marker)]))
  with pytest.raises(UnsafeArrayFileError, match=r"hostile\.npz' \(array 'bad'\)"):
    safe_numpy.load_npz(hostile)
  assert not marker.exists()
  with zipfile.ZipFile(tmp_path / 'empty.npz', 'w'):
    pass
  assert safe_numpy.load_npz(tmp_path / 'empty.npz') == {}
  (tmp_path / 'bad.npz').write_bytes(b'PK\x03\x04 truncated')
  with pytest.raises(ArrayFileError, match='not a readable .npz'):
    safe_numpy.load_npz(tmp_path / 'bad.npz')
  with pytest.raises(ArrayFileError, match='does not exist'):
    safe_numpy.load_npz(tmp_path / 'missing.npz')
