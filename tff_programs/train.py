r"""Trains a sparse model with FedMef (or a baseline): the TFF program `tff_programs.train`.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737); see ../shared/ALGORITHM.md for the algorithm and its symbols.

The program parses and checks every flag before doing any work (a bad value gets one line naming
the flag and its allowed range, and exit code 2), loads the data (`fedmef_tf.data`), partitions
it among `--num_clients` clients (Dirichlet label skew or IID) as a TFF `ClientData`, builds the
learning process (`tff_programs.fedmef_process.build_fedmef_process`) and runs `--rounds` rounds
in the TFF C++ runtime (`tff_programs.runtime`, which always ends its worker). Everything it
writes lives under `--root_dir` (see `tff_programs.program_io` for the layout):

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

Exit codes: 0 done; 1 failure while running (disk full, a worker lost, no round used any
client); 2 bad flag, unusable `--root_dir` (another configuration, in use, no intact checkpoint)
or data files; 130 interrupted (SIGINT); 143 terminated (SIGTERM), the last saved round intact.

Examples:

  python -m tff_programs.train                                  # built-in data, cnn, FedMef
  python -m tff_programs.train --algorithm=rigl --root_dir=runs/rigl
  python -m tff_programs.train --dataset=cifar10 --data_dir=/data/cifar-10-batches-bin \
      --model=resnet18 --num_clients=100 --clients_per_round=10 --rounds=500 --local_epochs=5 \
      --batch_size=64 --delta_t=10 --t_end=300 --root_dir=runs/cifar10_fedmef
"""

import asyncio
import collections
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from fedmef_tf import text
from tff_programs import cli
from tff_programs import program_io
from tff_programs import run_lock
from tff_programs import runtime  # sets quiet TF logging before TensorFlow is imported

ALGORITHMS = ('fedmef', 'fedmef_no_bae', 'fedmef_no_sap', 'rigl', 'feddst', 'static', 'tfmot',
              'fedavg')
MODELS = ('cnn', 'resnet18', 'mobilenet_v2')
DATASETS = ('synthetic', 'cifar10', 'cifar100', 'cinic10', 'tinyimagenet', 'client_data')
_MAX_INT32 = 2 ** 31 - 1

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

FLAGS = flags.FLAGS

flags.DEFINE_string('algorithm', 'fedmef', f'One of: {", ".join(ALGORITHMS)}.')
flags.DEFINE_string('model', 'cnn', f'One of: {", ".join(MODELS)}.')
flags.DEFINE_string('dataset', 'synthetic',
                    f'One of: {", ".join(DATASETS)}. "synthetic" is generated from --seed; '
                    '"client_data" reads a federated dataset of your own (see --data_dir).')
flags.DEFINE_string('data_dir', '',
                    'Directory of the dataset files (all but synthetic). For client_data: a '
                    'directory with train.sqlite and test.sqlite in the format of TFF\'s SQL '
                    'client data (tff_programs/user_data.py documents the element structure).')
flags.DEFINE_string('root_dir', os.path.join('runs', 'train'),
                    'Run directory: checkpoints, metrics, report, final model. Not empty.')
flags.DEFINE_bool('overwrite', False, 'Replace a run of another configuration in --root_dir.')
flags.DEFINE_integer('num_clients', 20, 'K, clients in total; in [1, 100000].')
flags.DEFINE_integer('clients_per_round', 5, 'S, clients sampled per round; in [1, --num_clients].')
flags.DEFINE_integer('rounds', 40, 'R, federated rounds; in [1, 1000000]. The defaults of '
                     '--delta_t, --t_end and --eval_every follow it.')
flags.DEFINE_integer('local_epochs', 1, 'E, local epochs per round; in [1, 1000].')
flags.DEFINE_integer('batch_size', 32, 'B, client batch size (also of the memory measurement); '
                     'in [1, 65536].')
