r"""Seconds per round of the FedMef simulation and of its baselines, run by hand.

FedMef: Huang et al., CVPR 2024 (arXiv 2403.14737). In one run, on two settings of the small
CNN (32x32x3 inputs, E = 1, B = 32, density 0.1):

- `default`: K = 100 clients of 32 to 96 examples (mean 64), S = 10 per round;
- `cifar10`: a CIFAR-10-sized set, 50,000 synthetic images in K = 20 clients of 2,500,
  S = 5 per round (79 local steps per client and round),

it runs `fedmef`, `fedmef_no_sap`, `rigl` and `fedavg` in the TFF simulation
(`tff_programs.fedmef_process`, SAP under its default `sap.SIMULATED` strategy), and `fedmef
stored` (SAP under `sap.STORED`, its memory-saving storage on TensorFlow ops), taking turns
round by round (round 1 of each, then round 2 of each, ...), so that a change of the machine's
load falls on every algorithm alike. It prints the median seconds per round (round 1, which
traces, excluded), the ratio of medians to `rigl`, and the median, smallest and largest of the
per-round ratios to `rigl` (the same round of both: the same clients, and an adjustment round
against an adjustment round), whose range shows how far one run's ratio can be trusted. It
then runs the same client updates (`fedmef_tf.client.build_client_update` on the clients each round
samples) as a plain TensorFlow loop in this process (for fedmef with the native SAP kernels
where they are built) and prints that time per round and the TFF round's overhead over it:
broadcast, aggregation, the server update, serialisation of the client datasets and the TFF
worker's own execution of the same ops.

Client data are synthetic `tf.data` pipelines generated from (client, example) seeds with
stateless random ops, so no client's examples are held in Python memory. Each client's pipeline
is built once, when first sampled, and reused.

    .venv/bin/python -m benchmarks.rounds                             # both settings
    .venv/bin/python -m benchmarks.rounds --settings=default --rounds=11
"""

import os
import statistics
import time
from typing import List, Sequence, Tuple

from absl import app
from absl import flags

from fedmef_tf import algorithms
from tff_programs import cli
from tff_programs import runtime

runtime.configure_logging()  # before TensorFlow is imported: quiet unless FEDMEF_VERBOSE=1

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-order

from fedmef_tf import agc  # pylint: disable=g-import-not-at-top
from fedmef_tf import client as client_lib  # pylint: disable=g-import-not-at-top
from fedmef_tf import masks as masks_lib  # pylint: disable=g-import-not-at-top
from fedmef_tf import sap  # pylint: disable=g-import-not-at-top
from fedmef_tf import server as server_lib  # pylint: disable=g-import-not-at-top
from tff_programs import fedmef_process  # pylint: disable=g-import-not-at-top

