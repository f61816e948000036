"""A federated training run: data, client split, learning process, rounds, checkpoints, report.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737). `run(config)` does everything `python -m tff_programs.train` does
once its flags are checked:

1. loads the data (`fedmef_tf.data`, or a federated dataset of the user's own,
   `tff_programs.user_data`) and splits it among the clients (Dirichlet label skew or IID) as a
   TFF `ClientData`;
2. builds the learning process of the algorithm (`tff_programs.fedmef_process`; what the
   algorithm is made of comes from `fedmef_tf.algorithms`) and the evaluation model;
3. starts the TFF runtime (`tff_programs.runtime`, which always ends its worker), claims the run
   directory (`tff_programs.program_io`) and resumes from its newest intact checkpoint;
4. runs the rounds: the clients of round t and the order of their examples are functions of
   `(seed, t)` only (`sample_clients`, `shuffle_seed`), so a resumed run ends with the model of
   an uninterrupted one; each round's metrics are released (`metrics.csv`, TensorBoard), then
   the program state is saved, and a console line is written;
5. at the end writes the final model, the plots and `summary.json` (`finish`), whose memory
   figures come from `memory_report`.

A first SIGINT asks the loop to stop after the running round (`GracefulStop`); a second one
raises `KeyboardInterrupt` at once. What goes wrong is raised as `SetupError` (the run cannot
start: run directory, data, checkpoints) or `NoClientUsedError`; the program maps these to its
exit codes and its flags.
"""

import asyncio
import collections
import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from fedmef_tf import algorithms
from fedmef_tf import text
from tff_programs import program_io
from tff_programs import runtime

_MAX_INT32 = 2**31 - 1