flags.DEFINE_float('client_lr', 0.1, 'eta_0, client SGD learning rate of round 1; in (0, 100].')
flags.DEFINE_float('client_lr_min', 0.01,
                   'eta_min, client learning rate of the last round (exponential decay); in '
                   '(0, --client_lr].')
flags.DEFINE_float('density', 0.2, 'd, target density of the prunable kernels (fedavg: 1); in '
                   '(0, 1].')
flags.DEFINE_integer('delta_t', None, 'dT, rounds between mask adjustments; in [1, --rounds]. '
                     'Default: --rounds / 50 rounded half up, at least 1 (1 for 40 rounds, 10 '
                     'for 500).')
flags.DEFINE_integer('t_end', None, 'T_end, last round that may adjust masks; in [0, --rounds]. '
                     'Default: 0.6 * --rounds rounded half up, at least 1 (24 for 40 rounds, '
                     '300 for 500).')
flags.DEFINE_float('alpha', 0.2, 'alpha, initial adjustment fraction; in [0, 1].')
flags.DEFINE_float('lambda_bae', 0.01, 'lambda, BaE penalty weight; in [0, 100].')
flags.DEFINE_float('gamma', 0.7, 'gamma, SAP drop ratio of the activation cache; in [0, 1).')
flags.DEFINE_float('dirichlet_alpha', 0.5, 'a, Dirichlet label-skew parameter; in (0, 1e6].')
flags.DEFINE_bool('iid', False, 'Split the data IID instead of by Dirichlet label skew.')
flags.DEFINE_integer('min_client_size', 10, 'Minimum examples per client (Dirichlet split); in '
                     '[1, 1000000].')
flags.DEFINE_integer('eval_every', None, 'Evaluate the global model every this many rounds '
                     '(and after the last round); in [1, --rounds]. Default: --rounds / 8 '
                     'rounded half up, at least 1 (5 for 40 rounds).')
flags.DEFINE_integer('eval_batch_size', 500, 'Batch size of the test-set evaluation; in '
                     '[1, 65536].')
flags.DEFINE_integer('seed', 0, 'Seed of the data, split, model, masks and client sampling; in '
                     '[0, 2147483647].')
flags.DEFINE_integer('synthetic_train_size', 10000, 'Training examples of the synthetic data; in '
                     '[10, 10000000] and >= --num_clients * --min_client_size.')
flags.DEFINE_integer('synthetic_test_size', 2000, 'Test examples of the synthetic data; in '
                     '[10, 10000000].')
flags.DEFINE_bool('verbose', False, 'Show TensorFlow and TFF logs.')
flags.DEFINE_string('workers', '',
                    'Comma-separated host:port of TFF worker services (python -m '
                    'tff_programs.worker) to divide each round\'s clients among; empty runs one '
                    'local worker (docs/DISTRIBUTED.md).')


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
      p.add(f'--synthetic_train_size={f["synthetic_train_size"]} is out of range: '
            f'must be >= --num_clients * --min_client_size = {need}')
  p.raise_if_any()


# Flags that do not change the result are left out of the configuration check.
_NOT_IN_CONFIG = ('root_dir', 'overwrite', 'verbose', 'data_dir', 'eval_batch_size', 'workers')


def run_config(f: Mapping[str, Any]) -> Dict[str, Any]:
  """The configuration stored in `config.json`: every flag that changes the result.

  The flags whose defaults follow `--rounds` are stored with their derived values.
  """
  f = cli.resolve_defaults(f)
  names = [n for n in _flag_names() if n not in _NOT_IN_CONFIG]
  config = {n: f[n] for n in names}
  if config['iid']:
    config['dirichlet_alpha'] = None  # unused
    config['min_client_size'] = None
  return config


def _flag_names() -> List[str]:
  return sorted(flag.name for flag in FLAGS.get_flags_for_module(__name__))


# ------------------------------------------------------------------------------------------------
# Algorithm -> model (ALGORITHM.md: FedMef models use NSConv + SAP; baselines Conv + BN).


