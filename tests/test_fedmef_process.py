"""Execution and type tests of tff_programs.fedmef_process (small CNN, tiny data, few rounds)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedmef_tf import bae
from tff_programs import fedmef_process

INPUT_SHAPE = (8, 8, 3)
NUM_CLASSES = 3


def _dataset(n, seed, nan=False):
  """Learnable toy images: the label is the channel with the largest mean, plus noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  x = rng.normal(size=(n,) + INPUT_SHAPE).astype(np.float32) * 0.5
  x[np.arange(n), :, :, y] += 1.0
  if nan and n:
    x[0, 0, 0, 0] = np.nan
  return tf.data.Dataset.from_tensor_slices((x, y))


def _clients(sizes=(24, 16, 32), seed=0):
  return [_dataset(n, seed + i) for i, n in enumerate(sizes)]


def _model_fn(algorithm, gamma=0.5):
  return fedmef_process.make_model_fn(
    'cnn', algorithm, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE, gamma=gamma, seed=1
  )


def _process(algorithm='fedmef', **overrides):
  kwargs = dict(
    algorithm=algorithm,
    density=0.3,
    delta_t=2,
    t_end=5,
    alpha=0.3,
    lambda_bae=0.01,
    gamma=0.5,
    client_lr=0.1,
    client_lr_min=0.05,
    total_rounds=10,
    local_epochs=1,
    batch_size=8,
    seed=3,
  )
  kwargs.update(overrides)
  return fedmef_process.build_fedmef_process(_model_fn(algorithm, kwargs['gamma']), **kwargs)


def _layout(algorithm='fedmef'):
  from fedmef_tf import client  # pylint: disable=import-outside-toplevel

  return client.WeightLayout(_model_fn(algorithm)())


@pytest.fixture(scope='module')
def fedmef_process_(tff_runtime):
  del tff_runtime
  return _process('fedmef')


def test_model_variant_for():
  assert fedmef_process.model_variant_for('fedmef') == 'fedmef'
  assert fedmef_process.model_variant_for('fedmef_no_sap') == 'fedmef'
  assert fedmef_process.model_variant_for('rigl') == 'baseline'
  assert fedmef_process.model_variant_for('fedavg') == 'baseline'
  assert fedmef_process.sap_gamma_for('fedmef_no_sap', 0.7) == 0.0
  with pytest.raises(ValueError):
    fedmef_process.model_variant_for('fedprox')


@pytest.mark.parametrize(
  'name,value',
  [
    ('density', 0.0),
    ('density', 1.5),
    ('delta_t', 0),
    ('alpha', -0.1),
    ('lambda_bae', -1.0),
    ('gamma', 1.2),
    ('client_lr', 0.0),
    ('client_lr_min', 0.5),
    ('local_epochs', 0),
    ('batch_size', 2.5),
    ('algorithm', 'fedprox'),
    ('total_rounds', True),
  ],
)
def test_builder_validates_arguments(name, value):
  with pytest.raises(ValueError):
    _process(**{name: value})


def test_builder_rejects_model_with_wrong_sap_gamma():
  with pytest.raises(ValueError, match='SAP gamma'):
    fedmef_process.build_fedmef_process(
      _model_fn('fedmef', 0.5), algorithm='fedmef_no_sap', gamma=0.5
    )


def test_next_type_signature(fedmef_process_):
  next_type = fedmef_process_.next.type_signature
  state_type, data_type = next_type.parameter
  assert state_type.placement is tff.SERVER
  assert data_type.placement is tff.CLIENTS
  assert isinstance(data_type.member, tff.SequenceType)
  assert next_type.result.state.placement is tff.SERVER
  assert next_type.result.metrics.placement is tff.SERVER
  assert state_type.member.is_equivalent_to(next_type.result.state.member)
  metric_names = [name for name, _ in tff.structure.iter_elements(next_type.result.metrics.member)]
  assert metric_names == [
    'round_num',
    'round_skipped',
    'learning_rate',
    'train_loss',
    'train_accuracy',
    'num_examples',
    'global_density',
    'layer_nnz',
    'k',
    'adjusted',
    'marked_overlap',
    'bytes_down',
    'bytes_up',
    'clients_used',
    'clients_rejected',
    'clients_empty',
  ]
  assert fedmef_process_.initialize.type_signature.result.member.is_equivalent_to(state_type.member)


