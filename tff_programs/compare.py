r"""FedMef against its baselines on the same federated data: `python -m tff_programs.compare`.

Every algorithm of `--algorithms` is one ordinary training run (`python -m tff_programs.train`)
under `--root_dir/<algorithm>/`, with the same values of every shared flag (data, partition,
seed, model family, density, rounds, local budget), so each one resumes like any training run
and a rerun of the comparison only runs what is missing. The runs go one after another in child
processes, each with its own TFF worker.

With `--seeds=0,1,2` every algorithm runs once per seed, in `--root_dir/<algorithm>/seed<k>/`
with `--seed=k` (data, split, model, masks and sampling all follow the seed), and every column
of the tables is the mean over the seeds; `<column>_std`, the sample standard deviation
(n - 1 in the denominator), is added for the final accuracy always and for every other column
whose values differ between seeds. Ratios and accuracy differences to the references are taken
per seed, on runs of the same seed, and then averaged.

From the runs' `summary.json` and `metrics.csv` it writes:

* `comparison.csv` and `comparison.md`: per algorithm, final and best test accuracy, measured
  peak memory of one client training step, analytic memory footprint, bytes down and up per
  round, seconds per round, and ratios of memory, traffic and time to `rigl` and `tfmot`
  (accuracy as a difference in points);
* `comparison.png`: test accuracy against round for all algorithms, and measured client-step
  memory against final accuracy (with several seeds: the mean, a band and error bars of one
  standard deviation).

Example (paper scale, needs the data files and a GPU):

    python -m tff_programs.compare --root_dir=runs/paper --model=resnet18 --dataset=cifar10 \
      --data_dir=/data/cifar-10-batches-bin --num_clients=100 --clients_per_round=10 \
      --rounds=500 --local_epochs=5 --batch_size=64 --density=0.1 --delta_t=10 --t_end=300
"""

import csv
import math
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Mapping, Sequence

from absl import app
from absl import flags

from fedmef_tf import algorithms
from fedmef_tf import text
from tff_programs import cli
from tff_programs import program_io
from tff_programs import train  # Defines the shared flags of the training program.

FLAGS = flags.FLAGS
DEFAULT_ALGORITHMS = algorithms.NAMES
REFERENCES = ('rigl', 'tfmot')
CSV_FILE = 'comparison.csv'
MD_FILE = 'comparison.md'
PNG_FILE = 'comparison.png'

flags.DEFINE_list(
  'algorithms', list(DEFAULT_ALGORITHMS), 'Algorithms to run and compare, comma-separated.'
)
flags.DEFINE_list(
  'seeds',
  [],
  'Seeds, comma-separated: each algorithm runs once per seed k in '
  '<root_dir>/<algorithm>/seed<k> with --seed=k, and the tables give the mean '
  'and standard deviation over the seeds. Empty: one run per algorithm in '
  '<root_dir>/<algorithm> with --seed.',
)
# Defaults of the shared flags of a comparison of every algorithm on the built-in dataset (its
# duration is in README.md, "Comparison with the baselines"); each can be set on the command line.
_COMPARE_DEFAULTS = {'root_dir': os.path.join('runs', 'compare'), 'density': 0.1}

# Flags of the training program that are not passed to the child runs as shared settings.
_PER_RUN_FLAGS = ('algorithm', 'root_dir')

COLUMNS = (
  'algorithm',
  'final_accuracy',
  'best_accuracy',
  'measured_peak_bytes',
  'analytic_bytes',
  'down_bytes_per_round',
  'up_bytes_per_round',
  'seconds_per_round',
  'rounds_completed',
  'density',
)


def _train_flag_names() -> List[str]:
  return [f.name for f in FLAGS.get_flags_for_module(train)]


def run_dir_for(root_dir: str, algorithm: str, seed=None) -> str:
  """Directory of one run: `root_dir/algorithm`, or `root_dir/algorithm/seed<k>`."""
  if seed is None:
    return os.path.join(root_dir, algorithm)
  return os.path.join(root_dir, algorithm, f'seed{int(seed)}')


def child_argv(algorithm: str, root_dir: str, values: Mapping[str, Any], seed=None) -> List[str]:
  """Command line of the training run of `algorithm`, sharing every other flag's value.

  With `seed` the run goes to `run_dir_for(root_dir, algorithm, seed)` with `--seed=<seed>`.
  """
  argv = [
    sys.executable,
    '-m',
    'tff_programs.train',
    f'--algorithm={algorithm}',
    f'--root_dir={run_dir_for(root_dir, algorithm, seed)}',
  ]
  for name in _train_flag_names():
    if name in _PER_RUN_FLAGS:
      continue
    value = values[name]
    if name == 'seed' and seed is not None:
      value = int(seed)
    if value is None:  # derived from the other flags by the training program itself
      continue
    if isinstance(value, bool):
      argv.append(f'--{name}' if value else f'--no{name}')
    elif isinstance(value, (list, tuple)):
      argv.append(f'--{name}={",".join(str(v) for v in value)}')
    else:
      argv.append(f'--{name}={value}')
  return argv


