"""Specification tests of `tff_programs.training_loop`, the algorithm catalogue and the formatters.

* the algorithm catalogue (`fedmef_tf.algorithms`): each algorithm's parts, as the paper's
  ablations define them, and the one lookup error;
* `RunConfig`: one field per flag of the training program, and `config.json`'s content;
* the row, console line and report line of a round and of a finished run, from known numbers;
* the evaluation of a global model: loss and accuracy equal to a hand computation;
* `fedmef_tf.text.format_bytes` / `format_seconds` and `fedmef_tf.losses`.
"""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import algorithms
from fedmef_tf import losses
from fedmef_tf import server
from fedmef_tf import text
from tff_programs import cli
from tff_programs import train
from tff_programs import training_loop


# ------------------------------------------------------------------------------------------------
# The catalogue.


def test_catalogue_parts_follow_the_ablations():
  fedmef = algorithms.get('fedmef')
  assert (fedmef.variant, fedmef.uses_sap, fedmef.uses_bae) == ('fedmef', True, True)
  # Each ablation removes exactly one part of FedMef.
  no_bae = algorithms.get('fedmef_no_bae')
  no_sap = algorithms.get('fedmef_no_sap')
  assert dataclasses.replace(
    no_bae, name='fedmef', uses_bae=True, summary=''
  ) == dataclasses.replace(fedmef, summary='')
  assert dataclasses.replace(
    no_sap, name='fedmef', uses_sap=True, summary=''
  ) == dataclasses.replace(fedmef, summary='')
  for name in ('rigl', 'feddst', 'static', 'tfmot', 'fedavg'):
    entry = algorithms.get(name)
    assert entry.variant == 'baseline' and not entry.uses_sap and not entry.uses_bae, name
  assert [a for a in algorithms.NAMES if algorithms.get(a).starts_dense] == ['tfmot', 'fedavg']
  assert [a for a in algorithms.NAMES if algorithms.get(a).dense] == ['fedavg']
  assert not algorithms.get('static').adjusts_mask
  assert {algorithms.get(a).mode for a in algorithms.NAMES} == set(server.MODES)
  assert len(set(algorithms.NAMES)) == len(algorithms.NAMES) == 8


def test_catalogue_arguments_with_and_without_the_parts():
  fedmef, rigl = algorithms.get('fedmef'), algorithms.get('rigl')
  assert fedmef.sap_gamma(0.7) == 0.7 and rigl.sap_gamma(0.7) == 0.0
  assert algorithms.get('fedmef_no_sap').sap_gamma(0.5) == 0.0
  assert fedmef.bae_lambda(0.01) == 0.01 and algorithms.get('fedmef_no_bae').bae_lambda(0.01) == 0
  assert algorithms.get('static').adjustment_fraction(0.2) == 0.0
  assert rigl.adjustment_fraction(0.2) == 0.2
  assert algorithms.get('tfmot').initial_density(0.1) == 1.0
  assert algorithms.get('tfmot').target_density(0.1) == 0.1
  assert algorithms.get('fedavg').target_density(0.1) == 1.0
  assert rigl.initial_density(0.1) == 0.1


def test_unknown_algorithm_is_one_value_error():
  with pytest.raises(ValueError, match="one of .*'fedmef'.*got 'fedprox'"):
    algorithms.get('fedprox')
  with pytest.raises(ValueError):
    algorithms.get(None)


def test_model_spec_reads_the_catalogue():
  for name in algorithms.NAMES:
    entry = algorithms.get(name)
    spec = training_loop.model_spec(name, 0.25, 0.6)
    assert spec['variant'] == entry.variant
    assert spec['gamma'] == (0.6 if entry.uses_sap else 0.0)
    assert spec['density'] == (1.0 if entry.dense else 0.25)


# ------------------------------------------------------------------------------------------------
# The run configuration.


def _default_values():
  train.FLAGS.unparse_flags()
  train.FLAGS(['train'])
  return cli.resolve_defaults(train.FLAGS.flag_values_dict())


def test_run_config_has_one_field_per_training_flag():
  flag_names = sorted(f.name for f in train.FLAGS.get_flags_for_module(train))
  assert sorted(training_loop.RunConfig.field_names()) == flag_names