def test_rounds_with_adjustments_keep_sparsity_invariants(fedmef_process_):
  layout = _layout()
  state = fedmef_process_.initialize()
  clients = _clients()
  nnz0 = [int(state.non_trainable[i].sum()) for i in layout.mask_indices]
  adjusted_rounds = []
  for _ in range(6):
    old = state
    output = fedmef_process_.next(state, clients)
    state, metrics = output.state, output.metrics
    t = int(metrics['round_num'])
    assert int(state.round_num) == t
    np.testing.assert_array_equal(metrics['layer_nnz'], nnz0)
    assert metrics['global_density'] == pytest.approx(sum(nnz0) / sum(layout.kernel_sizes))
    for l in range(layout.num_layers):
      old_mask = old.non_trainable[layout.mask_indices[l]]
      new_mask = state.non_trainable[layout.mask_indices[l]]
      kernel = state.trainable[layout.kernel_indices[l]]
      assert int(new_mask.sum()) == nnz0[l]
      assert np.all(kernel[new_mask == 0] == 0)
      assert np.all(state.non_trainable[layout.marked_indices[l]] == 0)
      pruned = (old_mask > 0) & (new_mask == 0)
      grown = (old_mask == 0) & (new_mask > 0)
      if metrics['adjusted']:
        marked = bae.marked_set(
          old.trainable[layout.kernel_indices[l]], old_mask, metrics['k'][l]
        ).numpy()
        np.testing.assert_array_equal(pruned, marked > 0)
        assert grown.sum() == pruned.sum() == metrics['k'][l]
        assert not np.any(grown & pruned)
        assert np.all(kernel[grown] == 0)
      else:
        assert not pruned.any() and not grown.any()
    if metrics['adjusted']:
      adjusted_rounds.append(t)
      assert 0.0 <= metrics['marked_overlap'] <= 1.0
    assert metrics['clients_used'] == 3 and metrics['clients_rejected'] == 0
  # Rounds 2 and 4 adjust; round 6 > T_end = 5 does not.
  assert adjusted_rounds == [2, 4]


def test_poisoned_and_empty_clients_do_not_change_the_aggregate(fedmef_process_):
  state = fedmef_process_.initialize()
  clients = _clients()
  clean = fedmef_process_.next(state, clients)
  dirty = fedmef_process_.next(state, clients + [_dataset(16, 9, nan=True), _dataset(0, 10)])
  for a, b in zip(tf.nest.flatten(clean.state), tf.nest.flatten(dirty.state)):
    np.testing.assert_array_equal(a, b)
  assert dirty.metrics['clients_rejected'] == 1
  assert dirty.metrics['clients_empty'] == 1
  assert dirty.metrics['clients_used'] == 3
  # No usable client: the state is kept and the round says so.
  none = fedmef_process_.next(state, [_dataset(16, 9, nan=True), _dataset(0, 10)])
  assert none.metrics['round_skipped'] == 1
  for a, b in zip(tf.nest.flatten(state), tf.nest.flatten(none.state)):
    np.testing.assert_array_equal(a, b)


def test_model_weights_round_trip(fedmef_process_):
  state = fedmef_process_.initialize()
  weights = fedmef_process_.get_model_weights(state)
  assert isinstance(weights, tff.learning.models.ModelWeights)
  state2 = fedmef_process_.set_model_weights(state, weights)
  for a, b in zip(tf.nest.flatten(state.trainable), tf.nest.flatten(state2.trainable)):
    np.testing.assert_array_equal(a, b)