def model_spec(algorithm: str, density: float, gamma: float) -> Dict[str, Any]:
  """Registry arguments of the model an algorithm trains (as `fedmef_process` builds it).

  Returns:
    dict with `variant` (`fedmef_process.model_variant_for`), `gamma`
    (`fedmef_process.sap_gamma_for`) and `density` (1 for dense FedAvg).
  """
  from tff_programs import fedmef_process  # pylint: disable=import-outside-toplevel
  return {'variant': fedmef_process.model_variant_for(algorithm),
          'density': 1.0 if algorithm == 'fedavg' else float(density),
          'gamma': fedmef_process.sap_gamma_for(algorithm, gamma)}


# ------------------------------------------------------------------------------------------------
# Deterministic sampling: functions of (seed, round), never of an RNG's history.


def sample_clients(seed: int, round_num: int, num_clients: int, per_round: int) -> List[int]:
  """The sorted client indices of round `round_num` (`fedmef_process.sample_clients`).

  A pure function of its arguments, so a resumed run samples the clients of an uninterrupted one.
  """
  from tff_programs import fedmef_process  # pylint: disable=import-outside-toplevel
  return sorted(int(k) for k in fedmef_process.sample_clients(
      num_clients, per_round, round_num, seed=seed))


def shuffle_seed(seed: int, round_num: int, client: int) -> int:
  """The shuffle seed of a client's examples in a round (a pure function of its arguments)."""
  return int(np.random.SeedSequence([seed, round_num, client, 0x5F]).generate_state(1)[0]
             & _MAX_INT32)


# ------------------------------------------------------------------------------------------------
# Metrics.


def _flatten(value, prefix='') -> List[Tuple[str, Any]]:
  if isinstance(value, Mapping):
    out = []
    for k, v in value.items():
      out += _flatten(v, f'{prefix}{k}/')
    return out
  if hasattr(value, '_asdict'):
    return _flatten(value._asdict(), prefix)
  return [(prefix.rstrip('/'), value)]


def pick_metrics(raw) -> Dict[str, Any]:
  """Finds the process's round metrics by their last name, wherever they are nested."""
  found = {}
  for path, value in _flatten(raw):
    found.setdefault(path.split('/')[-1], value)
  return found


def _num(value, default=float('nan')) -> float:
  try:
    arr = np.asarray(value)
    return float(arr) if arr.size == 1 else default
  except (TypeError, ValueError):
    return default


def _human_bytes(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if abs(n) < 1000 or unit == 'GB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1000.0
  return f'{n:.1f} GB'


def _human_seconds(s: float) -> str:
  s = max(0, int(round(s)))
  if s >= 3600:
    return f'{s // 3600}h{s % 3600 // 60:02d}m'
  if s >= 60:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s}s'


# ------------------------------------------------------------------------------------------------
# The run.