# ------------------------------------------------------------------------------------------------
# The configuration of a run.


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a training run is told (the training program's flags, one field each).

  Symbols as in ../shared/ALGORITHM.md: K = `num_clients`, S = `clients_per_round`,
  R = `rounds`, E = `local_epochs`, B = `batch_size`, eta_0 = `client_lr`,
  eta_min = `client_lr_min`, d = `density`, dT = `delta_t`, T_end = `t_end`, alpha, lambda =
  `lambda_bae`, gamma, a = `dirichlet_alpha`.
  """

  algorithm: str
  model: str
  dataset: str
  data_dir: str
  root_dir: str
  overwrite: bool
  num_clients: int
  clients_per_round: int
  rounds: int
  local_epochs: int
  batch_size: int
  client_lr: float
  client_lr_min: float
  density: float
  delta_t: int
  t_end: int
  alpha: float
  lambda_bae: float
  gamma: float
  dirichlet_alpha: float
  iid: bool
  min_client_size: int
  eval_every: int
  eval_batch_size: int
  seed: int
  synthetic_train_size: int
  synthetic_test_size: int
  verbose: bool
  workers: str

  #: Fields that do not change the result, left out of `result_config` (and config.json).
  NOT_IN_RESULT = ('root_dir', 'overwrite', 'verbose', 'data_dir', 'eval_batch_size', 'workers')

  @classmethod
  def field_names(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]

  @classmethod
  def from_values(cls, values: Mapping[str, Any]) -> 'RunConfig':
    """The configuration of `values` (name -> value, a superset of the fields).

    Raises:
      ValueError: a field is missing or None.
    """
    missing = [n for n in cls.field_names() if values.get(n) is None]
    if missing:
      raise ValueError(f'run configuration without {", ".join(missing)}')
    return cls(**{n: values[n] for n in cls.field_names()})

  def result_config(self) -> Dict[str, Any]:
    """What `config.json` stores: every field that changes the result, sorted by name.

    A rerun must match it to resume. With `iid`, the Dirichlet parameters (unused) are None.
    """
    config = {
      n: getattr(self, n) for n in sorted(self.field_names()) if n not in self.NOT_IN_RESULT
    }
    if config['iid']:
      config['dirichlet_alpha'] = None
      config['min_client_size'] = None
    return config

  @property
  def algorithm_entry(self) -> algorithms.Algorithm:
    return algorithms.get(self.algorithm)


def model_spec(algorithm: str, density: float, gamma: float) -> Dict[str, Any]:
  """Registry arguments of the model an algorithm trains (`fedmef_tf.algorithms`).

  Returns:
    dict with `variant`, `density` (of the final model: 1 for a dense algorithm) and `gamma`
    (the SAP ratio: 0 without SAP).
  """
  entry = algorithms.get(algorithm)
  return {
    'variant': entry.variant,
    'density': entry.target_density(density),
    'gamma': entry.sap_gamma(gamma),
  }


# ------------------------------------------------------------------------------------------------
# Errors and the console.


class SetupError(Exception):
  """The run cannot start: its run directory, data or checkpoints are unusable."""


class NoClientUsedError(Exception):
  """Every round of the run was without a usable client: the model is untrained."""


class Console:
  """Where a run writes: progress lines on stdout, warnings on stderr as `<program>: warning:`."""

  def __init__(self, program: str):
    self.program = program

  def info(self, message: str) -> None:
    print(message, flush=True)

  def warning(self, message: str) -> None:
    print(f'{self.program}: warning: {message}', file=sys.stderr, flush=True)


class GracefulStop:
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
    print(
      '\ninterrupt: stopping after this round (Ctrl-C again to stop now; the last saved '
      'round stays intact)',
      file=sys.stderr,
      flush=True,
    )


# ------------------------------------------------------------------------------------------------
# Deterministic sampling: functions of (seed, round), never of an RNG's history.


def sample_clients(seed: int, round_num: int, num_clients: int, per_round: int) -> List[int]:
  """The sorted client indices of round `round_num` (`fedmef_process.sample_clients`).

  A pure function of its arguments, so a resumed run samples the clients of an uninterrupted one.
  """
  from tff_programs import fedmef_process  # pylint: disable=import-outside-toplevel

  return sorted(
    int(k) for k in fedmef_process.sample_clients(num_clients, per_round, round_num, seed=seed)
  )


def shuffle_seed(seed: int, round_num: int, client: int) -> int:
  """The shuffle seed of a client's examples in a round (a pure function of its arguments)."""
  return int(
    np.random.SeedSequence([seed, round_num, client, 0x5F]).generate_state(1)[0] & _MAX_INT32
  )


# ------------------------------------------------------------------------------------------------
# Round metrics.


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


def round_row(
  metrics: Mapping[str, Any], test_loss: float, test_accuracy: float, seconds: float
) -> Dict[str, float]:
  """The `metrics.csv` row of a round from the process's metrics (`pick_metrics`).

  A round that used no client has NaN training loss and accuracy
  (`program_io.mark_clientless_round`); a missing metric is NaN (0 for the bytes and
  `adjusted`).
  """
  row = collections.OrderedDict(
    train_loss=_num(metrics.get('train_loss')),
    train_accuracy=_num(metrics.get('train_accuracy')),
    test_loss=test_loss,
    test_accuracy=test_accuracy,
    density=_num(metrics.get('global_density')),
    bytes_down=_num(metrics.get('bytes_down'), 0.0),
    bytes_up=_num(metrics.get('bytes_up'), 0.0),
    round_seconds=seconds,
    clients_used=_num(metrics.get('clients_used')),
    clients_rejected=_num(metrics.get('clients_rejected')),
    adjusted=_num(metrics.get('adjusted'), 0.0),
    learning_rate=_num(metrics.get('learning_rate')),
  )
  return program_io.mark_clientless_round(row)


def round_line(
  t: int,
  rounds: int,
  row: Mapping[str, float],
  evaluated: bool,
  last_accuracy: float,
  clients_sampled: int,
  eta_seconds: float,
) -> str:
  """The console line of round `t` of `rounds` (its `round_row`)."""
  if evaluated:
    acc = f'test acc {row["test_accuracy"]:.3f}'
  elif not math.isnan(last_accuracy):
    acc = f'test acc {last_accuracy:.3f}*'
  else:
    acc = 'test acc   -  '
  used = row['clients_used']
  used = 0 if math.isnan(used) else int(used)
  return (
    f'round {t:>{len(str(rounds))}}/{rounds}  loss {row["train_loss"]:.3f}  '
    f'{acc}  density {row["density"]:.3f}  down {text.format_bytes(row["bytes_down"])}  '
    f'up {text.format_bytes(row["bytes_up"])}  clients {used}/{clients_sampled}'
    f'{"  adjusted" if row["adjusted"] else ""}  {row["round_seconds"]:.1f}s  '
    f'ETA {text.format_seconds(eta_seconds)}'
  )


def done_line(summary: Mapping[str, Any], root_dir: str) -> str:
  """The console line that reports a finished run, from its `summary.json` contents."""
  memory = summary['memory']
  traffic = summary['traffic']

  def size(key):
    value = memory.get(key)
    return 'unavailable' if value is None else text.format_bytes(value)

  return (
    f'done: {summary["rounds_completed"]} rounds, test accuracy '
    f'{summary["final_accuracy"]:.4f}, density {summary["density"]:.4f}, traffic down '
    f'{text.format_bytes(traffic["down_bytes"])} up '
    f'{text.format_bytes(traffic["up_bytes"])}, training '
    f'{text.format_seconds(summary["train_seconds"])}; memory of a training step '
    f'(batch {memory["batch_size"]}): analytic {size("analytic_bytes")}, measured peak '
    f'{size("measured_peak_bytes")}; report in '
    f'{os.path.join(root_dir, program_io.SUMMARY_FILE)}'
  )


# ------------------------------------------------------------------------------------------------
# Memory of a client step.


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
  scalars = {
    k: float(v)
    for k, v in analytic.items()
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
  }
  total = scalars.get('total_bytes')
  if total is None:
    total = scalars.get('weight_bytes', 0.0) + scalars.get('cached_bytes', 0.0)
  measured = _as_dict(
    memory_lib.measure_train_step_peak(
      model, batch_size, gradient_clipping=agc.clipping_for(variant)
    )
  )
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
# The run.


def default_process_builder(model_fn, cfg: Mapping[str, Any], spec, element_spec):
  """Builds the learning process with `tff_programs.fedmef_process.build_fedmef_process`.

  Args:
    model_fn: the model function (`fedmef_process.make_model_fn`).
    cfg: `RunConfig.result_config()` (with the data's normalisation constants).
    spec: `model_spec` of the run (the process derives the same from the algorithm).
    element_spec: the element spec of one client's dataset.
  """
  del spec
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
    element_spec=element_spec,
  )


