"""Reads PyTorch checkpoints (`.pth` state dicts, Lightning `.ckpt`) into numpy, without torch.

`torch.save` writes a zip archive: `<name>/data.pkl` (a pickle of the saved object in which every
tensor is a call to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every
storage a persistent id `('storage', torch.FloatStorage, '<key>', 'cpu', numel)`), the raw bytes of
each storage in `<name>/data/<key>` and the byte order in `<name>/byteorder`.

The pickle is read by an unpickler that imports nothing and calls nothing from the file:

* the tensor rebuild functions, storage types, torch dtypes, `torch.Size`, `torch.device`,
  `collections.OrderedDict`, plain containers and scalars are replaced by local implementations
  that only record their arguments; tensors become numpy arrays over the stored bytes once the
  pickle has been read (sizes, strides and offsets checked against the storage first, views of one
  storage share its memory);
* globals of modules that run code or reach the system (`os`, `subprocess`, `builtins.eval`, ...)
  make the whole file refused with `UnsafeCheckpointError`;
* any other global (Lightning hyper-parameters, callbacks, ...) becomes an inert `PickledObject`
  that keeps the arguments and state the pickle gave it.

Typical use:
  state_dict = torch_reader.load_state_dict('resnet18-f37072fd.pth')  # {name: np.ndarray}
  checkpoint = torch_reader.read_checkpoint('last.ckpt')  # the whole object, tensors as arrays
"""

import collections
import io
import os
import pickle
import sys
from typing import Any, Callable, Mapping, Optional
import zipfile

import ml_dtypes
import numpy as np

from vpr_jax.errors import CheckpointNotFoundError
from vpr_jax.errors import TorchCheckpointError
from vpr_jax.errors import UnsafeCheckpointError


# Storage classes of torch's zip format -> numpy dtypes of their elements.
STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64),
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
    # Newer dtypes (uint16, float8, ...) are saved as untyped bytes plus a dtype argument.
    'UntypedStorage': np.dtype(np.uint8),
}
# Storages of quantised tensors: recognised, so that the error names them, but not read.
_UNSUPPORTED_STORAGES = ('QInt8Storage', 'QInt32Storage', 'QUInt8Storage', 'QUInt4x2Storage',
                         'QUInt2x4Storage')

# torch dtypes (pickled as the globals `torch.<name>`) -> numpy dtypes.
_TORCH_DTYPES = {
    'float64': np.dtype(np.float64),
    'float32': np.dtype(np.float32),
    'float16': np.dtype(np.float16),
    'bfloat16': np.dtype(ml_dtypes.bfloat16),
    'int64': np.dtype(np.int64),
    'int32': np.dtype(np.int32),
    'int16': np.dtype(np.int16),
    'int8': np.dtype(np.int8),
    'uint8': np.dtype(np.uint8),
    'uint16': np.dtype(np.uint16),
    'uint32': np.dtype(np.uint32),
    'uint64': np.dtype(np.uint64),
    'bool': np.dtype(np.bool_),
    'complex64': np.dtype(np.complex64),
    'complex128': np.dtype(np.complex128),
    'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e5m2fnuz': np.dtype(ml_dtypes.float8_e5m2fnuz),
    'float8_e4m3fnuz': np.dtype(ml_dtypes.float8_e4m3fnuz),
    'float8_e8m0fnu': np.dtype(ml_dtypes.float8_e8m0fnu),
}
# torch dtypes without a numpy counterpart: they may appear (e.g. as a tensor's dtype argument),
# but a tensor of one of them is not read.
_OTHER_TORCH_DTYPES = ('complex32', 'bcomplex32', 'qint8', 'qint32', 'quint8', 'quint4x2',
                       'quint2x4', 'float4_e2m1fn_x2', 'bits8', 'bits16', 'bits1x8', 'bits2x4',
                       'bits4x2', 'uint1', 'uint2', 'uint3', 'uint4', 'uint5', 'uint6', 'uint7',
                       'int1', 'int2', 'int3', 'int4', 'int5', 'int6', 'int7',
                       'per_tensor_affine', 'per_tensor_symmetric', 'per_channel_affine',
                       'per_channel_symmetric', 'per_channel_affine_float_qparams')