class _StopFlag:
  """SIGINT handler: the first Ctrl-C asks to stop after the round, the second aborts."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    self._previous = signal.signal(signal.SIGINT, self._handle)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print('\ninterrupt: stopping after this round (Ctrl-C again to stop now; the last saved '
          'round stays intact)', file=sys.stderr, flush=True)


def _log(msg: str) -> None:
  print(msg, flush=True)


def _warn_damaged(message: str) -> None:
  print(f'train: warning: {text.one_line(message)}; falling back to the round before',
        file=sys.stderr, flush=True)


def _split_name(f: Mapping[str, Any]) -> str:
  if f['dataset'] == 'client_data':
    return 'the data\'s own clients'
  return 'IID' if f['iid'] else f'Dirichlet a={f["dirichlet_alpha"]:g}'


def _default_process_builder(model_fn, cfg, spec, element_spec):
  """Builds the learning process with `tff_programs.fedmef_process.build_fedmef_process`."""
  del spec  # the process derives the variant and SAP ratio from the algorithm
  from tff_programs import fedmef_process  # pylint: disable=import-outside-toplevel
  return fedmef_process.build_fedmef_process(
      model_fn,
      algorithm=cfg['algorithm'],
      density=cfg['density'],
      delta_t=cfg['delta_t'],
      t_end=cfg['t_end'],
      alpha=cfg['alpha'],
      lambda_bae=cfg['lambda_bae'],
      gamma=cfg['gamma'],
      client_lr=cfg['client_lr'],
      client_lr_min=cfg['client_lr_min'],
      total_rounds=cfg['rounds'],
      local_epochs=cfg['local_epochs'],
      batch_size=cfg['batch_size'],
      seed=cfg['seed'],
      element_spec=element_spec)


def run(f: Mapping[str, Any], process_builder: Optional[Callable] = None) -> int:
  """Runs (or resumes) the training described by the flag values `f`; returns the exit code.

  Args:
    f: flag name -> value, already checked by `validate`.
    process_builder: `(model_fn, config, model_spec, element_spec) -> LearningProcess`; the
      default builds `tff_programs.fedmef_process.build_fedmef_process`. Tests may pass another.

  Returns:
    An exit code (`EXIT_*`).
  """
  f = cli.resolve_defaults(f)
  root_dir = f['root_dir']
  cfg = run_config(f)
  try:
    resumable = program_io.check_root_dir(root_dir, cfg, f['overwrite'],
                                          ignore=program_io.DATA_KEYS)
  except program_io.RunDirError as e:
    print(f'train: error: {e}', file=sys.stderr)
    return EXIT_USAGE
  finished = program_io.finished_summary(root_dir, f['rounds']) if resumable else None
  if finished is not None:
    _log(f'{root_dir} holds this run, finished; nothing to do. {done_line(finished, root_dir)}')
    return EXIT_OK

  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from fedmef_tf import data as data_lib
  from fedmef_tf import masks as masks_lib
  from tff_programs import checkpoints
  from tff_programs import client_data as client_data_lib

  setup_start = time.monotonic()
  own_split = f['dataset'] == 'client_data'
  try:
    if own_split:
      from tff_programs import user_data  # pylint: disable=import-outside-toplevel
      dataset, partitions, _ = user_data.load_sql_client_data(f['data_dir'], f['num_clients'])
    else:
      dataset = data_lib.load_dataset(
          f['dataset'], f['data_dir'] or None, seed=f['seed'],
          synthetic_train=f['synthetic_train_size'], synthetic_test=f['synthetic_test_size'])
  except data_lib.DataError as e:
    print(f'train: error: {e}', file=sys.stderr)
    return EXIT_USAGE
  n_train = len(dataset.train_labels)
  min_size = 1 if f['iid'] else f['min_client_size']
  if not own_split and f['num_clients'] * min_size > n_train:
    print(f'train: error: --num_clients={f["num_clients"]} is out of range for {f["dataset"]}: '
          f'{f["num_clients"]} clients * {min_size} examples > {n_train} training examples',
          file=sys.stderr)
    return EXIT_USAGE
  if not own_split:
    partitions = data_lib.partition(
        dataset.train_labels, f['num_clients'], 0.0 if f['iid'] else f['dirichlet_alpha'],
        f['seed'], min_size=min_size)
  skew = data_lib.label_skew(dataset.train_labels, partitions, dataset.num_classes)
  federated = client_data_lib.make_client_data(
      dataset.train_images, dataset.train_labels, partitions, as_float=True)
  test_ds = data_lib.test_dataset(dataset.test_images, dataset.test_labels,
                                  f['eval_batch_size'])
  _log(f'data: {f["dataset"]} {n_train} train / {len(dataset.test_labels)} test, '
       f'{dataset.num_classes} classes, {f["num_clients"]} clients '
       f'({_split_name(f)}: sizes '
       f'{min(len(p) for p in partitions)}..{max(len(p) for p in partitions)}, '
       f'mean KL {skew["mean_kl"]:.2f})')

  from tff_programs import fedmef_process
  spec = model_spec(f['algorithm'], f['density'], f['gamma'])
  # Masks are set by the process (ERK random masks of --density from --seed) and travel in its
  # state; the model function builds the architecture only.
  # Input normalisation constants of the training split: part of the run's configuration
  # (config.json), so a resumed run checks that it trains on the same data, and of the saved
  # model, so the exported model normalises the pixels itself.
  cfg['input_mean'], cfg['input_std'] = data_lib.channel_stats(dataset.train_images)
  model_fn = fedmef_process.make_model_fn(
      f['model'], f['algorithm'], num_classes=dataset.num_classes,
      input_shape=dataset.input_shape, gamma=f['gamma'], seed=f['seed'],
      input_mean=cfg['input_mean'], input_std=cfg['input_std'])

  element_spec = data_lib.client_dataset(
      federated.create_tf_dataset_for_client(federated.client_ids[0])).element_spec
  builder = process_builder or _default_process_builder
  process = builder(model_fn, dict(cfg), spec, element_spec)
  # Built after the process: TFF traces `model_fn` in graphs, and a Keras model built before
  # that would be invalidated.
  eval_model = model_fn()

  @tf.function
  def _eval_step(x, y):
    logits = eval_model(x, training=False)
    loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32)
    return tf.reduce_sum(loss), tf.reduce_sum(correct)

  def load_weights(state) -> None:
    weights = process.get_model_weights(state)
    trainable = getattr(weights, 'trainable', None)
    non_trainable = getattr(weights, 'non_trainable', None)
    if trainable is None:  # a (trainable, non_trainable) pair
      trainable, non_trainable = weights
    for v, w in zip(eval_model.trainable_weights, trainable):
      v.assign(w)
    for v, w in zip(eval_model.non_trainable_weights, non_trainable):
      v.assign(w)

  def evaluate() -> Tuple[float, float]:
    loss_sum, correct, n = 0.0, 0.0, 0
    for x, y in test_ds:
      l, c = _eval_step(x, y)
      loss_sum += float(l)
      correct += float(c)
      n += int(y.shape[0])
    return loss_sum / n, correct / n

  stop = _StopFlag()
  rt = runtime.make_runtime(f.get('workers'), verbose=f['verbose'])
  rt.start()
  try:
    stop.install()
    state = process.initialize()
    # The run directory is claimed (config.json written, or a foreign run cleared with
    # --overwrite) only now: a run that fails while loading its data or building its process
    # leaves it as it was.
    try:
      resumable = program_io.prepare_root_dir(root_dir, cfg, f['overwrite'])
      manager = program_io.state_manager(root_dir)
    except program_io.RunDirError as e:
      print(f'train: error: {e}', file=sys.stderr)
      return EXIT_USAGE
    totals = {'down_bytes': 0.0, 'up_bytes': 0.0, 'train_seconds': 0.0}
    start_round = 0
    if resumable:
      template = {'round': np.int64(0), 'process': state, 'totals': totals}
      try:
        saved, version = asyncio.run(manager.load_latest(template, on_damaged=_warn_damaged))
      except checkpoints.CheckpointError as e:
        print(f'train: error: {text.one_line(str(e))}; rerun with --overwrite to start '
              'afresh', file=sys.stderr)
        return EXIT_USAGE
      if saved is not None:
        state = saved['process']
        start_round = int(saved['round'])
        totals = {k: float(v) for k, v in saved['totals'].items()}
        _log(f'resuming after round {start_round} from {root_dir} (version {version})')
    releaser = program_io.MetricsReleaser(root_dir)
    _log(f'{f["algorithm"]} on {f["model"]}/{spec["variant"]} (density {spec["density"]:g}, '
         f'gamma {spec["gamma"]:g}): rounds {start_round + 1}..{f["rounds"]}, '
         f'{f["clients_per_round"]} of {f["num_clients"]} clients per round; set-up '
         f'{time.monotonic() - setup_start:.1f}s')

    clientless = program_io.ClientlessRounds()
    round_times: List[float] = []
    last_acc = float('nan')
    completed = start_round
    for t in range(start_round + 1, f['rounds'] + 1):
      if stop.requested:
        break
      t0 = time.monotonic()
      chosen = sample_clients(f['seed'], t, f['num_clients'], f['clients_per_round'])
      datasets = [
          data_lib.client_dataset(federated.create_tf_dataset_for_client(str(k)),
                                  shuffle_seed=shuffle_seed(f['seed'], t, k))
          for k in chosen]
      output = process.next(state, datasets)
      state = output.state
      m = pick_metrics(output.metrics)
      evaluated = t % f['eval_every'] == 0 or t == f['rounds']
      test_loss = test_acc = float('nan')
      if evaluated:
        load_weights(state)
        test_loss, test_acc = evaluate()
        last_acc = test_acc
      seconds = time.monotonic() - t0
      down, up = _num(m.get('bytes_down'), 0.0), _num(m.get('bytes_up'), 0.0)
      totals['down_bytes'] += down
      totals['up_bytes'] += up
      totals['train_seconds'] += seconds
      row = collections.OrderedDict(
          train_loss=_num(m.get('train_loss')),
          train_accuracy=_num(m.get('train_accuracy')),
          test_loss=test_loss,
          test_accuracy=test_acc,
          density=_num(m.get('global_density')),
          bytes_down=down,
          bytes_up=up,
          round_seconds=seconds,
          clients_used=_num(m.get('clients_used')),
          clients_rejected=_num(m.get('clients_rejected')),
          adjusted=_num(m.get('adjusted'), 0.0),
          learning_rate=_num(m.get('learning_rate')),
      )
      row = program_io.mark_clientless_round(row)
      warning = clientless.record(t, row['clients_used'])
      if warning:
        print(f'train: {warning}', file=sys.stderr, flush=True)
      # Release first, then save: a run killed in between redoes round t on resume, and the CSV
      # release manager replaces rows >= t, so metrics.csv never misses a saved round.
      releaser.release(row, t)
      program_state = {'round': np.int64(t), 'process': state,
                       'totals': {k: np.float64(v) for k, v in totals.items()}}
      asyncio.run(manager.save(program_state, t))
      completed = t
      round_times.append(seconds)
      recent = round_times[-10:]
      eta = sum(recent) / len(recent) * (f['rounds'] - t)
      acc_s = f'test acc {test_acc:.3f}' if evaluated else (
          f'test acc {last_acc:.3f}*' if not math.isnan(last_acc) else 'test acc   -  ')
      _log(f'round {t:>{len(str(f["rounds"]))}}/{f["rounds"]}  loss {row["train_loss"]:.3f}  '
           f'{acc_s}  density {row["density"]:.3f}  down {_human_bytes(down)}  '
           f'up {_human_bytes(up)}  clients {int(_num(m.get("clients_used"), 0))}'
           f'/{len(chosen)}{"  adjusted" if row["adjusted"] else ""}  {seconds:.1f}s  '
           f'ETA {_human_seconds(eta)}')
    if completed < f['rounds']:
      _log(f'stopped after round {completed} of {f["rounds"]}; rerun the same command to '
           'resume')
      return EXIT_INTERRUPTED
    if not program_io.any_client_used(program_io.read_metrics(root_dir)):
      print(f'train: error: no round of 1..{f["rounds"]} used any client (every client update was '
            'non-finite or empty): the model is untrained; a lower --client_lr may help',
            file=sys.stderr)
      return EXIT_FAILURE
    load_weights(state)
    _finish(f, cfg, spec, dataset, eval_model, model_fn, totals, masks_lib, evaluate)
    return EXIT_OK
  finally:
    stop.uninstall()
    rt.stop()


def _finish(f, cfg, spec, dataset, model, model_fn, totals, masks_lib, evaluate) -> None:
  """Evaluates the final model; writes final_model/, the plots and summary.json (last)."""
  # pylint: disable=import-outside-toplevel
  from fedmef_tf import model_io
  root_dir = f['root_dir']
  test_loss, test_acc = evaluate()
  layers = masks_lib.prunable_layers(model)
  layer_names = [layer.name for layer in layers]
  layer_density = [float(layer.mask.numpy().mean()) for layer in layers]
  density = float(masks_lib.global_density(model))
  model_config = {
      'model': f['model'], 'variant': spec['variant'], 'num_classes': dataset.num_classes,
      'input_shape': list(dataset.input_shape), 'gamma': spec['gamma'],
      'density': spec['density'], 'algorithm': f['algorithm'], 'dataset': f['dataset'],
      'rounds': f['rounds'], 'seed': f['seed'], 'final_accuracy': test_acc,
      'input_range': 'float32 RGB in [0, 1] (pixel / 255), NHWC',
      'input_mean': cfg['input_mean'], 'input_std': cfg['input_std'],
  }
  model_dir = model_io.save_model(model, model_config,
                                  os.path.join(root_dir, program_io.FINAL_MODEL_DIR))
  # The measurement trains a copy (it applies SGD steps), never the saved model.
  probe = model_fn()
  probe.set_weights(model.get_weights())
  try:
    memory = memory_report(probe, f['batch_size'], spec['variant'])
  except Exception as e:  # pylint: disable=broad-except
    # The trained model is saved already; a failed probe must not lose the run's report.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'train: warning: memory measurement failed ({type(e).__name__}: {msg})',
          file=sys.stderr)
    memory = {'analytic_bytes': None, 'measured_peak_bytes': None,
              'batch_size': f['batch_size'], 'breakdown_bytes': {}, 'bars_bytes': {},
              'error': msg}
  del probe
  rows = program_io.read_metrics(root_dir)
  plots_dir = os.path.join(root_dir, program_io.PLOTS_DIR)
  title = f'{f["algorithm"]} / {f["model"]} / {f["dataset"]}'
  plots = [
      program_io.plot_curves(rows, os.path.join(plots_dir, 'accuracy_loss.png'), title),
      program_io.plot_layer_density(layer_names, layer_density,
                                    os.path.join(plots_dir, 'layer_density.png'), title),
      program_io.plot_memory(memory.pop('breakdown_bytes'), memory.pop('bars_bytes'),
                             os.path.join(plots_dir, 'memory.png'),
                             f'{title}, batch {f["batch_size"]}'),
  ]
  summary = {
      'algorithm': f['algorithm'], 'model': f['model'], 'variant': spec['variant'],
      'dataset': f['dataset'], 'rounds_completed': f['rounds'],
      'final_accuracy': test_acc, 'final_loss': test_loss, 'density': density,
      'layer_density': dict(zip(layer_names, layer_density)),
      'memory': memory,
      'traffic': {'down_bytes': int(totals['down_bytes']), 'up_bytes': int(totals['up_bytes'])},
      'train_seconds': totals['train_seconds'],
      'config': cfg, 'plots': [os.path.relpath(p, root_dir) for p in plots],
      'final_model': os.path.relpath(model_dir, root_dir),
  }
  program_io.write_json(os.path.join(root_dir, program_io.SUMMARY_FILE), summary)
  _log(done_line(summary, root_dir))


def done_line(summary: Mapping[str, Any], root_dir: str) -> str:
  """The console line that reports a finished run, from its `summary.json` contents."""
  memory = summary['memory']
  traffic = summary['traffic']
  return (f'done: {summary["rounds_completed"]} rounds, test accuracy '
          f'{summary["final_accuracy"]:.4f}, density {summary["density"]:.4f}, traffic down '
          f'{_human_bytes(traffic["down_bytes"])} up {_human_bytes(traffic["up_bytes"])}, '
          f'training {_human_seconds(summary["train_seconds"])}; memory of a training step '
          f'(batch {memory["batch_size"]}): analytic {_human_bytes(memory["analytic_bytes"] or 0)}'
          f', measured peak {_human_bytes(memory["measured_peak_bytes"] or 0)}; report in '
          f'{os.path.join(root_dir, program_io.SUMMARY_FILE)}')


def _as_dict(value) -> Dict[str, Any]:
  """A mapping, a NamedTuple or a single number as a dict."""
  if isinstance(value, Mapping):
    return dict(value)
  if hasattr(value, '_asdict'):
    return dict(value._asdict())
  return {'total_bytes': value}


def memory_report(model, batch_size: int, variant: str = 'baseline') -> Dict[str, Any]:
  """Memory of one client training step at `batch_size`, in bytes (`fedmef_tf.memory`).

  Returns:
    dict with `analytic_bytes` (`analytic_footprint`'s `total_bytes`: resident weights in their
    sparse form plus the predicted peak of the step), `analytic_peak_bytes` (the predicted
    peak alone, comparable with the measurement), `weight_bytes`, `cached_bytes` (activations
    kept for the backward pass), `measured_peak_bytes` (allocator peak of a compiled step minus
    what was resident before it), `resident_bytes`, `batch_size`, and `breakdown_bytes` /
    `bars_bytes` for the plot.
  """
  # pylint: disable=import-outside-toplevel
  from fedmef_tf import agc
  from fedmef_tf import memory as memory_lib
  analytic = _as_dict(memory_lib.analytic_footprint(model, batch_size))
  scalars = {k: float(v) for k, v in analytic.items()
             if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}
  total = scalars.get('total_bytes')
  if total is None:
    total = scalars.get('weight_bytes', 0.0) + scalars.get('cached_bytes', 0.0)
  measured = _as_dict(memory_lib.measure_train_step_peak(
      model, batch_size, gradient_clipping=agc.clipping_for(variant)))
  peak = float(measured.get('peak_bytes', measured.get('total_bytes')))
  report = {
      'analytic_bytes': int(total),
      'measured_peak_bytes': int(peak),
      'batch_size': int(batch_size),
  }
  for key in ('peak_bytes', 'weight_bytes', 'cached_bytes', 'gradient_bytes'):
    if key in scalars:
      report['analytic_' + key if key == 'peak_bytes' else key] = int(scalars[key])
  if 'resident_bytes' in measured:
    report['resident_bytes'] = int(measured['resident_bytes'])
  parts = ('weight_bytes', 'cached_bytes', 'kernel_cache_bytes', 'gradient_bytes')
  report['breakdown_bytes'] = {k: scalars[k] for k in parts if k in scalars}
  bars = {'measured step peak': peak}
  if 'peak_bytes' in scalars:
    bars = {'analytic step peak': scalars['peak_bytes'], **bars}
  report['bars_bytes'] = bars
  return report


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
    program_io.check_root_dir(values['root_dir'], run_config(values), values['overwrite'],
                              ignore=program_io.DATA_KEYS)
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
  import tensorflow_federated  # pylint: disable=import-outside-toplevel,unused-import
  return rest


def main(argv: List[str]) -> int:
  """Runs the program on the parsed, checked flags (see `parse_flags`); returns the exit code."""
  del argv
  try:
    with run_lock.RunLock(FLAGS.root_dir):
      return run(FLAGS.flag_values_dict())
  except run_lock.LockError as e:
    print(f'train: error: {text.one_line(str(e))}', file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print('train: interrupted; rerun the same command to resume from the last saved round',
          file=sys.stderr)
    return EXIT_INTERRUPTED
  except runtime.WorkerError as e:
    print(f'train: error: {e}', file=sys.stderr)
    return EXIT_FAILURE
  except Exception as e:  # pylint: disable=broad-except
    disk_full = program_io.disk_full_message(e, FLAGS.root_dir)
    if disk_full:
      print(f'train: error: {disk_full}', file=sys.stderr)
      return EXIT_FAILURE
    if not FLAGS.workers or 'grpc' not in repr(e).lower() + type(e).__module__:
      raise
    # A remote worker failed during a round: the last finished round's checkpoint is intact.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'train: error: a TFF worker of --workers={FLAGS.workers} failed during a round '
          f'({type(e).__name__}: {first[:200]}); rerun with live workers to resume from the last '
          'saved round', file=sys.stderr)
    return EXIT_FAILURE


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
