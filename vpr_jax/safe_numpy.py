"""Numpy files from other people (`.npy`, `.npz`), read without ever running code from them.

`np.load(..., allow_pickle=True)` unpickles object arrays, and a pickle can call any function
(`os.system`, ...). Ground-truth lists of the VPR field are such object arrays (the gsv-cities
family's `*_gt.npy` and `msls_val_pIdx.npy`: one array or list of database indices per query), so
they cannot simply be refused. Here:

* arrays of numbers, booleans and strings are read by numpy with `allow_pickle=False`;
* object arrays are read from the `.npy` header and their pickle payload by an unpickler that
  imports nothing: the only globals it accepts are the ones numpy's own object-array pickles use
  (`numpy[._]core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`,
  `numpy[._]core.multiarray.scalar`), and each of them becomes a local stand-in that only records
  its arguments. The arrays are then built from those records after checks (dtype a plain number,
  bool, string or object dtype; sizes matching the bytes; the shape the header gives);
* an element of an object array must be a number, a string, a list or tuple of numbers, or an
  array of numbers or strings; anything else (dicts, objects, functions, deeper nesting) makes
  the whole file refused with `UnsafeArrayFileError`, in one line naming the file.

Typical use:
  positives = safe_numpy.load_npy('pitts30k_test_gt.npy')   # object array of int64 arrays
  arrays = safe_numpy.load_npz('descriptors.npz')            # {name: array}
"""

from __future__ import annotations

import math
import os
import pickle
import re
from typing import IO, Any, Iterable
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from vpr_jax.errors import ArrayFileError
from vpr_jax.errors import UnsafeArrayFileError

# Object arrays hold arrays (ground truth of a query) but not arrays of arrays of arrays.
_MAX_DEPTH = 2
# Plain dtype strings of numpy's dtype pickles: 'i8', 'f4', 'b1', 'U15', 'S3', 'O8', 'c16'.
_DTYPE_SPEC = re.compile(r'^[biufcUSO?][0-9]*$')
_NUMBER_KINDS = 'biufc'
_STRING_KINDS = 'US'


class _Refused(Exception):
  """Raised inside the unpickler; turned into UnsafeArrayFileError naming the file."""


class _Marker:
  """The stand-in for `numpy.ndarray` (only ever an argument of `_reconstruct`); not callable."""


_NDARRAY = _Marker()


class _DtypeRecord:
  """What `numpy.dtype(spec, align, copy)` and its BUILD state said, recorded, never applied."""

  def __init__(self, *args):
    self.args = args
    self.state = None

  def __setstate__(self, state):
    self.state = state


class _ArrayRecord:
  """What `_reconstruct(ndarray, shape, typecode)` and the array's BUILD state said."""

  def __init__(self, subtype, *args):
    if subtype is not _NDARRAY:
      raise _Refused('_reconstruct of something other than numpy.ndarray')
    self.state = None

  def __setstate__(self, state):
    self.state = state


class _ScalarRecord:
  """What `scalar(dtype, bytes)` (a numpy scalar, e.g. an np.int64 in a list) said."""

  def __init__(self, dtype=None, data=None, *rest):
    if rest:
      raise _Refused('scalar() with extra arguments')
    self.dtype = dtype
    self.data = data


_ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _ArrayRecord,
    ('numpy._core.multiarray', '_reconstruct'): _ArrayRecord,
    ('numpy.core.multiarray', 'scalar'): _ScalarRecord,
    ('numpy._core.multiarray', 'scalar'): _ScalarRecord,
    ('numpy', 'ndarray'): _NDARRAY,
    ('numpy', 'dtype'): _DtypeRecord,
}


class _DataUnpickler(pickle.Unpickler):
  """Imports nothing: the few globals of numpy's object-array pickles become recording stand-ins."""

  def find_class(self, module, name):
    target = _ALLOWED_GLOBALS.get((module, name))
    if target is None:
      raise _Refused(f'its pickle names {module}.{name}')
    return target

  def persistent_load(self, pid):
    raise _Refused('its pickle uses persistent ids')


