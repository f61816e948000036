r"""Trains a sparse model with FedMef (or a baseline): the TFF program `tff_programs.train`.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737); see ../shared/ALGORITHM.md for the algorithm and its symbols.

The program parses and checks every flag before doing any work (a bad value gets one line naming
the flag and its allowed range, and exit code 2), turns them into a
`tff_programs.training_loop.RunConfig` and calls `training_loop.run`, which loads the data
(`fedmef_tf.data`), partitions it among `--num_clients` clients (Dirichlet label skew or IID) as
a TFF `ClientData`, builds the learning process of `--algorithm` (`fedmef_tf.algorithms` says
what each one is made of; `tff_programs.fedmef_process` builds it) and runs `--rounds` rounds in
the TFF C++ runtime (`tff_programs.runtime`, which always ends its worker). Everything it writes
lives under `--root_dir` (see `tff_programs.program_io` for the layout):

* the program state after every round, as tensors only (`tff_programs.checkpoints`: written to
  a temporary file and renamed, atomic; loaded as data and checked against this run's state; a
  damaged newest one is passed over for the one before). Running the same command again resumes
  after the last saved round and ends with the same model as an uninterrupted run, because the
  clients of round t and the order of their examples are functions of `(--seed, t)` only;
* `config.json`, written when the first round starts (a run that fails while loading its data
  leaves `--root_dir` as it was): a `--root_dir` holding a run of another configuration is
  refused (one line, exit code 2) unless `--overwrite`. A run of another `--rounds` is refused
  with the reason: the learning-rate decay and the mask schedule of every round follow
  `--rounds`, so a longer run is a new run, not a continuation. Running a finished run's command
  again prints its report from `summary.json` and does nothing else;
* each round's metrics in `metrics.csv` and TensorBoard (`tff.program` release managers), and a
  console line per round with an ETA;
* at the end `summary.json`, PNG plots and `final_model/` (weights and masks in `weights.h5`,
  plus `model_config.json`), which `tflite_export` reads.

Ctrl-C (SIGINT) once: the running round finishes, is saved, and the program stops (exit 130);
rerun the command to go on. Ctrl-C twice: it stops at once, the last saved round intact.

The defaults of `--delta_t`, `--t_end` and `--eval_every` follow `--rounds` (`cli.round_defaults`:
the paper's dT = R/50 and T_end = 0.6 R, and R/8, rounded half up and at least 1), so any
`--rounds` runs with the other defaults; a value given on the command line wins. Every bad flag
value is reported, all in one line. The figures of the default run are in README.md.

The program holds a lock on `--root_dir` for the whole run (`tff_programs.run_lock`): a second
start on the same directory is refused in one line naming the running process.

Exit codes (the table of `tff_programs.cli`, shared by the programs): 0 done; 1 failure while
running (disk full, a worker lost, no round used any client); 2 bad flag, unusable `--root_dir`
(another configuration, in use, no intact checkpoint) or data files; 130 interrupted (SIGINT);
143 terminated (SIGTERM), the last saved round intact.

Examples:

  python -m tff_programs.train                                  # built-in data, cnn, FedMef
  python -m tff_programs.train --algorithm=rigl --root_dir=runs/rigl
  python -m tff_programs.train --dataset=cifar10 --data_dir=/data/cifar-10-batches-bin \
      --model=resnet18 --num_clients=100 --clients_per_round=10 --rounds=500 --local_epochs=5 \
      --batch_size=64 --delta_t=10 --t_end=300 --root_dir=runs/cifar10_fedmef
"""

import os
import sys
from typing import Any, Dict, List, Mapping

from absl import app
from absl import flags

from fedmef_tf import algorithms
from fedmef_tf import text
from tff_programs import cli
from tff_programs import program_io
from tff_programs import run_lock
from tff_programs import runtime
from tff_programs import training_loop

ALGORITHMS = algorithms.NAMES
MODELS = ('cnn', 'resnet18', 'mobilenet_v2')
DATASETS = ('synthetic', 'cifar10', 'cifar100', 'cinic10', 'tinyimagenet', 'client_data')
_MAX_INT32 = 2**31 - 1