def _split_name(config: RunConfig) -> str:
  if config.dataset == 'client_data':
    return "the data's own clients"
  return 'IID' if config.iid else f'Dirichlet a={config.dirichlet_alpha:g}'


@dataclasses.dataclass
class _Data:
  dataset: Any
  federated: Any
  test_ds: Any


def load_data(
  config: RunConfig, console: Console, names: text.SettingNames = text.KEYWORDS
) -> _Data:
  """Loads the data of `config` and splits it among its clients; says so on the console.

  `names` says how error messages name the settings (see `run`).

  Raises:
    SetupError: the data files are unusable, or too small for the clients.
  """
  # pylint: disable=import-outside-toplevel
  from fedmef_tf import data as data_lib
  from tff_programs import client_data as client_data_lib
  from tff_programs import user_data as user_data_lib

  own_split = config.dataset == 'client_data'
  try:
    if own_split:
      dataset, partitions, _ = user_data_lib.load_sql_client_data(
        config.data_dir, config.num_clients
      )
    else:
      dataset = data_lib.load_dataset(
        config.dataset,
        config.data_dir or None,
        seed=config.seed,
        synthetic_train=config.synthetic_train_size,
        synthetic_test=config.synthetic_test_size,
      )
  except user_data_lib.TooFewClientsError as e:
    raise SetupError(
      f'{e.path}: {e.available} clients, fewer than {names.setting("num_clients", e.requested)}'
    ) from None
  except data_lib.DataError as e:
    raise SetupError(str(e)) from None
  n_train = len(dataset.train_labels)
  min_size = 1 if config.iid else config.min_client_size
  if not own_split and config.num_clients * min_size > n_train:
    raise SetupError(
      f'{names.setting("num_clients", config.num_clients)} is out of range for '
      f'{config.dataset}: {config.num_clients} clients * {min_size} examples > '
      f'{n_train} training examples'
    )
  if not own_split:
    partitions = data_lib.partition(
      dataset.train_labels,
      config.num_clients,
      0.0 if config.iid else config.dirichlet_alpha,
      config.seed,
      min_size=min_size,
    )
  skew = data_lib.label_skew(dataset.train_labels, partitions, dataset.num_classes)
  federated = client_data_lib.make_client_data(
    dataset.train_images, dataset.train_labels, partitions, as_float=True
  )
  test_ds = data_lib.test_dataset(dataset.test_images, dataset.test_labels, config.eval_batch_size)
  console.info(
    f'data: {config.dataset} {n_train} train / {len(dataset.test_labels)} test, '
    f'{dataset.num_classes} classes, {config.num_clients} clients '
    f'({_split_name(config)}: sizes '
    f'{min(len(p) for p in partitions)}..{max(len(p) for p in partitions)}, '
    f'mean KL {skew["mean_kl"]:.2f})'
  )
  return _Data(dataset, federated, test_ds)


