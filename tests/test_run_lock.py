"""Tests of `tff_programs.run_lock`: one process per run directory, released on every exit.

* a second holder is refused in one line naming the running process by PID;
* the lock is free again after `release`, after its holder exits normally, raises, or is
  killed with SIGKILL (the kernel releases it); a lock file left with a dead PID is stale and
  taken over.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tff_programs import run_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = """
import sys, time
from tff_programs import run_lock
lock = run_lock.RunLock(sys.argv[1]).acquire()
print('held', flush=True)
if sys.argv[2] == 'raise':
  raise RuntimeError('boom')
time.sleep(600)
"""


def _holder(root_dir, mode='sleep'):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, str(root_dir), mode],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_second_holder_is_refused_naming_the_running_process(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(run_lock.LockedError) as caught:
      run_lock.RunLock(str(tmp_path)).acquire()
    message = str(caught.value)
    assert f'in use by process {proc.pid} ' in message
    assert '\n' not in message
  finally:
    proc.kill()
    proc.wait()


def test_lock_is_free_after_its_holder_is_killed_and_the_stale_pid_is_detected(tmp_path):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert run_lock.read_holder(str(tmp_path)) == proc.pid  # the file still names the dead run
  lock = run_lock.RunLock(str(tmp_path)).acquire()
  try:
    assert lock.stale_pid == proc.pid
    assert run_lock.read_holder(str(tmp_path)) == os.getpid()
  finally:
    lock.release()


def test_lock_is_free_after_its_holder_raises(tmp_path):
  proc = _holder(tmp_path, mode='raise')
  assert proc.wait(timeout=60) == 1
  with run_lock.RunLock(str(tmp_path)) as lock:
    assert lock.held


def test_release_frees_the_lock_and_with_releases_on_an_exception(tmp_path):
  first = run_lock.RunLock(str(tmp_path)).acquire()
  with pytest.raises(run_lock.LockedError):
    run_lock.RunLock(str(tmp_path)).acquire()
  first.release()
  first.release()  # twice is fine
  assert run_lock.read_holder(str(tmp_path)) is None
  with pytest.raises(ValueError):
    with run_lock.RunLock(str(tmp_path)):
      raise ValueError('inside the run')
  with run_lock.RunLock(str(tmp_path)) as again:
    assert again.held and again.stale_pid is None


def test_an_unwritable_root_dir_is_a_one_line_lock_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(run_lock.LockError, match=r'cannot be written \(Not a directory\)'):
    run_lock.RunLock(str(blocker / 'run')).acquire()


def test_a_lock_file_with_a_dead_pid_is_taken_over(tmp_path):
  dead = subprocess.Popen(['true'])
  dead.wait()
  time.sleep(0.05)
  (tmp_path / run_lock.LOCK_FILE).write_text(f'{dead.pid}\n')
  with run_lock.RunLock(str(tmp_path)) as lock:
    assert lock.stale_pid == dead.pid
