"""Plain-TF tests of fedmef_tf.client and fedmef_tf.server (no TFF): one round by hand."""

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import bae
from fedmef_tf import client
from fedmef_tf import execution
from fedmef_tf import masks
from fedmef_tf import server
from fedmef_tf import sparse_layers


def _mlp(seed=0, density=0.5):
  tf.keras.utils.set_random_seed(seed)
  inp = tf.keras.Input((6,))
  h = sparse_layers.MaskedDense(16, activation='relu', name='d1')(inp)
  out = sparse_layers.MaskedDense(3, name='d2')(h)
  model = tf.keras.Model(inp, out)
  masks.init_sparse(model, density, seed)
  return model


def _data(n, seed=0, nan=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
  if nan:
    x[0, 0] = np.nan
  return tf.data.Dataset.from_tensor_slices((x, y))


def _state(model, round_num=0):
  return server.ServerState(
    round_num=tf.constant(round_num, tf.int32),
    trainable=[tf.identity(v) for v in model.trainable_weights],
    non_trainable=[tf.identity(v) for v in model.non_trainable_weights],
    mask_changed=tf.constant(True),
  )


def _cfg(mode='server_adjust', alpha=0.2, density=0.5):
  return server.ScheduleConfig(
    mode=mode,
    delta_t=2,
    t_end=6,
    alpha=alpha,
    eta_0=0.1,
    eta_min=0.01,
    total_rounds=10,
    density=density,
  )


def _update_fn(model, **overrides):
  kwargs = dict(
    local_epochs=2,
    batch_size=8,
    eta_0=0.1,
    lambda_bae=0.01,
    use_bae=True,
    server_adjust=True,
    client_regrow=False,
  )
  kwargs.update(overrides)
  return client.build_client_update(model, client.WeightLayout(model), **kwargs)


def _sum(outputs):
  return tf.nest.map_structure(lambda *xs: tf.add_n(list(xs)), *outputs)


def test_layout_indices():
  model = _mlp()
  layout = client.WeightLayout(model)
  assert layout.num_layers == 2
  assert layout.kernel_shapes == [(6, 16), (16, 3)]
  for l, layer in enumerate(masks.prunable_layers(model)):
    assert model.trainable_weights[layout.kernel_indices[l]] is layer.kernel
    assert model.non_trainable_weights[layout.mask_indices[l]] is layer.mask
  assert layout.stat_indices == []
  assert layout.dense_param_count == 16 + 3  # the biases
  assert layout.mask_bytes() == (96 + 7) // 8 + (48 + 7) // 8


def test_plain_round_is_masked_sgd():
  model = _mlp()
  state = _state(model)
  cfg = _cfg()
  rc = server.round_config(state, client.WeightLayout(model), cfg)
  assert not bool(rc.adjust)
  np.testing.assert_allclose(float(rc.learning_rate), 0.1)
  out = _update_fn(model, local_epochs=1, batch_size=5)(
    _data(10), state.trainable, state.non_trainable, rc
  )
  # The same two steps by hand, on a fresh copy of the model.
  ref = _mlp()
  x, y = next(iter(_data(10).batch(10)))
  for start in (0, 5):
    with tf.GradientTape() as tape:
      loss = client.default_loss_fn(y[start : start + 5], ref(x[start : start + 5], training=True))
    for v, g in zip(ref.trainable_weights, tape.gradient(loss, ref.trainable_weights)):
      v.assign_sub(0.1 * g)
  assert float(out.weight) == 10.0
  for got, want in zip(out.weighted_trainable, ref.trainable_weights):
    np.testing.assert_allclose(got.numpy() / 10.0, want.numpy(), rtol=1e-5, atol=1e-6)
  for l, layer in enumerate(masks.prunable_layers(ref)):
    kernel = out.weighted_trainable[client.WeightLayout(ref).kernel_indices[l]].numpy()
    assert np.all(kernel[layer.mask.numpy() == 0] == 0)
  # No gradient pairs outside adjustment rounds.
  assert all(float(tf.reduce_sum(tf.abs(g))) == 0 for g in out.weighted_grads)
  assert int(out.metrics['num_examples']) == 10


class _PlainButReporting(execution.LayerKernels):
  """The plain kernel and op, reporting `variables` as updated inside the backward pass."""

  def __init__(self, variables):
    self.variables = list(variables)

  def apply(self, layer, inputs, op):
    return op(inputs, layer.effective_kernel())

  def updated_in_backward(self):
    return self.variables


@pytest.mark.parametrize('clipping', [None, 0.01])
def test_sgd_step_leaves_what_the_layer_kernels_updated_in_the_backward_pass(clipping):
  x, y = next(iter(_data(8).batch(8)))
  plain, reported = _mlp(), _mlp()
  d1 = reported.get_layer('d1')
  before = d1.kernel.numpy() + 0.5  # junk under the mask too, which the step must not mask
  d1.kernel.assign(before)
  plain.get_layer('d1').kernel.assign(before)
  layers = masks.prunable_layers(plain)
  loss_a, _ = client.sgd_step(plain, layers, x, y, 0.1, clipping=clipping)
  kernels = _PlainButReporting([d1.kernel])
  with execution.scope(execution.current().replace(layer_kernels=kernels)):
    loss_b, _ = client.sgd_step(
      reported, masks.prunable_layers(reported), x, y, 0.1, clipping=clipping
    )
  assert float(loss_a) == float(loss_b)
  np.testing.assert_array_equal(d1.kernel.numpy(), before)  # no update, no masking
  assert np.any(plain.get_layer('d1').kernel.numpy() != before)
  for a, b in zip(plain.trainable_weights, reported.trainable_weights):
    if b is not d1.kernel:  # every other variable took the plain step, bitwise
      np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=b.name)


