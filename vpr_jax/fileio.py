"""Files written whole or not at all: a temporary file beside the target, then a rename.

Every file that vpr_jax writes for a user (result JSON/CSV/NPZ, config.json, caches, indexes)
goes through `atomic_write`, so that a killed process never leaves a half-written file, and the
file gets the permissions that the process's umask gives any new file (tempfile.mkstemp alone
would create it 0600, unreadable by collaborators).
"""

import contextlib
import os
import re
import tempfile
from typing import IO, Any, Callable, Iterator, Union

from vpr_jax.errors import OutputPathError

PathLike = Union[str, os.PathLike]


def _current_umask() -> int:
  # os.umask only sets; setting and restoring is the portable way to read it.
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_open(path: PathLike, binary: bool = False, fsync: bool = True) -> Iterator[IO[Any]]:
  """Opens a temporary file beside `path`; it replaces `path` when the block ends without error.

  Args:
    path: the file to write. Its folder is created if missing.
    binary: open in binary mode ('wb') instead of text ('w', newline='').
    fsync: flush the data to disk before the rename (a crash then leaves the old or new file).

  Yields:
    The open temporary file. On an exception it is removed and `path` is left as it was.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
  try:
    os.chmod(tmp, 0o666 & ~_current_umask())
    with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'newline': ''})) as f:
      yield f
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
  """A temporary path beside `path`, for libraries that open files by name (h5py, ...).

  Args:
    path: the file to write. Its folder is created if missing.

  Yields:
    The temporary path (an empty file with the umask's permissions). When the block ends without
    error it replaces `path`; on an exception it is removed and `path` is left as it was.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
  os.close(fd)
  try:
    os.chmod(tmp, 0o666 & ~_current_umask())
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write(path: PathLike, data: Union[str, bytes, Callable[[IO[Any]], None]],
                 binary: bool = False) -> None:
  """Writes `data` (text, bytes, or a function that writes into the open file) to `path` atomically.

  Args:
    path: the file to write.
    data: str, bytes, or `write(file)`.
    binary: with a function: open the file in binary mode. Implied by bytes.
  """
  binary = binary or isinstance(data, bytes)
  with atomic_open(path, binary=binary) as f:
    if callable(data):
      data(f)
    else:
      f.write(data)


def safe_file_name(name: str) -> str:
  """`name` (a dataset name or path) as one file-name component: [A-Za-z0-9_.-] only."""
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'dataset'


def _check_creatable(path: str, what: str) -> None:
  """The nearest existing folder above `path` is a folder and writable (else OutputPathError)."""
  existing = os.path.dirname(path)
  while existing and not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if existing and not os.path.isdir(existing):
    raise OutputPathError(f'{what} {path!r}: {existing!r} is a file, not a folder.')
  if not os.access(existing or '.', os.W_OK | os.X_OK):
    raise OutputPathError(f'{what} {path!r}: folder {existing!r} is not writable.')


def check_output_folder(path: PathLike, what: str = 'output folder') -> str:
  """Checks, before any work, that a folder can be created (or written) at `path`.

  Args:
    path: the folder the command will write.
    what: the flag or field that named it, for the message.

  Returns:
    The absolute path.

  Raises:
    OutputPathError: `path` is a file, under a file, or its nearest existing folder is not
      writable.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputPathError(f'{what} {path!r} is a file; expected a folder.')
  _check_creatable(path, what)
  return path


def check_output_path(path: PathLike, what: str = 'output') -> str:
  """Checks, before any work, that a result file can be written at `path`.

  Args:
    path: the file the command will write at the end.
    what: the flag or field that named it, for the message.

  Returns:
    The absolute path.

  Raises:
    OutputPathError: `path` is a folder, or its folder cannot be created or written.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise OutputPathError(f'{what} {path!r} is a folder; expected a file path.')
  _check_creatable(path, what)
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise OutputPathError(f'{what} {path!r} exists and is not writable.')
  return path
