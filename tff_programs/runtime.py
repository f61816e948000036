"""The TFF runtime of every fedmef-tf program and test: one worker, started and always ended.

TensorFlow Federated's local C++ execution context runs computations in a separate process,
`tensorflow_federated/data/worker_binary`, reached over gRPC. TFF starts that
process lazily and only stops it when its context object is garbage-collected, which leaves it
running after a plain exit, after SIGKILL of the parent (holding the parent's output pipes open),
and hangs teardown when SIGINT is ignored (see ../shared/ENVIRONMENT.md).

`LocalRuntime` starts the worker itself, in the main thread, and installs the execution context
that talks to it, so that it owns the worker's PID and ends it on every exit path:

* normal return and exceptions: the context manager's `__exit__` (and an `atexit` hook for
  programs that never leave the `with` block);
* SIGINT: the default Python handler is restored before TFF starts (`KeyboardInterrupt`);
* SIGTERM: turned into `SystemExit(128 + SIGTERM)` so `finally` blocks and `__exit__` run;
* SIGKILL of the parent: the worker is started with `PR_SET_PDEATHSIG = SIGKILL` (Linux), so the
  kernel ends it when the thread that started it dies; it is started from the main thread for
  that reason. It runs in its own session, so a Ctrl-C typed in a terminal reaches the program
  (which decides when to stop) and not the worker directly.

The worker binary listens on every network interface, with no authentication, and has no flag
to change that. `LocalRuntime` therefore starts it in a network namespace of its own (Linux
`unshare(CLONE_NEWNET)`, where the only interface is its own loopback) and reaches it through a
Unix socket in a directory only this user may enter, relayed into that namespace by a thread of
this process (`_NamespaceRelay`): no other host, and no other user of this one, can send it
computations. Where the kernel does not allow a new namespace (no CAP_SYS_ADMIN) it says so in a
warning and starts the worker as before. Workers for remote use (`tff_programs.worker`) listen
on the network by design (docs/DISTRIBUTED.md).

Only processes started here are ever signalled, by their PID.

Typical use::

    from tff_programs import runtime
    runtime.configure_logging()          # before TensorFlow is imported; quiet unless verbose
    with runtime.LocalRuntime():
        ...  # run TFF computations
"""

import atexit
import ctypes
import fcntl
import logging as py_logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Optional

from fedmef_tf.flag_parsing import VERBOSE_ENV, verbose_from_environment

_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_WORKER_READY_TIMEOUT_S = 60.0
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_OPTIONS = [
  ('grpc.max_message_length', _GRPC_MAX_MESSAGE_BYTES),
  ('grpc.max_receive_message_length', _GRPC_MAX_MESSAGE_BYTES),
  ('grpc.max_send_message_length', _GRPC_MAX_MESSAGE_BYTES),
]


class WorkerError(RuntimeError):
  """The TFF worker could not be started or reached."""


def configure_logging(verbose: Optional[bool] = None) -> None:
  """Keeps TensorFlow's Python and C++ log noise out of the console unless `verbose`.

  TensorFlow reads its C++ log level once, when it is first imported: a program calls this
  before it imports TensorFlow (for example in its flag parser) to keep the C++ INFO and
  WARNING lines (CPU feature notices, oneDNN, TensorRT probes, grappler) out of the terminal.

  Args:
    verbose: True shows TensorFlow's warnings and info lines; None reads `VERBOSE_ENV`.
  """
  if verbose is None:
    verbose = verbose_from_environment()
  if verbose:
    os.environ[VERBOSE_ENV] = '1'
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')
  warnings.filterwarnings('ignore', category=DeprecationWarning)
  warnings.filterwarnings('ignore', category=UserWarning, module='tensorflow')
  for name in ('tensorflow', 'absl', 'jax', 'jax._src.xla_bridge'):
    py_logging.getLogger(name).setLevel(py_logging.ERROR)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:  # pragma: no cover
    pass


def _set_parent_death_signal() -> None:
  """Runs in the child between fork and exec: die with SIGKILL when the parent dies."""
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  except OSError:  # Not Linux: the atexit/signal paths still apply.
    pass