class Evaluator:
  """The global model of a process state, on the test set.

  Args:
    process: the learning process (its `get_model_weights`).
    model: a model built by the run's model function (built after the process: TFF traces the
      model function in graphs, and a Keras model built before that would be invalidated).
    test_ds: batched `(x, y)` test dataset.
  """

  def __init__(self, process, model, test_ds):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from fedmef_tf import losses  # pylint: disable=import-outside-toplevel

    self.process, self.model, self.test_ds = process, model, test_ds

    @tf.function
    def step(x, y):
      logits = model(x, training=False)
      correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32)
      return tf.reduce_sum(losses.example_losses(y, logits)), tf.reduce_sum(correct)

    self._step = step

  def load(self, state) -> None:
    """Sets the model's weights (and masks) to the global model of `state`."""
    weights = self.process.get_model_weights(state)
    trainable = getattr(weights, 'trainable', None)
    non_trainable = getattr(weights, 'non_trainable', None)
    if trainable is None:  # a (trainable, non_trainable) pair
      trainable, non_trainable = weights
    for v, w in zip(self.model.trainable_weights, trainable):
      v.assign(w)
    for v, w in zip(self.model.non_trainable_weights, non_trainable):
      v.assign(w)

  def evaluate(self) -> Tuple[float, float]:
    """`(mean loss, accuracy)` of the model over the test set."""
    loss_sum, correct, n = 0.0, 0.0, 0
    for x, y in self.test_ds:
      l, c = self._step(x, y)
      loss_sum += float(l)
      correct += float(c)
      n += int(y.shape[0])
    return loss_sum / n, correct / n


