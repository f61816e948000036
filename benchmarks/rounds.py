r"""Round time and memory of the FedMef simulation (issue 4's benchmark), run by hand.

FedMef: Huang et al., CVPR 2024 (arXiv 2403.14737). With the small CNN, K clients of which S are
sampled per round (100 and 10 by default), this measures

- the median wall time of a round of `fedmef` relative to `rigl` (the same loop without BaE and
  SAP, on the BatchNorm baseline model), first round (tracing) excluded;
- the resident memory (RSS, from /proc) of the simulating processes, i.e. this Python process
  and the TFF C++ worker that executes the computations, after round 30 relative to after
  round 5 (target: at most 1.1x), which shows that memory does not grow with the rounds.

Client data are synthetic `tf.data` pipelines generated from (client, example) seeds with
stateless random ops, so no client's examples are held in Python memory. Each client's pipeline
is built once, when first sampled, and reused: building a `Dataset.map` pipeline in eager mode
registers a new function in TensorFlow's context (about 0.2 MiB each, measured), so building
10 new pipelines per round would grow the simulating process by about 2 MiB per round for
reasons that have nothing to do with the algorithm. Cached, memory is bounded by K pipelines.

    .venv/bin/python -m benchmarks.rounds                      # defaults below
    .venv/bin/python -m benchmarks.rounds --rounds=30 --rigl_rounds=8 --input_size=32
"""

import os
import statistics
import time

from absl import app
from absl import flags

from tff_programs import cli
from tff_programs import runtime  # Sets quiet logging before TensorFlow is imported.

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-order

from tff_programs import fedmef_process  # pylint: disable=g-import-not-at-top