# Modules whose globals can run code or reach the system. A pickle naming any of them is refused
# (not merely left inert), because no checkpoint has a reason to.
_REFUSED_MODULES = frozenset({
    'os', 'posix', 'nt', 'posixpath', 'ntpath', 'subprocess', 'sys', 'builtins', '__builtin__',
    'importlib', 'imp', 'runpy', 'shutil', 'socket', 'pickle', '_pickle', 'cPickle', 'marshal',
    'types', 'ctypes', 'code', 'codeop', 'pty', 'commands', 'platform', 'webbrowser',
    'multiprocessing', 'signal', 'asyncio', 'operator', '_operator', 'io', '_io', 'tempfile',
    'threading', '_thread', 'inspect', 'pydoc', 'timeit', 'cProfile', 'profile', 'pdb', 'bdb',
    'trace', 'dill', 'cloudpickle', 'joblib', 'shelve', 'ssl', 'http', 'urllib', 'requests',
    'ftplib', 'smtplib', 'telnetlib', 'zipimport', 'pkgutil', 'site', 'sysconfig', 'gc',
    'numpy.testing', 'numpy.f2py', 'numpy.distutils', 'torch.hub', 'torch.jit', 'torch._C',
    'torch.ops', 'torch._ops', 'torch.package', 'torch.serialization', 'torch.storage',
    'torch.utils.cpp_extension', 'torch.multiprocessing', 'torch.distributed', 'torch.library',
    'torch._dynamo', 'torch.fx', 'torch.compiler', 'torch._inductor',
})
# ... except these globals of refused modules, which only build data.
_ALLOWED_BUILTINS = frozenset({'set', 'frozenset', 'complex', 'bytearray', 'bytes', 'slice',
                               'range', 'object', 'int', 'float', 'str', 'list', 'dict', 'tuple',
                               'bool'})


class PickledObject:
  """An inert stand-in for an object of a class that is not rebuilt (hyper-parameters, callbacks).

  Nothing of the original class runs: the stand-in keeps what the pickle handed over.

  Attributes:
    module: the module the pickle named (e.g. 'argparse').
    name: the class or function name (e.g. 'Namespace').
    args: positional arguments of the call or of `__new__`.
    kwargs: keyword arguments of `__new__` (protocol 4+).
    state: what `__setstate__` would have received (often the instance `__dict__`).
    items: entries set by the pickle (for subclasses of dict, e.g. Lightning's AttributeDict).
    list_items: entries appended by the pickle (for subclasses of list).
  """

  module = ''
  name = ''

  def __new__(cls, *args, **kwargs):
    instance = super().__new__(cls)
    instance.args = args
    instance.kwargs = kwargs
    instance.state = None
    instance.items = {}
    instance.list_items = []
    return instance

  def __init__(self, *args, **kwargs):
    del args, kwargs  # Recorded by __new__.

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list_items.append(value)

  def extend(self, values):
    self.list_items.extend(values)

  @property
  def qualified_name(self) -> str:
    return f'{self.module}.{self.name}'

  def __repr__(self) -> str:
    return f'PickledObject({self.qualified_name})'


class TorchDtype:
  """A torch dtype named in a checkpoint (e.g. inside an optimiser state); `numpy` if one fits."""

  __slots__ = ('name', 'numpy')

  def __init__(self, name: str, numpy_dtype: Optional[np.dtype]):
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 'numpy', numpy_dtype)

  def __setattr__(self, key, value):
    raise AttributeError('TorchDtype is immutable')

  def __eq__(self, other):
    return isinstance(other, TorchDtype) and other.name == self.name

  def __hash__(self):
    return hash(('TorchDtype', self.name))

  def __repr__(self) -> str:
    return f'torch.{self.name}'


class _Frozen:
  """Base of the unpickler's own objects: the pickle's BUILD opcode cannot change them."""

  __slots__ = ()

  def __setattr__(self, key, value):
    raise AttributeError(f'{type(self).__name__} is immutable')