def _mean(xs: Sequence[float]) -> float:
  xs = [x for x in xs if x is not None and not math.isnan(x)]
  return sum(xs) / len(xs) if xs else float('nan')


def run_result(run_dir: str) -> Dict[str, Any]:
  """Reads one finished run: its summary and per-round metrics, reduced to one table row."""
  summary = program_io.read_json(os.path.join(run_dir, program_io.SUMMARY_FILE))
  rows = program_io.read_metrics(run_dir)
  accs = [
    r['test_accuracy']
    for r in rows
    if r.get('test_accuracy') is not None and not math.isnan(r['test_accuracy'])
  ]
  memory = summary.get('memory', {})
  return {
    'algorithm': summary['algorithm'],
    'final_accuracy': float(summary['final_accuracy']),
    'best_accuracy': max(accs + [float(summary['final_accuracy'])]),
    'measured_peak_bytes': float(memory.get('measured_peak_bytes') or float('nan')),
    'analytic_bytes': float(memory.get('analytic_bytes') or float('nan')),
    'down_bytes_per_round': _mean([r.get('bytes_down') for r in rows]),
    'up_bytes_per_round': _mean([r.get('bytes_up') for r in rows]),
    'seconds_per_round': _mean([r.get('round_seconds') for r in rows]),
    'rounds_completed': int(summary['rounds_completed']),
    'density': float(summary['density']),
    'curve': [
      (int(r['round']), r['test_accuracy'])
      for r in rows
      if r.get('test_accuracy') is not None and not math.isnan(r['test_accuracy'])
    ],
  }


def _ratio(a: float, b: float) -> float:
  if b is None or a is None or math.isnan(a) or math.isnan(b) or b == 0:
    return float('nan')
  return a / b


def add_ratios(
  results: Sequence[Mapping[str, Any]], references: Sequence[str] = REFERENCES
) -> List[Dict[str, Any]]:
  """Adds, per reference algorithm present, ratios and accuracy differences to each row.

  For reference `r`: `peak_vs_r` = measured peak / r's, `analytic_vs_r`, `traffic_vs_r`
  (down + up bytes per round), `time_vs_r` (seconds per round), and `accuracy_minus_r` (final
  accuracy difference, in points of accuracy, i.e. fraction * 100).
  """
  by_name = {r['algorithm']: r for r in results}
  out = []
  for row in results:
    row = dict(row)
    for ref_name in references:
      ref = by_name.get(ref_name)
      if ref is None:
        continue
      row[f'peak_vs_{ref_name}'] = _ratio(row['measured_peak_bytes'], ref['measured_peak_bytes'])
      row[f'analytic_vs_{ref_name}'] = _ratio(row['analytic_bytes'], ref['analytic_bytes'])
      row[f'traffic_vs_{ref_name}'] = _ratio(
        row['down_bytes_per_round'] + row['up_bytes_per_round'],
        ref['down_bytes_per_round'] + ref['up_bytes_per_round'],
      )
      row[f'time_vs_{ref_name}'] = _ratio(row['seconds_per_round'], ref['seconds_per_round'])
      row[f'accuracy_minus_{ref_name}'] = 100.0 * (row['final_accuracy'] - ref['final_accuracy'])
    out.append(row)
  return out


def _numbers(values: Sequence[Any]) -> List[float]:
  return [
    float(v)
    for v in values
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
  ]