def test_run_config_is_frozen_and_result_config_is_sorted_without_run_only_fields():
  config = training_loop.RunConfig.from_values(_default_values())
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.rounds = 3  # type: ignore[misc]
  result = config.result_config()
  assert list(result) == sorted(result)
  assert not set(result) & set(training_loop.RunConfig.NOT_IN_RESULT)
  assert len(result) == len(training_loop.RunConfig.field_names()) - 6
  assert (result['delta_t'], result['t_end'], result['eval_every']) == (1, 24, 5)  # R = 40
  iid = dataclasses.replace(config, iid=True).result_config()
  assert iid['dirichlet_alpha'] is None and iid['min_client_size'] is None
  assert train.run_config(_default_values()) == result


def test_run_config_without_a_derived_value_is_refused():
  values = dict(_default_values(), t_end=None)
  with pytest.raises(ValueError, match='without t_end'):
    training_loop.RunConfig.from_values(values)


# ------------------------------------------------------------------------------------------------
# Rows and lines.


def _metrics(**overrides):
  m = {
    'train_loss': np.float32(1.25),
    'train_accuracy': np.float32(0.5),
    'global_density': np.float32(0.2),
    'bytes_down': np.int64(3 * 2**20),
    'bytes_up': np.int64(1536),
    'clients_used': np.int32(2),
    'clients_rejected': np.int32(0),
    'adjusted': np.int32(1),
    'learning_rate': np.float32(0.1),
  }
  m.update(overrides)
  return m


def test_round_row_from_nested_metrics():
  nested = {'client_work': {'train': _metrics()}, 'other': 3}
  row = training_loop.round_row(training_loop.pick_metrics(nested), 0.75, 0.625, 2.5)
  assert list(row) == [
    'train_loss',
    'train_accuracy',
    'test_loss',
    'test_accuracy',
    'density',
    'bytes_down',
    'bytes_up',
    'round_seconds',
    'clients_used',
    'clients_rejected',
    'adjusted',
    'learning_rate',
  ]
  assert row['train_loss'] == 1.25 and row['bytes_down'] == 3 * 2**20
  assert row['test_accuracy'] == 0.625 and row['round_seconds'] == 2.5
  assert row['density'] == pytest.approx(0.2)


def test_round_row_of_a_clientless_round_has_no_training_loss():
  row = training_loop.round_row(_metrics(clients_used=np.int32(0)), math.nan, math.nan, 1.0)
  assert math.isnan(row['train_loss']) and math.isnan(row['train_accuracy'])
  missing = training_loop.round_row({}, math.nan, math.nan, 1.0)
  assert missing['bytes_down'] == 0.0 and missing['adjusted'] == 0.0
  assert math.isnan(missing['clients_used'])


def test_round_line_numbers():
  row = training_loop.round_row(_metrics(), 0.75, 0.625, 2.5)
  line = training_loop.round_line(7, 40, row, True, math.nan, 2, 125.0)
  assert line == (
    'round  7/40  loss 1.250  test acc 0.625  density 0.200  down 3.0 MiB  '
    'up 1.5 KiB  clients 2/2  adjusted  2.5s  ETA 2m05s'
  )
  stale = training_loop.round_line(8, 40, dict(row, adjusted=0.0), False, 0.5, 3, 7.0)
  assert 'test acc 0.500*' in stale and 'adjusted' not in stale and 'clients 2/3' in stale
  first = training_loop.round_line(1, 40, row, False, math.nan, 2, 0.0)
  assert 'test acc   -  ' in first and first.endswith('ETA 0s')


def test_done_line_numbers():
  summary = {
    'rounds_completed': 3,
    'final_accuracy': 0.12345,
    'density': 0.3,
    'traffic': {'down_bytes': 2048, 'up_bytes': 100},
    'train_seconds': 3725.0,
    'memory': {'batch_size': 16, 'analytic_bytes': 5 * 2**20, 'measured_peak_bytes': None},
  }
  line = training_loop.done_line(summary, 'runs/x')
  assert line == (
    'done: 3 rounds, test accuracy 0.1235, density 0.3000, traffic down 2.0 KiB '
    'up 100 B, training 1h02m; memory of a training step (batch 16): analytic '
    '5.0 MiB, measured peak unavailable; report in runs/x/summary.json'
  )


