"""A lock on a run directory: one training program at a time per run directory.

The lock is the file `<root_dir>/.lock`, held with `fcntl.flock` for the whole run and holding
the PID of its holder. The kernel releases a `flock` when its holder exits in any way (return,
exception, signal, SIGKILL), so a lock can never outlive its process; the PID in the file is
only there to name the running process to a second start. A file left with the PID of a process
that no longer exists (a killed run) is a stale lock and is taken over.

Typical use::

    from tff_programs import run_lock
    try:
      with run_lock.RunLock(root_dir):
        ...  # the run
    except run_lock.LockedError as e:
      print(f'train: error: {e}')
"""

import errno
import fcntl
import os
from typing import Optional

from fedmef_tf import text

LOCK_FILE = '.lock'


class LockError(Exception):
  """The run directory cannot be locked (one-line message naming it and why)."""


class LockedError(LockError):
  """Another live process holds the run directory (one-line message naming it)."""


def pid_alive(pid: int) -> bool:
  """Whether a process with this PID exists (signal 0 is sent, nothing is delivered)."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, owned by another user
    return True
  return True


def read_holder(root_dir: str) -> Optional[int]:
  """The PID written in `root_dir`'s lock file, or None when there is none or it is unreadable."""
  try:
    with open(os.path.join(root_dir, LOCK_FILE)) as f:
      content = f.read().strip()
  except OSError:
    return None
  return int(content) if content.isdigit() else None


def _command_line(pid: int) -> str:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      parts = f.read().split(b'\0')
  except OSError:
    return ''
  command = text.one_line(' '.join(os.fsdecode(p) for p in parts if p))
  return command if len(command) <= 120 else command[:117] + '...'


class RunLock:
  """Holds `<root_dir>/.lock` from `acquire` (or `with`) until `release` or process exit.

  Args:
    root_dir: the run directory; created when missing.
    names: how the messages name the run directory setting (`fedmef_tf.text.KEYWORDS`, or a
      program's `fedmef_tf.text.FLAGS`).
  """

  def __init__(self, root_dir: str, names: text.SettingNames = text.KEYWORDS):
    self.root_dir = root_dir
    self._names = names
    self.path = os.path.join(root_dir, LOCK_FILE)
    self.stale_pid: Optional[int] = None  # PID of a dead holder whose lock was taken over
    self._fd: Optional[int] = None

  def acquire(self) -> 'RunLock':
    """Takes the lock; raises `LockedError` naming the holder when a live process has it.

    Raises:
      LockedError: another live process holds it.
      LockError: the directory or its lock file cannot be created.
    """
    try:
      os.makedirs(self.root_dir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise LockError(
        f'{self._names.setting("root_dir", self.root_dir)}: cannot be written ({e.strerror or e})'
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      pid = read_holder(self.root_dir)
      who = f'process {pid}' if pid else 'another process'
      command = _command_line(pid) if pid else ''
      raise LockedError(
        f'{self._names.setting("root_dir", self.root_dir)} is in use by {who}'
        f'{f" ({command})" if command else ""}; wait for it to end or stop it, or choose '
        f'another {self._names.name("root_dir")}'
      ) from None
    old = os.read(fd, 64).decode('ascii', 'replace').strip()
    if old.isdigit() and int(old) != os.getpid() and not pid_alive(int(old)):
      self.stale_pid = int(old)
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode('ascii'))
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    """Empties the lock file and releases the lock; safe to call more than once."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> 'RunLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()
