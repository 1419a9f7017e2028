"""One training process per workdir: an exclusive lock taken before anything is written.

Two trainers on the same workdir would resume from each other's checkpoints, interleave their
logs and double the compute. `WorkdirLock` holds `fcntl.flock` on `<workdir>/.lock`, which records
its holder as JSON ({"host", "pid", "start_time"}); a second process fails at once with a
`WorkdirLockedError` naming that holder:

  with workdir_lock.WorkdirLock(workdir, process_index=jax.process_index()):
    ...  # train

Stale locks: the kernel drops a flock when the process holding it dies (even by SIGKILL), so a
killed run never blocks the next one. The one case it does not cover is a lock inherited by a
child process (os.fork, e.g. data loader workers) that outlives its parent; then the file names a
pid that no longer runs on this host, and the lock is taken over (a new lock file replaces it).
A holder on another host cannot be checked, so its lock is trusted.

The same lock guards other folders that one process at a time may write, e.g. a localisation
index folder (`WorkdirLock(out, what='index folder')`): the same stale-lock rules apply.

Several processes (one per host): only process 0 takes the lock; the others hold nothing, as they
write nothing that process 0 does not coordinate.

On release the lock file is removed, and so is the workdir if the lock created it and it holds
nothing else: a run that fails before writing anything leaves nothing behind.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Optional

from vpr_jax.errors import WorkdirLockedError
from vpr_jax.errors import WorkdirNotUsableError

LOCK_FILENAME = '.lock'
# Rounds of "open, lock, check that the file is still the one at the path": another process can
# remove or replace the file between our open and our flock.
_ATTEMPTS = 5


def read_holder(workdir: str) -> Optional[dict[str, Any]]:
  """The holder recorded in `<workdir>/.lock` ({host, pid, start_time}), or None if unreadable."""
  try:
    with open(os.path.join(workdir, LOCK_FILENAME)) as f:
      return _parse_holder(f.read())
  except OSError:
    return None


def describe_holder(holder: Optional[dict[str, Any]]) -> str:
  """'pid 123 on host h (started 2026-11-30T22:03:43Z)' or a note that the holder is unknown."""
  if not holder:
    return 'another process (it has not recorded itself yet)'
  return (f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")} (started '
          f'{holder.get("start_time", "?")})')


def _parse_holder(text: str) -> Optional[dict[str, Any]]:
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def _process_start_ticks(pid: int) -> Optional[int]:
  """The start time of `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  # Field 22 (starttime), counted after the command name, which may itself hold spaces.
  fields = stat[stat.rfind(')') + 2:].split()
  try:
    return int(fields[19])
  except (IndexError, ValueError):
    return None


def _is_dead_here(holder: Optional[dict[str, Any]]) -> bool:
  """True if `holder` ran on this host and its process is gone (or the pid now is another one)."""
  if not holder or holder.get('host') != socket.gethostname():
    return False
  pid = holder.get('pid')
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # Alive, owned by another user.
    pass
  recorded = holder.get('pid_start_ticks')
  current = _process_start_ticks(pid)
  return recorded is not None and current is not None and recorded != current


class WorkdirLock:
  """An exclusive lock on a workdir for the lifetime of a run.

  Use as a context manager, or call `acquire()` and `release()` (release is idempotent and also
  runs when the object is garbage-collected; the kernel drops the lock when the process ends).
  """

  def __init__(self, workdir: str, process_index: int = 0, what: str = 'workdir'):
    """Prepares the lock; nothing happens until `acquire`.

    Args:
      workdir: the run's folder (created by `acquire` if missing).
      process_index: this process's index among the run's processes (`jax.process_index()`);
        only process 0 takes the lock.
      what: what the folder is, in the messages ('workdir', 'index folder').
    """
    self.what = what
    self.workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    self.path = os.path.join(self.workdir, LOCK_FILENAME)
    self.active = process_index == 0
    self._fd: Optional[int] = None
    self._created_workdir = False

  @property
  def held(self) -> bool:
    """Whether this object holds the lock now."""
    return self._fd is not None

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock, or fails at once.

    Returns:
      self.

    Raises:
      WorkdirLockedError: another live process holds it (the message names it).
      WorkdirNotUsableError: the workdir is a file, or cannot be created or written.
    """
    if not self.active or self.held:
      return self
    self._make_workdir()
    for _ in range(_ATTEMPTS):
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self._read(fd)
        os.close(fd)
        if _is_dead_here(holder):
          # Held by a child that outlived the process named in the file: replace the file, so
          # that the lock lives on a new inode that the orphan does not hold.
          self._remove_if_same(holder)
          continue
        raise WorkdirLockedError(
            f'{self.what} {self.workdir!r} is in use by {describe_holder(holder)}; wait for it to '
            f'end or stop it, or choose another {self.what} (lock file {self.path}).') from None
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise WorkdirNotUsableError(
              f'{self.what} {self.workdir!r}: its file system does not support locks '
              f'({e.strerror}); choose a {self.what} on a local or NFS disk.') from None
        raise
      if self._still_at_path(fd):
        self._fd = fd
        self._record_holder()
        return self
      os.close(fd)  # The file was removed or replaced after we opened it: try the new one.
    raise WorkdirLockedError(f'{self.what} {self.workdir!r}: could not take the lock '
                             f'{self.path} after {_ATTEMPTS} attempts; other processes keep '
                             'replacing it.')

  def release(self) -> None:
    """Releases the lock and removes the lock file (and the workdir if it made it, when empty)."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      # Removed while still locked, so that a waiting process sees another inode and retries.
      if self._still_at_path(fd):
        os.remove(self.path)
      # Explicit unlock: a forked child holding a copy of fd would otherwise keep the lock.
      fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
      pass
    finally:
      os.close(fd)
    if self._created_workdir:
      try:
        os.rmdir(self.workdir)  # Only succeeds when the run wrote nothing else.
      except OSError:
        pass

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()

  def __del__(self):
    self.release()

  def _make_workdir(self) -> None:
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise WorkdirNotUsableError(f'{self.what} {self.workdir!r} is a file; expected a folder.')
    if os.path.isdir(self.workdir):
      return
    try:
      os.makedirs(self.workdir)
    except FileExistsError:  # Made by another process meanwhile.
      return
    except OSError as e:
      raise WorkdirNotUsableError(f'{self.what} {self.workdir!r} cannot be created: '
                                  f'{e.strerror or e}.') from None
    self._created_workdir = True

  def _open(self) -> int:
    try:
      # os.open gives a descriptor that exec'd programs do not inherit (O_CLOEXEC).
      return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
      reason = 'is not writable' if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else (
          f'cannot hold the lock file {LOCK_FILENAME}')
      raise WorkdirNotUsableError(f'{self.what} {self.workdir!r} {reason} ({e.strerror or e}).'
                                  ) from None

  def _still_at_path(self, fd: int) -> bool:
    try:
      on_disk = os.stat(self.path)
    except FileNotFoundError:
      return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

  @staticmethod
  def _read(fd: int) -> Optional[dict[str, Any]]:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      return _parse_holder(os.read(fd, 65536).decode('utf-8', 'replace'))
    except OSError:
      return None

  def _remove_if_same(self, holder: Optional[dict[str, Any]]) -> None:
    """Removes the lock file if it still names `holder` (another process may have replaced it)."""
    if read_holder(self.workdir) == holder:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def _record_holder(self) -> None:
    holder = {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'start_time': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
    }
    ticks = _process_start_ticks(os.getpid())
    if ticks is not None:
      holder['pid_start_ticks'] = ticks
    data = (json.dumps(holder) + '\n').encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)
    os.fsync(self._fd)