def aggregate_seeds(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
  """One row per algorithm from the rows of several seeds (each a list of table rows).

  Every numeric column becomes its mean over the seeds that have a number there (NaN if none);
  `<column>_std`, the sample standard deviation (0.0 for a single seed), is added for
  `final_accuracy` always and for every other column whose values differ between seeds.
  `seeds` counts the seeds of the algorithm. `curve` becomes the mean accuracy at each round
  that every seed evaluated and `curve_std` its standard deviation there. Algorithms keep the
  order of their first appearance.
  """
  order, by_name = [], {}
  for rows in per_seed:
    for row in rows:
      if row['algorithm'] not in by_name:
        order.append(row['algorithm'])
        by_name[row['algorithm']] = []
      by_name[row['algorithm']].append(row)
  out = []
  for name in order:
    rows = by_name[name]
    agg = {'algorithm': name, 'seeds': len(rows)}
    keys = []
    for row in rows:
      keys += [k for k in row if k not in keys and k not in ('algorithm', 'curve')]
    for key in keys:
      values = _numbers([row.get(key) for row in rows])
      agg[key] = statistics.fmean(values) if values else float('nan')
      std = statistics.stdev(values) if len(values) > 1 else 0.0
      if key == 'final_accuracy' or std > 0.0:
        agg[f'{key}_std'] = std if values else float('nan')
    curves = [dict(row.get('curve') or []) for row in rows]
    common = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
    agg['curve'] = [(r, statistics.fmean([c[r] for c in curves])) for r in common]
    agg['curve_std'] = [
      (r, statistics.stdev([c[r] for c in curves]) if len(curves) > 1 else 0.0) for r in common
    ]
    out.append(agg)
  return out


def _columns(rows: Sequence[Mapping[str, Any]]) -> List[str]:
  extra = []
  for row in rows:
    for k in row:
      if k not in COLUMNS and k not in ('curve', 'curve_std') and k not in extra:
        extra.append(k)
  return list(COLUMNS) + extra


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  cols = _columns(rows)
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction='ignore')
    w.writeheader()
    for row in rows:
      w.writerow({k: row.get(k, '') for k in cols})
  os.replace(tmp, path)


def _fmt(x: float, spec: str) -> str:
  return '-' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _fmt_spread(row: Mapping[str, Any], key: str, spec: str) -> str:
  """`mean ± std` where the row has `<key>_std` (several seeds), else the value alone."""
  value = _fmt(row.get(key), spec)
  if f'{key}_std' in row and row.get('seeds', 1) > 1:
    return f'{value} ± {_fmt(row[f"{key}_std"], spec.lstrip("+"))}'
  return value