FLAGS = flags.FLAGS

flags.DEFINE_string('algorithm', 'fedmef', f'One of: {", ".join(ALGORITHMS)}.')
flags.DEFINE_string('model', 'cnn', f'One of: {", ".join(MODELS)}.')
flags.DEFINE_string(
  'dataset',
  'synthetic',
  f'One of: {", ".join(DATASETS)}. "synthetic" is generated from --seed; '
  '"client_data" reads a federated dataset of your own (see --data_dir).',
)
flags.DEFINE_string(
  'data_dir',
  '',
  'Directory of the dataset files (all but synthetic). For client_data: a '
  "directory with train.sqlite and test.sqlite in the format of TFF's SQL "
  'client data (tff_programs/user_data.py documents the element structure).',
)
flags.DEFINE_string(
  'root_dir',
  os.path.join('runs', 'train'),
  'Run directory: checkpoints, metrics, report, final model. Not empty.',
)
flags.DEFINE_bool('overwrite', False, 'Replace a run of another configuration in --root_dir.')
flags.DEFINE_integer('num_clients', 20, 'K, clients in total; in [1, 100000].')
flags.DEFINE_integer('clients_per_round', 5, 'S, clients sampled per round; in [1, --num_clients].')
flags.DEFINE_integer(
  'rounds',
  40,
  'R, federated rounds; in [1, 1000000]. The defaults of '
  '--delta_t, --t_end and --eval_every follow it.',
)
flags.DEFINE_integer('local_epochs', 1, 'E, local epochs per round; in [1, 1000].')
flags.DEFINE_integer(
  'batch_size', 32, 'B, client batch size (also of the memory measurement); in [1, 65536].'
)
flags.DEFINE_float('client_lr', 0.1, 'eta_0, client SGD learning rate of round 1; in (0, 100].')
flags.DEFINE_float(
  'client_lr_min',
  0.01,
  'eta_min, client learning rate of the last round (exponential decay); in (0, --client_lr].',
)
flags.DEFINE_float(
  'density', 0.2, 'd, target density of the prunable kernels (fedavg: 1); in (0, 1].'
)
flags.DEFINE_integer(
  'delta_t',
  None,
  'dT, rounds between mask adjustments; in [1, --rounds]. '
  'Default: --rounds / 50 rounded half up, at least 1 (1 for 40 rounds, 10 '
  'for 500).',
)
flags.DEFINE_integer(
  't_end',
  None,
  'T_end, last round that may adjust masks; in [0, --rounds]. '
  'Default: 0.6 * --rounds rounded half up, at least 1 (24 for 40 rounds, '
  '300 for 500).',
)
flags.DEFINE_float('alpha', 0.2, 'alpha, initial adjustment fraction; in [0, 1].')
flags.DEFINE_float('lambda_bae', 0.01, 'lambda, BaE penalty weight; in [0, 100].')
flags.DEFINE_float('gamma', 0.7, 'gamma, SAP drop ratio of the activation cache; in [0, 1).')
flags.DEFINE_float('dirichlet_alpha', 0.5, 'a, Dirichlet label-skew parameter; in (0, 1e6].')
flags.DEFINE_bool('iid', False, 'Split the data IID instead of by Dirichlet label skew.')
flags.DEFINE_integer(
  'min_client_size', 10, 'Minimum examples per client (Dirichlet split); in [1, 1000000].'
)
flags.DEFINE_integer(
  'eval_every',
  None,
  'Evaluate the global model every this many rounds '
  '(and after the last round); in [1, --rounds]. Default: --rounds / 8 '
  'rounded half up, at least 1 (5 for 40 rounds).',
)
flags.DEFINE_integer(
  'eval_batch_size', 500, 'Batch size of the test-set evaluation; in [1, 65536].'
)
flags.DEFINE_integer(
  'seed', 0, 'Seed of the data, split, model, masks and client sampling; in [0, 2147483647].'
)
flags.DEFINE_integer(
  'synthetic_train_size',
  10000,
  'Training examples of the synthetic data; in '
  '[10, 10000000] and >= --num_clients * --min_client_size.',
)
flags.DEFINE_integer(
  'synthetic_test_size', 2000, 'Test examples of the synthetic data; in [10, 10000000].'
)
flags.DEFINE_bool('verbose', False, 'Show TensorFlow and TFF logs.')
flags.DEFINE_string(
  'workers',
  '',
  'Comma-separated host:port of TFF worker services (python -m '
  "tff_programs.worker) to divide each round's clients among; empty runs one "
  'local worker (docs/DISTRIBUTED.md).',
)