def _isolate_network() -> None:
  """Runs in the child between fork and exec: a network namespace of its own, loopback up.

  The worker binary listens on every interface and has no flag to change that; in a new
  network namespace the only interface is its own loopback, which nothing outside can reach.
  Raises OSError when the kernel refuses (no CAP_SYS_ADMIN): `Popen` then fails.
  """
  _set_parent_death_signal()
  libc = ctypes.CDLL('libc.so.6', use_errno=True)
  if libc.unshare(_CLONE_NEWNET) != 0:
    raise OSError(ctypes.get_errno(), 'unshare(CLONE_NEWNET) failed')
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack('16sH14x', b'lo', 0)
    flags = struct.unpack('16sH14x', fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack('16sH14x', b'lo', flags | _IFF_UP))


class _NamespaceRelay:
  """Connects a Unix socket of this host to a worker's port inside its network namespace.

  A thread of this process enters the worker's namespace (`setns`, thread-local) and accepts
  connections on `socket_path` (a file in a directory only this user may enter); for each it
  opens a TCP connection to the worker's loopback port from inside the namespace, and two
  threads copy bytes both ways. gRPC clients reach the worker as `unix:<socket_path>`.
  """

  def __init__(self, worker_pid: int, port: int):
    self._netns = f'/proc/{worker_pid}/ns/net'
    self._port = port
    self._dir = tempfile.mkdtemp(prefix='tff_worker_')  # mode 0700
    self.socket_path = os.path.join(self._dir, 'worker.sock')
    self._listener: Optional[socket.socket] = None
    self._connections = []
    self._stopping = threading.Event()
    self._ready = threading.Event()
    self._error: Optional[BaseException] = None
    self._thread = threading.Thread(target=self._serve, name='tff-worker-relay', daemon=True)

  def start(self) -> None:
    self._thread.start()
    self._ready.wait(10)
    if self._error is not None or not self._ready.is_set():
      self.stop()
      raise WorkerError(f"cannot enter the worker's network namespace ({self._error})")

  def _serve(self) -> None:
    try:
      libc = ctypes.CDLL('libc.so.6', use_errno=True)
      fd = os.open(self._netns, os.O_RDONLY)
      try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
          raise OSError(ctypes.get_errno(), 'setns failed')
      finally:
        os.close(fd)
      self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
      self._listener.bind(self.socket_path)
      self._listener.listen(16)
      self._listener.settimeout(0.2)
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e
      return
    finally:
      self._ready.set()
    while not self._stopping.is_set():
      try:
        client, _ = self._listener.accept()
      except socket.timeout:
        continue
      except OSError:
        return
      try:
        upstream = socket.create_connection(('127.0.0.1', self._port), timeout=5)
        upstream.settimeout(None)
      except OSError:
        client.close()  # the worker is not listening yet: gRPC retries
        continue
      client.settimeout(None)
      self._connections += [client, upstream]
      for src, dst in ((client, upstream), (upstream, client)):
        threading.Thread(
          target=_pump, args=(src, dst), daemon=True, name='tff-worker-relay-copy'
        ).start()

  def stop(self) -> None:
    self._stopping.set()
    if self._thread.is_alive() and self._thread is not threading.current_thread():
      self._thread.join(timeout=2)
    for conn in [self._listener] + self._connections:
      if conn is not None:
        try:
          conn.close()
        except OSError:
          pass
    self._connections = []
    shutil.rmtree(self._dir, ignore_errors=True)


def _pump(src: socket.socket, dst: socket.socket) -> None:
  try:
    while True:
      data = src.recv(1 << 20)
      if not data:
        break
      dst.sendall(data)
  except OSError:
    pass
  finally:
    for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
      try:
        sock.shutdown(how)
      except OSError:
        pass


def worker_binary_path() -> str:
  """Absolute path of the C++ worker binary shipped inside the TFF package."""
  import tensorflow_federated  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.dirname(tensorflow_federated.__file__), 'data', 'worker_binary')
  if not os.path.isfile(path):
    raise WorkerError(
      f'TFF worker binary not found at {path}; reinstall with scripts/install.sh --force'
    )
  return path


def restore_signal_handlers() -> None:
  """SIGINT raises KeyboardInterrupt and SIGTERM raises SystemExit, in the main thread.

  A program started in the background of a non-interactive shell inherits SIGINT as ignored,
  which makes TFF's teardown hang forever; restoring the default Python handler fixes that.
  """
  if threading.current_thread() is not threading.main_thread():
    return
  signal.signal(signal.SIGINT, signal.default_int_handler)
  if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
    signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum, frame):  # pylint: disable=unused-argument
  raise SystemExit(128 + signum)


