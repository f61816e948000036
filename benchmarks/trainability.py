"""Trainability of the FedMef and baseline networks: where does plain masked SGD stay stable?

`python -m benchmarks.trainability` runs, for each model and both variants, N masked SGD steps
of the client's own training step (`fedmef_tf.client.sgd_step`: SAP on at gamma 0.7, BaE off,
density 0.1, ERK masks from the seed; the FedMef variant with its adaptive gradient clipping,
`fedmef_tf.agc`, as its clients train) on

- a real image set: scikit-learn's handwritten digits, written in CIFAR-10's binary layout
  (`fedmef_tf.digits`) and read back through the project's CIFAR-10 loader;
- uniform noise images in [0, 1) with the same labels (nothing to learn but the examples),

for every batch size and learning rate of the grid, with the input normalised by the per-channel
statistics of the set (`fedmef_tf.data.channel_stats`), as a training run does. Batches are
drawn without replacement from a permutation of the set (new permutation each epoch), the same
for both variants. Per cell it prints whether the run diverged (a non-finite loss, or a loss
above 3x the first one) and the mean loss of the last 20 steps (`LAST`). With several
`--seeds` (models, masks and batch order; the image sets and the block scales use the first)
every cell runs once per seed: it counts as diverged if any seed diverged, and its figure is
the mean over the seeds, printed with their sample standard deviation; the loss-ratio target
also lists the ratio of each seed.

It also prints the scale of each block's output at initialisation (mean and standard deviation
over a batch of 64, variant in training mode), on both image sets, and plots it
(`--plot=FILE.png`). The default runs the small CNN only (README.md gives its duration);
`--models=cnn,resnet18,mobilenet_v2` is the full grid.

Summary lines at the end check the targets of the trainability work: no cell in which FedMef
diverges and the baseline does not, and at lr 0.1 and batch 64 on the real set FedMef's last
loss at most 1.1x the baseline's.
"""

import json
import os
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

from absl import app
from absl import flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from fedmef_tf import agc  # pylint: disable=g-import-not-at-top
from fedmef_tf import client
from fedmef_tf import data
from fedmef_tf import digits
from fedmef_tf import masks
from fedmef_tf import models
from tff_programs import cli

#: Steps whose losses are averaged for a cell's figure.
LAST = 20
#: A loss above this multiple of the first one counts as diverged.
DIVERGE_FACTOR = 3.0
DENSITY = 0.1
GAMMA = 0.7
SCALE_BATCH = 64