def test_bae_shrinks_marked_weights_by_hand():
  """Task gradient 0: each step multiplies marked weights by (1 - 2 lambda mu_tau)."""
  model = _mlp(density=0.5)
  layout = client.WeightLayout(model)
  state = _state(model, round_num=1)  # round 2 adjusts (delta_t = 2)
  rc = server.round_config(state, layout, _cfg())
  assert bool(rc.adjust)
  lam, eta_0 = 0.5, 0.1

  def zero_task_loss(y_true, logits):
    del y_true
    return 0.0 * tf.reduce_sum(logits)

  update = _update_fn(
    model, local_epochs=1, batch_size=4, lambda_bae=lam, server_adjust=False, loss_fn=zero_task_loss
  )
  out = update(_data(12), state.trainable, state.non_trainable, rc)
  kernels = [state.trainable[i].numpy() for i in layout.kernel_indices]
  mask_list = [state.non_trainable[i].numpy() for i in layout.mask_indices]
  marked = [
    bae.marked_set(kk, m, kl).numpy() for kk, m, kl in zip(kernels, mask_list, rc.k.numpy())
  ]
  low = [kk * mk for kk, mk in zip(kernels, marked)]
  eta_t = float(rc.learning_rate)
  budget = 3  # 1 epoch * ceil(12 / 4)
  for tau in range(budget):
    norm = np.sqrt(sum(float(np.sum(w**2)) for w in low))
    mu = float(bae.bae_learning_rate(tau, budget, norm, eta_t, eta_0))
    low = [w * (1 - 2 * lam * mu) for w in low]
  for l, i in enumerate(layout.kernel_indices):
    got = out.weighted_trainable[i].numpy() / 12.0
    np.testing.assert_allclose(got[marked[l] > 0], low[l][marked[l] > 0], rtol=1e-5)
    unmarked = marked[l] == 0
    np.testing.assert_allclose(got[unmarked], kernels[l][unmarked], rtol=1e-6)


def test_adjustment_round_gradient_pairs_are_inactive_topk():
  model = _mlp()
  layout = client.WeightLayout(model)
  state = _state(model, round_num=1)
  rc = server.round_config(state, layout, _cfg())
  out = _update_fn(model)(_data(20), state.trainable, state.non_trainable, rc)
  for l, i in enumerate(layout.mask_indices):
    grad = out.weighted_grads[l].numpy()
    mask = state.non_trainable[i].numpy()
    assert np.count_nonzero(grad) <= int(rc.k[l])
    assert np.count_nonzero(grad) >= int(rc.k[l]) - 1  # an exact zero gradient is possible
    assert np.all(grad[mask > 0] == 0)
  # Uplink: nonzeros + biases, plus 2 numbers of 4 bytes per pair.
  nnz = sum(int(state.non_trainable[i].numpy().sum()) for i in layout.mask_indices)
  expected_up = 4 * (nnz + layout.dense_param_count) + 8 * int(tf.reduce_sum(rc.k))
  assert int(out.metrics['bytes_up']) == expected_up
  assert int(out.metrics['bytes_down']) == (
    4 * (nnz + layout.dense_param_count) + layout.mask_bytes()
  )