# ------------------------------------------------------------------------------------------------
# Records -> arrays, checked.


def _dtype(record) -> np.dtype:
  if not isinstance(record, _DtypeRecord) or not record.args:
    raise _Refused(f'an array dtype is {type(record).__name__}, not a numpy dtype')
  spec = record.args[0]
  if not isinstance(spec, str) or not _DTYPE_SPEC.match(spec):
    raise _Refused(f'dtype {spec!r} is not a plain number, bool, string or object dtype')
  state = record.state
  endian = '|'
  if state is not None:
    if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3):
      raise _Refused(f'dtype {spec!r} has a state numpy does not write for plain dtypes')
    endian, subarray, names, fields, elsize = state[1:6]
    if subarray is not None or names is not None or fields is not None:
      raise _Refused(f'dtype {spec!r} is structured or a sub-array')
    if endian not in ('<', '>', '|', '='):
      raise _Refused(f'dtype {spec!r} has byte order {endian!r}')
    if spec[0] in _STRING_KINDS and isinstance(elsize, int) and elsize > 0:
      spec = spec[0] + str(elsize // 4 if spec[0] == 'U' else elsize)
  dtype = np.dtype(spec)
  if endian in ('<', '>') and dtype.kind != 'O':
    dtype = dtype.newbyteorder(endian)
  return dtype


def _shape(value) -> tuple[int, ...]:
  if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
    raise _Refused(f'an array shape is {value!r}')
  return value


def _array(record: _ArrayRecord, depth: int) -> np.ndarray:
  state = record.state
  if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
    raise _Refused('an array has a state numpy does not write')
  _, shape, dtype_record, fortran, data = state
  shape, dtype = _shape(shape), _dtype(dtype_record)
  size = math.prod(shape)
  order = 'F' if fortran else 'C'
  if dtype.kind == 'O':
    if depth >= _MAX_DEPTH:
      raise _Refused('object arrays are nested too deeply')
    if not isinstance(data, list) or len(data) != size:
      raise _Refused(f'an object array of shape {shape} holds {type(data).__name__} data')
    out = np.empty(size, dtype=object)
    for i, element in enumerate(data):
      out[i] = _element(element, depth + 1)
    # numpy pickles the elements of an object array in C order, whatever its memory layout.
    out = out.reshape(shape)
    return np.asfortranarray(out) if fortran else out
  if not isinstance(data, bytes) or len(data) != size * dtype.itemsize:
    raise _Refused(f'an array of shape {shape} and dtype {dtype} does not hold '
                   f'{size * dtype.itemsize} bytes')
  array = np.frombuffer(data, dtype=dtype).reshape(shape, order=order)
  # numpy's own unpickling gives native byte order; so does this.
  return array.astype(dtype.newbyteorder('='), order='K')


def _number(value):
  if type(value) in (int, float, bool):
    return value
  if isinstance(value, _ScalarRecord):
    dtype = _dtype(value.dtype)
    if dtype.kind not in _NUMBER_KINDS or not isinstance(value.data, bytes) or (
        len(value.data) != dtype.itemsize):
      raise _Refused(f'a numpy scalar of dtype {dtype} is not a number')
    return np.frombuffer(value.data, dtype=dtype)[0]
  raise _Refused(f'an element is a {type(value).__name__}')


def _element(value, depth: int):
  """An object array's element: a number, a string, a list/tuple of numbers or an array."""
  if isinstance(value, (str, bytes)):
    return value
  if isinstance(value, _ArrayRecord):
    return _array(value, depth)
  if type(value) in (list, tuple):
    return type(value)(_number(v) for v in value)
  return _number(value)


def _read_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
  try:
    version = npy_format.read_magic(f)
    if version == (1, 0):
      return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
      return npy_format.read_array_header_2_0(f)
  except (ValueError, EOFError, OSError, SyntaxError) as e:
    raise ArrayFileError(f'{where} is not a readable .npy array ({e}).') from None
  raise ArrayFileError(f'{where}: .npy format version {version} is not read (1.0 and 2.0 are).')


def _read_object_payload(f: IO[bytes], shape, fortran: bool, where: str) -> np.ndarray:
  try:
    record = _DataUnpickler(f).load()
    if not isinstance(record, _ArrayRecord):
      raise _Refused(f'its pickle holds a {type(record).__name__}, not an array')
    array = _array(record, 0)
  except _Refused as e:
    raise UnsafeArrayFileError(
        f'{where} is refused: {e}; only arrays of numbers and strings, and lists of numbers, are '
        'read from pickled object arrays (nothing from the file is run).') from None
  except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
          KeyError, RecursionError, MemoryError, OverflowError, UnicodeDecodeError) as e:
    raise ArrayFileError(f'{where}: its object array cannot be read (truncated or damaged: '
                         f'{type(e).__name__}: {e}).') from None
  if array.shape != tuple(shape):
    raise ArrayFileError(f'{where}: the header says shape {tuple(shape)}, the data holds '
                         f'{array.shape}.')
  return np.asfortranarray(array) if fortran and array.ndim > 1 else array