def test_dense_round_equals_tff_weighted_fed_avg(tff_runtime):
  del tff_runtime
  keras_fn = fedmef_process.make_model_fn(
    'cnn', 'fedmef_no_bae', num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE, gamma=0.0, seed=1
  )
  process = fedmef_process.build_fedmef_process(
    keras_fn,
    algorithm='fedmef_no_bae',
    density=1.0,
    gamma=0.0,
    client_lr=0.1,
    client_lr_min=0.1,
    total_rounds=5,
    local_epochs=1,
    batch_size=8,
    delta_t=1,
    t_end=5,
  )
  element_spec = (
    tf.TensorSpec([None] + list(INPUT_SHAPE), tf.float32),
    tf.TensorSpec([None], tf.int32),
  )

  def tff_model_fn():
    return tff.learning.models.from_keras_model(
      keras_fn(),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=element_spec,
    )

  fed_avg = tff.learning.algorithms.build_weighted_fed_avg(
    tff_model_fn,
    client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
    server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
  )
  state = process.initialize()
  reference = fed_avg.set_model_weights(fed_avg.initialize(), process.get_model_weights(state))
  clients = _clients((20, 13, 32))
  ours = process.next(state, clients)
  theirs = fed_avg.next(reference, [ds.batch(8) for ds in clients])
  assert ours.metrics['adjusted'] == 0
  ours_w = process.get_model_weights(ours.state)
  theirs_w = fed_avg.get_model_weights(theirs.state)
  for a, b in zip(ours_w.trainable, theirs_w.trainable):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert ours.metrics['train_loss'] == pytest.approx(
    theirs.metrics['client_work']['train']['loss'], rel=1e-4
  )


@pytest.mark.parametrize('algorithm', fedmef_process.ALGORITHMS)
def test_loss_falls(tff_runtime, algorithm):
  del tff_runtime
  process = _process(algorithm, density=0.5, t_end=4)
  state = process.initialize()
  clients = _clients()
  losses = []
  for _ in range(5):
    output = process.next(state, clients)
    state = output.state
    losses.append(float(output.metrics['train_loss']))
    assert np.isfinite(losses[-1])
  assert losses[-1] < losses[0], losses
  if algorithm in ('fedavg',):
    assert output.metrics['global_density'] == 1.0
  else:
    assert output.metrics['global_density'] == pytest.approx(0.5, abs=0.01)


def _shuffled_clients():
  """`_clients()` as the training program feeds them: shuffled with a seed, reshuffled on each
  iteration (the client update iterates its dataset more than once in an adjustment round)."""
  return [
    ds.shuffle(64, seed=10 + i, reshuffle_each_iteration=True) for i, ds in enumerate(_clients())
  ]


def _round_bits(process, state):
  output = process.next(state, _shuffled_clients())
  return [np.asarray(a).tobytes() for a in tf.nest.flatten((output.state, output.metrics))]


def test_a_rigl_round_is_bitwise_repeatable_in_the_worker_and_in_a_fresh_one(tff_runtime):
  """Same state and client data: the same bits, again in the same worker and in a new worker
  process. rigl trains the BatchNorm model (oneDNN batch norm kernels in the worker, moving
  statistics aggregated), the path FedMef's BatchNorm-free model does not take; round 1 adjusts
  the mask, so the clients' top-k gradients and the server's prune/grow run too."""
  from tff_programs import runtime  # pylint: disable=import-outside-toplevel

  del tff_runtime
  process = _process('rigl', delta_t=1, t_end=2)
  state = process.initialize()
  first = _round_bits(process, state)
  assert _round_bits(process, state) == first
  with runtime.LocalRuntime(verbose=False):
    assert _round_bits(process, state) == first


def test_sample_clients_is_repeatable_and_distinct():
  a = fedmef_process.sample_clients(100, 10, 7, seed=1)
  b = fedmef_process.sample_clients(100, 10, 7, seed=1)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
  assert not np.array_equal(a, fedmef_process.sample_clients(100, 10, 8, seed=1))
  with pytest.raises(ValueError):
    fedmef_process.sample_clients(5, 6, 1)