def test_examples_are_counted_when_the_cardinality_is_unknown():
  """n_k (the weight, the BaE budget) is the same whether tf.data knows the dataset's
  cardinality or the client counts the examples."""
  model = _mlp()
  state = _state(model, round_num=1)
  rc = server.round_config(state, client.WeightLayout(model), _cfg())
  assert bool(rc.adjust)  # BaE on: the learning rate of every step depends on n_k
  update = _update_fn(model)
  known = _data(21)
  unknown = known.filter(lambda x, y: True)
  assert int(known.cardinality()) == 21
  assert int(unknown.cardinality()) == int(tf.data.UNKNOWN_CARDINALITY)
  a = update(known, state.trainable, state.non_trainable, rc)
  b = update(unknown, state.trainable, state.non_trainable, rc)
  assert float(a.weight) == 21.0
  for s, t in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
    np.testing.assert_array_equal(s.numpy(), t.numpy())
  positives = known.filter(lambda x, y: y > 0)
  n = int(sum(int(y) > 0 for _, y in known))
  assert 0 < n < 21
  c = update(positives, state.trainable, state.non_trainable, rc)
  assert float(c.weight) == float(n)
  assert int(c.metrics['num_examples']) == 2 * n  # two local epochs


def test_client_iterates_without_autotune_and_gets_the_same_update():
  """The client turns tf.data's autotuning off (no model thread whose wake-up an iterator's
  destruction waits for in TFF's worker); a pipeline with AUTOTUNE parameters gives the same
  update as the plain one."""
  assert client.without_autotune(_data(5)).options().autotune.enabled is False
  model = _mlp()
  state = _state(model, round_num=1)
  rc = server.round_config(state, client.WeightLayout(model), _cfg())
  update = _update_fn(model)
  plain = _data(21)
  tuned = plain.map(lambda x, y: (x, y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(
    tf.data.AUTOTUNE
  )
  a = update(plain, state.trainable, state.non_trainable, rc)
  b = update(tuned, state.trainable, state.non_trainable, rc)
  for s, t in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
    np.testing.assert_array_equal(s.numpy(), t.numpy())


def test_nan_and_empty_clients_have_zero_weight():
  model = _mlp()
  state = _state(model, round_num=1)
  rc = server.round_config(state, client.WeightLayout(model), _cfg())
  update = _update_fn(model)
  bad = update(_data(16, nan=True), state.trainable, state.non_trainable, rc)
  assert float(bad.weight) == 0.0
  assert int(bad.metrics['rejected']) == 1 and int(bad.metrics['used']) == 0
  for t in tf.nest.flatten(bad):
    assert np.all(np.isfinite(t.numpy()))
  empty = update(_data(16).take(0), state.trainable, state.non_trainable, rc)
  assert float(empty.weight) == 0.0 and int(empty.metrics['empty']) == 1
  assert int(empty.metrics['bytes_up']) == 0


def test_server_round_properties_and_poisoned_client():
  model = _mlp()
  layout = client.WeightLayout(model)
  state = _state(model, round_num=1)
  cfg = _cfg()
  rc = server.round_config(state, layout, cfg)
  update = _update_fn(model)
  good = [
    update(_data(n, seed=s), state.trainable, state.non_trainable, rc)
    for n, s in ((16, 1), (24, 2))
  ]
  bad = update(_data(16, seed=3, nan=True), state.trainable, state.non_trainable, rc)
  new_state, metrics = server.server_update(state, rc, _sum(good), layout, cfg)
  poisoned_state, poisoned_metrics = server.server_update(
    state, rc, _sum(good + [bad]), layout, cfg
  )
  for a, b in zip(tf.nest.flatten(new_state), tf.nest.flatten(poisoned_state)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert int(poisoned_metrics['clients_rejected']) == 1
  assert int(poisoned_metrics['clients_used']) == 2

  assert int(metrics['adjusted']) == 1 and int(new_state.round_num) == 2
  for l in range(layout.num_layers):
    old_mask = state.non_trainable[layout.mask_indices[l]].numpy()
    new_mask = new_state.non_trainable[layout.mask_indices[l]].numpy()
    kernel = new_state.trainable[layout.kernel_indices[l]].numpy()
    marked = bae.marked_set(state.trainable[layout.kernel_indices[l]], old_mask, rc.k[l]).numpy()
    pruned = (old_mask > 0) & (new_mask == 0)
    grown = (old_mask == 0) & (new_mask > 0)
    np.testing.assert_array_equal(pruned, marked > 0)
    assert grown.sum() == pruned.sum() == int(rc.k[l])
    assert np.all(kernel[grown] == 0) and np.all(kernel[new_mask == 0] == 0)
    assert new_mask.sum() == old_mask.sum()
    assert np.all(new_state.non_trainable[layout.marked_indices[l]].numpy() == 0)
  assert float(metrics['global_density']) == pytest.approx(
    sum(int(m.sum()) for m in (state.non_trainable[i].numpy() for i in layout.mask_indices))
    / sum(layout.kernel_sizes)
  )
  np.testing.assert_array_equal(metrics['k'].numpy(), rc.k.numpy())
  assert 0.0 <= float(metrics['marked_overlap']) <= 1.0
  assert bool(new_state.mask_changed)


def test_weighted_mean_without_adjustment():
  model = _mlp()
  layout = client.WeightLayout(model)
  state = _state(model, round_num=0)
  cfg = _cfg()
  rc = server.round_config(state, layout, cfg)
  update = _update_fn(model)
  outs = [
    update(_data(n, seed=s), state.trainable, state.non_trainable, rc) for n, s in ((8, 1), (24, 2))
  ]
  new_state, metrics = server.server_update(state, rc, _sum(outs), layout, cfg)
  for i, v in enumerate(new_state.trainable):
    want = (outs[0].weighted_trainable[i] + outs[1].weighted_trainable[i]) / 32.0
    np.testing.assert_allclose(v.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
  assert int(metrics['adjusted']) == 0 and not bool(new_state.mask_changed)


def test_round_without_usable_client_keeps_state():
  model = _mlp()
  layout = client.WeightLayout(model)
  state = _state(model, round_num=1)
  cfg = _cfg()
  rc = server.round_config(state, layout, cfg)
  update = _update_fn(model)
  outs = [
    update(_data(8, nan=True), state.trainable, state.non_trainable, rc),
    update(_data(8).take(0), state.trainable, state.non_trainable, rc),
  ]
  new_state, metrics = server.server_update(state, rc, _sum(outs), layout, cfg)
  for a, b in zip(tf.nest.flatten(new_state), tf.nest.flatten(state)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert int(metrics['round_skipped']) == 1 and int(metrics['adjusted']) == 0
  assert int(metrics['clients_rejected']) == 1 and int(metrics['clients_empty']) == 1


def test_feddst_round_keeps_density():
  model = _mlp()
  layout = client.WeightLayout(model)
  state = _state(model, round_num=1)
  cfg = _cfg(mode='feddst')
  rc = server.round_config(state, layout, cfg)
  update = _update_fn(model, use_bae=False, server_adjust=False, client_regrow=True)
  outs = [
    update(_data(n, seed=s), state.trainable, state.non_trainable, rc)
    for n, s in ((16, 1), (24, 2))
  ]
  # Each client changed its own mask, keeping nnz.
  for out in outs:
    for l, i in enumerate(layout.mask_indices):
      client_mask = out.weighted_masks[l].numpy() / float(out.weight)
      assert client_mask.sum() == state.non_trainable[i].numpy().sum()
  new_state, metrics = server.server_update(state, rc, _sum(outs), layout, cfg)
  for l in range(layout.num_layers):
    new_mask = new_state.non_trainable[layout.mask_indices[l]].numpy()
    assert new_mask.sum() == state.non_trainable[layout.mask_indices[l]].numpy().sum()
    kernel = new_state.trainable[layout.kernel_indices[l]].numpy()
    assert np.all(kernel[new_mask == 0] == 0)
  assert int(metrics['adjusted']) == 1


def test_tfmot_mode_prunes_to_schedule():
  model = _mlp(density=1.0)
  layout = client.WeightLayout(model)
  state = _state(model, round_num=5)  # round 6 = end round, final sparsity
  cfg = _cfg(mode='tfmot', density=0.25)
  rc = server.round_config(state, layout, cfg)
  update = _update_fn(model, use_bae=False, server_adjust=False)
  out = update(_data(16), state.trainable, state.non_trainable, rc)
  new_state, metrics = server.server_update(state, rc, out, layout, cfg)
  np.testing.assert_array_equal(metrics['layer_nnz'].numpy(), [24, 12])  # 25% of 96, 48
  for l in range(layout.num_layers):
    mask = new_state.non_trainable[layout.mask_indices[l]].numpy()
    kernel = new_state.trainable[layout.kernel_indices[l]].numpy()
    assert np.all(kernel[mask == 0] == 0)
    # The kept entries are the largest |w| of the aggregate.
    agg = (out.weighted_trainable[layout.kernel_indices[l]] / out.weight).numpy()
    assert np.abs(agg[mask > 0]).min() >= np.abs(agg[mask == 0]).max()
