"""Specification tests of the training program `python -m tff_programs.train` and its helpers.

* every flag check, through the real command line: one line naming the flag and the range,
  exit code 2, before any work (nothing written, TensorFlow not even imported: fast);
* the run directory: a foreign configuration is refused (one line, exit 2) unless --overwrite,
  which removes only the run's own entries;
* client sampling and shuffle seeds are functions of (seed, round);
* metrics release to CSV and TensorBoard, plots, atomic JSON;
* end to end on tiny settings: the files of a run, then a run killed with SIGKILL after its
  second checkpoint and rerun ends with exactly the weights of the uninterrupted run, and
  Ctrl-C (SIGINT) stops between rounds with the last checkpoint intact.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedmef_tf import text
from tff_programs import cli
from tff_programs import program_io
from tff_programs import train
from tff_programs import training_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HAVE_PROCESS = os.path.isfile(os.path.join(ROOT, 'tff_programs', 'fedmef_process.py'))
needs_process = pytest.mark.skipif(
  not _HAVE_PROCESS, reason='tff_programs/fedmef_process.py has not landed yet'
)

# Tiny settings: about 20-30 s per run on 2 cores, most of it start-up.
TINY = [
  '--synthetic_train_size=400',
  '--synthetic_test_size=100',
  '--num_clients=6',
  '--clients_per_round=2',
  '--min_client_size=20',
  '--batch_size=16',
  '--eval_every=2',
  '--delta_t=1',
  '--t_end=2',
  '--density=0.3',
  '--seed=3',
]


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'  # what a user gets by default (tff_programs.runtime)
  env.pop('FEDMEF_VERBOSE', None)
  return env


def _cli(args, timeout=240, **kwargs):
  return subprocess.run(
    [sys.executable, '-m', 'tff_programs.train'] + list(args),
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    **kwargs,
  )


def _error_line(proc):
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('train: error: '), lines[0]
  return lines[0]


# ------------------------------------------------------------------------------------------------
# Flag checks through the command line.

BAD_FLAGS = [
  ('--algorithm=fedprox', '--algorithm', 'one of fedmef'),
  ('--model=vgg', '--model', 'one of cnn'),
  ('--dataset=mnist', '--dataset', 'one of synthetic'),
  ('--num_clients=0', '--num_clients', '[1, 100000]'),
  ('--clients_per_round=0', '--clients_per_round', '[1, 20]'),
  ('--clients_per_round=21', '--clients_per_round', '[1, 20]'),
  ('--rounds=0', '--rounds', '[1, 1000000]'),
  ('--local_epochs=0', '--local_epochs', '[1, 1000]'),
  ('--batch_size=0', '--batch_size', '[1, 65536]'),
  ('--client_lr=0', '--client_lr', '(0, 100]'),
  ('--client_lr=-1', '--client_lr', '(0, 100]'),
  ('--client_lr=nan', '--client_lr', '(0, 100]'),
  ('--client_lr_min=0.5', '--client_lr_min', '(0, 0.1]'),
  ('--density=0', '--density', '(0, 1]'),
  ('--density=1.01', '--density', '(0, 1]'),
  ('--delta_t=0', '--delta_t', '[1, 60]'),
  ('--delta_t=61', '--delta_t', '[1, 60]'),
  ('--t_end=-1', '--t_end', '[0, 60]'),
  ('--t_end=61', '--t_end', '[0, 60]'),
  ('--alpha=1.5', '--alpha', '[0, 1]'),
  ('--alpha=-0.1', '--alpha', '[0, 1]'),
  ('--lambda_bae=-1', '--lambda_bae', '[0, 100]'),
  ('--gamma=1', '--gamma', '[0, 1)'),
  ('--gamma=-0.1', '--gamma', '[0, 1)'),
  ('--dirichlet_alpha=0', '--dirichlet_alpha', '(0, 1e+06]'),
  ('--min_client_size=0', '--min_client_size', '[1, 1000000]'),
  ('--eval_every=0', '--eval_every', '[1, 60]'),
  ('--eval_every=61', '--eval_every', '[1, 60]'),
  ('--eval_batch_size=0', '--eval_batch_size', '[1, 65536]'),
  ('--seed=-1', '--seed', '[0, 2147483647]'),
  ('--synthetic_train_size=5', '--synthetic_train_size', '[10, 10000000]'),
  ('--synthetic_test_size=5', '--synthetic_test_size', '[10, 10000000]'),
  ('--synthetic_train_size=100', '--synthetic_train_size', '>= --num_clients'),
  ('--dataset=cifar10', '--data_dir', 'required'),
  ('--data_dir=/nonexistent/dir', '--data_dir', 'not an existing directory'),
  ('--root_dir=', '--root_dir', 'must not be empty'),
  ('--rounds=many', '--rounds', 'invalid literal'),
  ('--no_such_flag=1', 'no_such_flag', 'Unknown'),
]


@pytest.mark.parametrize(
  'arg,flag,expected', BAD_FLAGS, ids=[b[0].lstrip('-') or 'empty' for b in BAD_FLAGS]
)
def test_bad_flag_is_one_line_error_exit_2_before_any_work(tmp_path, arg, flag, expected):
  root = tmp_path / 'run'
  extra = ['--dataset=cifar10'] if arg.startswith('--data_dir') else []
  # Fixed context, so that the ranges that depend on other flags are known; the bad value last.
  context = ['--rounds=60', '--num_clients=20', '--client_lr=0.1']
  args = [f'--root_dir={root}'] + context + extra + [arg]
  proc = _cli(args, timeout=60)
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  line = _error_line(proc)
  assert flag in line and expected in line, line
  assert not root.exists()  # nothing was written


def test_validate_accepts_the_defaults_and_paper_protocol():
  train.FLAGS.unparse_flags()
  train.FLAGS(['train'])
  defaults = train.FLAGS.flag_values_dict()
  train.validate(defaults)
  paper = dict(
    defaults,
    num_clients=100,
    clients_per_round=10,
    rounds=500,
    local_epochs=5,
    batch_size=64,
    density=0.1,
    delta_t=10,
    t_end=300,
    alpha=0.2,
    lambda_bae=0.01,
    gamma=0.7,
    dirichlet_alpha=0.5,
    client_lr=0.1,
    client_lr_min=0.01,
  )
  train.validate(paper)
  with pytest.raises(train.UsageError, match='--t_end=501'):
    train.validate(dict(paper, t_end=501))


def test_flag_lists_match_the_registries():
  from fedmef_tf import data  # pylint: disable=import-outside-toplevel

  assert train.DATASETS == data.DATASET_NAMES + ('client_data',)
  try:
    from fedmef_tf import models  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  assert train.MODELS == tuple(models.MODEL_NAMES)


def test_defaults_that_follow_rounds():
  assert cli.round_defaults(500) == {'delta_t': 10, 't_end': 300, 'eval_every': 63}
  assert cli.round_defaults(40) == {'delta_t': 1, 't_end': 24, 'eval_every': 5}
  assert cli.round_defaults(10) == {'delta_t': 1, 't_end': 6, 'eval_every': 1}
  assert cli.round_defaults(75) == {'delta_t': 2, 't_end': 45, 'eval_every': 9}
  assert cli.round_defaults(1) == {'delta_t': 1, 't_end': 1, 'eval_every': 1}
  train.FLAGS.unparse_flags()
  train.FLAGS(['train'])
  defaults = train.FLAGS.flag_values_dict()
  assert defaults['delta_t'] is None and defaults['t_end'] is None
  for rounds in range(1, 120):
    train.validate(dict(defaults, rounds=rounds))
  # A value given on the command line wins over the derived one.
  resolved = cli.resolve_defaults(dict(defaults, rounds=100, t_end=7))
  assert (resolved['delta_t'], resolved['t_end'], resolved['eval_every']) == (2, 7, 13)
  assert train.run_config(dict(defaults, rounds=100))['t_end'] == 60


def test_every_conflict_is_reported_at_once(tmp_path):
  root = tmp_path / 'run'
  proc = _cli(
    [
      f'--root_dir={root}',
      '--rounds=10',
      '--delta_t=20',
      '--t_end=30',
      '--eval_every=50',
      '--gamma=1',
      '--clients_per_round=30',
    ],
    timeout=60,
  )
  assert proc.returncode == 2, proc.stderr
  line = _error_line(proc)
  for part in (
    '--delta_t=20',
    '[1, 10]',
    '--t_end=30',
    '[0, 10]',
    '--eval_every=50',
    '--gamma=1',
    '--clients_per_round=30',
  ):
    assert part in line, line
  assert not root.exists()


def test_help_exits_0_with_ranges_and_derived_defaults():
  proc = _cli(['--help'], timeout=60)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert '--delta_t: dT' in out and 'in [1, --rounds]' in out and 'derived from --rounds' in out
  assert '--clients_per_round:' in out and 'in [1, --num_clients]' in out
  for module in ('tff_programs.worker', 'tff_programs.compare'):
    proc = subprocess.run(
      [sys.executable, '-m', module, '--help'],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == 0, (module, proc.stderr)
    assert '--' in proc.stdout and not proc.stderr.strip(), (module, proc.stderr)


def test_model_spec_per_algorithm():
  assert training_loop.model_spec('fedmef', 0.1, 0.7) == {
    'variant': 'fedmef',
    'density': 0.1,
    'gamma': 0.7,
  }
  assert training_loop.model_spec('fedmef_no_sap', 0.1, 0.7)['gamma'] == 0.0
  assert training_loop.model_spec('fedmef_no_bae', 0.1, 0.7)['gamma'] == 0.7
  assert training_loop.model_spec('fedavg', 0.1, 0.7) == {
    'variant': 'baseline',
    'density': 1.0,
    'gamma': 0.0,
  }
  for algo in ('rigl', 'feddst', 'static', 'tfmot'):
    assert training_loop.model_spec(algo, 0.1, 0.7) == {
      'variant': 'baseline',
      'density': 0.1,
      'gamma': 0.0,
    }


# ------------------------------------------------------------------------------------------------
# Sampling is a function of (seed, round).


def test_client_sampling_is_a_function_of_seed_and_round():
  a = [training_loop.sample_clients(7, t, 100, 10) for t in range(1, 50)]
  b = [training_loop.sample_clients(7, t, 100, 10) for t in reversed(range(1, 50))][::-1]
  assert a == b  # no hidden RNG state: order of calls does not matter
  assert all(len(set(c)) == 10 and c == sorted(c) and 0 <= min(c) and max(c) < 100 for c in a)
  assert len({tuple(c) for c in a}) > 40  # rounds differ
  assert training_loop.sample_clients(8, 1, 100, 10) != a[0]
  assert training_loop.sample_clients(1, 1, 5, 5) == [0, 1, 2, 3, 4]
  counts = np.bincount(np.concatenate(a), minlength=100)
  assert counts.min() >= 0 and counts.sum() == 490
  assert training_loop.shuffle_seed(1, 2, 3) == training_loop.shuffle_seed(1, 2, 3)
  assert len({training_loop.shuffle_seed(1, t, k) for t in range(5) for k in range(5)}) == 25


# ------------------------------------------------------------------------------------------------
# Run directory.


def test_root_dir_new_same_config_resumes_foreign_refused(tmp_path):
  root = str(tmp_path / 'run')
  cfg = {'algorithm': 'fedmef', 'rounds': 3, 'gamma': 0.7}
  assert program_io.prepare_root_dir(root, cfg, overwrite=False) is False
  assert program_io.read_json(os.path.join(root, 'config.json')) == cfg
  assert program_io.prepare_root_dir(root, dict(cfg), overwrite=False) is True
  with pytest.raises(program_io.RunDirError) as e:
    program_io.prepare_root_dir(root, dict(cfg, gamma=0.5), overwrite=False)
  msg = str(e.value)
  # The library names the settings as configuration keys; a program passes its flag names.
  assert '\n' not in msg and 'gamma=0.7 there, 0.5 now' in msg and '--' not in msg
  assert 'rerun with overwrite' in msg
  with pytest.raises(program_io.RunDirError) as e:
    program_io.prepare_root_dir(root, dict(cfg, gamma=0.5), overwrite=False, names=text.FLAGS)
  msg = str(e.value)
  assert f'--root_dir={root} holds' in msg and '--gamma=0.7 there, 0.5 now' in msg
  assert 'rerun with --overwrite' in msg


def test_another_length_is_refused_with_the_reason(tmp_path):
  root = str(tmp_path / 'run')
  cfg = {'algorithm': 'fedmef', 'rounds': 10, 'delta_t': 1, 't_end': 6, 'eval_every': 1}
  program_io.prepare_root_dir(root, cfg, overwrite=False)
  with pytest.raises(program_io.RunDirError) as e:
    program_io.check_root_dir(root, dict(cfg, rounds=20, t_end=12, eval_every=3), False)
  msg = str(e.value)
  assert '\n' not in msg and 'unfinished run of rounds=10' in msg
  assert 'cannot extend' in msg and 'learning-rate decay' in msg and 'with overwrite' in msg
  program_io.write_json(os.path.join(root, 'summary.json'), {'rounds_completed': 10})
  with pytest.raises(program_io.RunDirError, match='finished run of --rounds=10 that --rounds=20'):
    program_io.check_root_dir(root, dict(cfg, rounds=20), False, names=text.FLAGS)
  # Another change besides the length gets the list of differences.
  with pytest.raises(program_io.RunDirError, match='another configuration'):
    program_io.check_root_dir(root, dict(cfg, rounds=20, algorithm='rigl'), False)
  assert program_io.check_root_dir(root, dict(cfg, rounds=20), True) is False
  assert program_io.finished_summary(root, 10) == {'rounds_completed': 10}
  assert program_io.finished_summary(root, 11) is None


def test_overwrite_removes_only_run_entries(tmp_path):
  root = tmp_path / 'run'
  program_io.prepare_root_dir(str(root), {'a': 1}, overwrite=False)
  (root / 'metrics.csv').write_text('round\n1\n')
  (root / 'checkpoints' / 'program_state_1').mkdir(parents=True)
  (root / 'notes.txt').write_text('mine')
  assert program_io.prepare_root_dir(str(root), {'a': 2}, overwrite=True) is False
  assert not (root / 'metrics.csv').exists() and not (root / 'checkpoints').exists()
  assert (root / 'notes.txt').read_text() == 'mine'
  assert program_io.read_json(str(root / 'config.json')) == {'a': 2}


def test_run_entries_without_config_refused(tmp_path):
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(program_io.RunDirError, match='no config.json'):
    program_io.prepare_root_dir(str(tmp_path), {'a': 1}, overwrite=False)
  # An unrelated non-empty directory is fine: nothing of ours to clash with.
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'x.txt').write_text('x')
  assert program_io.prepare_root_dir(str(other), {'a': 1}, overwrite=False) is False


def test_foreign_root_dir_refused_through_cli(tmp_path):
  root = tmp_path / 'run'
  root.mkdir()
  (root / 'config.json').write_text(json.dumps({'algorithm': 'rigl'}))
  proc = _cli([f'--root_dir={root}'], timeout=60)
  assert proc.returncode == 2
  line = _error_line(proc)
  assert str(root) in line and 'another configuration' in line and '--overwrite' in line
  assert json.loads((root / 'config.json').read_text()) == {'algorithm': 'rigl'}


def test_run_config_leaves_out_what_does_not_change_the_result():
  train.FLAGS.unparse_flags()
  train.FLAGS(['train'])
  values = train.FLAGS.flag_values_dict()
  cfg = train.run_config(values)
  for name in ('root_dir', 'overwrite', 'verbose', 'data_dir'):
    assert name not in cfg
  for name in (
    'algorithm',
    'model',
    'dataset',
    'rounds',
    'seed',
    'density',
    'gamma',
    'dirichlet_alpha',
    'lambda_bae',
    'alpha',
    't_end',
    'delta_t',
  ):
    assert name in cfg
  json.dumps(cfg)
  assert train.run_config(dict(values, iid=True))['dirichlet_alpha'] is None


# ------------------------------------------------------------------------------------------------
# Release, plots, JSON.


def test_metrics_release_csv_and_tensorboard_and_replace_on_resume(tmp_path):
  root = str(tmp_path)
  rel = program_io.MetricsReleaser(root)
  for t in (1, 2, 3):
    rel.release({'train_loss': 1.0 / t, 'test_accuracy': float('nan') if t % 2 else 0.5}, t)
  # A resumed run redoes round 2: rows >= 2 are replaced.
  rel2 = program_io.MetricsReleaser(root)
  rel2.release({'train_loss': 0.25, 'test_accuracy': 0.75}, 2)
  rows = program_io.read_metrics(root)
  assert [r['round'] for r in rows] == [1, 2]
  assert rows[1]['train_loss'] == 0.25 and rows[1]['test_accuracy'] == 0.75
  assert math.isnan(rows[0]['test_accuracy'])
  events = os.listdir(os.path.join(root, 'tensorboard'))
  assert any(e.startswith('events.out.tfevents') for e in events)


def test_plots_are_png(tmp_path):
  rows = [
    {
      'round': t,
      'train_loss': 2.0 / t,
      'train_accuracy': 0.1 * t,
      'test_accuracy': float('nan') if t % 2 else 0.2 * t,
      'test_loss': 1.0,
    }
    for t in range(1, 5)
  ]
  paths = [
    program_io.plot_curves(rows, str(tmp_path / 'a.png'), 't'),
    program_io.plot_layer_density(
      ['c1', 'c2', 'fc'], [0.5, 0.1, 0.3], str(tmp_path / 'b.png'), 't'
    ),
    program_io.plot_memory(
      {'weight_bytes': 1e6, 'cached_bytes': 4e6},
      {'analytic step peak': 5e6, 'measured step peak': 3e6},
      str(tmp_path / 'c.png'),
      't',
    ),
  ]
  for p in paths:
    with open(p, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert sorted(os.listdir(tmp_path)) == ['a.png', 'b.png', 'c.png']  # no temporaries left


def test_state_manager_removes_half_written_saves(tmp_path):
  ckpt = tmp_path / 'checkpoints'
  ckpt.mkdir()
  (ckpt / '.program_state_3.npz.k2j_x9.tmp').write_bytes(b'PK half')
  (ckpt / 'program_state_2.npz').write_bytes(b'')
  program_io.state_manager(str(tmp_path))
  assert sorted(os.listdir(ckpt)) == ['program_state_2.npz']


def test_write_json_atomic(tmp_path):
  path = str(tmp_path / 'x' / 's.json')
  program_io.write_json(path, {'b': 1, 'a': [1, 2]})
  program_io.write_json(path, {'c': 3})
  assert program_io.read_json(path) == {'c': 3}
  assert os.listdir(tmp_path / 'x') == ['s.json']


# ------------------------------------------------------------------------------------------------
# End to end through the command line (needs the FedMef process).


def _h5_weights(path):
  import h5py  # pylint: disable=import-outside-toplevel

  out = {}
  with h5py.File(path, 'r') as f:
    f.visititems(
      lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
    )
  return out


def _wait_for(path, proc, timeout):
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(
        f'program ended ({proc.returncode}) before {path} appeared: '
        f'{proc.stderr.read() if proc.stderr else ""}'
      )
    if time.monotonic() > deadline:
      raise AssertionError(f'{path} did not appear within {timeout}s')
    time.sleep(0.1)


def _worker_children(pid):
  """PIDs of live `worker_binary` processes whose parent is `pid` (Linux /proc)."""
  found = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        stat = f.read()
    except OSError:
      continue
    comm = stat[stat.index('(') + 1 : stat.rindex(')')]
    fields = stat[stat.rindex(')') + 2 :].split()
    if fields[1] == str(pid) and fields[0] != 'Z' and 'worker_bin' in comm:
      found.append(int(entry))
  return found


def _gone(pids, timeout=10.0):
  """True when none of `pids` is alive (zombies count as gone) within `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    alive = []
    for p in pids:
      try:
        with open(f'/proc/{p}/stat') as f:
          state = f.read().rsplit(')', 1)[1].split()[0]
      except OSError:
        continue
      if state != 'Z':
        alive.append(p)
    if not alive:
      return True
    time.sleep(0.1)
  return False


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """One uninterrupted tiny run of 3 rounds (shared by the tests below)."""
  if not _HAVE_PROCESS:
    pytest.skip('tff_programs/fedmef_process.py has not landed yet')
  root = tmp_path_factory.mktemp('uninterrupted') / 'run'
  proc = _cli([f'--root_dir={root}', '--rounds=3'] + TINY)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return root, proc


@needs_process
def test_end_to_end_writes_every_artifact(uninterrupted):
  root, proc = uninterrupted
  out = proc.stdout
  for t in (1, 2, 3):
    assert f'round {t}/3' in out
  assert 'ETA' in out and 'done: 3 rounds' in out
  summary = json.loads((root / 'summary.json').read_text())
  for key in (
    'algorithm',
    'model',
    'dataset',
    'rounds_completed',
    'final_accuracy',
    'density',
    'memory',
    'traffic',
  ):
    assert key in summary
  assert summary['algorithm'] == 'fedmef' and summary['rounds_completed'] == 3
  assert 0.0 <= summary['final_accuracy'] <= 1.0
  assert summary['density'] == pytest.approx(0.3, abs=0.01)
  assert summary['memory']['analytic_bytes'] > 0 and summary['memory']['measured_peak_bytes'] > 0
  assert summary['traffic']['down_bytes'] > 0 and summary['traffic']['up_bytes'] > 0
  rows = program_io.read_metrics(str(root))
  assert [r['round'] for r in rows] == [1, 2, 3]
  for col in (
    'train_loss',
    'test_accuracy',
    'density',
    'bytes_down',
    'bytes_up',
    'round_seconds',
    'clients_used',
    'clients_rejected',
  ):
    assert col in rows[0]
  assert math.isnan(rows[0]['test_accuracy']) and not math.isnan(rows[1]['test_accuracy'])
  assert rows[0]['clients_used'] + rows[0]['clients_rejected'] == 2
  for png in ('accuracy_loss.png', 'layer_density.png', 'memory.png'):
    assert (root / 'plots' / png).read_bytes()[:4] == b'\x89PNG'
  assert any(n.startswith('events.out') for n in os.listdir(root / 'tensorboard'))
  model_cfg = json.loads((root / 'final_model' / 'model_config.json').read_text())
  assert model_cfg['model'] == 'cnn' and model_cfg['variant'] == 'fedmef'
  assert model_cfg['num_classes'] == 10 and model_cfg['input_shape'] == [32, 32, 3]
  assert model_cfg['gamma'] == 0.7
  assert sorted(os.listdir(root / 'checkpoints')) == ['program_state_2.npz', 'program_state_3.npz']
  # The saved model loads in the exporter's reader with its masks.
  from fedmef_tf import masks, model_io  # pylint: disable=import-outside-toplevel

  model, _ = model_io.load_model(str(root / 'final_model'))
  assert float(masks.global_density(model)) == pytest.approx(summary['density'], abs=1e-6)
  # The input normalisation constants are those of the training split, stored with the run
  # (config.json) and in the saved model, whose first layer applies them.
  from fedmef_tf import data as data_lib  # pylint: disable=import-outside-toplevel

  train = data_lib.synthetic(num_train=400, num_test=100, seed=3)
  mean, std = data_lib.channel_stats(train.train_images)
  run_cfg = json.loads((root / 'config.json').read_text())
  assert run_cfg['input_mean'] == mean and run_cfg['input_std'] == std
  assert model_cfg['input_mean'] == mean and model_cfg['input_std'] == std
  norm = model.get_layer('input_norm')
  x = np.full((1, 2, 2, 3), 0.5, np.float32)
  np.testing.assert_allclose(
    norm(x).numpy()[0, 0, 0], (0.5 - np.array(mean)) / np.array(std), rtol=1e-5
  )


@needs_process
def test_rerun_of_a_finished_run_changes_nothing(uninterrupted):
  root, _ = uninterrupted
  before = _h5_weights(root / 'final_model' / 'weights.h5')
  proc = _cli([f'--root_dir={root}', '--rounds=3'] + TINY)
  assert proc.returncode == 0, proc.stderr
  assert 'round 1/3' not in proc.stdout
  after = _h5_weights(root / 'final_model' / 'weights.h5')
  assert all(np.array_equal(before[k], after[k]) for k in before)


@needs_process
def test_resume_after_sigkill_gives_the_same_final_weights(uninterrupted, tmp_path):
  reference_root, _ = uninterrupted
  root = tmp_path / 'killed'
  args = [sys.executable, '-m', 'tff_programs.train', f'--root_dir={root}', '--rounds=3'] + TINY
  proc = subprocess.Popen(
    args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    _wait_for(str(root / 'checkpoints' / 'program_state_2.npz'), proc, timeout=200)
    workers = _worker_children(proc.pid)
  finally:
    proc.kill()
    proc.wait()
  assert workers, 'the program runs its TFF worker as a child process'
  assert _gone(workers), f'TFF worker(s) {workers} outlived the killed program'
  assert not (root / 'summary.json').exists()
  resumed = _cli([f'--root_dir={root}', '--rounds=3'] + TINY)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert 'resuming after round 2' in resumed.stdout
  assert 'round 3/3' in resumed.stdout and 'round 2/3' not in resumed.stdout
  want = _h5_weights(reference_root / 'final_model' / 'weights.h5')
  got = _h5_weights(root / 'final_model' / 'weights.h5')
  assert sorted(want) == sorted(got)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert [r['round'] for r in program_io.read_metrics(str(root))] == [1, 2, 3]
  ref_summary = json.loads((reference_root / 'summary.json').read_text())
  summary = json.loads((root / 'summary.json').read_text())
  assert summary['final_accuracy'] == ref_summary['final_accuracy']
  assert summary['traffic'] == ref_summary['traffic']


@needs_process
def test_ctrl_c_stops_between_rounds_and_keeps_the_checkpoint(tmp_path):
  root = tmp_path / 'interrupted'
  args = [sys.executable, '-m', 'tff_programs.train', f'--root_dir={root}', '--rounds=40'] + TINY
  proc = subprocess.Popen(
    args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    _wait_for(str(root / 'checkpoints' / 'program_state_1.npz'), proc, timeout=200)
    workers = _worker_children(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 130, out + err
  assert 'stopped after round' in out
  assert workers and _gone(workers), f'TFF worker(s) {workers} outlived the program'
  assert len([l for l in err.splitlines() if l.strip()]) <= 2, err  # no traceback
  versions = sorted(
    int(n[len('program_state_') : -len('.npz')])
    for n in os.listdir(root / 'checkpoints')
    if n.startswith('program_state_') and n.endswith('.npz')
  )
  assert versions and versions[-1] < 40
  rows = program_io.read_metrics(str(root))
  assert rows[-1]['round'] == versions[-1]
  assert not (root / 'summary.json').exists()


# ------------------------------------------------------------------------------------------------
# Faults: a damaged checkpoint, a second run on the same directory, rounds without clients.


def test_clientless_rounds_have_no_loss_and_a_run_of_them_warns_once():
  row = {'train_loss': 0.0, 'train_accuracy': 0.0, 'clients_used': 0.0}
  marked = program_io.mark_clientless_round(row)
  assert math.isnan(marked['train_loss']) and math.isnan(marked['train_accuracy'])
  used = {'train_loss': 1.5, 'train_accuracy': 0.25, 'clients_used': 2.0}
  assert program_io.mark_clientless_round(used) == used
  watch = program_io.ClientlessRounds(warn_after=3)
  said = [watch.record(t, n) for t, n in enumerate([0, 0, 2, 0, 0, 0, 0, 1], start=1)]
  assert [t for t, w in enumerate(said, start=1) if w] == [6]
  assert said[5].startswith('rounds 4..6 used no client')
  assert not program_io.any_client_used([{'clients_used': 0.0}, {'clients_used': float('nan')}])
  assert program_io.any_client_used([{'clients_used': 0.0}, {'clients_used': 1.0}])


def test_one_line_escapes_control_characters_and_undecodable_bytes_of_file_names():
  assert text.one_line('runs/a\nb') == 'runs/a\\nb'
  assert text.one_line(os.fsdecode(b'img_\xff.png')) == 'img_\\xff.png'
  assert text.one_line('caf\u00e9 ok') == 'caf\u00e9 ok'
  with_newline = program_io.RunDirError('--root_dir=runs/a\nb: exists and is not a directory')
  assert '\n' not in str(with_newline) and 'runs/a\\nb' in str(with_newline)


@needs_process
def test_damaged_newest_checkpoint_is_reported_and_the_round_before_resumed(
  uninterrupted, tmp_path
):
  import shutil  # pylint: disable=import-outside-toplevel

  reference_root, _ = uninterrupted
  root = tmp_path / 'damaged'
  shutil.copytree(reference_root, root)
  os.remove(root / 'summary.json')
  newest = root / 'checkpoints' / 'program_state_3.npz'
  newest.write_bytes(newest.read_bytes()[:100000])
  proc = _cli([f'--root_dir={root}', '--rounds=3'] + TINY)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  warnings = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(warnings) == 1, proc.stderr
  assert warnings[0].startswith(f'train: warning: {newest}: damaged')
  assert 'resuming after round 2' in proc.stdout and 'round 3/3' in proc.stdout
  want = _h5_weights(reference_root / 'final_model' / 'weights.h5')
  got = _h5_weights(root / 'final_model' / 'weights.h5')
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@needs_process
def test_second_run_on_a_busy_root_dir_is_refused_and_sigterm_exits_143(tmp_path):
  from tff_programs import run_lock  # pylint: disable=import-outside-toplevel

  root = tmp_path / 'busy'
  args = [sys.executable, '-m', 'tff_programs.train', f'--root_dir={root}', '--rounds=60'] + TINY
  first = subprocess.Popen(
    args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  try:
    _wait_for(str(root / 'checkpoints' / 'program_state_1.npz'), first, timeout=200)
    second = _cli([f'--root_dir={root}', '--rounds=60'] + TINY)
    assert first.poll() is None, 'the first run ended before the second was refused'
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert second.returncode == 2, second.stdout + second.stderr
  line = _error_line(second)
  assert f'is in use by process {first.pid} ' in line, line
  assert first.returncode == 143, first.stderr.read()
  rounds = [r['round'] for r in program_io.read_metrics(str(root))]
  assert rounds == list(range(1, len(rounds) + 1)), rounds  # each round once
  with run_lock.RunLock(str(root)) as lock:  # released by the terminated run
    assert lock.held


@needs_process
def test_a_run_in_which_no_client_survives_warns_has_no_loss_and_fails(tmp_path):
  root = tmp_path / 'diverged'
  # Unclipped SGD at lr 100 for 8 local epochs: every client's update overflows (the FedMef
  # model's clipped steps can survive such a rate).
  proc = _cli(
    [
      f'--root_dir={root}',
      '--rounds=3',
      '--client_lr=100',
      '--client_lr_min=100',
      '--algorithm=rigl',
      '--local_epochs=8',
    ]
    + TINY
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 2, proc.stderr
  assert lines[0].startswith('train: warning: rounds 1..3 used no client')
  assert lines[1].startswith('train: error: no round of 1..3 used any client')
  rows = program_io.read_metrics(str(root))
  assert [r['round'] for r in rows] == [1, 2, 3]
  assert all(r['clients_used'] == 0 for r in rows)
  assert all(math.isnan(r['train_loss']) and math.isnan(r['train_accuracy']) for r in rows)
  with open(root / 'metrics.csv') as f:
    assert ',0.0,0.0\n' not in f.read()  # no 0 loss recorded
  assert not (root / 'summary.json').exists()


# ------------------------------------------------------------------------------------------------
# Local dataset files through the program.


def _write_tiny_cifar10(directory, per_file=40, seed=0):
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
  for name in names:
    labels = rng.integers(0, 10, size=(per_file, 1), dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
    (directory / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())


def test_truncated_dataset_file_is_one_line_error_exit_2(tmp_path):
  data_dir = tmp_path / 'cifar-10-batches-bin'
  _write_tiny_cifar10(data_dir)
  bad = data_dir / 'data_batch_4.bin'
  bad.write_bytes(bad.read_bytes()[:-100])
  proc = _cli(
    [f'--root_dir={tmp_path / "run"}', '--dataset=cifar10', f'--data_dir={data_dir}'], timeout=120
  )
  assert proc.returncode == 2, proc.stdout + proc.stderr
  line = _error_line(proc)
  assert str(bad) in line and 'wrong size' in line


def test_failed_data_load_leaves_the_root_dir_reusable(tmp_path):
  data_dir = tmp_path / 'cifar-10-batches-bin'
  _write_tiny_cifar10(data_dir)
  bad = data_dir / 'test_batch.bin'
  bad.write_bytes(bad.read_bytes()[:-7])
  root = tmp_path / 'run'
  proc = _cli([f'--root_dir={root}', '--dataset=cifar10', f'--data_dir={data_dir}'], timeout=120)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert 'wrong size' in _error_line(proc)
  # Nothing of a run was written: any other command may use the directory.
  present = [n for n in program_io.RUN_ENTRIES if (root / n).exists()]
  assert not present, present
  assert program_io.check_root_dir(str(root), {'dataset': 'synthetic'}, False) is False
  # With --overwrite, a foreign run is not cleared by a start that fails.
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'config.json').write_text(json.dumps({'algorithm': 'rigl'}))
  (foreign / 'metrics.csv').write_text('round\n1\n')
  proc = _cli(
    [f'--root_dir={foreign}', '--dataset=cifar10', f'--data_dir={data_dir}', '--overwrite'],
    timeout=120,
  )
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert json.loads((foreign / 'config.json').read_text()) == {'algorithm': 'rigl'}
  assert (foreign / 'metrics.csv').read_text() == 'round\n1\n'


# Tiny data without --delta_t, --t_end or --eval_every: their defaults follow --rounds.
TINY_DATA = [
  '--synthetic_train_size=240',
  '--synthetic_test_size=60',
  '--num_clients=4',
  '--clients_per_round=2',
  '--min_client_size=20',
  '--batch_size=16',
  '--seed=5',
]


@pytest.fixture(scope='module')
def ten_rounds(tmp_path_factory):
  """A finished tiny run of `--rounds=10` with the derived defaults."""
  if not _HAVE_PROCESS:
    pytest.skip('tff_programs/fedmef_process.py has not landed yet')
  root = tmp_path_factory.mktemp('ten_rounds') / 'run'
  proc = _cli([f'--root_dir={root}', '--rounds=10'] + TINY_DATA, timeout=400)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return root, proc


@needs_process
def test_rounds_10_runs_with_the_derived_defaults(ten_rounds):
  root, proc = ten_rounds
  assert 'round 10/10' in proc.stdout and 'done: 10 rounds' in proc.stdout
  config = json.loads((root / 'config.json').read_text())
  assert (config['delta_t'], config['t_end'], config['eval_every']) == (1, 6, 1)
  rows = program_io.read_metrics(str(root))
  assert [r['round'] for r in rows] == list(range(1, 11))
  assert all(not math.isnan(r['test_accuracy']) for r in rows)  # eval_every = 1
  assert all(r['adjusted'] == 0 for r in rows if r['round'] > 6)  # t_end = 6


@needs_process
def test_rerun_of_a_finished_run_prints_its_summary_and_rewrites_nothing(ten_rounds):
  root, first = ten_rounds
  summary = root / 'summary.json'
  before = (summary.read_bytes(), summary.stat().st_mtime_ns)
  config_before = (root / 'config.json').read_bytes()
  proc = _cli([f'--root_dir={root}', '--rounds=10'] + TINY_DATA, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'finished; nothing to do' in proc.stdout
  done = [l for l in first.stdout.splitlines() if l.startswith('done: ')]
  assert done and done[0] in proc.stdout  # the same report line, from summary.json
  assert 'data: ' not in proc.stdout and 'round 1/' not in proc.stdout  # no set-up, no round
  assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before
  # A longer run is refused with the reason, and the directory is left as it was.
  longer = _cli([f'--root_dir={root}', '--rounds=12'] + TINY_DATA, timeout=60)
  assert longer.returncode == 2
  line = _error_line(longer)
  assert 'finished run of --rounds=10' in line and 'cannot extend' in line
  assert (root / 'config.json').read_bytes() == config_before
  assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before


@needs_process
def test_cifar10_binary_files_train_end_to_end(tmp_path):
  data_dir = tmp_path / 'cifar'
  _write_tiny_cifar10(data_dir)
  root = tmp_path / 'run'
  proc = _cli(
    [
      f'--root_dir={root}',
      '--dataset=cifar10',
      f'--data_dir={data_dir}',
      '--algorithm=rigl',
      '--rounds=1',
      '--num_clients=4',
      '--clients_per_round=2',
      '--min_client_size=5',
      '--batch_size=16',
      '--eval_every=1',
      '--delta_t=1',
      '--t_end=1',
    ]
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'data: cifar10 200 train / 40 test' in proc.stdout
  summary = json.loads((root / 'summary.json').read_text())
  assert summary['dataset'] == 'cifar10' and summary['algorithm'] == 'rigl'
  assert summary['variant'] == 'baseline' and summary['rounds_completed'] == 1