def write_markdown(rows: Sequence[Mapping[str, Any]], path: str, settings: str) -> None:
  refs = [r for r in REFERENCES if any(f'peak_vs_{r}' in row for row in rows)]
  head = [
    'algorithm',
    'final acc',
    'best acc',
    'client-step peak',
    'analytic',
    'down/round',
    'up/round',
    's/round',
  ]
  for r in refs:
    head += [f'peak vs {r}', f'acc - {r} (pt)']
  lines = [
    f'# Comparison\n\n{settings}\n',
    '| ' + ' | '.join(head) + ' |',
    '|' + '---|' * len(head),
  ]
  for row in rows:
    cells = [
      row['algorithm'],
      _fmt_spread(row, 'final_accuracy', '.4f'),
      _fmt_spread(row, 'best_accuracy', '.4f'),
    ]
    cells += [
      text.format_bytes(row[k])
      for k in (
        'measured_peak_bytes',
        'analytic_bytes',
        'down_bytes_per_round',
        'up_bytes_per_round',
      )
    ]
    cells.append(_fmt(row['seconds_per_round'], '.1f'))
    for r in refs:
      cells += [
        _fmt(row.get(f'peak_vs_{r}'), '.3f') + 'x',
        _fmt_spread(row, f'accuracy_minus_{r}', '+.1f'),
      ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  seeds = max([row.get('seeds', 1) for row in rows] or [1])
  if seeds > 1:
    lines.append(
      f'\nMean ± sample standard deviation over {seeds} seeds; accuracy '
      'differences are taken per seed against the reference run of the same seed.'
    )
  lines.append(
    "\nPeak: allocator peak of one compiled client training step at the run's batch "
    'size, minus what was resident before it (one process per run). Ratios below 1 '
    'mean less than the reference.'
  )
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  os.replace(tmp, path)


def plot(rows: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
  plt = program_io.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for row in rows:
    if row['curve']:
      xs, ys = zip(*row['curve'])
      (line,) = ax1.plot(xs, ys, marker='.', label=row['algorithm'])
      if row.get('seeds', 1) > 1 and row.get('curve_std'):
        sd = [s for _, s in row['curve_std']]
        ax1.fill_between(
          xs,
          [y - d for y, d in zip(ys, sd)],
          [y + d for y, d in zip(ys, sd)],
          color=line.get_color(),
          alpha=0.2,
        )
  ax1.set_xlabel('round')
  ax1.set_ylabel('test accuracy')
  ax1.set_title('accuracy against round')
  ax1.legend(fontsize=8)
  ax1.grid(alpha=0.3)
  for row in rows:
    x = row['measured_peak_bytes'] / 2**20
    ax2.errorbar(
      [x],
      [row['final_accuracy']],
      xerr=row.get('measured_peak_bytes_std', 0) / 2**20,
      yerr=row.get('final_accuracy_std', 0),
      fmt='o',
      capsize=3,
    )
    ax2.annotate(
      row['algorithm'],
      (x, row['final_accuracy']),
      fontsize=8,
      textcoords='offset points',
      xytext=(4, 4),
    )
  ax2.set_xlabel('measured client-step peak memory (MiB)')
  ax2.set_ylabel('final test accuracy')
  ax2.set_title('memory against accuracy')
  ax2.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  program_io.save_figure(fig, plt, path)


def validate(values: Mapping[str, Any]) -> None:
  """Checks `--algorithms` and every shared flag (`train.validate`), reporting all at once.

  Raises:
    cli.UsageError: one line naming each bad flag.
  """
  problems = cli.Problems()
  algos = values['algorithms']
  if not algos:
    problems.add('--algorithms is empty')
  unknown = [a for a in algos if a not in algorithms.NAMES]
  if unknown:
    problems.add(f'--algorithms: unknown {unknown} (known: {", ".join(algorithms.NAMES)})')
  if len(set(algos)) != len(algos):
    problems.add(f'--algorithms repeats a name: {",".join(algos)}')
  seeds = values.get('seeds') or []
  if not all(str(k).isdigit() and int(k) <= 2**31 - 1 for k in seeds):
    problems.add(f'--seeds must be integers in [0, 2^31), got {",".join(seeds)}')
  elif len(set(int(k) for k in seeds)) != len(seeds):
    problems.add(f'--seeds repeats a seed: {",".join(seeds)}')
  try:
    train.validate(values)
  except cli.UsageError as e:
    problems.add(str(e))
  problems.raise_if_any()


def help_text() -> str:
  """What `--help` prints: the docstring, the flags of the comparison and the shared ones."""
  shared = cli.flags_help([train.__name__], skip=('algorithm',))
  return (
    f'{__doc__.strip()}\n\nFlags of the comparison:\n{cli.flags_help([__name__])}\n\n'
    'Flags of python -m tff_programs.train, shared by every run (each run goes to '
    f'<--root_dir>/<algorithm>):\n{shared}'
  )


def main(argv: List[str]) -> int:
  del argv  # checked by `cli.flags_parser`, with `validate`
  values = FLAGS.flag_values_dict()
  root_dir = values['root_dir']
  os.makedirs(root_dir, exist_ok=True)
  seeds = [int(k) for k in values['seeds']] or [None]
  per_seed = []
  for seed in seeds:
    results = []
    for algorithm in values['algorithms']:
      run_dir = run_dir_for(root_dir, algorithm, seed)
      print(f'== {algorithm} -> {run_dir}', flush=True)
      try:
        rc = subprocess.call(child_argv(algorithm, root_dir, values, seed))
      except KeyboardInterrupt:
        print('compare: interrupted; rerun the same command to resume', file=sys.stderr)
        return cli.EXIT_INTERRUPTED
      if rc != 0:
        print(
          f'compare: error: the {algorithm} run exited with code {rc}; its output is '
          f'above, its files in {run_dir}',
          file=sys.stderr,
        )
        return rc if rc > 0 else cli.EXIT_FAILURE
      results.append(run_result(run_dir))
    per_seed.append(add_ratios(results))
  if seeds == [None]:
    rows, seed_text = per_seed[0], f'seed {values["seed"]}'
  else:
    rows, seed_text = aggregate_seeds(per_seed), f'seeds {",".join(map(str, seeds))}'
  settings = (
    f'{values["model"]} on {values["dataset"]}, density {values["density"]}, '
    f'{values["rounds"]} rounds, {values["clients_per_round"]} of '
    f'{values["num_clients"]} clients per round, E={values["local_epochs"]}, '
    f'B={values["batch_size"]}, {seed_text}.'
  )
  write_csv(rows, os.path.join(root_dir, CSV_FILE))
  write_markdown(rows, os.path.join(root_dir, MD_FILE), settings)
  plot(rows, os.path.join(root_dir, PNG_FILE), settings)
  with open(os.path.join(root_dir, MD_FILE)) as f:
    print(f.read())
  return cli.EXIT_OK


def _apply_defaults() -> None:
  for name, value in _COMPARE_DEFAULTS.items():
    FLAGS.set_default(name, value)


if __name__ == '__main__':
  _apply_defaults()
  app.run(main, flags_parser=cli.flags_parser('compare', help_text, validate))
