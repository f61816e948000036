"""python -m tff_programs.compare: ratios on a hand-made table, and a tiny real comparison."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from tff_programs import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(name, acc, peak, analytic, down, up, secs):
  return {
    'algorithm': name,
    'final_accuracy': acc,
    'best_accuracy': acc,
    'measured_peak_bytes': peak,
    'analytic_bytes': analytic,
    'down_bytes_per_round': down,
    'up_bytes_per_round': up,
    'seconds_per_round': secs,
    'rounds_completed': 10,
    'density': 0.1,
    'curve': [],
  }


def test_ratios_on_hand_made_table():
  rows = compare.add_ratios(
    [
      _row('fedmef', 0.60, 30.0, 40.0, 10.0, 10.0, 3.0),
      _row('rigl', 0.55, 100.0, 80.0, 10.0, 30.0, 2.0),
      _row('tfmot', 0.50, 60.0, 50.0, 40.0, 40.0, 1.5),
    ]
  )
  fedmef = rows[0]
  assert fedmef['peak_vs_rigl'] == pytest.approx(0.30)
  assert fedmef['peak_vs_tfmot'] == pytest.approx(0.50)
  assert fedmef['analytic_vs_rigl'] == pytest.approx(0.50)
  assert fedmef['traffic_vs_rigl'] == pytest.approx(20.0 / 40.0)
  assert fedmef['traffic_vs_tfmot'] == pytest.approx(20.0 / 80.0)
  assert fedmef['time_vs_rigl'] == pytest.approx(1.5)
  assert fedmef['accuracy_minus_rigl'] == pytest.approx(5.0)
  assert fedmef['accuracy_minus_tfmot'] == pytest.approx(10.0)
  assert rows[1]['peak_vs_rigl'] == pytest.approx(1.0)  # a reference against itself


def test_ratios_without_references_and_with_missing_values():
  rows = compare.add_ratios([_row('fedmef', 0.6, 30.0, 40.0, 1.0, 1.0, 1.0)])
  assert not any(k.startswith('peak_vs') for k in rows[0])
  rows = compare.add_ratios(
    [
      _row('fedmef', 0.6, float('nan'), 40.0, 1.0, 1.0, 1.0),
      _row('rigl', 0.5, 10.0, 0.0, 1.0, 1.0, 1.0),
    ]
  )
  assert math.isnan(rows[0]['peak_vs_rigl'])
  assert math.isnan(rows[0]['analytic_vs_rigl'])  # division by a zero reference


def test_child_runs_share_every_flag_but_algorithm_and_root_dir():
  from absl import flags  # pylint: disable=g-import-not-at-top

  values = {f.name: f.value for f in flags.FLAGS.get_flags_for_module(compare.train)}
  a = compare.child_argv('fedmef', '/tmp/x', values)
  b = compare.child_argv('rigl', '/tmp/x', values)
  assert '--algorithm=fedmef' in a and '--root_dir=/tmp/x/fedmef' in a
  shared_a = [x for x in a[3:] if not x.startswith(('--algorithm=', '--root_dir='))]
  shared_b = [x for x in b[3:] if not x.startswith(('--algorithm=', '--root_dir='))]
  assert shared_a == shared_b
  # Flags left to their derived defaults are not passed: each run derives them from --rounds.
  derived = [n for n in ('delta_t', 't_end', 'eval_every') if values[n] is None]
  assert derived and not any(x.startswith(tuple(f'--{n}=' for n in derived)) for x in shared_a)
  assert len(shared_a) == len(values) - 2 - len(derived)


TINY = [
  '--rounds=2',
  '--num_clients=4',
  '--clients_per_round=2',
  '--synthetic_train_size=240',
  '--synthetic_test_size=60',
  '--batch_size=16',
  '--delta_t=1',
  '--t_end=2',
  '--eval_every=1',
  '--min_client_size=8',
]


def test_tiny_comparison_writes_tables_from_the_runs(tmp_path):
  root = str(tmp_path / 'cmp')
  proc = subprocess.run(
    [sys.executable, '-m', 'tff_programs.compare', f'--root_dir={root}', '--algorithms=fedmef,rigl']
    + TINY,
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in (compare.CSV_FILE, compare.MD_FILE, compare.PNG_FILE):
    assert os.path.getsize(os.path.join(root, name)) > 0
  with open(os.path.join(root, compare.CSV_FILE)) as f:
    rows = {r['algorithm']: r for r in csv.DictReader(f)}
  assert set(rows) == {'fedmef', 'rigl'}
  for name, row in rows.items():
    with open(os.path.join(root, name, 'summary.json')) as f:
      summary = json.load(f)
    assert summary['algorithm'] == name
    assert float(row['final_accuracy']) == pytest.approx(summary['final_accuracy'])
    assert float(row['measured_peak_bytes']) == pytest.approx(
      summary['memory']['measured_peak_bytes']
    )
    assert int(row['rounds_completed']) == 2
  assert float(rows['rigl']['peak_vs_rigl']) == pytest.approx(1.0)
  assert float(rows['fedmef']['peak_vs_rigl']) == pytest.approx(
    float(rows['fedmef']['measured_peak_bytes']) / float(rows['rigl']['measured_peak_bytes'])
  )
  # A second call finds both runs finished and only rewrites the tables.
  again = subprocess.run(
    [sys.executable, '-m', 'tff_programs.compare', f'--root_dir={root}', '--algorithms=fedmef,rigl']
    + TINY,
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'round 1/' not in again.stdout


def test_unknown_algorithm_is_refused(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'tff_programs.compare',
      f'--root_dir={tmp_path}',
      '--algorithms=fedmef,nope',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert proc.returncode == 2
  assert 'nope' in proc.stderr.strip().splitlines()[-1]


def test_errors_are_reported_under_the_name_compare(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'tff_programs.compare',
      f'--root_dir={tmp_path / "cmp"}',
      '--rounds=0',
      '--algorithms=fedmef,nope',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('compare: error: '), proc.stderr
  assert 'nope' in lines[0] and '--rounds=0' in lines[0]
  assert not (tmp_path / 'cmp').exists()


def test_help_lists_the_shared_flags():
  proc = subprocess.run(
    [sys.executable, '-m', 'tff_programs.compare', '--help'],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  for flag in (
    '--algorithms:',
    '--rounds:',
    '--density:',
    '--delta_t:',
    '--dataset:',
    '--root_dir:',
  ):
    assert flag in proc.stdout, flag
  assert '--algorithm:' not in proc.stdout  # set per run by the comparison
  assert "(default: 'runs/compare')" in proc.stdout


def test_aggregate_seeds_mean_and_spread_on_hand_made_rows():
  seed0 = compare.add_ratios(
    [
      _row('fedmef', 0.60, 30.0, 40.0, 10.0, 10.0, 3.0),
      _row('rigl', 0.50, 100.0, 80.0, 10.0, 30.0, 2.0),
    ]
  )
  seed1 = compare.add_ratios(
    [
      _row('fedmef', 0.70, 30.0, 40.0, 10.0, 10.0, 5.0),
      _row('rigl', 0.56, 100.0, 80.0, 10.0, 30.0, 2.0),
    ]
  )
  seed2 = compare.add_ratios(
    [
      _row('fedmef', 0.68, 30.0, 40.0, 10.0, 10.0, 4.0),
      _row('rigl', 0.62, 100.0, 80.0, 10.0, 30.0, 2.0),
    ]
  )
  seed0[0]['curve'] = [(1, 0.2), (2, 0.6)]
  seed1[0]['curve'] = [(1, 0.4), (2, 0.7)]
  seed2[0]['curve'] = [(2, 0.68)]  # this seed evaluated round 2 only
  rows = {r['algorithm']: r for r in compare.aggregate_seeds([seed0, seed1, seed2])}
  assert list(rows) == ['fedmef', 'rigl']
  fedmef, rigl = rows['fedmef'], rows['rigl']
  assert fedmef['seeds'] == 3
  assert fedmef['final_accuracy'] == pytest.approx(0.66)
  # Sample standard deviation: sqrt(((-0.06)^2 + 0.04^2 + 0.02^2) / 2).
  assert fedmef['final_accuracy_std'] == pytest.approx(math.sqrt(0.0056 / 2))
  assert rigl['final_accuracy'] == pytest.approx(0.56)
  assert rigl['final_accuracy_std'] == pytest.approx(0.06)
  # Differences to rigl are per seed (10, 14, 6 points), then averaged.
  assert fedmef['accuracy_minus_rigl'] == pytest.approx(10.0)
  assert fedmef['accuracy_minus_rigl_std'] == pytest.approx(4.0)
  assert fedmef['seconds_per_round'] == pytest.approx(4.0)
  assert fedmef['seconds_per_round_std'] == pytest.approx(1.0)
  assert fedmef['time_vs_rigl'] == pytest.approx(2.0)
  # A column that does not vary gets no spread column; the final accuracy always does.
  assert 'measured_peak_bytes_std' not in fedmef and fedmef['measured_peak_bytes'] == 30.0
  assert 'final_accuracy_std' in rigl and 'seconds_per_round_std' not in rigl
  assert fedmef['curve'] == [(2, pytest.approx(0.66))]
  assert fedmef['curve_std'] == [(2, pytest.approx(math.sqrt(0.0056 / 2)))]


def test_aggregate_seeds_skips_missing_values_and_single_seed_has_zero_spread():
  a = _row('fedmef', 0.6, float('nan'), 40.0, 1.0, 1.0, 1.0)
  b = _row('fedmef', 0.8, 20.0, 40.0, 1.0, 1.0, 1.0)
  row = compare.aggregate_seeds([[a], [b]])[0]
  assert row['measured_peak_bytes'] == 20.0 and 'measured_peak_bytes_std' not in row
  assert row['final_accuracy'] == pytest.approx(0.7)
  single = compare.aggregate_seeds([[a]])[0]
  assert single['final_accuracy_std'] == 0.0 and math.isnan(single['measured_peak_bytes'])


def test_tiny_multi_seed_comparison_reports_mean_and_spread(tmp_path):
  root = str(tmp_path / 'seeds')
  argv = [
    sys.executable,
    '-m',
    'tff_programs.compare',
    f'--root_dir={root}',
    '--algorithms=fedmef,rigl',
    '--seeds=0,1',
  ] + TINY
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  finals = {}
  for name in ('fedmef', 'rigl'):
    for seed in (0, 1):
      with open(os.path.join(root, name, f'seed{seed}', 'summary.json')) as f:
        summary = json.load(f)
      assert summary['config']['seed'] == seed and summary['algorithm'] == name
      finals[name, seed] = summary['final_accuracy']
  with open(os.path.join(root, compare.CSV_FILE)) as f:
    rows = {r['algorithm']: r for r in csv.DictReader(f)}
  for name in ('fedmef', 'rigl'):
    a, b = finals[name, 0], finals[name, 1]
    assert int(rows[name]['seeds']) == 2
    assert float(rows[name]['final_accuracy']) == pytest.approx((a + b) / 2)
    assert float(rows[name]['final_accuracy_std']) == pytest.approx(abs(a - b) / math.sqrt(2))
  with open(os.path.join(root, compare.MD_FILE)) as f:
    assert 'over 2 seeds' in f.read()
  assert os.path.getsize(os.path.join(root, compare.PNG_FILE)) > 0
  # The per-seed runs resume: a second call runs no round.
  again = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'round 1/' not in again.stdout


def test_bad_seeds_are_refused(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'tff_programs.compare',
      f'--root_dir={tmp_path / "cmp"}',
      '--seeds=0,x,0',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert proc.returncode == 2
  assert '--seeds' in proc.stderr