class _StorageType(_Frozen):
  """What the global `torch.FloatStorage` (etc.) stands for: a storage element type."""

  __slots__ = ('name', 'dtype')

  def __init__(self, name: str, dtype: Optional[np.dtype]):
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 'dtype', dtype)


class _StorageRef(_Frozen):
  """A storage named by the pickle: its record key, element type and element count."""

  __slots__ = ('key', 'dtype', 'numel')

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    object.__setattr__(self, 'key', key)
    object.__setattr__(self, 'dtype', dtype)
    object.__setattr__(self, 'numel', numel)


class _TensorRef(_Frozen):
  """A tensor to build once the pickle is read: a strided view of a storage."""

  __slots__ = ('storage', 'offset', 'size', 'stride', 'dtype', 'conj', 'neg')

  def __init__(self, storage, offset, size, stride, dtype, metadata):
    if not isinstance(storage, _StorageRef):
      raise TorchCheckpointError(f'a tensor refers to {type(storage).__name__}, not a storage')
    values = {'storage': storage, 'offset': _as_index(offset, 'storage offset'),
              'size': _as_shape(size, 'size'), 'stride': _as_shape(stride, 'stride'),
              'dtype': storage.dtype if dtype is None else dtype,
              'conj': bool(isinstance(metadata, Mapping) and metadata.get('conj')),
              'neg': bool(isinstance(metadata, Mapping) and metadata.get('neg'))}
    if len(values['size']) != len(values['stride']):
      raise TorchCheckpointError(f'a tensor has size {values["size"]} but stride '
                                 f'{values["stride"]}')
    for key, value in values.items():
      object.__setattr__(self, key, value)


class _SafeCallable(_Frozen):
  """A local function handed to the pickle in place of a global it names."""

  __slots__ = ('qualified_name', 'function')

  def __init__(self, qualified_name: str, function: Callable[..., Any]):
    object.__setattr__(self, 'qualified_name', qualified_name)
    object.__setattr__(self, 'function', function)

  def __call__(self, *args, **kwargs):
    return self.function(*args, **kwargs)

  def __repr__(self) -> str:
    return self.qualified_name


def _as_index(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise TorchCheckpointError(f'a tensor has {what} {value!r}; expected a non-negative integer')
  return value


def _as_shape(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)):
    raise TorchCheckpointError(f'a tensor has {what} {value!r}; expected a tuple of integers')
  return tuple(_as_index(v, what) for v in value)


