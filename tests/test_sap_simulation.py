"""A FedMef client round inside TFF (SAP under `sap.SIMULATED`, TensorFlow ops in TFF's worker)
equals the same round in plain TensorFlow with the native SAP kernels (`sap.STORED`).

One round of `build_fedmef_process` with one client and an adjustment (BaE, top-k gradient
pairs, server prune/grow) against `server.round_config`, `client.build_client_update` and
`server.server_update` called in this process, on a model with an NSConv conv, an NSConv
depthwise conv and a dense layer, for gamma 0, 0.5 and 0.7.

Tolerance: the new weights agree to 1e-6 (absolute and relative); the masks, the BaE lambdas
and the integer metrics exactly. The weights are not bitwise equal, at gamma 0 (no SAP at all)
as much as at 0.5 and 0.7: TFF's worker is a separate TensorFlow build whose float kernels
round differently in the last bit (differences of up to 3e-8 on weights of order 0.1 were seen
on these machines). The SAP ops themselves give bitwise the same kept sets and gradients under
both strategies (tests/test_sap.py, simulated against stored).
"""

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import agc
from fedmef_tf import client
from fedmef_tf import masks
from fedmef_tf import sap
from fedmef_tf.sap import native as sap_native
from fedmef_tf import server
from fedmef_tf import sparse_layers
from tff_programs import fedmef_process

INPUT_SHAPE = (8, 8, 3)
NUM_CLASSES = 3
SETTINGS = dict(
  density=0.5,
  delta_t=1,
  t_end=5,
  alpha=0.3,
  lambda_bae=0.01,
  client_lr=0.1,
  client_lr_min=0.05,
  total_rounds=10,
  local_epochs=1,
  batch_size=8,
  seed=2,
)


def _model_fn(gamma):
  def model_fn():
    tf.keras.utils.set_random_seed(7)
    inp = tf.keras.Input(INPUT_SHAPE)
    h = sparse_layers.MaskedConv2D(
      6, 3, padding='same', normalize=True, sap_gamma=gamma, name='conv'
    )(inp)
    h = sap.BitReLU(name='relu1')(h)
    h = sparse_layers.MaskedDepthwiseConv2D(
      3, padding='same', normalize=True, sap_gamma=gamma, name='depthwise'
    )(h)
    h = sap.BitReLU(name='relu2')(h)
    h = tf.keras.layers.Flatten()(h)
    out = sparse_layers.MaskedDense(NUM_CLASSES, sap_gamma=gamma, name='dense')(h)
    return tf.keras.Model(inp, out)

  return model_fn


def _dataset(n=20, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  x = rng.normal(size=(n,) + INPUT_SHAPE).astype(np.float32)
  x[np.arange(n), :, :, y] += 1.0
  return tf.data.Dataset.from_tensor_slices((x, y))


def _plain_round(model_fn, gamma, state0):
  """The round in this process: round config, one client update with the native kernels,
  server update."""
  model = model_fn()
  layout = client.WeightLayout(model)
  schedule = server.ScheduleConfig(
    mode=server.MODE_SERVER_ADJUST,
    delta_t=SETTINGS['delta_t'],
    t_end=SETTINGS['t_end'],
    alpha=SETTINGS['alpha'],
    eta_0=SETTINGS['client_lr'],
    eta_min=SETTINGS['client_lr_min'],
    total_rounds=SETTINGS['total_rounds'],
    density=SETTINGS['density'],
  )
  state = server.ServerState(
    round_num=tf.constant(state0.round_num, tf.int32),
    trainable=[tf.constant(a) for a in state0.trainable],
    non_trainable=[tf.constant(a) for a in state0.non_trainable],
    mask_changed=tf.constant(state0.mask_changed),
  )
  config = server.round_config(state, layout, schedule)
  update = client.build_client_update(
    model,
    layout,
    local_epochs=SETTINGS['local_epochs'],
    batch_size=SETTINGS['batch_size'],
    eta_0=SETTINGS['client_lr'],
    lambda_bae=SETTINGS['lambda_bae'],
    use_bae=True,
    server_adjust=True,
    client_regrow=False,
    gradient_clipping=agc.clipping_for('fedmef'),
  )
  assert sap.current_strategy() == sap.STORED and sap_native.enabled()
  output = update(_dataset(), list(state.trainable), list(state.non_trainable), config)
  return server.server_update(state, config, output, layout, schedule)


@pytest.mark.skipif(not sap_native.available(), reason='native SAP kernels not built')
@pytest.mark.parametrize('gamma', [0.0, 0.5, 0.7])
def test_tff_round_equals_plain_tf_round_with_native_kernels(tff_runtime, gamma):
  del tff_runtime
  model_fn = _model_fn(gamma)
  kinds = [type(l).__name__ for l in masks.prunable_layers(model_fn())]
  assert kinds == ['MaskedConv2D', 'MaskedDepthwiseConv2D', 'MaskedDense']
  process = fedmef_process.build_fedmef_process(
    model_fn, algorithm='fedmef', gamma=gamma, sap_strategy=sap.SIMULATED, **SETTINGS
  )
  state0 = process.initialize()
  output = process.next(state0, [_dataset()])
  state, metrics = output.state, output.metrics
  assert int(metrics['adjusted']) == 1 and int(metrics['clients_used']) == 1

  plain_state, plain_metrics = _plain_round(model_fn, gamma, state0)
  assert int(state.round_num) == int(plain_state.round_num) == 1
  for tff_w, plain_w in zip(state.trainable, plain_state.trainable):
    np.testing.assert_allclose(tff_w, plain_w.numpy(), rtol=1e-6, atol=1e-6)
  for tff_w, plain_w in zip(state.non_trainable, plain_state.non_trainable):
    np.testing.assert_array_equal(tff_w, plain_w.numpy())
  for key in ('layer_nnz', 'k', 'num_examples'):
    np.testing.assert_array_equal(metrics[key], plain_metrics[key].numpy())
  # The round moved the weights (a comparison of two untrained states would prove nothing).
  moved = [not np.array_equal(a, b) for a, b in zip(state.trainable, state0.trainable)]
  assert all(moved)