# ------------------------------------------------------------------------------------------------
# Flag checks (no TensorFlow needed).


UsageError = cli.UsageError


def validate(f: Mapping[str, Any]) -> None:
  """Checks every flag value; raises `UsageError` naming every bad one at once.

  Args:
    f: flag name -> value (for example `FLAGS.flag_values_dict()`); the flags whose defaults
      follow `--rounds` (`cli.ROUND_DERIVED`) may be None, meaning derived.

  Raises:
    UsageError: with a one-line message naming each bad flag and its allowed range.
  """
  f = cli.resolve_defaults(f)
  p = cli.Problems()
  p.check_choice('algorithm', f['algorithm'], ALGORITHMS)
  p.check_choice('model', f['model'], MODELS)
  if p.check_choice('dataset', f['dataset'], DATASETS) and f['dataset'] != 'synthetic':
    if not f['data_dir']:
      p.add(f'--data_dir is required with --dataset={f["dataset"]}: the directory of its files')
    elif not os.path.isdir(f['data_dir']):
      p.add(f'--data_dir={f["data_dir"]} is not an existing directory')
  if not f['root_dir']:
    p.add('--root_dir must not be empty')
  p.check_range('num_clients', f['num_clients'], 1, 100000)
  p.check_range('clients_per_round', f['clients_per_round'], 1, f['num_clients'])
  # The ranges that end at --rounds are checked against it only when it is valid itself.
  last_round = f['rounds'] if p.check_range('rounds', f['rounds'], 1, 1000000) else None
  p.check_range('local_epochs', f['local_epochs'], 1, 1000)
  p.check_range('batch_size', f['batch_size'], 1, 65536)
  p.check_range('client_lr', f['client_lr'], 0.0, 100.0, lo_open=True)
  p.check_range('client_lr_min', f['client_lr_min'], 0.0, f['client_lr'], lo_open=True)
  p.check_range('density', f['density'], 0.0, 1.0, lo_open=True)
  p.check_range('delta_t', f['delta_t'], 1, last_round)
  p.check_range('t_end', f['t_end'], 0, last_round)
  p.check_range('alpha', f['alpha'], 0.0, 1.0)
  p.check_range('lambda_bae', f['lambda_bae'], 0.0, 100.0)
  p.check_range('gamma', f['gamma'], 0.0, 1.0, hi_open=True)
  p.check_range('dirichlet_alpha', f['dirichlet_alpha'], 0.0, 1e6, lo_open=True)
  p.check_range('min_client_size', f['min_client_size'], 1, 1000000)
  p.check_range('eval_every', f['eval_every'], 1, last_round)
  p.check_range('eval_batch_size', f['eval_batch_size'], 1, 65536)
  p.check_range('seed', f['seed'], 0, _MAX_INT32)
  train_size_ok = p.check_range('synthetic_train_size', f['synthetic_train_size'], 10, 10000000)
  p.check_range('synthetic_test_size', f['synthetic_test_size'], 10, 10000000)
  if f.get('workers'):
    try:
      runtime.parse_workers(f['workers'])
    except ValueError as e:
      p.add(f'--workers={f["workers"]}: {e}')
  if f['dataset'] == 'synthetic' and train_size_ok:
    need = f['num_clients'] * (1 if f['iid'] else f['min_client_size'])
    if need > f['synthetic_train_size']:
      p.add(
        f'--synthetic_train_size={f["synthetic_train_size"]} is out of range: '
        f'must be >= --num_clients * --min_client_size = {need}'
      )
  p.raise_if_any()