def test_sampling_and_shuffle_seeds_are_functions_of_their_arguments():
  assert training_loop.sample_clients(1, 1, 5, 5) == [0, 1, 2, 3, 4]
  a = training_loop.sample_clients(3, 9, 50, 7)
  assert a == training_loop.sample_clients(3, 9, 50, 7) and len(set(a)) == 7 and a == sorted(a)
  assert 0 <= training_loop.shuffle_seed(1, 2, 3) <= 2**31 - 1
  assert training_loop.shuffle_seed(1, 2, 3) != training_loop.shuffle_seed(1, 2, 4)


# ------------------------------------------------------------------------------------------------
# Evaluation.


class _FixedWeights:
  """A stand-in learning process whose global model is a fixed weight list."""

  def __init__(self, trainable, non_trainable):
    self.weights = (trainable, non_trainable)

  def get_model_weights(self, state):
    del state
    return self.weights


def test_evaluator_loss_and_accuracy_equal_a_hand_computation():
  inputs = tf.keras.Input((2,))
  model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, use_bias=False)(inputs))
  kernel = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]], np.float32)
  x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], np.float32)
  y = np.array([0, 1, 1, 2, 1], np.int32)  # the last example is misclassified
  test_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)  # batches of 2, 2, 1
  evaluator = training_loop.Evaluator(_FixedWeights([kernel], []), model, test_ds)
  evaluator.load(state=None)
  np.testing.assert_array_equal(model.get_weights()[0], kernel)
  loss, accuracy = evaluator.evaluate()
  logits = x @ kernel
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want_loss = float(-log_softmax[np.arange(5), y].mean())
  want_accuracy = float((logits.argmax(-1) == y).mean())
  assert loss == pytest.approx(want_loss, rel=1e-6)
  assert accuracy == want_accuracy == 0.8


def test_losses_equal_the_cross_entropy_formula():
  logits = tf.constant([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = tf.constant([0, 1])
  p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(-1, keepdims=True)
  want = -np.log(p[[0, 1], [0, 1]])
  np.testing.assert_allclose(losses.example_losses(labels, logits).numpy(), want, rtol=1e-6)
  assert float(losses.mean_loss(labels, logits)) == pytest.approx(want.mean(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Formatters.


def test_format_bytes_units_and_edges():
  assert text.format_bytes(0) == '0 B'
  assert text.format_bytes(1023) == '1023 B'
  assert text.format_bytes(1024) == '1.0 KiB'
  assert text.format_bytes(1536) == '1.5 KiB'
  assert text.format_bytes(5 * 2**20) == '5.0 MiB'
  assert text.format_bytes(3 * 2**30, precision=2) == '3.00 GiB'
  assert text.format_bytes(2**19, 'MiB', 2) == '0.50 MiB'
  assert text.format_bytes(None) == '-' and text.format_bytes(float('nan')) == '-'
  with pytest.raises(ValueError, match='unit'):
    text.format_bytes(1, 'MB')


def test_format_seconds():
  assert [text.format_seconds(s) for s in (-1, 0.4, 59.6, 61, 3599, 3600, 7384)] == [
    '0s',
    '0s',
    '1m00s',
    '1m01s',
    '59m59s',
    '1h00m',
    '2h03m',
  ]


def test_library_messages_name_settings_as_their_caller_asks():
  from tff_programs import program_io  # pylint: disable=import-outside-toplevel

  assert (
    text.KEYWORDS.setting('rounds', 40) == 'rounds=40' and text.KEYWORDS.name('t_end') == 't_end'
  )
  assert text.FLAGS.setting('rounds', 40) == '--rounds=40' and text.FLAGS.name('t_end') == '--t_end'
  assert (
    program_io.ClientlessRounds(warn_after=1).record(1, 0).endswith('a lower client_lr may help')
  )
  assert (
    program_io.ClientlessRounds(warn_after=1, names=text.FLAGS)
    .record(1, 0)
    .endswith('a lower --client_lr may help')
  )
  full = OSError(28, 'No space left on device')
  assert '--' not in program_io.disk_full_message(full, 'runs/x')
  assert 'copy --root_dir=runs/x to a larger one' in program_io.disk_full_message(
    full, 'runs/x', names=text.FLAGS
  )
