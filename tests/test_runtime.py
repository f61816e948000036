"""The TFF runtime ends its worker on every exit path, and computes through it correctly."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program that starts the runtime, runs a federated mean, prints the worker PID, then ends
# in the way named by argv[1].
CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, %(root)r)
    from tff_programs import runtime
    import numpy as np
    mode = sys.argv[1]
    with runtime.LocalRuntime():
      import tensorflow_federated as tff
      @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
      def mean(x):
        return tff.federated_mean(x)
      assert float(mean([1.0, 2.0, 6.0])) == 3.0
      from tff_programs.runtime import _LIVE_WORKERS
      (worker,) = _LIVE_WORKERS
      print('WORKER', worker.pid, flush=True)
      if mode == 'exit':
        sys.exit(0)
      if mode == 'raise':
        raise ValueError('deliberate failure')
      if mode == 'noexit':
        os._exit(0)  # skips every Python cleanup: only the parent-death signal can help
      print('WAITING', flush=True)
      while True:
        mean([1.0, 2.0])
        time.sleep(0.05)
""") % {'root': ROOT}


def _is_worker(pid: int) -> bool:
  """True while `pid` is a live (not zombie) worker_binary process."""
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      cmd = f.read()
    with open(f'/proc/{pid}/stat', 'rb') as f:
      state = f.read().rsplit(b')', 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return False
  return b'worker_binary' in cmd and state != b'Z'


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if not _is_worker(pid):
      return True
    time.sleep(0.1)
  return False


def _start(mode: str):
  proc = subprocess.Popen(
    [sys.executable, '-c', CHILD, mode],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  line = proc.stdout.readline()
  assert line.startswith('WORKER'), (line, proc.stderr.read() if proc.poll() is not None else '')
  return proc, int(line.split()[1])


@pytest.mark.parametrize('mode,expected_rc', [('exit', 0), ('raise', 1), ('noexit', 0)])
def test_worker_ends_when_program_ends(mode, expected_rc):
  proc, pid = _start(mode)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == expected_rc, err
  if mode == 'raise':
    assert 'deliberate failure' in err
  assert _wait_gone(pid), f'worker {pid} outlived its program ({mode})'


@pytest.mark.parametrize(
  'sig,expected_rc',
  [
    (signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt: Python re-raises SIGINT at exit
    (signal.SIGTERM, 128 + signal.SIGTERM),
    (signal.SIGKILL, -signal.SIGKILL),
  ],
)
def test_worker_ends_when_program_is_signalled(sig, expected_rc):
  proc, pid = _start('wait')
  assert proc.stdout.readline().startswith('WAITING')
  assert _is_worker(pid)
  os.kill(proc.pid, sig)
  # communicate() would hang forever if a surviving worker held the pipes open.
  proc.communicate(timeout=60)
  assert proc.returncode == expected_rc
  assert _wait_gone(pid), f'worker {pid} outlived its program (signal {sig})'


def test_federated_mean_through_runtime(tff_runtime):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
  def mean(x):
    return tff.federated_mean(x)

  @tff.federated_computation(
    tff.FederatedType(np.float32, tff.CLIENTS), tff.FederatedType(np.float32, tff.CLIENTS)
  )
  def weighted_mean(x, w):
    return tff.federated_mean(x, weight=w)

  rng = np.random.default_rng(0)
  values = rng.normal(size=7).astype(np.float32)
  weights = rng.uniform(1, 5, size=7).astype(np.float32)
  assert float(mean(list(values))) == pytest.approx(float(values.mean()), rel=1e-6)
  assert float(weighted_mean(list(values), list(weights))) == pytest.approx(
    float((values * weights).sum() / weights.sum()), rel=1e-5
  )
  assert tff_runtime.worker.alive()


def test_worker_is_in_its_own_session_and_owned_by_this_process(tff_runtime):
  pid = tff_runtime.worker.pid
  with open(f'/proc/{pid}/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  ppid, sid = int(fields[1]), int(fields[3])
  assert ppid == os.getpid()
  assert sid == pid  # start_new_session: a terminal Ctrl-C goes to the program, not the worker


def _non_loopback_address():
  """An IPv4 address of this host other than loopback (None when it has none)."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    try:
      s.connect(('192.0.2.123', 9))  # no packet is sent: this only picks a source address
    except OSError:
      return None
    address = s.getsockname()[0]
  return None if address.startswith('127.') else address


def test_security_local_worker_is_not_reachable_over_the_network(tff_runtime):
  address = _non_loopback_address()
  if address is None:
    pytest.skip('this host has no non-loopback IPv4 address')
  port = tff_runtime.worker.port
  for host in (address, '127.0.0.1'):
    with pytest.raises(ConnectionRefusedError):
      socket.create_connection((host, port), timeout=5).close()
  assert tff_runtime.worker.target.startswith('unix:')
  directory = os.path.dirname(tff_runtime.worker.target[len('unix:') :])
  assert os.stat(directory).st_mode & 0o077 == 0  # only this user may reach the socket
