r"""Runs one TFF worker service on this host: `python -m tff_programs.worker --port=N`.

Point a run at one or more of these with `--workers=host:port,host:port` on
`python -m tff_programs.train` or `python -m tff_programs.compare`; the clients of each round are
divided among the workers (docs/DISTRIBUTED.md). The service is TFF's own C++ worker binary; this
program starts it, says where it listens, and stops it on SIGINT or SIGTERM (and, through the
parent-death signal, when this program is killed).
"""

import socket
import sys
import time

from absl import app
from absl import flags

from tff_programs import cli
from tff_programs import runtime

_PORT = flags.DEFINE_integer('port', 8000, 'TCP port to serve on (1..65535), on all interfaces.')
_MAX_CALLS = flags.DEFINE_integer(
  'max_concurrent_computation_calls',
  -1,
  'Most computation calls the worker runs at once; -1 for no limit.',
)
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show the worker's own log lines.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not 1 <= _PORT.value <= 65535:
    print(f'worker: --port={_PORT.value} is out of range 1..65535', file=sys.stderr)
    return cli.EXIT_USAGE
  runtime.configure_logging(_VERBOSE.value)
  runtime.restore_signal_handlers()
  with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
    # Like gRPC's own listener: a port left in TIME_WAIT by an earlier worker counts as free.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(('::', _PORT.value))
    except OSError as e:
      print(f'worker: port {_PORT.value} is not free ({e.strerror})', file=sys.stderr)
      return cli.EXIT_FAILURE
  worker = runtime.WorkerProcess(
    _PORT.value, verbose=_VERBOSE.value, max_concurrent_computation_calls=_MAX_CALLS.value
  )
  target = f'localhost:{worker.port}'
  try:
    runtime.wait_ready(runtime.make_stub(target), target, 60.0, worker)
    print(
      f'worker: TFF worker pid {worker.pid} listening on {socket.getfqdn()}:{worker.port} '
      f'(all interfaces); stop with Ctrl-C',
      flush=True,
    )
    while worker.alive():
      time.sleep(0.5)
    print(f'worker: TFF worker exited with code {worker.process.returncode}', file=sys.stderr)
    return cli.EXIT_FAILURE
  except (KeyboardInterrupt, SystemExit):
    print('worker: stopping', flush=True)
    return cli.EXIT_OK
  finally:
    worker.stop()


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('worker', cli.program_help(__doc__, [__name__])))