class WorkerProcess:
  """One TFF C++ worker service started by this process (owned by PID).

  Args:
    port: its port; a free one when None.
    max_concurrent_computation_calls: passed to the worker; -1 is unbounded.
    log_path: file for its output (a temporary one when None and not `verbose`).
    verbose: let it write to this console.
    isolated: run it in a network namespace of its own, reachable only through a Unix socket
      of this host (`_NamespaceRelay`); `target` is then `unix:<path>`. Raises WorkerError
      when the kernel does not allow it. Otherwise it listens on every interface and `target`
      is `localhost:<port>`.
  """

  def __init__(
    self,
    port: Optional[int] = None,
    *,
    max_concurrent_computation_calls: int = -1,
    log_path: Optional[str] = None,
    verbose: bool = False,
    isolated: bool = False,
  ):
    import portpicker  # pylint: disable=g-import-not-at-top

    self.port = port or portpicker.pick_unused_port()
    args = [
      worker_binary_path(),
      f'--port={self.port}',
      f'--max_concurrent_computation_calls={max_concurrent_computation_calls}',
    ]
    if verbose:
      out = None
      self.log_path = None
    else:
      if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix='tff_worker_', suffix='.log')
        os.close(fd)
      self.log_path = log_path
      out = open(log_path, 'ab')  # pylint: disable=consider-using-with
    self._out = out
    self._relay: Optional[_NamespaceRelay] = None
    try:
      self.process = subprocess.Popen(  # pylint: disable=consider-using-with
        args,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        preexec_fn=_isolate_network if isolated else _set_parent_death_signal,
        start_new_session=True,
        close_fds=True,
      )
    except subprocess.SubprocessError as e:
      self._close_log()
      raise WorkerError(
        f'cannot start the TFF worker in a network namespace of its own ({e})'
      ) from None
    self.pid = self.process.pid
    _LIVE_WORKERS.add(self)
    self.target = f'localhost:{self.port}'
    if isolated:
      self._relay = _NamespaceRelay(self.pid, self.port)
      try:
        self._relay.start()
      except WorkerError:
        self.stop()
        raise
      self.target = f'unix:{self._relay.socket_path}'

  def alive(self) -> bool:
    return self.process.poll() is None

  def stop(self, timeout_s: float = 5.0) -> None:
    """SIGINT, then SIGKILL after `timeout_s`; only this worker's PID is signalled."""
    if self.alive():
      try:
        os.kill(self.pid, signal.SIGINT)
        self.process.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait()
      except ProcessLookupError:
        pass
    if self._relay is not None:
      self._relay.stop()
      self._relay = None
    self._close_log()
    _LIVE_WORKERS.discard(self)

  def _close_log(self) -> None:
    if self._out is not None:
      self._out.close()
      self._out = None
    if self.log_path and os.path.exists(self.log_path) and os.path.getsize(self.log_path) == 0:
      os.remove(self.log_path)


_LIVE_WORKERS: 'set[WorkerProcess]' = set()


@atexit.register
def _stop_all_workers() -> None:
  for worker in list(_LIVE_WORKERS):
    worker.stop(timeout_s=2.0)


def wait_ready(stub, target: str, timeout_s: float, worker: Optional[WorkerProcess] = None):
  """Waits until the worker behind `stub` (at `target`) serves.

  Raises:
    WorkerError: `worker` (when given) exited, or `target` did not answer within `timeout_s`.
  """
  deadline = time.monotonic() + timeout_s
  while not stub.is_ready:
    if worker is not None and not worker.alive():
      raise WorkerError(
        f'TFF worker at {target} exited with code {worker.process.returncode} '
        f'(log: {worker.log_path})'
      )
    if time.monotonic() > deadline:
      raise WorkerError(f'TFF worker at {target} not reachable within {timeout_s:.0f}s')
    time.sleep(0.05)


def make_stub(target: str, on_state=None):
  """A TFF executor stub for `target`; `on_state(connectivity)` hears of channel changes."""
  import grpc  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub  # pylint: disable=g-import-not-at-top

  channel = grpc.insecure_channel(target, _GRPC_OPTIONS)
  if on_state is not None:
    channel.subscribe(on_state, try_to_connect=False)
  return remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)


def _executor_factory(stub, default_num_clients: int):
  from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.executors import remote_executor  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.types import placements  # pylint: disable=g-import-not-at-top

  def stack_fn(cardinalities):
    if cardinalities.get(placements.CLIENTS) is None:
      cardinalities[placements.CLIENTS] = default_num_clients
    ex = remote_executor.RemoteExecutor(stub)
    ex.set_cardinalities(cardinalities)
    return ex

  return python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


