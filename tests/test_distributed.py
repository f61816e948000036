"""Rounds on two TFF worker services (`python -m tff_programs.worker`) match the local context."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from tff_programs import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def two_workers():
  """Two worker programs on 127.0.0.1, ended (and checked ended) after the module's tests."""
  ports = [portpicker.pick_unused_port() for _ in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, '-m', 'tff_programs.worker', f'--port={p}'],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
    )
    for p in ports
  ]
  try:
    binaries = []
    for proc in procs:
      line = proc.stdout.readline()
      assert 'listening on' in line, proc.stderr.read() if proc.poll() is not None else line
      binaries.append(int(line.split('pid ')[1].split()[0]))
    yield [f'127.0.0.1:{p}' for p in ports], binaries
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
      proc.communicate(timeout=30)
  for pid in binaries:
    deadline = time.monotonic() + 10
    while os.path.exists(f'/proc/{pid}') and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not os.path.exists(f'/proc/{pid}'), f'worker binary {pid} outlived its worker program'


def _fedavg_rounds(num_rounds=2):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  def model_fn():
    keras_model = tf.keras.Sequential(
      [
        tf.keras.layers.Input((6,)),
        tf.keras.layers.Dense(3, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1)),
      ]
    )
    return tff.learning.models.from_keras_model(
      keras_model,
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=(tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None], tf.int32)),
    )

  process = tff.learning.algorithms.build_weighted_fed_avg(
    model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1)
  )
  rng = np.random.default_rng(3)
  clients = [
    tf.data.Dataset.from_tensor_slices(
      (
        rng.normal(size=(10 + i, 6)).astype(np.float32),
        rng.integers(0, 3, size=10 + i).astype(np.int32),
      )
    ).batch(4)
    for i in range(5)
  ]
  state = process.initialize()
  losses = []
  for _ in range(num_rounds):
    out = process.next(state, clients)
    state = out.state
    losses.append(float(out.metrics['client_work']['train']['loss']))
  weights = process.get_model_weights(state).trainable
  return losses, [np.asarray(w) for w in weights]


def test_two_workers_match_local_context(two_workers, tff_runtime):
  targets, _ = two_workers
  local_losses, local_weights = _fedavg_rounds()
  with runtime.RemoteRuntime(targets):
    remote_losses, remote_weights = _fedavg_rounds()
  np.testing.assert_allclose(remote_losses, local_losses, rtol=1e-5)
  for a, b in zip(remote_weights, local_weights):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert tff_runtime.worker.alive()  # the session's local context is back in place


def test_unreachable_worker_fails_fast_with_its_name():
  port = portpicker.pick_unused_port()
  start = time.monotonic()
  with pytest.raises(runtime.WorkerError, match=f'127.0.0.1:{port}'):
    runtime.RemoteRuntime([f'127.0.0.1:{port}'], connect_timeout_s=3).start()
  assert time.monotonic() - start < 10


@pytest.mark.parametrize('spec', ['', 'host', 'host:0', 'host:70000', 'a:1,a:1', ':80'])
def test_bad_worker_addresses_are_refused(spec):
  with pytest.raises(ValueError):
    runtime.parse_workers(spec)


def test_worker_program_refuses_out_of_range_port():
  proc = subprocess.run(
    [sys.executable, '-m', 'tff_programs.worker', '--port=0'],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=60,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == 'worker: --port=0 is out of range 1..65535'


TINY = [
  '--rounds=3',
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


def _train(root_dir, extra=()):
  proc = subprocess.run(
    [sys.executable, '-m', 'tff_programs.train', f'--root_dir={root_dir}'] + TINY + list(extra),
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  from tff_programs import program_io  # pylint: disable=g-import-not-at-top
  from fedmef_tf import model_io  # pylint: disable=g-import-not-at-top

  rows = program_io.read_metrics(root_dir)
  model, _ = model_io.load_model(os.path.join(root_dir, program_io.FINAL_MODEL_DIR))
  return rows, [np.asarray(w) for w in model.get_weights()]


def test_training_program_on_two_workers_matches_local_run(two_workers, tmp_path):
  targets, _ = two_workers
  local_rows, local_weights = _train(str(tmp_path / 'local'))
  remote_rows, remote_weights = _train(str(tmp_path / 'remote'), [f'--workers={",".join(targets)}'])
  assert len(remote_rows) == len(local_rows) == 3
  for a, b in zip(remote_rows, local_rows):
    for key in (
      'train_loss',
      'train_accuracy',
      'test_accuracy',
      'density',
      'bytes_down',
      'bytes_up',
      'clients_used',
    ):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
  assert len(remote_weights) == len(local_weights)
  for a, b in zip(remote_weights, local_weights):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_training_program_names_an_unreachable_worker(tmp_path):
  port = portpicker.pick_unused_port()
  start = time.monotonic()
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'tff_programs.train',
      f'--root_dir={tmp_path / "run"}',
      f'--workers=127.0.0.1:{port}',
    ]
    + TINY,
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last == f'train: error: TFF worker at 127.0.0.1:{port} not reachable within 15s'
  assert time.monotonic() - start < 120
