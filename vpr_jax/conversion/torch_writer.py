"""Writes PyTorch checkpoints (`.pth` state dicts, Lightning-style `.ckpt` dicts) without torch.

The inverse of `torch_reader`: the zip archive that `torch.save` writes, which
`torch.load(path, weights_only=True)` reads:

* `archive/data.pkl`: a protocol-2 pickle of the saved object, in which every tensor is the call
  `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` and every
  storage the persistent id `('storage', torch.<Type>Storage, '<key>', 'cpu', numel)`. The
  pickle is written opcode by opcode here (the standard pickler would need the torch objects
  themselves), with only the opcodes and globals that torch's own files use, all of which
  torch's weights-only unpickler accepts;
* `archive/data/<key>`: the bytes of each tensor, C-contiguous, in the machine's byte order
  (recorded in `archive/byteorder`), each record's data aligned to 64 bytes as torch aligns them
  (so `torch.load(..., mmap=True)` maps them too);
* `archive/version` (3), `archive/.format_version` (1), `archive/.storage_alignment` (64).

Objects that can be saved: dicts (an `OrderedDict` stays one), lists, tuples, str, int, float,
bool, None and numpy arrays of the dtypes in `torch_reader.STORAGE_DTYPES` (float32, int64,
float16, bfloat16, ...). Each array gets its own storage. Arrays are written one at a time,
in chunks, so that a large model is never copied whole.
"""

import collections
import struct
import sys
from typing import IO, Any, Iterator
import zipfile

import numpy as np

from vpr_jax.conversion import torch_reader

ARCHIVE_PREFIX = 'archive/'
ALIGNMENT = 64
FILE_FORMAT_VERSION = '3'
_CHUNK_BYTES = 64 << 20
# torch pads a record's local header with an extra field of this id ('FB') to align its data.
_PADDING_FIELD_ID = 0x4246
_LOCAL_HEADER_BYTES = 30
_ZIP64_LOCAL_EXTRA_BYTES = 20

# numpy dtype -> torch storage class name (the inverse of the reader's table).
_STORAGE_NAMES = {dtype: name for name, dtype in torch_reader.STORAGE_DTYPES.items()
                  if name != 'UntypedStorage'}

# Pickle protocol 2 opcodes (pickle's own names; see `pickletools`).
_PROTO = b'\x80\x02'
_STOP = b'.'
_MARK = b'('
_EMPTY_DICT = b'}'
_EMPTY_LIST = b']'
_EMPTY_TUPLE = b')'
_SETITEMS = b'u'
_APPENDS = b'e'
_TUPLE = b't'
_REDUCE = b'R'
_BINPERSID = b'Q'
_NONE = b'N'
_NEWTRUE = b'\x88'
_NEWFALSE = b'\x89'
_BININT1 = b'K'
_BININT = b'J'
_LONG1 = b'\x8a'
_BINFLOAT = b'G'
_BINUNICODE = b'X'
_GLOBAL = b'c'


def _global(module: str, name: str) -> bytes:
  return _GLOBAL + f'{module}\n{name}\n'.encode('ascii')


