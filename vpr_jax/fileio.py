"""Files written whole or not at all: a temporary file beside the target, then a rename.

Every file that vpr_jax writes for a user (result JSON/CSV/NPZ, config.json, caches, indexes)
goes through `atomic_write`, so that a killed process never leaves a half-written file, and the
file gets the permissions that the process's umask gives any new file (tempfile.mkstemp alone
would create it 0600, unreadable by collaborators). Folders written whole (a converted
checkpoint) are built in a temporary sibling and moved into place by `replace_folder`; such a
folder lists the files it was written with (`record_written_files`), so that replacing it later
can prove that it deletes nothing else (`files_not_written`).

This module is the one place where vpr_jax renames files into place.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
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


def sibling_temp_folder(folder: PathLike, purpose: str = 'tmp') -> str:
  """A new, unique, not yet existing path beside `folder` for building its replacement."""
  folder = os.path.abspath(os.fspath(folder))
  tag = f'{os.getpid()}-{uuid.uuid4().hex[:8]}'
  return os.path.join(os.path.dirname(folder), f'.{os.path.basename(folder)}.{purpose}-{tag}')


def replace_folder(new_folder: PathLike, folder: PathLike) -> None:
  """Moves the complete folder `new_folder` to `folder` (same parent), replacing what is there.

  An existing `folder` is renamed aside first and removed only once the new one is in place; if
  the move fails, it is put back. A reader therefore sees the old folder or the new one, never a
  mix, and a failure leaves `folder` as it was.

  Args:
    new_folder: the folder built in full (e.g. at `sibling_temp_folder(folder)`).
    folder: where it goes. The caller has checked that replacing it loses nothing of the
      user's (`files_not_written`).
  """
  new_folder, folder = os.path.abspath(os.fspath(new_folder)), os.path.abspath(os.fspath(folder))
  old = sibling_temp_folder(folder, 'old')
  moved_aside = False
  try:
    if os.path.isdir(folder):
      if os.listdir(folder):
        os.rename(folder, old)
        moved_aside = True
      else:
        os.rmdir(folder)
    os.rename(new_folder, folder)
  except BaseException:
    if moved_aside and not os.path.exists(folder):
      os.rename(old, folder)
    raise
  if moved_aside:
    shutil.rmtree(old, ignore_errors=True)


# Written last into a folder that a command writes whole: every file it holds, relative paths.
WRITTEN_FILES_RECORD = '.vpr_jax_written_files.json'


def _files_under(folder: str) -> list[str]:
  found = []
  for where, _, names in os.walk(folder):
    found.extend(os.path.relpath(os.path.join(where, name), folder) for name in names)
  return sorted(path for path in found if path != WRITTEN_FILES_RECORD)


def record_written_files(folder: PathLike) -> None:
  """Lists every file under `folder` in its `WRITTEN_FILES_RECORD` (call once it is complete)."""
  folder = os.fspath(folder)
  atomic_write(os.path.join(folder, WRITTEN_FILES_RECORD),
               json.dumps({'files': _files_under(folder)}, indent=0) + '\n')


def files_not_written(folder: PathLike) -> list[str]:
  """The files under `folder` that its `WRITTEN_FILES_RECORD` does not list (relative paths).

  Every file counts as not written when the record is missing or unreadable: only a folder that
  proves it holds nothing else may be replaced whole.
  """
  folder = os.fspath(folder)
  try:
    with open(os.path.join(folder, WRITTEN_FILES_RECORD)) as f:
      listed = json.load(f)['files']
    listed = set(listed) if all(isinstance(path, str) for path in listed) else set()
  except (OSError, ValueError, KeyError, TypeError):
    listed = set()
  return [path for path in _files_under(folder) if path not in listed]


def safe_file_name(name: str) -> str:
  """`name` (a dataset name or path) as one file-name component: [A-Za-z0-9_.-] only."""
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'dataset'


def _check_writable_folder(folder: str, path: str, what: str) -> None:
  """Creates and removes a probe file in `folder`: the one check that agrees with the later write.

  os.access can say yes where the write then fails: for root (who passes every permission
  check) on a read-only mount or in /proc, or on network file systems.
  """
  try:
    fd, probe = tempfile.mkstemp(prefix='.vpr_jax-write-probe-', dir=folder)
  except OSError as e:
    raise OutputPathError(f'{what} {path!r}: folder {folder!r} is not writable '
                          f'({e.strerror or e}).') from None
  os.close(fd)
  os.remove(probe)


def _check_creatable(path: str, what: str) -> None:
  """The nearest existing folder above `path` is a folder and writable (else OutputPathError)."""
  existing = os.path.dirname(path)
  while existing and not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if existing and not os.path.isdir(existing):
    raise OutputPathError(f'{what} {path!r}: {existing!r} is a file, not a folder.')
  _check_writable_folder(existing or '.', path, what)


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
  if os.path.isdir(path):
    _check_writable_folder(path, path, what)
  else:
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