def run(
  config: RunConfig,
  *,
  process_builder: Optional[Callable] = None,
  console: Optional[Console] = None,
  names: text.SettingNames = text.KEYWORDS,
) -> bool:
  """Runs (or resumes) the training of `config`.

  Args:
    config: the run.
    process_builder: `(model_fn, result_config, model_spec, element_spec) -> LearningProcess`;
      default `default_process_builder`. Tests may pass another.
    console: where progress and warnings go; default `Console('train')`.
    names: how messages name the settings: as `RunConfig` fields (`fedmef_tf.text.KEYWORDS`)
      or as a program's flags (`fedmef_tf.text.FLAGS`).

  Returns:
    True when every round is done (now, or by an earlier run of the same configuration),
    False when the run stopped early on request (`GracefulStop`): rerunning resumes it.

  Raises:
    SetupError: the run directory, the data or the checkpoints are unusable.
    NoClientUsedError: no round used any client.
    runtime.WorkerError: the TFF worker could not be started or reached.
  """
  console = console or Console('train')
  root_dir = config.root_dir
  cfg = config.result_config()
  try:
    resumable = program_io.check_root_dir(
      root_dir, cfg, config.overwrite, ignore=program_io.DATA_KEYS, names=names
    )
  except program_io.RunDirError as e:
    raise SetupError(str(e)) from None
  finished = program_io.finished_summary(root_dir, config.rounds) if resumable else None
  if finished is not None:
    console.info(
      f'{root_dir} holds this run, finished; nothing to do. {done_line(finished, root_dir)}'
    )
    return True

  # pylint: disable=import-outside-toplevel
  from fedmef_tf import data as data_lib
  from tff_programs import fedmef_process

  setup_start = time.monotonic()
  data = load_data(config, console, names)
  dataset, federated = data.dataset, data.federated
  spec = model_spec(config.algorithm, config.density, config.gamma)
  # Masks are set by the process (ERK random masks of the density from the seed) and travel in
  # its state; the model function builds the architecture only. The input normalisation
  # constants of the training split are part of the run's configuration (config.json), so a
  # resumed run checks that it trains on the same data, and of the saved model, so the exported
  # model normalises the pixels itself.
  cfg['input_mean'], cfg['input_std'] = data_lib.channel_stats(dataset.train_images)
  model_fn = fedmef_process.make_model_fn(
    config.model,
    config.algorithm,
    num_classes=dataset.num_classes,
    input_shape=dataset.input_shape,
    gamma=config.gamma,
    seed=config.seed,
    input_mean=cfg['input_mean'],
    input_std=cfg['input_std'],
  )
  element_spec = data_lib.client_dataset(
    federated.create_tf_dataset_for_client(federated.client_ids[0])
  ).element_spec
  builder = process_builder or default_process_builder
  process = builder(model_fn, dict(cfg), spec, element_spec)
  evaluator = Evaluator(process, model_fn(), data.test_ds)

  stop = GracefulStop()
  rt = runtime.make_runtime(config.workers, verbose=config.verbose)
  rt.start()
  try:
    stop.install()
    state = process.initialize()
    # The run directory is claimed (config.json written, or a foreign run cleared with
    # overwrite) only now: a run that fails while loading its data or building its process
    # leaves it as it was.
    try:
      resumable = program_io.prepare_root_dir(root_dir, cfg, config.overwrite, names=names)
      manager = program_io.state_manager(root_dir)
    except program_io.RunDirError as e:
      raise SetupError(str(e)) from None
    totals = {'down_bytes': 0.0, 'up_bytes': 0.0, 'train_seconds': 0.0}
    start_round = 0
    if resumable:
      state, start_round, totals = _resume(manager, state, totals, root_dir, console, names)
    console.info(
      f'{config.algorithm} on {config.model}/{spec["variant"]} (density '
      f'{spec["density"]:g}, gamma {spec["gamma"]:g}): rounds {start_round + 1}..'
      f'{config.rounds}, {config.clients_per_round} of {config.num_clients} clients '
      f'per round; set-up {time.monotonic() - setup_start:.1f}s'
    )
    state, completed = _round_loop(
      config,
      process,
      state,
      start_round,
      totals,
      federated,
      evaluator,
      manager,
      stop,
      console,
      names,
    )
    if completed < config.rounds:
      console.info(
        f'stopped after round {completed} of {config.rounds}; rerun the same command to resume'
      )
      return False
    if not program_io.any_client_used(program_io.read_metrics(root_dir)):
      raise NoClientUsedError(
        f'no round of 1..{config.rounds} used any client (every client update was non-finite '
        f'or empty): the model is untrained; a lower {names.name("client_lr")} may help'
      )
    evaluator.load(state)
    summary = finish(config, cfg, spec, dataset, evaluator, model_fn, totals, console)
    console.info(done_line(summary, root_dir))
    return True
  finally:
    stop.uninstall()
    rt.stop()


