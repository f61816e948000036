"""`--dataset=client_data`: the user's own federated data as TFF SQL client data.

The reader (`tff_programs.user_data`) on small databases written with TFF's own
`save_to_sql_client_data`: element structure, one-line errors for a missing file, a corrupt
file and a wrong structure; then two rounds through the command line.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedmef_tf import data as data_lib
from tff_programs import program_io
from tff_programs import user_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, clients, make_element):
  """Writes `clients` (id -> number of examples) with TFF's writer; elements from `make_element`."""

  def dataset_fn(client_id):
    rows = [make_element(client_id, i) for i in range(clients[client_id])]
    return tf.data.Dataset.from_tensor_slices({k: np.stack([r[k] for r in rows]) for k in rows[0]})

  tff.simulation.datasets.save_to_sql_client_data(sorted(clients), dataset_fn, str(path))


def _image_element(client_id, i, shape=(8, 8, 3)):
  rng = np.random.default_rng([int(client_id[1:]), i])
  return {
    'image': rng.integers(0, 256, size=shape, dtype=np.uint8),
    'label': np.int64((int(client_id[1:]) + i) % 4),
  }


def _write_dir(directory, train_clients=None, shape=(8, 8, 3)):
  directory.mkdir(parents=True, exist_ok=True)
  train_clients = train_clients or {'c0': 12, 'c1': 9, 'c2': 15, 'c3': 10}
  element = lambda c, i: _image_element(c, i, shape)  # pylint: disable=unnecessary-lambda-assignment
  _write(directory / user_data.TRAIN_FILE, train_clients, element)
  _write(directory / user_data.TEST_FILE, {'c7': 6, 'c8': 5}, element)
  return directory


def test_reads_the_clients_as_written(tmp_path):
  d = _write_dir(tmp_path / 'data')
  dataset, partitions, ids = user_data.load_sql_client_data(str(d), 3)
  assert ids == ['c0', 'c1', 'c2']
  assert [len(p) for p in partitions] == [12, 9, 15]
  assert dataset.input_shape == (8, 8, 3) and dataset.train_images.dtype == np.uint8
  assert dataset.num_classes == 4 and len(dataset.test_labels) == 11
  # Client c1's examples in the order they were written.
  x = dataset.train_images[partitions[1]]
  np.testing.assert_array_equal(x[4], _image_element('c1', 4)['image'])
  assert dataset.train_labels[partitions[1]].tolist() == [(1 + i) % 4 for i in range(9)]


def test_grey_square_images_and_an_explicit_shape(tmp_path):
  d = _write_dir(tmp_path / 'grey', shape=(6, 6, 1))
  assert user_data.element_spec(str(d / user_data.TRAIN_FILE))['image'].shape == (6, 6, 1)
  path = tmp_path / 'wide.sqlite'
  _write(
    path,
    {'c0': 2},
    lambda c, i: dict(_image_element(c, i, (4, 6, 3)), image_shape=np.array([4, 6, 3], np.int64)),
  )
  assert user_data.element_spec(str(path))['image'].shape == (4, 6, 3)


def _one_line_error(fn, *parts):
  with pytest.raises(data_lib.DataError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg, msg
  for part in parts:
    assert part in msg, msg
  return msg


def test_one_line_errors(tmp_path):
  d = tmp_path / 'data'
  d.mkdir()
  _one_line_error(
    lambda: user_data.load_sql_client_data(str(d), 2), str(d / user_data.TRAIN_FILE), 'missing file'
  )
  (d / user_data.TRAIN_FILE).write_bytes(b'not a database at all, just bytes' * 50)
  _one_line_error(
    lambda: user_data.load_sql_client_data(str(d), 2),
    str(d / user_data.TRAIN_FILE),
    'not TFF SQL client data',
  )
  wrong = tmp_path / 'wrong.sqlite'
  _write(
    wrong, {'c0': 2}, lambda c, i: {'pixels': np.zeros((4, 4, 3), np.uint8), 'label': np.int64(0)}
  )
  _one_line_error(lambda: user_data.element_spec(str(wrong)), "no 'image' feature", 'pixels')
  floats = tmp_path / 'floats.sqlite'
  _write(
    floats, {'c0': 2}, lambda c, i: {'image': np.zeros((4, 4, 3), np.float32), 'label': np.int64(0)}
  )
  _one_line_error(lambda: user_data.element_spec(str(floats)), 'integer pixel values')
  odd = tmp_path / 'odd.sqlite'
  _write(
    odd, {'c0': 2}, lambda c, i: {'image': np.zeros((5, 7, 3), np.uint8), 'label': np.int64(0)}
  )
  _one_line_error(lambda: user_data.element_spec(str(odd)), 'cannot infer the shape')
  good = _write_dir(tmp_path / 'good')
  _one_line_error(
    lambda: user_data.load_sql_client_data(str(good), 5), '4 clients, fewer than the 5 asked for'
  )


def _cli(args, timeout=300):
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  return subprocess.run(
    [sys.executable, '-m', 'tff_programs.train'] + list(args),
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_own_client_data_trains_two_rounds_through_the_command_line(tmp_path):
  d = _write_dir(tmp_path / 'data')
  good_test = (d / user_data.TEST_FILE).read_bytes()
  (d / user_data.TEST_FILE).write_bytes(good_test[:200])  # a truncated database
  root = tmp_path / 'run'
  args = [
    f'--root_dir={root}',
    '--dataset=client_data',
    f'--data_dir={d}',
    '--rounds=2',
    '--num_clients=4',
    '--clients_per_round=2',
    '--batch_size=8',
    '--eval_batch_size=8',
  ]
  proc = _cli(args)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('train: error: '), proc.stderr
  assert str(d / user_data.TEST_FILE) in lines[0]
  assert not [n for n in program_io.RUN_ENTRIES if (root / n).exists()]
  (d / user_data.TEST_FILE).write_bytes(good_test)
  proc = _cli(args)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'data: client_data 46 train / 11 test, 4 classes, 4 clients' in proc.stdout
  assert 'round 2/2' in proc.stdout
  summary = json.loads((root / 'summary.json').read_text())
  assert summary['dataset'] == 'client_data' and summary['rounds_completed'] == 2
  model_cfg = json.loads((root / 'final_model' / 'model_config.json').read_text())
  assert model_cfg['input_shape'] == [8, 8, 3] and model_cfg['num_classes'] == 4