class _Pickle:
  """The pickle of one object, tensors replaced by storage references (collected in `arrays`)."""

  def __init__(self):
    self.out = bytearray(_PROTO)
    self.arrays: list[np.ndarray] = []

  def dump(self, obj: Any) -> bytes:
    self._save(obj)
    self.out += _STOP
    return bytes(self.out)

  def _save(self, obj: Any) -> None:
    if obj is None:
      self.out += _NONE
    elif isinstance(obj, (bool, np.bool_)):
      self.out += _NEWTRUE if obj else _NEWFALSE
    elif isinstance(obj, (int, np.integer)):
      self._save_int(int(obj))
    elif isinstance(obj, (float, np.floating)):
      self.out += _BINFLOAT + struct.pack('>d', float(obj))
    elif isinstance(obj, str):
      data = obj.encode('utf-8', 'surrogatepass')
      self.out += _BINUNICODE + struct.pack('<I', len(data)) + data
    elif isinstance(obj, np.ndarray):
      self._save_tensor(obj)
    elif isinstance(obj, dict):
      self._save_dict(obj)
    elif isinstance(obj, list):
      self.out += _EMPTY_LIST
      if obj:
        self.out += _MARK
        for item in obj:
          self._save(item)
        self.out += _APPENDS
    elif isinstance(obj, tuple):
      self._save_tuple(obj)
    else:
      raise TypeError(f'Cannot write a {type(obj).__name__} into a PyTorch checkpoint (only '
                      'dicts, lists, tuples, str, int, float, bool, None and numpy arrays).')

  def _save_int(self, value: int) -> None:
    if 0 <= value < 256:
      self.out += _BININT1 + bytes([value])
    elif -2**31 <= value < 2**31:
      self.out += _BININT + struct.pack('<i', value)
    else:
      data = value.to_bytes((value.bit_length() + 8) // 8, 'little', signed=True)
      self.out += _LONG1 + bytes([len(data)]) + data

  def _save_tuple(self, items) -> None:
    if not items:
      self.out += _EMPTY_TUPLE
      return
    self.out += _MARK
    for item in items:
      self._save(item)
    self.out += _TUPLE

  def _save_dict(self, obj: dict) -> None:
    if isinstance(obj, collections.OrderedDict):
      # As torch writes a state dict: OrderedDict() called, then its items set.
      self.out += _global('collections', 'OrderedDict') + _EMPTY_TUPLE + _REDUCE
    else:
      self.out += _EMPTY_DICT
    if not obj:
      return
    self.out += _MARK
    for key, value in obj.items():
      if not isinstance(key, str):
        raise TypeError(f'Dict keys must be strings, got {key!r}.')
      self._save(key)
      self._save(value)
    self.out += _SETITEMS

  def _save_tensor(self, array: np.ndarray) -> None:
    if array.dtype not in _STORAGE_NAMES:
      raise TypeError(f'Cannot write a tensor of dtype {array.dtype} (writable: '
                      f'{", ".join(sorted(str(d) for d in _STORAGE_NAMES))}).')
    key = str(len(self.arrays))
    self.arrays.append(array)
    shape = tuple(int(n) for n in array.shape)
    strides, step = [], 1
    for n in reversed(shape):  # C-contiguous strides, in elements.
      strides.append(step)
      step *= n
    self.out += _global('torch._utils', '_rebuild_tensor_v2') + _MARK
    self.out += _MARK
    self._save('storage')
    self.out += _global('torch', _STORAGE_NAMES[array.dtype])
    self._save(key)
    self._save('cpu')
    self._save(int(array.size))
    self.out += _TUPLE + _BINPERSID
    self._save(0)  # storage offset
    self._save_tuple(shape)
    self._save_tuple(tuple(reversed(strides)))
    self._save(False)  # requires_grad
    self._save(collections.OrderedDict())  # backward hooks
    self.out += _TUPLE + _REDUCE


def _padding_extra(offset: int, name: bytes, zip64: bool) -> bytes:
  """The extra field that puts a record's data (after its local header) on a 64-byte boundary."""
  start = offset + _LOCAL_HEADER_BYTES + len(name) + 4 + (_ZIP64_LOCAL_EXTRA_BYTES if zip64 else 0)
  pad = -start % ALIGNMENT
  return struct.pack('<HH', _PADDING_FIELD_ID, pad) + b'\0' * pad


def _chunks(array: np.ndarray) -> Iterator[memoryview]:
  """The array's bytes in C order, about 64 MiB at a time (a strided view is copied in slabs)."""
  per_chunk = max(1, _CHUNK_BYTES // max(1, array.dtype.itemsize))
  if array.flags.c_contiguous:
    flat = array.reshape(-1)
    for start in range(0, flat.size, per_chunk):
      yield memoryview(flat[start:start + per_chunk].view(np.uint8))
    return
  # A transposed leaf: slabs of whole rows along the first axis, each made contiguous in turn.
  rows = max(1, per_chunk // max(1, array[0].size))
  for start in range(0, array.shape[0], rows):
    yield memoryview(np.ascontiguousarray(array[start:start + rows]).reshape(-1).view(np.uint8))


def _write_record(archive: zipfile.ZipFile, stream: IO[bytes], name: str, size: int,
                  chunks) -> None:
  encoded = (ARCHIVE_PREFIX + name).encode('ascii')
  # Above 1 GiB a record is written with zip64 sizes (zipfile's own threshold is ~2 GiB, so the
  # choice made here is the one zipfile follows, and the padding is computed for it).
  zip64 = size > (1 << 30)
  info = zipfile.ZipInfo(encoded.decode('ascii'), date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = size
  info.extra = _padding_extra(stream.tell(), encoded, zip64)
  with archive.open(info, mode='w', force_zip64=zip64) as record:
    for chunk in chunks:
      record.write(chunk)


def save(obj: Any, stream: IO[bytes]) -> None:
  """Writes `obj` into `stream` (a seekable binary file) in torch's zip format.

  Args:
    obj: e.g. `OrderedDict({name: np.ndarray})` (a state dict) or `{'state_dict': ...}` (a
      Lightning-style checkpoint); see the module docstring for what may be inside.
    stream: a file opened 'wb' (seekable: zipfile rewrites each local header once its record is
      written).
  """
  pickle = _Pickle()
  data = pickle.dump(obj)
  with zipfile.ZipFile(stream, mode='w', compression=zipfile.ZIP_STORED,
                       allowZip64=True) as archive:
    small = [('data.pkl', data), ('.format_version', b'1'),
             ('.storage_alignment', str(ALIGNMENT).encode()),
             ('byteorder', sys.byteorder.encode('ascii'))]
    for name, payload in small:
      _write_record(archive, stream, name, len(payload), [payload])
    for key, array in enumerate(pickle.arrays):
      _write_record(archive, stream, f'data/{key}', int(array.nbytes), _chunks(array))
    version = (FILE_FORMAT_VERSION + '\n').encode()
    _write_record(archive, stream, 'version', len(version), [version])