def _resume(manager, state, totals, root_dir: str, console: Console, names: text.SettingNames):
  """`(state, last saved round, totals)` from the newest intact checkpoint, if any."""
  from tff_programs import checkpoints  # pylint: disable=import-outside-toplevel

  def warn_damaged(message: str) -> None:
    console.warning(f'{text.one_line(message)}; falling back to the round before')

  template = {'round': np.int64(0), 'process': state, 'totals': totals}
  try:
    saved, version = asyncio.run(manager.load_latest(template, on_damaged=warn_damaged))
  except checkpoints.CheckpointError as e:
    raise SetupError(
      f'{text.one_line(str(e))}; rerun with {names.name("overwrite")} to start afresh'
    ) from None
  if saved is None:
    return state, 0, totals
  console.info(f'resuming after round {int(saved["round"])} from {root_dir} (version {version})')
  return (saved['process'], int(saved['round']), {k: float(v) for k, v in saved['totals'].items()})


def _round_loop(
  config: RunConfig,
  process,
  state,
  start_round: int,
  totals,
  federated,
  evaluator: Evaluator,
  manager,
  stop: GracefulStop,
  console: Console,
  names: text.SettingNames,
):
  """Runs rounds `start_round + 1 .. config.rounds` (until a stop request); returns
  `(state, last completed round)`. `totals` is updated in place."""
  from fedmef_tf import data as data_lib  # pylint: disable=import-outside-toplevel

  releaser = program_io.MetricsReleaser(config.root_dir)
  clientless = program_io.ClientlessRounds(names=names)
  round_times: List[float] = []
  last_acc = float('nan')
  completed = start_round
  for t in range(start_round + 1, config.rounds + 1):
    if stop.requested:
      break
    t0 = time.monotonic()
    chosen = sample_clients(config.seed, t, config.num_clients, config.clients_per_round)
    datasets = [
      data_lib.client_dataset(
        federated.create_tf_dataset_for_client(str(k)), shuffle_seed=shuffle_seed(config.seed, t, k)
      )
      for k in chosen
    ]
    output = process.next(state, datasets)
    state = output.state
    evaluated = t % config.eval_every == 0 or t == config.rounds
    test_loss = test_acc = float('nan')
    if evaluated:
      evaluator.load(state)
      test_loss, test_acc = evaluator.evaluate()
    seconds = time.monotonic() - t0
    row = round_row(pick_metrics(output.metrics), test_loss, test_acc, seconds)
    totals['down_bytes'] += row['bytes_down']
    totals['up_bytes'] += row['bytes_up']
    totals['train_seconds'] += seconds
    warning = clientless.record(t, row['clients_used'])
    if warning:
      console.warning(warning)
    # Release first, then save: a run killed in between redoes round t on resume, and the CSV
    # release manager replaces rows >= t, so metrics.csv never misses a saved round.
    releaser.release(row, t)
    program_state = {
      'round': np.int64(t),
      'process': state,
      'totals': {k: np.float64(v) for k, v in totals.items()},
    }
    asyncio.run(manager.save(program_state, t))
    completed = t
    round_times.append(seconds)
    recent = round_times[-10:]
    eta = sum(recent) / len(recent) * (config.rounds - t)
    console.info(round_line(t, config.rounds, row, evaluated, last_acc, len(chosen), eta))
    if evaluated:
      last_acc = test_acc
  return state, completed


