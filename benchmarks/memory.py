r"""Training-step memory of FedMef against the baseline, measured and analytic, in one run.

FedMef: Huang et al., CVPR 2024 (arXiv 2403.14737). For each model this builds, in one process,

- ``baseline dense``: the BatchNorm baseline variant at density 1;
- ``baseline sparse``: the baseline variant at ``--density`` (the reference of the ratios);
- ``fedmef g=<gamma>``: the FedMef variant (NSConv + SAP + BitReLU, no BatchNorm) at
  ``--density`` for each SAP drop ratio of ``--gammas``;

and reports for each row the measured peak of one compiled SGD training step
(``fedmef_tf.memory.measure_train_step_peak``: allocator peak minus the bytes resident before
the step), the analytic peak (``fedmef_tf.memory.analytic_footprint``), their ratio, the peak
and the step time relative to ``baseline sparse``, and the analytic weight bytes. The step time
is the fastest of the measured steps (other processes only ever slow a step down).

Targets (CPU): fedmef at gamma 0.7 has a measured peak <= 0.6x and a step time <= 1.5x the
baseline sparse model, for ResNet18 and MobileNetV2, and the analytic peak is within 20% of the
measured one. The last lines of the table say whether each target holds.

    .venv/bin/python -m benchmarks.memory
    .venv/bin/python -m benchmarks.memory --models=resnet18 --batch_size=32 --json

By default the TensorFlow executor runs one op at a time (``--inter_op_threads=1``, each op
still uses all cores): the order of the ops, and so the peak, is then the same from run to run,
as in an on-device interpreter. ``--inter_op_threads=0`` keeps TensorFlow's default.
"""

import json
import os
import sys

from absl import app
from absl import flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from fedmef_tf import agc  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedmef_tf import memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedmef_tf import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedmef_tf import text  # pylint: disable=g-import-not-at-top,wrong-import-position
from tff_programs import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODELS = flags.DEFINE_list(
  'models', ['resnet18', 'mobilenet_v2'], 'Models of fedmef_tf.models to measure.'
)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'B, examples per training step.')
_DENSITY = flags.DEFINE_float('density', 0.1, 'Density of the sparse rows.')
_GAMMAS = flags.DEFINE_list('gammas', ['0', '0.5', '0.7', '0.9'], 'SAP drop ratios of fedmef.')
_STEPS = flags.DEFINE_integer(
  'steps', 5, 'Measured steps per row, after 2 warm-up (peak: median; time: fastest step).'
)
_INTER_OP = flags.DEFINE_integer(
  'inter_op_threads', 1, "TensorFlow inter-op threads (0: TensorFlow's default)."
)
_JSON = flags.DEFINE_bool('json', False, 'Print the rows as JSON instead of a table.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of initial weights, masks and the batch.')

#: gamma of the rows the targets are checked on, and the targets.
TARGET_GAMMA = 0.7
TARGET_PEAK_RATIO = 0.6
TARGET_TIME_RATIO = 1.5
TARGET_ANALYTIC_ERROR = 0.2


def _row(model_name, label, variant, density, gamma, batch_size, steps, seed):
  model = models.build_model(model_name, variant, density=density, gamma=gamma, seed=seed)
  analytic = memory.analytic_footprint(model, batch_size)
  measured = memory.measure_train_step_peak(
    model, batch_size, steps=steps, seed=seed, gradient_clipping=agc.clipping_for(variant)
  )
  row = {
    'model': model_name,
    'row': label,
    'variant': variant,
    'density': density,
    'gamma': gamma,
    'batch_size': batch_size,
    'measured_peak_bytes': measured['peak_bytes'],
    'measured_peak_bytes_min': measured['peak_bytes_min'],
    'measured_peak_bytes_max': measured['peak_bytes_max'],
    'analytic_peak_bytes': analytic['peak_bytes'],
    'analytic_peak_layer': analytic['peak_layer'],
    'analytic_cached_bytes': analytic['cached_bytes'],
    'analytic_weight_bytes': analytic['weight_bytes'],
    'step_seconds': measured['step_seconds_min'],
    'step_seconds_median': measured['step_seconds'],
  }
  row['analytic_over_measured'] = row['analytic_peak_bytes'] / row['measured_peak_bytes']
  del model
  tf.keras.backend.clear_session()
  return row


