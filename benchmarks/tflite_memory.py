"""On-device training peak and time of TFLite exports: FedMef against baseline and tfmot.

FedMef (Huang et al., CVPR 2024) claims a smaller training footprint on the client. This
benchmark exports, at the same density and batch size, freshly initialised models

* `fedmef`: NSConv + SAP (gamma) + BitReLU, no BatchNorm, masks enforced on device;
* `baseline`: masked conv + BatchNorm + ReLU, masks enforced on device;
* `tfmot` (cnn only): the same CNN from stock Keras layers pruned by
  `tfmot.sparsity.keras.prune_low_magnitude` and stripped (`tflite_export.tfmot_model`);

and measures the peak resident memory of one `train` call in the TFLite interpreter
(`tflite_export.memprobe`: fresh subprocess, `VmHWM` delta over the call, minus the same
process without the call; minimum over `--repeats`), and the median time of a `train` call
at each of `--threads` (`tflite_export.train_timing`: fresh subprocess, `--time_calls` timed
calls after two untimed ones, images uniform in [0, 1)). The targets of the project: FedMef's
peak at most 0.45x the baseline's, and its `train` call at most 1.5x the baseline's on one
thread.

    python -m benchmarks.tflite_memory --models=cnn,resnet18 --batch_sizes=32,8 \
        [--max_im2col_kib=1024,0] [--weight_grads=builtin,tf] [--threads=1,2] [--time_calls=10]

Each row also shows the peak of a second `train` call in the same process over the same
starting point (`steady_peak` of `tflite_export.memprobe`): by then the arena has its full size
(the first call grows it in steps, each a copy into a larger buffer), and what it adds is
pages that the select-TF kernels' allocator touches anew.

Prints one row per export and, per (model, batch), the FedMef / baseline ratio at each
structure (im2col budget, and kind of conv weight gradient where both were measured: equal
settings), and, where several structures were measured, FedMef's lowest peak against the
baseline's lowest: each variant at its own best structure. The target line uses that
best-against-best ratio where there is one; a line does the same for later calls
(informative: the target is stated for one call in a fresh process). Time lines follow, per
(model, batch, structure): FedMef / baseline (and tfmot / baseline) median `train` time at
each thread count, with the verdict of the one-thread target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, List, Mapping, Sequence

from absl import app
from absl import flags

from tff_programs import cli

__all__ = [
  'run_benchmark',
  'measure_export',
  'format_row',
  'time_ratio_lines',
  'define_flags',
  'validate',
  'main',
  'TARGET_RATIO',
  'TIME_TARGET_RATIO',
]

#: FedMef's `train` peak at most this times the baseline's.
TARGET_RATIO = 0.45
#: FedMef's median `train` call at most this times the baseline's, on one thread.
TIME_TARGET_RATIO = 1.5


def run_benchmark(
  models: Sequence[str],
  batch_sizes: Sequence[int],
  *,
  density: float,
  gamma: float,
  repeats: int,
  out_dir: str,
  layer_updates: bool = True,
  max_im2col_kib: Sequence[int] = (1024,),
  weight_grads: Sequence[str] = ('builtin',),
  threads: Sequence[int] = (1, 2),
  time_calls: int = 10,
  sap_storages: Sequence[str] = (None,),
) -> List[Dict[str, object]]:
  """Exports and measures every (model, batch, variant); returns one dict per export.

  Args:
    models: registry names.
    batch_sizes: fixed batch sizes of the `train` signature.
    density: global kernel density of every export.
    gamma: SAP drop ratio of the FedMef exports.
    repeats: measuring subprocess pairs per export (the minimum is kept).
    out_dir: where the `.tflite` files are written.
    layer_updates: train-step structure of every fedmef and baseline export (the same for
      both; see `tflite_export.layer_updates`): per-layer updates inside the backward pass
      (default) or the plain step.
    max_im2col_kib: im2col budgets of one CONV_2D in an export's `train`
      (`tflite_export.chunked_conv`; 0: whole-batch convolutions); every variant is exported
      and measured under each.
    weight_grads: weight gradients of the masked convolutions: 'builtin'
      (`tflite_export.filter_grad`) and/or 'tf' (select-TF `Conv2DBackpropFilter`); every
      fedmef and baseline export is made with each (tfmot's Keras layers use neither).
    threads: thread counts at which the median `train` call is timed (empty: no timing).
    time_calls: timed `train` calls per thread count (after two untimed ones).
    sap_storages: SAP storages of the fedmef exports (names of
      `tflite_export.static_sap.STORAGES`; None: the default); each one is a fedmef row of
      its own (`variant` `fedmef` for the first, `fedmef-<name>` for the others), the other
      variants are exported once.

  Returns:
    Rows with keys model, batch, variant, budget_kib, weight_grads, size_bytes, peak_bytes,
    steady_bytes, density, train_seconds (`{threads: median seconds}`).
  """
  from tflite_export import export  # pylint: disable=import-outside-toplevel

  rows = []
  for model in models:
    variants = ['fedmef', 'baseline'] + (['tfmot'] if model == 'cnn' else [])
    for batch in batch_sizes:
      for budget in max_im2col_kib:
        for grads, variant, storage in [
          (g, v, st)
          for g in weight_grads
          for v in variants
          for st in (sap_storages if v == 'fedmef' else sap_storages[:1])
          if v != 'tfmot' or g == weight_grads[0]
        ]:
          keras_model, config = export.load_source(
            model=model, variant=variant, density=density, gamma=gamma
          )
          label = variant if storage == sap_storages[0] else f'{variant}-{storage}'
          path = os.path.join(out_dir, f'{model}_{label}_b{batch}_k{budget}_{grads}.tflite')
          report = export.export_model(
            keras_model,
            config,
            path,
            batch_size=batch,
            measure_memory=False,
            layer_updates=layer_updates,
            max_im2col_kib=budget,
            builtin_weight_grads=grads == 'builtin',
            sap_storage=storage if variant == 'fedmef' else None,
          )
          row = {
            'model': model,
            'batch': batch,
            'variant': label,
            'budget_kib': budget,
            'weight_grads': grads,
            'size_bytes': report.size_bytes,
            'density': report.global_density,
          }
          row.update(measure_export(path, repeats=repeats, threads=threads, time_calls=time_calls))
          rows.append(row)
          print(format_row(row), flush=True)
  return rows


def measure_export(
  path: str,
  *,
  repeats: int = 1,
  threads: Sequence[int] = (1, 2),
  time_calls: int = 10,
  memory: bool = True,
) -> Dict[str, object]:
  """The measured columns of one export's row: `peak_bytes` and `steady_bytes`
  (`tflite_export.memprobe`, minimum over `repeats`; left out if not `memory`) and
  `train_seconds` (`{threads: median seconds of a train call}`, `tflite_export.train_timing`)."""
  from tflite_export import memprobe  # pylint: disable=import-outside-toplevel
  from tflite_export import train_timing  # pylint: disable=import-outside-toplevel

  row = {
    'train_seconds': {
      int(n): train_timing.median_train_seconds(path, num_threads=int(n), calls=time_calls)
      for n in threads
    }
  }
  if memory:
    peaks = memprobe.measure_train_peak(path, repeats=repeats)
    row.update(peak_bytes=peaks['train_peak'], steady_bytes=peaks['steady_peak'])
  return row


def format_row(row: Mapping[str, object]) -> str:
  """One printed row: export, file size, density, peaks (MiB) and median `train` times (ms)."""
  mib = 2**20
  times = row.get('train_seconds') or {}
  timing = ''.join(f'  train {1000 * s:8.1f} ms @{n}t' for n, s in sorted(times.items()))
  return (
    f'{row["model"]:10s} b{row["batch"]:<4d} {row["variant"]:9s} '
    f'im2col {row["budget_kib"]:5d} KiB {row.get("weight_grads", "builtin"):7s}'
    f'  file {row["size_bytes"] / mib:7.2f} MiB  density {row["density"]:.4f}'
    + (
      f'  train peak {row["peak_bytes"] / mib:8.2f} MiB'
      f'  (later calls {row["steady_bytes"] / mib:6.2f} MiB)'
      if 'peak_bytes' in row
      else ''
    )
    + timing
  )


def time_ratio_lines(rows: Sequence[Mapping[str, object]]) -> List[str]:
  """Per (model, batch, structure): median `train` time of FedMef (and tfmot) over the
  baseline's at each thread count measured, and the verdict of the one-thread target
  (`TIME_TARGET_RATIO`). Rows without times give no line."""
  lines = []
  groups = sorted(
    {(r['model'], r['batch'], r['budget_kib'], r.get('weight_grads', 'builtin')) for r in rows},
    key=lambda g: (g[0], g[1], -g[2], g[3]),
  )
  kinds = {(r['model'], r['batch']): set() for r in rows}
  for r in rows:
    kinds[r['model'], r['batch']].add(r.get('weight_grads', 'builtin'))
  for model, batch, budget, grads in groups:
    mine = [
      r
      for r in rows
      if (r['model'], r['batch'], r['budget_kib'], r.get('weight_grads', 'builtin'))
      == (model, batch, budget, grads)
    ]
    times = {r['variant']: r.get('train_seconds') or {} for r in mine}
    base = times.get('baseline') or {}
    if not base:
      continue
    parts = []
    for variant in sorted(v for v in times if v != 'baseline'):
      mine_t = times.get(variant) or {}
      shared = sorted(set(mine_t) & set(base))
      if shared:
        parts.append(
          f'{variant}/baseline ' + ', '.join(f'{mine_t[n] / base[n]:.2f}x @{n}t' for n in shared)
        )
    if not parts:
      continue
    label = f'im2col {budget} KiB' + (
      f', {grads} weight grads' if len(kinds[model, batch]) > 1 else ''
    )
    line = f'{model} batch {batch} {label}: train time ' + '; '.join(parts)
    fedmef = times.get('fedmef') or {}
    if 1 in fedmef and 1 in base:
      ok = fedmef[1] <= TIME_TARGET_RATIO * base[1]
      line += f'  (target fedmef <= {TIME_TARGET_RATIO}x at 1 thread: {"met" if ok else "NOT met"})'
    lines.append(line)
  return lines


def _ratios(rows) -> List[str]:
  """Summary lines: ratios at each structure (im2col budget, and weight gradients where more
  than one kind was measured), then best against best where several structures were."""
  lines = []
  keys = sorted({(r['model'], r['batch']) for r in rows})
  for model, batch in keys:
    mine = [r for r in rows if r['model'] == model and r['batch'] == batch]
    kinds = sorted({r.get('weight_grads', 'builtin') for r in mine})
    structures = sorted(
      {(r['budget_kib'], r.get('weight_grads', 'builtin')) for r in mine},
      key=lambda s: (-s[0], s[1]),
    )
    lowest = {}
    for budget, grads in structures:
      peaks = {
        r['variant']: r['peak_bytes']
        for r in mine
        if r['budget_kib'] == budget and r.get('weight_grads', 'builtin') == grads
      }
      if 'tfmot' not in peaks:  # measured once per budget
        peaks.update(
          {
            r['variant']: r['peak_bytes']
            for r in mine
            if r['variant'] == 'tfmot' and r['budget_kib'] == budget
          }
        )
      for v, p in peaks.items():
        lowest[v] = min(lowest.get(v, float('inf')), p)
      base = peaks.get('baseline')
      if not base:
        continue
      parts = [f'{v}/baseline {peaks[v] / base:.2f}x' for v in sorted(peaks) if v != 'baseline']
      label = f'im2col {budget} KiB' + (f', {grads} weight grads' if len(kinds) > 1 else '')
      line = f'{model} batch {batch} {label}: ' + ', '.join(parts)
      if len(structures) == 1:
        ok = peaks.get('fedmef', float('inf')) <= TARGET_RATIO * base
        line += f'  (target fedmef <= {TARGET_RATIO}x: {"met" if ok else "NOT met"})'
      lines.append(line)
    if len(structures) > 1 and 'baseline' in lowest and 'fedmef' in lowest:
      ratio = lowest['fedmef'] / lowest['baseline']
      lines.append(
        f'{model} batch {batch} lowest of each variant over the structures: fedmef '
        f'{lowest["fedmef"] / 2**20:.1f} MiB / baseline '
        f'{lowest["baseline"] / 2**20:.1f} MiB = {ratio:.2f}x  (target fedmef <= '
        f'{TARGET_RATIO}x: {"met" if ratio <= TARGET_RATIO else "NOT met"})'
      )
    steady = {}
    for r in mine:
      if r.get('steady_bytes'):
        steady[r['variant']] = min(steady.get(r['variant'], float('inf')), r['steady_bytes'])
    if 'baseline' in steady and 'fedmef' in steady:
      lines.append(
        f'{model} batch {batch} later calls (second call in the same process, not '
        f"the target's measure), lowest of each: fedmef "
        f'{steady["fedmef"] / 2**20:.1f} MiB / baseline '
        f'{steady["baseline"] / 2**20:.1f} MiB = '
        f'{steady["fedmef"] / steady["baseline"]:.2f}x'
      )
  return lines


def define_flags() -> None:
  """Defines the program's flags (when it runs as a program; the tests import the module)."""
  flags.DEFINE_string('models', 'cnn', 'registry names of the models, comma-separated')
  flags.DEFINE_string('batch_sizes', '32,8', 'batch sizes, comma-separated')
  flags.DEFINE_float('density', 0.1, 'global kernel density of every export')
  flags.DEFINE_float('gamma', 0.7, 'SAP drop ratio of the fedmef exports')
  flags.DEFINE_integer('repeats', 1, 'memory probes per export (the minimum is taken)')
  flags.DEFINE_string('out_dir', None, 'keep the exports here (default: temp)')
  flags.DEFINE_bool(
    'plain_step',
    False,
    'export every variant with the plain train step (all gradients, then all updates) instead '
    'of per-layer updates in the backward pass',
  )
  flags.DEFINE_string(
    'weight_grads',
    'builtin',
    "conv weight gradients: 'builtin' (builtin TFLite ops), 'tf' (select-TF "
    "Conv2DBackpropFilter) or 'builtin,tf' (both, every fedmef and baseline export made with "
    'each; best against best)',
  )
  flags.DEFINE_string(
    'max_im2col_kib',
    '1024',
    'im2col workspace per CONV_2D, KiB (0: whole batch); a comma list measures every variant '
    'under each and compares best against best',
  )
  flags.DEFINE_string(
    'threads',
    '1,2',
    'thread counts at which the median train call is timed (comma list; empty: no timing)',
  )
  flags.DEFINE_integer(
    'time_calls', 10, 'timed train calls per thread count (after two untimed ones)'
  )
  flags.DEFINE_string(
    'sap_storages',
    '',
    "SAP storages of the fedmef exports, a comma list of 'topk' and 'radix' "
    '(tflite_export.static_sap.STORAGES; each a fedmef row; empty: the default)',
  )


def _items(text: str) -> List[str]:
  return [v.strip() for v in text.split(',') if v.strip()]


def validate(values) -> None:
  """Checks the flags; raises `cli.UsageError` naming each bad one."""
  problems = cli.Problems()
  try:
    threads = [int(n) for n in _items(values['threads'])]
  except ValueError:
    problems.add(f'--threads must be integers, got {values["threads"]!r}')
  else:
    if threads and min(threads) < 1:
      problems.add('--threads must be integers >= 1')
  problems.check_range('time_calls', values['time_calls'], 1)
  try:
    budgets = [int(b) for b in _items(values['max_im2col_kib'])]
  except ValueError:
    problems.add(f'--max_im2col_kib must be integers, got {values["max_im2col_kib"]!r}')
  else:
    if not budgets or min(budgets) < 0:
      problems.add('--max_im2col_kib must be one or more integers >= 0')
  grads = _items(values['weight_grads'])
  if not grads or any(g not in ('builtin', 'tf') for g in grads):
    problems.add(f"--weight_grads must list 'builtin' and/or 'tf', got {values['weight_grads']!r}")
  if any(st not in ('topk', 'radix') for st in _items(values['sap_storages'])):
    problems.add(f"--sap_storages must list 'topk' and/or 'radix', got {values['sap_storages']!r}")
  try:
    [int(b) for b in _items(values['batch_sizes'])]
  except ValueError:
    problems.add(f'--batch_sizes must be integers, got {values["batch_sizes"]!r}')
  problems.raise_if_any()


def main(argv) -> int:
  del argv  # checked by `cli.flags_parser`, with `validate`
  args = flags.FLAGS
  threads = [int(n) for n in _items(args.threads)]
  budgets = [int(b) for b in _items(args.max_im2col_kib)]
  grads = _items(args.weight_grads)
  storages = _items(args.sap_storages) or [None]
  out_dir = args.out_dir or tempfile.mkdtemp(prefix='tflite_memory_')
  os.makedirs(out_dir, exist_ok=True)
  try:
    rows = run_benchmark(
      [m for m in args.models.split(',') if m],
      [int(b) for b in args.batch_sizes.split(',') if b],
      density=args.density,
      gamma=args.gamma,
      repeats=args.repeats,
      out_dir=out_dir,
      layer_updates=not args.plain_step,
      max_im2col_kib=budgets,
      weight_grads=grads,
      threads=threads,
      time_calls=args.time_calls,
      sap_storages=storages,
    )
  finally:
    if not args.out_dir:
      shutil.rmtree(out_dir, ignore_errors=True)
  step = 'plain step' if args.plain_step else 'per-layer updates in the backward pass'
  print(
    f'density {args.density}, gamma {args.gamma}, train step: {step}, im2col budgets '
    f'{budgets} KiB, weight gradients {grads} (each for all variants); peak = VmHWM delta '
    f'of one train call; time = median of {args.time_calls} train calls at threads '
    f'{threads}'
  )
  for line in _ratios(rows) + time_ratio_lines(rows):
    print(line)
  return cli.EXIT_OK


if __name__ == '__main__':
  define_flags()
  app.run(
    main,
    flags_parser=cli.flags_parser(
      'tflite_memory',
      cli.program_help(__doc__, [__name__]),
      validate,
      preload=('tensorflow',),
    ),
  )