def finish(
  config: RunConfig,
  cfg: Mapping[str, Any],
  spec: Mapping[str, Any],
  dataset,
  evaluator: Evaluator,
  model_fn,
  totals: Mapping[str, float],
  console: Console,
) -> Dict[str, Any]:
  """Evaluates the final model; writes final_model/, the plots and summary.json (last).

  Returns:
    The summary written to `summary.json`.
  """
  # pylint: disable=import-outside-toplevel
  from fedmef_tf import masks as masks_lib
  from fedmef_tf import model_io

  root_dir = config.root_dir
  model = evaluator.model
  test_loss, test_acc = evaluator.evaluate()
  layers = masks_lib.prunable_layers(model)
  layer_names = [layer.name for layer in layers]
  layer_density = [float(layer.mask.numpy().mean()) for layer in layers]
  density = float(masks_lib.global_density(model))
  model_config = {
    'model': config.model,
    'variant': spec['variant'],
    'num_classes': dataset.num_classes,
    'input_shape': list(dataset.input_shape),
    'gamma': spec['gamma'],
    'density': spec['density'],
    'algorithm': config.algorithm,
    'dataset': config.dataset,
    'rounds': config.rounds,
    'seed': config.seed,
    'final_accuracy': test_acc,
    'input_range': 'float32 RGB in [0, 1] (pixel / 255), NHWC',
    'input_mean': cfg['input_mean'],
    'input_std': cfg['input_std'],
  }
  model_dir = model_io.save_model(
    model, model_config, os.path.join(root_dir, program_io.FINAL_MODEL_DIR)
  )
  # The measurement trains a copy (it applies SGD steps), never the saved model.
  probe = model_fn()
  probe.set_weights(model.get_weights())
  try:
    memory = memory_report(probe, config.batch_size, spec['variant'])
  except Exception as e:  # pylint: disable=broad-except
    # The trained model is saved already; a failed probe must not lose the run's report.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    console.warning(f'memory measurement failed ({type(e).__name__}: {msg})')
    memory = {
      'analytic_bytes': None,
      'measured_peak_bytes': None,
      'batch_size': config.batch_size,
      'breakdown_bytes': {},
      'bars_bytes': {},
      'error': msg,
    }
  del probe
  rows = program_io.read_metrics(root_dir)
  plots_dir = os.path.join(root_dir, program_io.PLOTS_DIR)
  title = f'{config.algorithm} / {config.model} / {config.dataset}'
  plots = [
    program_io.plot_curves(rows, os.path.join(plots_dir, 'accuracy_loss.png'), title),
    program_io.plot_layer_density(
      layer_names, layer_density, os.path.join(plots_dir, 'layer_density.png'), title
    ),
    program_io.plot_memory(
      memory.pop('breakdown_bytes'),
      memory.pop('bars_bytes'),
      os.path.join(plots_dir, 'memory.png'),
      f'{title}, batch {config.batch_size}',
    ),
  ]
  summary = {
    'algorithm': config.algorithm,
    'model': config.model,
    'variant': spec['variant'],
    'dataset': config.dataset,
    'rounds_completed': config.rounds,
    'final_accuracy': test_acc,
    'final_loss': test_loss,
    'density': density,
    'layer_density': dict(zip(layer_names, layer_density)),
    'memory': memory,
    'traffic': {'down_bytes': int(totals['down_bytes']), 'up_bytes': int(totals['up_bytes'])},
    'train_seconds': totals['train_seconds'],
    'config': cfg,
    'plots': [os.path.relpath(p, root_dir) for p in plots],
    'final_model': os.path.relpath(model_dir, root_dir),
  }
  program_io.write_json(os.path.join(root_dir, program_io.SUMMARY_FILE), summary)
  return summary