def _context_kwargs():
  from tensorflow_federated.python.core.backends.native import compiler  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.environments.tensorflow_frontend import (
    tensorflow_computation,
  )  # pylint: disable=g-import-not-at-top

  return dict(
    compiler_fn=compiler.desugar_and_transform_to_native,
    transform_args=tensorflow_computation.transform_args,
    transform_result=tensorflow_computation.transform_result,
  )


def _install_default_context(context):
  """Makes `context` TFF's default (this thread) and returns the one it replaces.

  Called where no `with_context` scope is open, so the current context is the default one.
  """
  from tensorflow_federated.python.core.impl.context_stack import context_stack_impl  # pylint: disable=g-import-not-at-top

  stack = context_stack_impl.context_stack
  previous = stack.current
  stack.set_default_context(context)
  return previous


class LocalRuntime:
  """Installs a TFF execution context backed by a C++ worker this process owns.

  Equivalent to `tff.backends.native.set_sync_local_cpp_execution_context()`, except that the
  worker is started eagerly, by this object, and is always ended (see the module docstring).

  Args:
    default_num_clients: cardinality of CLIENTS when a computation cannot infer it.
    max_concurrent_computation_calls: passed to the worker; -1 is unbounded.
    worker_log: file for the worker's stdout/stderr; a temporary file when None (deleted if
      empty). Ignored when `verbose`, in which case the worker writes to this console.
    verbose: show TensorFlow and worker logs.
  """

  def __init__(
    self,
    *,
    default_num_clients: int = 0,
    max_concurrent_computation_calls: int = -1,
    worker_log: Optional[str] = None,
    verbose: Optional[bool] = None,
  ):
    self._default_num_clients = default_num_clients
    self._max_calls = max_concurrent_computation_calls
    self._worker_log = worker_log
    self._verbose = verbose_from_environment() if verbose is None else verbose
    self.worker: Optional[WorkerProcess] = None
    self.context = None
    self._previous = None

  def start(self) -> 'LocalRuntime':
    """Starts the worker, waits until it serves, and installs the execution context."""
    configure_logging(self._verbose)
    restore_signal_handlers()
    from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context  # pylint: disable=g-import-not-at-top

    try:
      self.worker = WorkerProcess(
        max_concurrent_computation_calls=self._max_calls,
        log_path=self._worker_log,
        verbose=self._verbose,
        isolated=True,
      )
    except WorkerError as e:
      print(
        f'warning: {e}; the TFF worker listens on every network interface instead',
        file=sys.stderr,
        flush=True,
      )
      self.worker = WorkerProcess(
        max_concurrent_computation_calls=self._max_calls,
        log_path=self._worker_log,
        verbose=self._verbose,
      )
    target = self.worker.target
    try:
      stub = make_stub(target)
      wait_ready(stub, target, _WORKER_READY_TIMEOUT_S, self.worker)
    except BaseException:
      self.worker.stop()
      raise
    self.context = sync_execution_context.SyncExecutionContext(
      executor_fn=_executor_factory(stub, self._default_num_clients), **_context_kwargs()
    )
    self._previous = _install_default_context(self.context)
    return self

  def stop(self) -> None:
    """Removes the execution context and ends the worker; safe to call more than once."""
    if self.context is not None:
      _install_default_context(self._previous)  # the context that was there before start()
      self.context = None
    if self.worker is not None:
      self.worker.stop()
      self.worker = None

  def __enter__(self) -> 'LocalRuntime':
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()


def parse_workers(spec: str) -> 'list[str]':
  """Parses `host:port,host:port,...` into targets; raises ValueError with a one-line reason."""
  targets = []
  for item in (x.strip() for x in spec.split(',')):
    if not item:
      continue
    host, sep, port = item.rpartition(':')
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
      raise ValueError(f"worker address '{item}' is not host:port with a port in 1..65535")
    targets.append(f'{host}:{int(port)}')
  if not targets:
    raise ValueError('no worker address given')
  if len(set(targets)) != len(targets):
    raise ValueError(f'worker addresses repeat: {spec}')
  return targets