_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 100, 'K, clients in total.')
_PER_ROUND = flags.DEFINE_integer('clients_per_round', 10, 'S, clients sampled per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 30, 'Rounds of fedmef (RSS is read after round 5 '
                               'and after the last round).')
_RIGL_ROUNDS = flags.DEFINE_integer('rigl_rounds', 11, 'Rounds of rigl for the time ratio.')
_NO_SAP_ROUNDS = flags.DEFINE_integer(
    'no_sap_rounds', 6, 'Rounds of fedmef_no_sap (0: skip), to tell SAP\'s share of the time.')
_EXAMPLES = flags.DEFINE_integer('examples_per_client', 64, 'Mean n_k (n_k varies +-50%).')
_INPUT_SIZE = flags.DEFINE_integer('input_size', 32, 'Image side (the CNN is built for it).')
_LOCAL_EPOCHS = flags.DEFINE_integer('local_epochs', 1, 'E.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'B.')
_DELTA_T = flags.DEFINE_integer('delta_t', 5, 'Rounds between adjustments.')
_DENSITY = flags.DEFINE_float('density', 0.1, 'Target density.')
_GAMMA = flags.DEFINE_float('gamma', 0.7, 'SAP ratio of fedmef.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of sampling, data and masks.')

NUM_CLASSES = 10


def rss_mib(pid='self') -> float:
  """Resident set size of a process in MiB, from /proc/<pid>/status (VmRSS)."""
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024.0
  return float('nan')


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


def client_sizes(num_clients: int, mean: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(max(1, mean // 2), mean + mean // 2 + 1, size=num_clients)


def run_algorithm(algorithm: str, rounds: int, sizes: np.ndarray, worker_pid=None):
  """Runs `rounds` rounds; returns (round times in s, {round: (parent RSS, worker RSS)})."""
  size = _INPUT_SIZE.value
  model_fn = fedmef_process.make_model_fn(
      'cnn', algorithm, num_classes=NUM_CLASSES, input_shape=(size, size, 3),
      gamma=_GAMMA.value, seed=_SEED.value)
  process = fedmef_process.build_fedmef_process(
      model_fn, algorithm=algorithm, density=_DENSITY.value, delta_t=_DELTA_T.value,
      t_end=max(rounds, _DELTA_T.value), alpha=0.2, lambda_bae=0.01, gamma=_GAMMA.value,
      client_lr=0.1, client_lr_min=0.01, total_rounds=max(rounds, 2),
      local_epochs=_LOCAL_EPOCHS.value, batch_size=_BATCH_SIZE.value, seed=_SEED.value)
  state = process.initialize()
  times, rss = [], {}
  cache = {}
  for r in range(1, rounds + 1):
    sampled = fedmef_process.sample_clients(len(sizes), _PER_ROUND.value, r, _SEED.value)
    for c in sampled:
      if int(c) not in cache:
        cache[int(c)] = client_dataset(int(c), int(sizes[c]), size)
    datasets = [cache[int(c)] for c in sampled]
    start = time.perf_counter()
    output = process.next(state, datasets)
    times.append(time.perf_counter() - start)
    state = output.state
    m = output.metrics
    rss[r] = (rss_mib(), rss_mib(worker_pid) if worker_pid else float('nan'))
    print(f'{algorithm:8s} round {r:3d}  {times[-1]:6.2f} s  loss {m["train_loss"]:.3f}  '
          f'density {m["global_density"]:.4f}  adjusted {m["adjusted"]}  '
          f'up {m["bytes_up"] / 2**20:6.2f} MiB  down {m["bytes_down"] / 2**20:6.2f} MiB  '
          f'RSS {rss[r][0]:7.1f} + {rss[r][1]:7.1f} MiB', flush=True)
  return times, rss


def main(argv):
  del argv
  sizes = client_sizes(_NUM_CLIENTS.value, _EXAMPLES.value, _SEED.value)
  with runtime.LocalRuntime() as rt:
    worker = getattr(getattr(rt, 'worker', None), 'pid', None)
    rigl_times, _ = run_algorithm('rigl', _RIGL_ROUNDS.value, sizes, worker)
    no_sap_times = []
    if _NO_SAP_ROUNDS.value > 0:
      no_sap_times, _ = run_algorithm('fedmef_no_sap', _NO_SAP_ROUNDS.value, sizes, worker)
    fedmef_times, rss = run_algorithm('fedmef', _ROUNDS.value, sizes, worker)
  rigl_median = statistics.median(rigl_times[1:] or rigl_times)
  fedmef_median = statistics.median(fedmef_times[1:] or fedmef_times)
  print(f'\nK={_NUM_CLIENTS.value} S={_PER_ROUND.value} cnn {_INPUT_SIZE.value}x'
        f'{_INPUT_SIZE.value} E={_LOCAL_EPOCHS.value} B={_BATCH_SIZE.value} '
        f'mean n_k={_EXAMPLES.value} density={_DENSITY.value} cores={os.cpu_count()}')
  print(f'median round time: fedmef {fedmef_median:.2f} s, rigl {rigl_median:.2f} s, '
        f'ratio fedmef/rigl {fedmef_median / rigl_median:.2f}')
  early = min(5, _ROUNDS.value)
  last = _ROUNDS.value
  parent = rss[last][0] / rss[early][0]
  total_early = rss[early][0] + rss[early][1]
  total_last = rss[last][0] + rss[last][1]
  if no_sap_times:
    no_sap_median = statistics.median(no_sap_times[1:] or no_sap_times)
    print(f'median round time fedmef_no_sap (NSConv, no SAP) {no_sap_median:.2f} s, '
          f'ratio to rigl {no_sap_median / rigl_median:.2f}')
  print(f'RSS after round {early}: python {rss[early][0]:.1f} MiB, worker {rss[early][1]:.1f} '
        f'MiB; after round {last}: python {rss[last][0]:.1f} MiB, worker {rss[last][1]:.1f} MiB')
  print(f'RSS ratio round {last} / round {early}: python {parent:.3f}, '
        f'python + worker {total_last / total_early:.3f} (target <= 1.1)')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('rounds', cli.program_help(__doc__, [__name__])))