ALGORITHMS = ('fedmef', 'fedmef_no_sap', 'rigl', 'fedavg')
SETTINGS = {
  # name: (K, S, mean n_k, n_k spread +-50%)
  'default': (100, 10, 64, True),
  'cifar10': (20, 5, 2500, False),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the program's flags (when it runs as a program; the tests import the module)."""
  flags.DEFINE_list('settings', list(SETTINGS), f'Settings to run, of {sorted(SETTINGS)}.')
  flags.DEFINE_list('algorithms', list(ALGORITHMS), 'Algorithms to time.')
  flags.DEFINE_integer(
    'rounds', 6, 'Rounds per algorithm on the default setting (round 1 traces and is not counted).'
  )
  flags.DEFINE_integer('cifar_rounds', 3, 'Rounds per algorithm on the cifar10 setting.')
  flags.DEFINE_integer('delta_t', 5, 'Rounds between adjustments.')
  flags.DEFINE_float('density', 0.1, 'Target density.')
  flags.DEFINE_float('gamma', 0.7, 'SAP ratio of fedmef.')
  flags.DEFINE_integer('seed', 0, 'Seed of sampling, data and masks.')
  flags.DEFINE_bool(
    'stored',
    True,
    'Also time fedmef with SAP under sap.STORED (the '
    'memory-saving storage on TensorFlow ops) in the TFF simulation.',
  )


NUM_CLASSES = 10
SIZE = 32
LOCAL_EPOCHS = 1
BATCH_SIZE = 32


def client_dataset(client_id: int, num_examples: int, size: int) -> tf.data.Dataset:
  """Synthetic, label-skewed examples of one client, generated lazily from stateless seeds."""
  # Each client favours two classes (a crude non-IID split).
  favoured = tf.constant([client_id % NUM_CLASSES, (3 * client_id + 1) % NUM_CLASSES], tf.int32)

  def make(i):
    seed = tf.stack([tf.cast(client_id, tf.int64), i])
    pick = tf.random.stateless_uniform([], seed, 0, 4, dtype=tf.int32)
    other = tf.random.stateless_uniform([], seed + 1, 0, NUM_CLASSES, dtype=tf.int32)
    label = tf.where(pick < 2, favoured[tf.minimum(pick, 1)], other)
    image = tf.random.stateless_normal([size, size, 3], seed + 2) * 0.5
    image += 0.3 * tf.cast(label, tf.float32) / NUM_CLASSES
    return image, label

  return tf.data.Dataset.range(num_examples).map(make)


def client_sizes(num_clients: int, mean: int, spread: bool, seed: int) -> np.ndarray:
  if not spread:
    return np.full(num_clients, mean, np.int64)
  rng = np.random.default_rng(seed)
  return rng.integers(max(1, mean // 2), mean + mean // 2 + 1, size=num_clients)


class Setting:
  """Clients of one setting and their cached pipelines."""

  def __init__(self, name: str, rounds: int):
    num_clients, self.per_round, mean, spread = SETTINGS[name]
    self.name, self.rounds = name, rounds
    self.sizes = client_sizes(num_clients, mean, spread, FLAGS.seed)
    self._cache = {}

  def sampled(self, round_num: int):
    ids = fedmef_process.sample_clients(len(self.sizes), self.per_round, round_num, FLAGS.seed)
    for c in ids:
      if int(c) not in self._cache:
        self._cache[int(c)] = client_dataset(int(c), int(self.sizes[c]), SIZE)
    return [self._cache[int(c)] for c in ids]

  def describe(self) -> str:
    return (
      f'{self.name}: K={len(self.sizes)} S={self.per_round} '
      f'n_k={int(self.sizes.min())}..{int(self.sizes.max())} '
      f'({int(self.sizes.sum())} examples) cnn {SIZE}x{SIZE} E={LOCAL_EPOCHS} '
      f'B={BATCH_SIZE} density={FLAGS.density}'
    )


def _model_fn(algorithm: str):
  return fedmef_process.make_model_fn(
    'cnn',
    algorithm,
    num_classes=NUM_CLASSES,
    input_shape=(SIZE, SIZE, 3),
    gamma=FLAGS.gamma,
    seed=FLAGS.seed,
  )


def _process_kwargs(algorithm: str, rounds: int):
  return dict(
    algorithm=algorithm,
    density=FLAGS.density,
    delta_t=FLAGS.delta_t,
    t_end=max(rounds, FLAGS.delta_t),
    alpha=0.2,
    lambda_bae=0.01,
    gamma=FLAGS.gamma,
    client_lr=0.1,
    client_lr_min=0.01,
    total_rounds=max(rounds, 2),
    local_epochs=LOCAL_EPOCHS,
    batch_size=BATCH_SIZE,
    seed=FLAGS.seed,
  )


class TffRun:
  """The TFF process of one algorithm on one setting, run one round at a time, so that the
  algorithms of a setting can take turns round by round (`main`): a change of the machine's
  load during the run then falls on all of them alike."""

  def __init__(self, algorithm: str, setting: Setting, sap_strategy: str = sap.SIMULATED):
    self.algorithm, self.setting, self.sap_strategy = algorithm, setting, sap_strategy
    self.process = fedmef_process.build_fedmef_process(
      _model_fn(algorithm), sap_strategy=sap_strategy, **_process_kwargs(algorithm, setting.rounds)
    )
    self.state = self.process.initialize()
    #: The row name of the run: the algorithm, or 'fedmef stored' under `sap.STORED`.
    self.label = algorithm if sap_strategy == sap.SIMULATED else f'{algorithm} stored'
    #: Wall seconds of each round run so far (round 1, which traces, included).
    self.times: List[float] = []

  def run_round(self, round_num: int) -> None:
    datasets = self.setting.sampled(round_num)
    start = time.perf_counter()
    output = self.process.next(self.state, datasets)
    self.times.append(time.perf_counter() - start)
    self.state = output.state
    m = output.metrics
    print(
      f'  {self.setting.name:8s} {self.algorithm:14s} {self.sap_strategy:9s} round '
      f'{round_num:2d} {self.times[-1]:7.2f} s  loss {m["train_loss"]:.3f}  '
      f'adjusted {m["adjusted"]}',
      flush=True,
    )


def ratio_summary(times: Sequence[float], reference: Sequence[float]) -> Tuple[float, float, float]:
  """Median, smallest and largest of the per-round ratios `times[r] / reference[r]` over the
  rounds after the first (round 1 traces; both lists hold one entry per round, round 1
  first; a single round is used as it is)."""
  if len(times) != len(reference) or not times:
    raise ValueError(f'need equally many rounds, got {len(times)} and {len(reference)}')
  pairs = list(zip(times, reference))
  ratios = [t / ref for t, ref in (pairs[1:] or pairs)]
  return statistics.median(ratios), min(ratios), max(ratios)


def plain_round_times(algorithm: str, setting: Setting):
  """Wall seconds per round of the same client updates as a plain TF loop in this process.

  Each round's sampled clients are trained one after another from the initial weights with
  the round's configuration (`server.round_config`), so the local steps are those of the TFF
  round; nothing is aggregated.
  """
  kwargs = _process_kwargs(algorithm, setting.rounds)
  entry = algorithms.get(algorithm)
  model = _model_fn(algorithm)()
  masks_lib.init_sparse(model, entry.initial_density(kwargs['density']), kwargs['seed'])
  layout = client_lib.WeightLayout(model)
  schedule = server_lib.ScheduleConfig(
    mode=entry.mode,
    delta_t=kwargs['delta_t'],
    t_end=kwargs['t_end'],
    alpha=entry.adjustment_fraction(kwargs['alpha']),
    eta_0=kwargs['client_lr'],
    eta_min=kwargs['client_lr_min'],
    total_rounds=kwargs['total_rounds'],
    density=kwargs['density'],
  )
  update = client_lib.build_client_update(
    model,
    layout,
    local_epochs=LOCAL_EPOCHS,
    batch_size=BATCH_SIZE,
    eta_0=kwargs['client_lr'],
    lambda_bae=entry.bae_lambda(kwargs['lambda_bae']),
    use_bae=entry.uses_bae,
    server_adjust=entry.mode == server_lib.MODE_SERVER_ADJUST,
    client_regrow=entry.mode == server_lib.MODE_FEDDST,
    gradient_clipping=agc.clipping_for(entry.variant),
  )
  trainable = [tf.identity(v) for v in model.trainable_weights]
  non_trainable = [tf.identity(v) for v in model.non_trainable_weights]
  times = []
  for r in range(1, setting.rounds + 1):
    state = server_lib.ServerState(
      round_num=tf.constant(r - 1, tf.int32),
      trainable=trainable,
      non_trainable=non_trainable,
      mask_changed=tf.constant(r == 1),
    )
    config = server_lib.round_config(state, layout, schedule)
    datasets = setting.sampled(r)
    start = time.perf_counter()
    for ds in datasets:
      out = update(ds, trainable, non_trainable, config)
    float(out.weight)  # waits for the last update
    times.append(time.perf_counter() - start)
  return times


def _median(times):
  return statistics.median(times[1:] or times)


def main(argv):
  del argv
  settings = [
    Setting(name, FLAGS.cifar_rounds if name == 'cifar10' else FLAGS.rounds)
    for name in FLAGS.settings
  ]
  plain_algorithms = [a for a in ('fedmef', 'rigl') if a in FLAGS.algorithms]
  runs = {}
  with runtime.LocalRuntime():
    for setting in settings:
      turns = [TffRun(algorithm, setting) for algorithm in FLAGS.algorithms]
      if FLAGS.stored and 'fedmef' in FLAGS.algorithms:
        turns.append(TffRun('fedmef', setting, sap.STORED))
      for r in range(1, setting.rounds + 1):
        for run in turns:
          run.run_round(r)
      for run in turns:
        runs[setting.name, run.label] = run
  tff_median = {key: _median(run.times) for key, run in runs.items()}
  plain_median = {
    (setting.name, algorithm): _median(plain_round_times(algorithm, setting))
    for setting in settings
    for algorithm in plain_algorithms
  }

  print(
    f'\nseconds per round (median of rounds 2..), cores={os.cpu_count()}, '
    f'gamma={FLAGS.gamma}, delta_t={FLAGS.delta_t}'
  )
  for setting in settings:
    print(setting.describe())
    rigl = runs.get((setting.name, 'rigl'))
    for algorithm in FLAGS.algorithms + ['fedmef stored']:
      if (setting.name, algorithm) not in runs:
        continue
      seconds = tff_median[setting.name, algorithm]
      ratio = ''
      if rigl is not None:
        middle, low, high = ratio_summary(runs[setting.name, algorithm].times, rigl.times)
        ratio = (
          f'{seconds / tff_median[setting.name, "rigl"]:5.2f}x rigl  (per round {middle:.2f}x, '
          f'{low:.2f}..{high:.2f})'
        )
      print(f'  TFF       {algorithm:14s} {seconds:8.2f} s  {ratio}')
    for algorithm in plain_algorithms:
      seconds = plain_median[setting.name, algorithm]
      overhead = tff_median[setting.name, algorithm] / seconds
      print(
        f'  plain TF  {algorithm:14s} {seconds:8.2f} s  (TFF round / plain loop {overhead:.2f}x)'
      )
    if (setting.name, 'fedmef') in tff_median:
      print(f'  20 fedmef rounds: about {20 * tff_median[setting.name, "fedmef"] / 60:.1f} min')


def validate(values) -> None:
  """Checks `--settings` and `--algorithms`; raises `cli.UsageError` naming each bad one."""
  problems = cli.Problems()
  for name in values['settings']:
    problems.check_choice('settings', name, sorted(SETTINGS))
  for algorithm in values['algorithms']:
    problems.check_choice('algorithms', algorithm, ALGORITHMS)
  problems.raise_if_any()


if __name__ == '__main__':
  define_flags()
  app.run(
    main, flags_parser=cli.flags_parser('rounds', cli.program_help(__doc__, [__name__]), validate)
  )