class RemoteRuntime:
  """Installs a TFF context that divides each round's clients among remote TFF workers.

  The workers are TFF C++ worker services (`python -m tff_programs.worker --port=N` on each
  host). Computations are compiled to TFF's mergeable form
  (`tff.backends.native.create_mergeable_comp_execution_context`): each worker runs the part of
  the computation before the aggregation for its share of the clients, and this process merges
  the partial aggregates and runs the rest. Nothing is started or stopped on the workers' hosts.

  TFF's context retries calls to an unreachable worker without end, so a worker that dies during
  a round would hang the run. A watchdog thread follows each worker's gRPC channel; once a worker
  has been unreachable for `failure_timeout_s`, it signals the main thread (SIGUSR1), whose
  handler raises `WorkerError` naming the worker: the round is abandoned and the program's last
  checkpoint stays as it was.

  Args:
    workers: targets `host:port`.
    connect_timeout_s: how long to wait for every worker to answer before failing.
    failure_timeout_s: how long a worker may be unreachable during the run before it fails.
    default_num_clients: cardinality of CLIENTS when a computation cannot infer it.
  """

  def __init__(
    self,
    workers,
    *,
    connect_timeout_s: float = 15.0,
    failure_timeout_s: float = 20.0,
    default_num_clients: int = 0,
    verbose: Optional[bool] = None,
  ):
    self.workers = list(workers)
    self._timeout = connect_timeout_s
    self._failure_timeout = failure_timeout_s
    self._down_since = {}
    self._lock = threading.Lock()
    self._stopping = threading.Event()
    self._watchdog = None
    self._old_usr1 = None
    self.failed_worker: Optional[str] = None
    self._default_num_clients = default_num_clients
    self._verbose = verbose_from_environment() if verbose is None else verbose
    self.context = None
    self._previous = None

  def start(self) -> 'RemoteRuntime':
    """Connects to every worker (bounded wait) and installs the mergeable context."""
    configure_logging(self._verbose)
    restore_signal_handlers()
    from tensorflow_federated.python.core.backends.native import execution_contexts  # pylint: disable=g-import-not-at-top
    from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context  # pylint: disable=g-import-not-at-top
    import grpc  # pylint: disable=g-import-not-at-top

    async_contexts = []
    for target in self.workers:

      def on_state(state, target=target):
        with self._lock:
          if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE):
            self._down_since.pop(target, None)
          else:
            self._down_since.setdefault(target, time.monotonic())

      stub = make_stub(target, on_state)
      wait_ready(stub, target, self._timeout)
      async_contexts.append(
        async_execution_context.AsyncExecutionContext(
          executor_fn=_executor_factory(stub, self._default_num_clients), **_context_kwargs()
        )
      )
    self.context = execution_contexts.create_mergeable_comp_execution_context(async_contexts)
    self._previous = _install_default_context(self.context)
    if threading.current_thread() is threading.main_thread():
      self._old_usr1 = signal.signal(signal.SIGUSR1, self._raise_failure)
      self._stopping.clear()
      self._watchdog = threading.Thread(target=self._watch, name='tff-worker-watchdog', daemon=True)
      self._watchdog.start()
    return self

  def _watch(self) -> None:
    while not self._stopping.wait(0.5):
      now = time.monotonic()
      with self._lock:
        down = [(t, now - since) for t, since in self._down_since.items()]
      late = [t for t, secs in down if secs >= self._failure_timeout]
      if late:
        self.failed_worker = late[0]
        os.kill(os.getpid(), signal.SIGUSR1)
        return

  def _raise_failure(self, signum, frame):  # pylint: disable=unused-argument
    raise WorkerError(
      f'TFF worker at {self.failed_worker} stopped answering for '
      f'{self._failure_timeout:.0f}s during the run'
    )

  def stop(self) -> None:
    self._stopping.set()
    if self._watchdog is not None:
      self._watchdog.join(timeout=2)
      self._watchdog = None
    if self._old_usr1 is not None:
      signal.signal(signal.SIGUSR1, self._old_usr1)
      self._old_usr1 = None
    if self.context is not None:
      _install_default_context(self._previous)  # the context that was there before start()
      self.context = None

  def __enter__(self) -> 'RemoteRuntime':
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()


def make_runtime(workers: Optional[str] = None, **kwargs):
  """The runtime for a program's `--workers` flag: local worker when empty, remote otherwise."""
  if workers:
    return RemoteRuntime(parse_workers(workers), **kwargs)
  return LocalRuntime(**kwargs)


def run_main(main_fn, argv=None):
  """Runs `main_fn(argv)` inside a LocalRuntime and returns its exit code.

  For programs: `absl.app.run(lambda argv: runtime.run_main(real_main, argv))` keeps the worker's
  lifetime inside the program's.
  """
  with LocalRuntime():
    return main_fn(argv)