def image_sets(seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """`{'digits': (uint8 images, labels), 'noise': (...)}`: the real set through the CIFAR-10
  loader, and uniform noise images of the same count and labels."""
  with tempfile.TemporaryDirectory() as d:
    digits.write_cifar10_layout(d, seed=seed)
    real = data.load_cifar10(d)
  rng = np.random.default_rng(seed + 1)
  noise = rng.integers(0, 256, size=real.train_images.shape, dtype=np.uint8)
  return {
    'digits': (real.train_images, real.train_labels),
    'noise': (noise, real.train_labels.copy()),
  }


def _batches(n: int, batch_size: int, steps: int, seed: int) -> List[np.ndarray]:
  rng = np.random.default_rng(seed)
  out, order = [], np.array([], np.int64)
  while len(out) < steps:
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    out.append(order[:batch_size])
    order = order[batch_size:]
  return out


def build(name: str, variant: str, stats, seed: int = 0) -> tf.keras.Model:
  mean, std = stats
  return models.build_model(
    name, variant, density=DENSITY, gamma=GAMMA, seed=seed, input_mean=mean, input_std=std
  )


def run_cell(
  name: str,
  variant: str,
  images: np.ndarray,
  labels: np.ndarray,
  stats,
  batch_size: int,
  learning_rate: float,
  steps: int,
  seed: int = 0,
) -> Dict[str, object]:
  """N client SGD steps from a fresh model; returns losses, diverged and the last mean."""
  model = build(name, variant, stats, seed)
  layers = masks.prunable_layers(model)
  lr = tf.constant(learning_rate, tf.float32)

  clipping = agc.clipping_for(variant)

  @tf.function
  def step(x, y):
    loss, _ = client.sgd_step(model, layers, x, y, lr, clipping=clipping)
    return loss

  xs = tf.convert_to_tensor(images.astype(np.float32) / 255.0)
  ys = tf.convert_to_tensor(labels.astype(np.int32))
  losses = []
  for idx in _batches(len(labels), batch_size, steps, seed):
    loss = float(step(tf.gather(xs, idx), tf.gather(ys, idx)))
    losses.append(loss)
    if not np.isfinite(loss):
      break
  diverged = (not all(np.isfinite(losses))) or max(losses) > DIVERGE_FACTOR * losses[0]
  tail = losses[-LAST:]
  return {
    'losses': losses,
    'diverged': bool(diverged),
    'last': float(np.mean(tail)) if all(np.isfinite(tail)) else float('nan'),
  }


def block_outputs(model: tf.keras.Model) -> List[str]:
  """Names of the layers whose outputs are a block's output, in depth order."""
  names = [layer.name for layer in model.layers]
  picked = []
  for n in names:
    if n.endswith('_add'):
      picked.append(n)
    elif n.startswith(('stem_relu', 'conv')) and n.endswith('_relu'):
      picked.append(n)
    elif n.endswith('_relu2') and n[:-6] + '_add' in picked:
      # A post-activation block (the baseline) ends in the ReLU after its sum.
      picked = [p for p in picked if p != n[:-6] + '_add'] + [n]
    elif n.startswith('block') and (n.endswith('_project') or n.endswith('_project_bn')):
      block = n.split('_')[0]
      if block + '_add' not in names and (
        n.endswith('_project_bn') or block + '_project_bn' not in names
      ):
        picked.append(n)
  if 'classifier' in names:
    picked.append('classifier')
  return picked


def block_scales(
  name: str, variant: str, images: np.ndarray, stats, seed: int = 0
) -> List[Tuple[str, float, float]]:
  """`(block, mean, std)` of each block output at initialisation, training mode."""
  model = build(name, variant, stats, seed)
  outs = block_outputs(model)
  probe = tf.keras.Model(model.input, [model.get_layer(n).output for n in outs])
  x = tf.convert_to_tensor(images[:SCALE_BATCH].astype(np.float32) / 255.0)
  values = probe(x, training=True)
  return [(n, float(tf.reduce_mean(v)), float(tf.math.reduce_std(v))) for n, v in zip(outs, values)]


def combine_seeds(per_seed: Sequence[Dict[str, object]]) -> Dict[str, object]:
  """One cell from the `run_cell` results of several seeds (the same cell otherwise).

  `diverged` if any seed diverged; `last` the mean of the seeds' `last` (NaN if one is NaN),
  `last_sd` their sample standard deviation (0 for one seed), `lasts` each seed's, and
  `losses` the losses of each seed (a list per seed).
  """
  lasts = [float(c['last']) for c in per_seed]
  finite = all(np.isfinite(lasts))
  return {
    'losses': [list(c['losses']) for c in per_seed],
    'diverged': any(bool(c['diverged']) for c in per_seed),
    'last': float(np.mean(lasts)) if finite else float('nan'),
    'last_sd': float(np.std(lasts, ddof=1)) if finite and len(lasts) > 1 else 0.0,
    'lasts': lasts,
  }


def _cell_text(cell: Dict[str, object]) -> str:
  text = ('DIVERGED' if cell['diverged'] else 'ok') + f' {cell["last"]:.3f}'
  if len(cell.get('lasts', ())) > 1:
    text += f' ± {cell["last_sd"]:.3f}'
  return text


def summary_lines(cells: Sequence[Dict[str, object]], models_run: Sequence[str]) -> List[str]:
  """The target lines, from the cells (dicts with model, variant, data, batch, lr, diverged,
  last, and optionally `lasts`, one per seed, as `combine_seeds` makes them)."""
  lines = []
  index = {(c['model'], c['variant'], c['data'], c['batch'], c['lr']): c for c in cells}
  bad = [
    k
    for k, c in index.items()
    if k[1] == 'fedmef'
    and c['diverged']
    and not index.get((k[0], 'baseline') + k[2:], {'diverged': True})['diverged']
  ]
  lines.append(
    'target: no cell where fedmef diverges and the baseline does not: '
    + (
      'met'
      if not bad
      else 'NOT met: ' + ', '.join(f'{m} {d} b{b} lr{lr:g}' for m, _, d, b, lr in bad)
    )
  )
  for m in models_run:
    f = index.get((m, 'fedmef', 'digits', 64, 0.1))
    b = index.get((m, 'baseline', 'digits', 64, 0.1))
    if f is None or b is None:
      continue
    ratio = f['last'] / b['last'] if b['last'] > 0 else float('inf')
    per_seed = ''
    f_lasts, b_lasts = f.get('lasts', ()), b.get('lasts', ())
    if len(f_lasts) > 1 and len(f_lasts) == len(b_lasts):
      ratios = [x / y if y > 0 else float('inf') for x, y in zip(f_lasts, b_lasts)]
      per_seed = ' per seed ' + ', '.join(f'{r:.2f}x' for r in ratios) + ';'
    lines.append(
      f'target: {m} lr 0.1 batch 64 digits: fedmef {f["last"]:.3f} / baseline '
      f'{b["last"]:.3f} = {ratio:.2f}x (mean of each;{per_seed} at most 1.1x: '
      f'{"met" if ratio <= 1.1 else "NOT met"})'
    )
  return lines


def plot_scales(
  scales: Dict[Tuple[str, str, str], List[Tuple[str, float, float]]], path: str
) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  names = sorted({k[0] for k in scales})
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
  for ax, name in zip(axes[0], names):
    for (m, v, d), rows in sorted(scales.items()):
      if m != name:
        continue
      ax.plot(
        [r[2] for r in rows], marker='o', ms=3, ls='-' if v == 'fedmef' else '--', label=f'{v} {d}'
      )
    ax.set_title(f'{name}: block output std at init')
    ax.set_xlabel('block')
    ax.set_ylabel('std')
    ax.set_yscale('log')
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def define_flags() -> None:
  """Defines the program's flags (when it runs as a program; the tests import the module)."""
  flags.DEFINE_list('models', ['cnn'], 'Registry names of the models, comma-separated.')
  flags.DEFINE_list('batch_sizes', ['8', '32', '64'], 'Batch sizes of the grid (>= 1).')
  flags.DEFINE_list('learning_rates', ['0.05', '0.1', '0.2'], 'Learning rates of the grid (> 0).')
  flags.DEFINE_integer('steps', 40, f'SGD steps per cell (>= {LAST}).')
  flags.DEFINE_list('data', ['digits', 'noise'], 'Image sets: digits, noise or both.')
  flags.DEFINE_list(
    'seeds',
    ['0'],
    'Seeds of the models, masks and batch order, comma-separated: every cell runs once per '
    'seed and reports the mean. The first also seeds the image sets and the block scales.',
  )
  flags.DEFINE_string('plot', None, 'PNG of the block scales.')
  flags.DEFINE_string('json', None, 'Write every cell and scale as JSON to this file.')
  flags.DEFINE_bool('scales_only', False, 'Print (and plot) the block scales, run no SGD cell.')


def _numbers(values: Sequence[str], kind) -> List:
  return [kind(v) for v in values if v.strip()]


def validate(values) -> None:
  """Checks the flags; raises `cli.UsageError` naming each bad one."""
  problems = cli.Problems()
  for name in values['models']:
    problems.check_choice('models', name, models.MODEL_NAMES)
  for name in values['data']:
    problems.check_choice('data', name, ('digits', 'noise'))
  problems.check_range('steps', values['steps'], LAST)
  try:
    seeds = _numbers(values['seeds'], int)
  except ValueError:
    seeds = []
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    problems.add(f'--seeds must be distinct integers >= 0, got {",".join(values["seeds"])!r}')
  try:
    batch_sizes = _numbers(values['batch_sizes'], int)
    rates = _numbers(values['learning_rates'], float)
  except ValueError as e:
    problems.add(f'--batch_sizes and --learning_rates must be numbers ({e})')
  else:
    if not batch_sizes or min(batch_sizes) < 1 or not rates or min(rates) <= 0:
      problems.add('--batch_sizes must be >= 1 and --learning_rates > 0')
  problems.raise_if_any()


def main(argv) -> int:
  del argv  # checked by `cli.flags_parser`, with `validate`
  args = flags.FLAGS
  names = list(args.models)
  batch_sizes = _numbers(args.batch_sizes, int)
  rates = _numbers(args.learning_rates, float)
  sets = list(args.data)
  seeds = _numbers(args.seeds, int)

  start = time.monotonic()
  all_sets = image_sets(seeds[0])
  stats = {k: data.channel_stats(v[0]) for k, v in all_sets.items()}
  scales = {}
  for name in names:
    for d in sets:
      for variant in models.VARIANTS:
        rows = block_scales(name, variant, all_sets[d][0], stats[d], seeds[0])
        scales[(name, variant, d)] = rows
        print(
          f'scale {name:12s} {variant:8s} {d:6s} std '
          + ' '.join(f'{s:.2f}' for _, _, s in rows)
          + '  mean '
          + ' '.join(f'{m:.2f}' for _, m, _ in rows),
          flush=True,
        )
  cells = []
  if args.scales_only:
    names_to_run = []
  else:
    names_to_run = names
    print(
      f'{"model":12s} {"data":6s} {"batch":>5s} {"lr":>5s} | {"fedmef":>22s} | {"baseline":>22s}'
    )
  for name in names_to_run:
    for d in sets:
      images, labels = all_sets[d]
      for b in batch_sizes:
        for lr in rates:
          row = {}
          for variant in models.VARIANTS:
            cell = combine_seeds(
              [
                run_cell(name, variant, images, labels, stats[d], b, lr, args.steps, seed)
                for seed in seeds
              ]
            )
            cell.update(model=name, variant=variant, data=d, batch=b, lr=lr)
            cells.append(cell)
            row[variant] = _cell_text(cell)
          print(
            f'{name:12s} {d:6s} {b:5d} {lr:5g} | {row["fedmef"]:>22s} | {row["baseline"]:>22s}',
            flush=True,
          )
  for line in summary_lines(cells, names_to_run):
    print(line)
  print(
    f'{len(cells)} cells of {args.steps} steps x {len(seeds)} seed(s) in '
    f'{time.monotonic() - start:.0f} s'
  )
  if args.plot:
    plot_scales(scales, args.plot)
    print(f'plot: {args.plot}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'cells': cells, 'scales': {'/'.join(k): v for k, v in scales.items()}}, f)
  return cli.EXIT_OK


if __name__ == '__main__':
  define_flags()
  app.run(
    main,
    flags_parser=cli.flags_parser('trainability', cli.program_help(__doc__, [__name__]), validate),
  )