def _read_array(f: IO[bytes], where: str) -> np.ndarray:
  """One .npy stream: plain arrays through numpy (no pickles), object arrays as above."""
  shape, fortran, dtype = _read_header(f, where)
  if dtype.hasobject:
    if dtype != np.dtype(object):
      raise UnsafeArrayFileError(f'{where} is refused: structured dtype {dtype} holds objects; '
                                 'only plain object arrays are read.')
    return _read_object_payload(f, shape, fortran, where)
  f.seek(0)
  try:
    return npy_format.read_array(f, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    raise ArrayFileError(f'{where} cannot be read (truncated or damaged: {e}).') from None


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
  """Reads a `.npy` file; object arrays only when they hold plain data (see the module doc).

  Args:
    path: the file.
    mmap_mode: as `np.load` (arrays without objects only; object arrays are read whole).

  Returns:
    The array.

  Raises:
    ArrayFileError: the file is missing, not a .npy file, truncated or inconsistent.
    UnsafeArrayFileError: its pickle holds anything but plain data (one line, naming the file).
  """
  path = os.fspath(path)
  where = repr(path)
  try:
    with open(path, 'rb') as f:
      shape, fortran, dtype = _read_header(f, where)
      if dtype.hasobject or mmap_mode is None:
        f.seek(0)
        return _read_array(f, where)
  except FileNotFoundError:
    raise ArrayFileError(f'{where} does not exist.') from None
  except IsADirectoryError:
    raise ArrayFileError(f'{where} is a folder, not a .npy file.') from None
  del shape, fortran
  try:
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    raise ArrayFileError(f'{where} cannot be read (truncated or damaged: {e}).') from None


def load_npz(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """Reads the arrays of a `.npz` file (every member, or `keys`), by the rules of `load_npy`.

  Args:
    path: the file.
    keys: the arrays to read (default: all).

  Returns:
    {name: array}, in the order of the archive.

  Raises:
    ArrayFileError: missing file, not a zip archive, a missing key, a truncated member.
    UnsafeArrayFileError: a member's pickle holds anything but plain data.
  """
  path = os.fspath(path)
  wanted = None if keys is None else list(keys)
  try:
    with zipfile.ZipFile(path) as archive:
      members = {name[:-len('.npy')] if name.endswith('.npy') else name: name
                 for name in archive.namelist()}
      missing = [k for k in wanted or () if k not in members]
      if missing:
        raise ArrayFileError(f'{path!r} has no array {missing[0]!r} (it has '
                             f'{", ".join(sorted(members))}).')
      arrays = {}
      for key, member in members.items():
        if wanted is None or key in wanted:
          with archive.open(member) as f:
            arrays[key] = _read_array(f, f'{path!r} (array {key!r})')
      return arrays
  except FileNotFoundError:
    raise ArrayFileError(f'{path!r} does not exist.') from None
  except IsADirectoryError:
    raise ArrayFileError(f'{path!r} is a folder, not a .npz file.') from None
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    if isinstance(e, ArrayFileError):
      raise
    raise ArrayFileError(f'{path!r} is not a readable .npz archive ({e}).') from None