# ----------------------------------------------------------------------------------------------
# The local implementations of the globals a checkpoint may name.


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks  # Training state, not data.
  return _TensorRef(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks
  if not isinstance(dtype, TorchDtype):
    raise TorchCheckpointError(f'a tensor has dtype {dtype!r}; expected a torch dtype')
  if dtype.numpy is None:
    raise TorchCheckpointError(f'a tensor has dtype {dtype!r}, which has no numpy counterpart')
  return _TensorRef(storage, storage_offset, size, stride, dtype.numpy, metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state  # Python attributes set on the Parameter.
  return data


def _rebuild_from_type_v2(function, new_type, args, state):
  """A tensor subclass or a tensor with Python attributes: the plain tensor is kept."""
  del new_type, state
  if not isinstance(function, _SafeCallable) or function.function not in _TENSOR_REBUILDERS:
    raise UnsafeCheckpointError(f'_rebuild_from_type_v2 is asked to call {function!r}, '
                                'which is not a tensor rebuild function')
  if not isinstance(args, tuple):
    raise TorchCheckpointError(f'_rebuild_from_type_v2 received arguments {args!r}')
  return function(*args)


def _unsupported_tensor(kind: str) -> Callable[..., Any]:
  def refuse(*args, **kwargs):
    del args, kwargs
    raise TorchCheckpointError(f'it holds a {kind} tensor, which is not read (only dense CPU '
                               'tensors are)')
  return refuse


def _torch_size(*args):
  if len(args) != 1 or not isinstance(args[0], (tuple, list)):
    raise TorchCheckpointError(f'torch.Size received {args!r}')
  return tuple(args[0])


def _torch_device(*args):
  return ':'.join(str(a) for a in args)


def _codecs_encode(text, encoding='utf-8', errors='strict'):
  """How protocol-2 pickles store bytes: `_codecs.encode(str, 'latin1')`."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1') or errors != 'strict':
    raise UnsafeCheckpointError(f'_codecs.encode called with {encoding!r}, {errors!r}')
  return text.encode('latin-1')


def _bytes_like(kind: type) -> Callable[..., Any]:
  def build(*args):
    if not args:
      return kind()
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ('latin1', 'latin-1'):
      return kind(args[0].encode('latin-1'))
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list)):
      return kind(args[0])
    raise TorchCheckpointError(f'{kind.__name__} called with {args!r}')
  return build


def _layout(name):
  return str(name)


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3)


def _safe_globals() -> dict[tuple[str, str], Any]:
  table = {
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
      ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
      ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
      ('torch.tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
      ('torch._utils', '_rebuild_qtensor'): _unsupported_tensor('quantised'),
      ('torch._utils', '_rebuild_sparse_tensor'): _unsupported_tensor('sparse'),
      ('torch._utils', '_rebuild_nested_tensor'): _unsupported_tensor('nested'),
      ('torch._utils', '_rebuild_meta_tensor_no_storage'): _unsupported_tensor('meta'),
      ('torch._utils', '_rebuild_wrapper_subclass'): _unsupported_tensor('wrapper-subclass'),
      ('torch._utils', '_rebuild_device_tensor_from_numpy'): _unsupported_tensor('device'),
      ('torch._utils', '_rebuild_device_tensor_from_cpu_tensor'): _unsupported_tensor('device'),
      ('torch._utils', '_rebuild_xla_tensor'): _unsupported_tensor('XLA'),
      ('torch.serialization', '_get_layout'): _layout,
      ('torch', 'Size'): _torch_size,
      ('torch', 'device'): _torch_device,
      ('_codecs', 'encode'): _codecs_encode,
      ('builtins', 'bytes'): _bytes_like(bytes),
      ('builtins', 'bytearray'): _bytes_like(bytearray),
  }
  return {key: _SafeCallable('.'.join(key), function) for key, function in table.items()}


_SAFE_GLOBALS = _safe_globals()
# Plain types: calling them builds data and runs nothing of the file.
_PLAIN_TYPES = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('collections', 'Counter'): collections.Counter,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'complex'): complex,
    ('builtins', 'slice'): slice,
    ('builtins', 'range'): range,
    ('builtins', 'object'): object,
    ('builtins', 'int'): int,
    ('builtins', 'float'): float,
    ('builtins', 'str'): str,
    ('builtins', 'list'): list,
    ('builtins', 'dict'): dict,
    ('builtins', 'tuple'): tuple,
    ('builtins', 'bool'): bool,
}


_PYTHON2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}


def _is_refused(module: str, name: str) -> bool:
  if module in ('builtins', '__builtin__') and name in _ALLOWED_BUILTINS:
    return False
  if (module, name) in (('torch', 'load'), ('torch', 'compile')):
    return True
  parts = module.split('.')
  return any('.'.join(parts[:i]) in _REFUSED_MODULES for i in range(1, len(parts) + 1))


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` with local stand-ins for every global (see the module docstring)."""

  def __init__(self, file, storages: dict[str, '_StorageRef'], source: str):
    super().__init__(file, encoding='utf-8')
    self._storages = storages
    self._source = source
    self._placeholder_types: dict[tuple[str, str], type] = {}

  def find_class(self, module, name):
    module, name = str(module), str(name)
    # Protocol-2 pickles spell some Python 3 modules by their Python 2 names.
    module = _PYTHON2_MODULES.get(module, module)
    key = (module, name)
    if key in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[key]
    if key in _PLAIN_TYPES:
      return _PLAIN_TYPES[key]
    if module == 'copyreg' and name == '_reconstructor':
      return _SafeCallable('copyreg._reconstructor', self._reconstructor)
    if module in ('torch', 'torch.storage') and name.endswith('Storage'):
      if name in STORAGE_DTYPES:
        return _StorageType(name, STORAGE_DTYPES[name])
      if name in _UNSUPPORTED_STORAGES:
        return _StorageType(name, None)
    if module == 'torch' and (name in _TORCH_DTYPES or name in _OTHER_TORCH_DTYPES):
      return TorchDtype(name, _TORCH_DTYPES.get(name))
    if _is_refused(module, name):
      raise UnsafeCheckpointError(
          f'{self._source} is refused: its pickle calls {module}.{name}, which could run code or '
          'reach the system; only tensors, containers and plain values are read, and nothing '
          'from the file was run.')
    if key not in self._placeholder_types:
      self._placeholder_types[key] = type(name.rsplit('.', 1)[-1] or 'Unnamed',
                                          (PickledObject,), {'module': module, 'name': name})
    return self._placeholder_types[key]

  def _reconstructor(self, cls, base, state):
    """copyreg._reconstructor (protocols 0 and 1): only stand-ins and OrderedDicts are built."""
    del base
    if isinstance(cls, type) and issubclass(cls, PickledObject):
      instance = cls()
      instance.state = state
      return instance
    if cls is collections.OrderedDict:
      return collections.OrderedDict(state or {})
    raise UnsafeCheckpointError(f'copyreg._reconstructor is asked to build {cls!r}')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) < 5:
      raise TorchCheckpointError(f'unexpected persistent id {pid!r}')
    typename = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
    if typename != 'storage':
      raise TorchCheckpointError(f'unexpected persistent id {pid!r}')
    storage_type, key, _, numel = pid[1:5]
    key = key.decode('ascii') if isinstance(key, bytes) else str(key)
    if not isinstance(storage_type, _StorageType):
      raise TorchCheckpointError(f'storage {key} has type {storage_type!r}')
    if storage_type.dtype is None:
      raise TorchCheckpointError(f'storage {key} is a {storage_type.name}, which is not read')
    numel = _as_index(numel, 'storage size')
    existing = self._storages.get(key)
    if existing is None:
      existing = self._storages[key] = _StorageRef(key, storage_type.dtype, numel)
    elif existing.dtype != storage_type.dtype or existing.numel != numel:
      raise TorchCheckpointError(f'storage {key} is named with two types or sizes')
    return existing


# ----------------------------------------------------------------------------------------------
# The zip archive.


def _describe_non_zip(path: str, head: bytes, size: int) -> str:
  if size == 0:
    return f'{path} is empty (0 bytes); expected a PyTorch checkpoint written by torch.save.'
  if head[:1] == b'\x80':
    return (f'{path} is in PyTorch\'s legacy format (a bare pickle, written by torch < 1.6 or with '
            '_use_new_zipfile_serialization=False), which is not read; re-save it with a recent '
            'torch: torch.save(torch.load(old_path), new_path).')
  if len(head) >= 262 and head[257:262] == b'ustar':
    return (f'{path} is in PyTorch\'s legacy tar format (torch < 0.4), which is not read; re-save '
            'it with a recent torch: torch.save(torch.load(old_path), new_path).')
  if head[:4] == b'PK\x03\x04':
    return (f'{path} is a damaged or truncated zip archive ({size} bytes); download or copy the '
            'checkpoint again.')
  return (f'{path} is not a PyTorch checkpoint: expected the zip archive torch.save writes, found '
          f'{size} bytes starting with {head[:16]!r}.')


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
  """The folder torch.save put every record in (the file's stem, or 'archive')."""
  names = archive.namelist()
  candidates = [n[:-len('data.pkl')] for n in names
                if n.endswith('/data.pkl') and n.count('/') == 1]
  if not candidates:
    raise TorchCheckpointError(f'{path} is a zip archive without the data.pkl record torch.save '
                               f'writes (first entries: {names[:5]}).')
  first = names[0].split('/', 1)[0] + '/'
  prefix = first if first in candidates else candidates[0]
  if prefix + 'constants.pkl' in names or any(n.startswith(prefix + 'code/') for n in names):
    raise TorchCheckpointError(f'{path} is a TorchScript archive (torch.jit.save), not a '
                               'checkpoint; save the weights with torch.save(model.state_dict(), '
                               'path).')
  return prefix


def _read_storage(archive: zipfile.ZipFile, prefix: str, storage: _StorageRef, swap: bool,
                  path: str) -> np.ndarray:
  """The bytes of one storage as a writable uint8 array (byte-swapped to native order if asked)."""
  name = f'{prefix}data/{storage.key}'
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise TorchCheckpointError(f'{path} lacks the record {name} of a tensor storage '
                               '(damaged file?).') from None
  nbytes = storage.numel * storage.dtype.itemsize
  if info.file_size != nbytes:
    raise TorchCheckpointError(f'{path}: record {name} holds {info.file_size} bytes, but its '
                               f'storage needs {storage.numel} x {storage.dtype.itemsize} = '
                               f'{nbytes}.')
  buffer = np.empty(nbytes, np.uint8)
  with archive.open(info) as stream:
    view = memoryview(buffer)
    filled = 0
    while filled < nbytes:
      count = stream.readinto(view[filled:])
      if not count:
        raise TorchCheckpointError(f'{path}: record {name} ends early (truncated file?).')
      filled += count
  if swap and storage.dtype.itemsize > 1:
    # Complex numbers swap each of their two parts.
    parts = 2 if storage.dtype.kind == 'c' else 1
    unit = np.dtype(f'u{storage.dtype.itemsize // parts}')
    buffer.view(unit).byteswap(inplace=True)
  return buffer


def _build_array(tensor: _TensorRef, buffer: np.ndarray, path: str) -> np.ndarray:
  """A numpy view of `buffer` with the tensor's dtype, size, stride and offset (all checked)."""
  dtype, itemsize = tensor.dtype, tensor.dtype.itemsize
  if any(s == 0 for s in tensor.size):
    return np.zeros(tensor.size, dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
  if (last + 1) * itemsize > buffer.size:
    raise TorchCheckpointError(
        f'{path}: a tensor of size {tensor.size}, stride {tensor.stride} and offset '
        f'{tensor.offset} ({dtype}) reaches past its storage {tensor.storage.key} of '
        f'{buffer.size} bytes.')
  array = np.ndarray(tensor.size, dtype, buffer=buffer, offset=tensor.offset * itemsize,
                     strides=tuple(s * itemsize for s in tensor.stride))
  if tensor.conj:
    array = np.conj(array)
  if tensor.neg:
    array = np.negative(array)
  return array


def _materialise(obj: Any, make_array: Callable[[_TensorRef], np.ndarray]) -> Any:
  """Replaces every _TensorRef in the unpickled object by its array (containers are updated)."""
  done: dict[int, Any] = {}

  def visit(value):
    if isinstance(value, _TensorRef):
      # One tensor pickled once and referenced twice stays one array.
      if id(value) not in done:
        done[id(value)] = make_array(value)
      return done[id(value)]
    if isinstance(value, (_StorageRef, _StorageType)):
      raise TorchCheckpointError(f'it holds a bare storage or storage type ({value.dtype}) '
                                 'instead of tensors')
    if not isinstance(value, (dict, list, tuple, PickledObject)):
      return value
    if id(value) in done:
      return done[id(value)]
    if isinstance(value, tuple):
      done[id(value)] = value  # A cycle through a tuple ends at the tuple as unpickled.
      result = tuple(visit(v) for v in value)
      done[id(value)] = result
      return result
    done[id(value)] = value
    if isinstance(value, dict):
      for key in list(value):
        value[key] = visit(value[key])
    elif isinstance(value, list):
      value[:] = [visit(v) for v in value]
    else:
      value.args = visit(value.args)
      value.kwargs = visit(value.kwargs)
      value.state = visit(value.state)
      value.items = visit(value.items)
      value.list_items = visit(value.list_items)
    return value

  return visit(obj)


def read_checkpoint(path: str) -> Any:
  """Reads a file written by `torch.save` without torch and without running code from it.

  Args:
    path: a `.pth` / `.pt` / `.ckpt` file in torch's zip format (torch >= 1.6).

  Returns:
    The saved object: dicts (OrderedDicts stay OrderedDicts), lists, tuples and scalars as
    pickled; tensors and Parameters as numpy arrays (bfloat16 and float8 as ml_dtypes types;
    views of one storage share memory); torch dtypes as `TorchDtype`, `torch.Size` as a tuple,
    `torch.device` as a string; objects of any other class as inert `PickledObject`s.

  Raises:
    CheckpointNotFoundError: `path` does not exist (a FileNotFoundError).
    UnsafeCheckpointError: the pickle names a function that could run code (nothing was run).
    TorchCheckpointError: not torch's zip format (empty, text, legacy format, TorchScript),
      damaged or truncated, or holding tensors that are not read (sparse, quantised, ...).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise TorchCheckpointError(f'{path} is a folder; expected a PyTorch checkpoint file (.pth, '
                               '.ckpt).')
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(f'PyTorch checkpoint {path} does not exist.')
  with open(path, 'rb') as f:
    head = f.read(512)
  size = os.path.getsize(path)
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError, OSError, ValueError):
    # The file opened above, so an OSError here comes from its contents (e.g. a bad offset).
    raise TorchCheckpointError(_describe_non_zip(path, head, size)) from None
  with archive:
    try:
      return _read_archive(archive, path)
    except TorchCheckpointError as e:
      message = str(e)
      if not message.startswith(path):
        message = f'Cannot read PyTorch checkpoint {path}: {message}'
      raise type(e)(message) from None
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
      raise TorchCheckpointError(f'{path} is a damaged or truncated zip archive ({e}); download '
                                 'or copy the checkpoint again.') from None
    except (pickle.UnpicklingError, TypeError, ValueError, KeyError, AttributeError, IndexError,
            RecursionError) as e:
      raise TorchCheckpointError(f'Cannot read PyTorch checkpoint {path}: its data.pkl is '
                                 f'malformed ({type(e).__name__}: {e}).') from None


def _read_archive(archive: zipfile.ZipFile, path: str) -> Any:
  prefix = _archive_prefix(archive, path)
  names = set(archive.namelist())
  swap = False
  if prefix + 'byteorder' in names:
    byteorder = archive.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
    if byteorder not in ('little', 'big'):
      raise TorchCheckpointError(f'{path} records byte order {byteorder!r}')
    swap = byteorder != sys.byteorder
  storages: dict[str, _StorageRef] = {}
  unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(prefix + 'data.pkl')), storages, path)
  obj = unpickler.load()
  buffers: dict[str, np.ndarray] = {}

  def make_array(tensor: _TensorRef) -> np.ndarray:
    key = tensor.storage.key
    if key not in buffers:
      buffers[key] = _read_storage(archive, prefix, tensor.storage, swap, path)
    return _build_array(tensor, buffers[key], path)

  return _materialise(obj, make_array)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a state dict file (`.pth`) or of a Lightning checkpoint's 'state_dict'.

  Args:
    path: a file written by `torch.save(model.state_dict(), path)` or a Lightning `.ckpt`.

  Returns:
    {name: np.ndarray} with the names as stored; entries that are not tensors are dropped.

  Raises:
    As `read_checkpoint`; TorchCheckpointError also when the file holds no state dict (e.g. a
    whole pickled model).
  """
  checkpoint = read_checkpoint(path)
  if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get('state_dict'), Mapping):
    checkpoint = checkpoint['state_dict']
  if not isinstance(checkpoint, Mapping):
    kind = (checkpoint.qualified_name if isinstance(checkpoint, PickledObject)
            else type(checkpoint).__name__)
    raise TorchCheckpointError(
        f'{os.fspath(path)} holds a {kind}, not a state dict (a mapping of names to tensors); '
        'save the weights with torch.save(model.state_dict(), path).')
  arrays = {str(k): v for k, v in checkpoint.items() if isinstance(v, np.ndarray)}
  if not arrays:
    raise TorchCheckpointError(f'{os.fspath(path)} holds no tensors (keys: '
                               f'{list(checkpoint)[:8]}).')
  return arrays