def run_config(f: Mapping[str, Any]) -> Dict[str, Any]:
  """The configuration stored in `config.json`: every flag that changes the result.

  The flags whose defaults follow `--rounds` are stored with their derived values
  (`training_loop.RunConfig.result_config`).
  """
  return _typed_config(f).result_config()


def _typed_config(f: Mapping[str, Any]) -> training_loop.RunConfig:
  return training_loop.RunConfig.from_values(cli.resolve_defaults(f))


# ------------------------------------------------------------------------------------------------
# Entry point.


def check_command_line(values: Mapping[str, Any]) -> None:
  """Every check of the command line before any work: `validate`, then the run directory.

  Raises:
    UsageError: naming every bad flag, or why `--root_dir` cannot hold this run
      (`program_io.check_root_dir`).
  """
  validate(values)
  values = cli.resolve_defaults(values)
  try:
    program_io.check_root_dir(
      values['root_dir'],
      run_config(values),
      values['overwrite'],
      ignore=program_io.DATA_KEYS,
      names=text.FLAGS,
    )
  except program_io.RunDirError as e:
    raise UsageError(str(e)) from None


def help_text() -> str:
  """What `--help` prints: this module's docstring and every flag with its range and default."""
  return f'{__doc__.strip()}\n\nFlags:\n{cli.flags_help([__name__])}'


def parse_flags(argv: List[str]) -> List[str]:
  """absl's `flags_parser`: `--help` (exit 0), one-line errors with exit code 2, then TFF.

  Runs before `main` (`cli.flags_parser` with `check_command_line`). Once the flags are valid it
  imports TensorFlow Federated: importing TFF 0.87 for the first time inside absl's `main` leaves
  Keras unable to build functional models ('SymbolicTensor' object has no attribute 'node'),
  importing it here does not.
  """
  rest = cli.flags_parser('train', help_text, check_command_line)(argv)
  runtime.configure_logging(FLAGS.verbose)
  import tensorflow_federated  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import

  return rest


def _error(message: str) -> None:
  print(f'train: error: {message}', file=sys.stderr)


def main(argv: List[str]) -> int:
  """Runs the program on the parsed, checked flags (see `parse_flags`); returns the exit code."""
  del argv
  config = _typed_config(FLAGS.flag_values_dict())
  try:
    with run_lock.RunLock(config.root_dir, names=text.FLAGS):
      done = training_loop.run(config, console=training_loop.Console('train'), names=text.FLAGS)
    return cli.EXIT_OK if done else cli.EXIT_INTERRUPTED
  except run_lock.LockError as e:
    _error(text.one_line(str(e)))
    return cli.EXIT_USAGE
  except training_loop.SetupError as e:
    _error(str(e))
    return cli.EXIT_USAGE
  except training_loop.NoClientUsedError as e:
    _error(str(e))
    return cli.EXIT_FAILURE
  except KeyboardInterrupt:
    print(
      'train: interrupted; rerun the same command to resume from the last saved round',
      file=sys.stderr,
    )
    return cli.EXIT_INTERRUPTED
  except runtime.WorkerError as e:
    _error(str(e))
    return cli.EXIT_FAILURE
  except Exception as e:  # pylint: disable=broad-except
    disk_full = program_io.disk_full_message(e, FLAGS.root_dir, names=text.FLAGS)
    if disk_full:
      _error(disk_full)
      return cli.EXIT_FAILURE
    if not FLAGS.workers or 'grpc' not in repr(e).lower() + type(e).__module__:
      raise
    # A remote worker failed during a round: the last finished round's checkpoint is intact.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    _error(
      f'a TFF worker of --workers={FLAGS.workers} failed during a round '
      f'({type(e).__name__}: {first[:200]}); rerun with live workers to resume from the '
      'last saved round'
    )
    return cli.EXIT_FAILURE


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
