r"""Round time on two local TFF worker services against the local context.

    python -m benchmarks.workers [--rounds=6] [--clients_per_round=5,10,20]

Runs the training program's default (small CNN, FedMef, built-in data) for a few rounds, once on
the local context and once with `--workers` pointing at two `python -m tff_programs.worker`
processes on 127.0.0.1, for each number of clients per round, and prints the median seconds per
round of each (the first round, which traces the computations, is left out). On one machine the
workers share its cores, so this measures the overhead of splitting a round, not a speed-up.
"""

import os
import signal
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from tff_programs import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Rounds per run (the first is not timed).')
_SIZES = flags.DEFINE_list('clients_per_round', ['5', '10', '20'], 'Values of S to time.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 20, 'K.')


def _median_round_seconds(root_dir: str, extra) -> float:
  from tff_programs import program_io  # pylint: disable=g-import-not-at-top

  cmd = [
    sys.executable,
    '-m',
    'tff_programs.train',
    f'--root_dir={root_dir}',
    '--overwrite',
    f'--rounds={_ROUNDS.value}',
    f'--num_clients={_NUM_CLIENTS.value}',
    f'--eval_every={_ROUNDS.value}',
    '--delta_t=2',
    f'--t_end={_ROUNDS.value}',
  ] + list(extra)
  subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  rows = program_io.read_metrics(root_dir)
  return statistics.median(r['round_seconds'] for r in rows[1:])


def main(argv):
  del argv
  import portpicker  # pylint: disable=g-import-not-at-top

  ports = [portpicker.pick_unused_port() for _ in range(2)]
  workers = [
    subprocess.Popen(
      [sys.executable, '-m', 'tff_programs.worker', f'--port={p}'],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      text=True,
    )
    for p in ports
  ]
  try:
    for w in workers:
      assert 'listening on' in w.stdout.readline()
    spec = ','.join(f'127.0.0.1:{p}' for p in ports)
    print(f'{"S":>4} {"local s/round":>14} {"2 workers s/round":>18} {"ratio":>6}')
    with tempfile.TemporaryDirectory() as tmp:
      for s in _SIZES.value:
        extra = [f'--clients_per_round={s}']
        local = _median_round_seconds(os.path.join(tmp, f'local{s}'), extra)
        remote = _median_round_seconds(
          os.path.join(tmp, f'remote{s}'), extra + [f'--workers={spec}']
        )
        print(f'{s:>4} {local:14.2f} {remote:18.2f} {remote / local:6.2f}', flush=True)
  finally:
    for w in workers:
      w.send_signal(signal.SIGTERM)
    for w in workers:
      w.wait(timeout=30)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('workers', cli.program_help(__doc__, [__name__])))