def run(model_names, batch_size, density, gammas, steps, seed):
  """Measures every row of every model; returns the rows (dicts, bytes and seconds)."""
  rows = []
  for name in model_names:
    specs = [
      ('baseline dense', 'baseline', 1.0, 0.0),
      ('baseline sparse', 'baseline', density, 0.0),
    ]
    specs += [(f'fedmef g={g:g}', 'fedmef', density, g) for g in gammas]
    model_rows = []
    for label, variant, d, g in specs:
      model_rows.append(_row(name, label, variant, d, g, batch_size, steps, seed))
      print(f'  measured {name} {label}', file=sys.stderr, flush=True)
    ref = next(r for r in model_rows if r['row'] == 'baseline sparse')
    for r in model_rows:
      r['peak_ratio'] = r['measured_peak_bytes'] / ref['measured_peak_bytes']
      r['time_ratio'] = r['step_seconds'] / ref['step_seconds']
    rows.extend(model_rows)
  return rows


def targets(rows):
  """(description, holds) of each target, for the fedmef rows at TARGET_GAMMA."""
  checks = []
  for r in rows:
    if r['variant'] != 'fedmef' or abs(r['gamma'] - TARGET_GAMMA) > 1e-9:
      continue
    checks.append(
      (
        f'{r["model"]}: fedmef g={TARGET_GAMMA:g} peak {r["peak_ratio"]:.2f}x '
        f'<= {TARGET_PEAK_RATIO}x',
        r['peak_ratio'] <= TARGET_PEAK_RATIO,
      )
    )
    checks.append(
      (
        f'{r["model"]}: fedmef g={TARGET_GAMMA:g} step time '
        f'{r["time_ratio"]:.2f}x <= {TARGET_TIME_RATIO}x',
        r['time_ratio'] <= TARGET_TIME_RATIO,
      )
    )
  for r in rows:
    err = abs(r['analytic_over_measured'] - 1.0)
    checks.append(
      (
        f'{r["model"]}: {r["row"]} analytic/measured '
        f'{r["analytic_over_measured"]:.2f} within {TARGET_ANALYTIC_ERROR:.0%}',
        err <= TARGET_ANALYTIC_ERROR,
      )
    )
  return checks


def _table(rows):
  def mib(n, precision=1):
    return text.format_bytes(n, 'MiB', precision)

  lines = [
    f'{"model":13s} {"row":16s} {"measured":>12s} {"analytic":>12s} {"an/meas":>8s} '
    f'{"peak/bs":>8s} {"step s":>8s} {"time/bs":>8s} {"weights":>11s}'
  ]
  for r in rows:
    lines.append(
      f'{r["model"]:13s} {r["row"]:16s} {mib(r["measured_peak_bytes"]):>12s} '
      f'{mib(r["analytic_peak_bytes"]):>12s} {r["analytic_over_measured"]:8.2f} '
      f'{r["peak_ratio"]:8.2f} {r["step_seconds"]:8.3f} {r["time_ratio"]:8.2f} '
      f'{mib(r["analytic_weight_bytes"], 2):>11s}'
    )
  return '\n'.join(lines)


def main(argv):
  del argv
  if _INTER_OP.value > 0:
    tf.config.threading.set_inter_op_parallelism_threads(_INTER_OP.value)
  gammas = [float(g) for g in _GAMMAS.value]
  rows = run(_MODELS.value, _BATCH_SIZE.value, _DENSITY.value, gammas, _STEPS.value, _SEED.value)
  checks = targets(rows)
  if _JSON.value:
    print(
      json.dumps(
        {'rows': rows, 'targets': [{'target': t, 'holds': ok} for t, ok in checks]}, indent=1
      )
    )
    return
  print(
    f'batch {_BATCH_SIZE.value}, density {_DENSITY.value}, device '
    f'{"GPU" if tf.config.list_logical_devices("GPU") else "CPU"}, inter-op threads '
    f'{_INTER_OP.value or "default"}; MiB = 2^20 bytes, ratios to baseline sparse (bs)'
  )
  print(_table(rows))
  for description, ok in checks:
    print(f'{"PASS" if ok else "FAIL"}  {description}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('memory', cli.program_help(__doc__, [__name__])))
