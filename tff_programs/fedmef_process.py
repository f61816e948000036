"""FedMef and its baselines as a `tff.learning.templates.LearningProcess`.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737). This module only wires the plain-TensorFlow building blocks of
`fedmef_tf.client` and `fedmef_tf.server` into TFF computations, in the shape of TFF's
`simple_fedavg`: a `tff.tensorflow.computation` per block and one `tff.federated_computation`
per round. The stock FedAvg composition is not used, because its finalizer ignores
non-trainable weights (the masks) and tfmot's wrapper fails inside it (see
../shared/ENVIRONMENT.md); the masks travel in the process state instead.

One call of `next(state, client_datasets)` is one round t = state.round_num + 1:

1. on the server, `server.round_config`: eta_t, whether round t adjusts, k_l;
2. broadcast of the state (weights, masks) and of that configuration;
3. on each client, `client.build_client_update(...)`: masked local SGD (E epochs, batch B), BaE in
   adjustment rounds, top-k inactive gradient pairs (or FedDST's local regrowth);
4. `tff.federated_sum` of the clients' outputs (already multiplied by n_k, zero for a rejected or
   empty client);
5. on the server, `server.server_update`: weighted mean, prune/grow, metrics.

Algorithms (`ALGORITHMS`): those of the catalogue `fedmef_tf.algorithms`, which says for each
one its model variant, whether it uses SAP and BaE, its server's mask policy and whether it
starts dense: `fedmef`, its ablations `fedmef_no_bae` and `fedmef_no_sap`, `rigl`, `feddst`,
`static`, `tfmot` and `fedavg`. The builder reads nothing else about an algorithm.

Client data are unbatched `tf.data.Dataset`s of `(x, y)` examples (`tff.SequenceType`); the
client batches them with `batch_size`, so n_k and the step budget T_B = E * ceil(n_k / B) are
exact. Nothing is materialised per client on the Python side, so the simulation's memory does
not grow with the number of clients or rounds.

Round metrics (all at the server, one `OrderedDict`):

- `round_num` (t), `round_skipped` (1 when no client was usable: the state is kept unchanged,
  round number included), `learning_rate` (eta_t);
- `train_loss`, `train_accuracy`: mean over all local training examples of the usable clients
  (every epoch, before each step's update), `num_examples` (examples seen, epochs counted);
- `global_density` (mask ones / prunable entries), `layer_nnz` [L], `k` [L] (k_l applied this
  round, zeros when the round did not adjust), `adjusted` (0/1);
- `marked_overlap`: share of the pruned (marked) set that is also among the k_l smallest |theta|
  of the active aggregated weights, i.e. how well BaE's marked set predicts what magnitude
  pruning after aggregation would pick (0 when no adjustment);
- `bytes_down`, `bytes_up`: wire bytes summed over the clients that took part. A value is 4 bytes
  (float32). Down per client: nonzeros of the prunable kernels plus all dense parameters
  (biases, gains, BatchNorm parameters and statistics), plus the masks as bitmaps
  (1 bit per prunable entry, each layer padded to whole bytes) when the mask changed since the
  last broadcast (always in round 1). Up per client: its nonzeros plus dense parameters, plus
  8 bytes (int32 index + float32 value) per gradient pair in adjustment rounds (FedMef, RigL), or
  its mask bitmap in FedDST adjustment rounds. Empty clients count nothing;
- `clients_used`, `clients_rejected` (non-finite update), `clients_empty`.
"""

from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmef_tf import agc
from fedmef_tf import algorithms
from fedmef_tf import client as client_lib
from fedmef_tf import execution
from fedmef_tf import masks as masks_lib
from fedmef_tf import server as server_lib

#: The algorithm names (`fedmef_tf.algorithms.NAMES`).
ALGORITHMS = algorithms.NAMES


def model_variant_for(algorithm: str) -> str:
  """The model variant an algorithm trains (`fedmef_tf.algorithms`): 'fedmef' or 'baseline'.

  Raises:
    ValueError: unknown algorithm.
  """
  return algorithms.get(algorithm).variant


def sap_gamma_for(algorithm: str, gamma: float) -> float:
  """The SAP drop ratio the algorithm's model must be built with: `gamma`, or 0 without SAP.

  Raises:
    ValueError: unknown algorithm.
  """
  return algorithms.get(algorithm).sap_gamma(gamma)


def make_model_fn(
  name: str,
  algorithm: str,
  *,
  num_classes: int = 10,
  input_shape=(32, 32, 3),
  gamma: float = 0.7,
  seed: int = 0,
  input_mean=None,
  input_std=None,
):
  """A zero-argument `model_fn` building model `name` as `algorithm` needs it.

  Calls `fedmef_tf.models.build_model(name, variant, ...)` with the algorithm's variant and SAP
  ratio (`fedmef_tf.algorithms`) and density 1 (the process sets the masks).

  Args:
    name: a model name of `fedmef_tf.models.MODEL_NAMES` (e.g. 'cnn').
    algorithm: one of `ALGORITHMS`.
    num_classes, input_shape, gamma, seed, input_mean, input_std: see `build_model` (the
      input normalisation constants, `fedmef_tf.data.channel_stats` of the training split).

  Returns:
    A callable returning a new Keras model on every call.
  """
  from fedmef_tf import models  # pylint: disable=import-outside-toplevel

  entry = algorithms.get(algorithm)
  variant = entry.variant
  sap_gamma = entry.sap_gamma(gamma)

  def model_fn():
    return models.build_model(
      name,
      variant,
      num_classes=num_classes,
      input_shape=tuple(input_shape),
      density=1.0,
      gamma=sap_gamma,
      seed=seed,
      input_mean=input_mean,
      input_std=input_std,
    )

  return model_fn


def sample_clients(
  num_clients: int, clients_per_round: int, round_num: int, seed: int = 0
) -> np.ndarray:
  """The S client indices of round t, drawn without replacement from K, repeatable.

  Depends only on (seed, round_num), so a resumed run samples the same clients.

  Args:
    num_clients: K.
    clients_per_round: S (<= K).
    round_num: t.
    seed: sampling seed.

  Returns:
    An int array [S] of distinct indices in [0, K).
  """
  num_clients = _check_positive_int('num_clients', num_clients)
  clients_per_round = _check_positive_int('clients_per_round', clients_per_round)
  if clients_per_round > num_clients:
    raise ValueError(f'clients_per_round {clients_per_round} > num_clients {num_clients}')
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(round_num)])
  return rng.choice(num_clients, clients_per_round, replace=False)


def _check_positive_int(name, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return int(value)


def _check_float(name, value, low, high, low_open=False):
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise ValueError(f'{name} must be a number, got {value!r}')
  value = float(value)
  ok = (value > low if low_open else value >= low) and value <= high
  if not ok:
    bracket = '(' if low_open else '['
    raise ValueError(f'{name} must be in {bracket}{low}, {high}], got {value}')
  return value


def _check_model_gamma(model, expected: float, algorithm: str) -> None:
  gammas = [float(getattr(layer, 'sap_gamma', 0.0)) for layer in masks_lib.prunable_layers(model)]
  if expected == 0.0:
    bad = [g for g in gammas if g != 0.0]
  else:
    bad = [g for g in gammas if g not in (0.0, expected)]
  if bad:
    raise ValueError(
      f'algorithm {algorithm!r} needs SAP gamma {expected}, but the model has prunable '
      f'layers with sap_gamma {sorted(set(bad))}; build it with '
      f'sap_gamma_for(algorithm, gamma) (see make_model_fn)'
    )


def _default_element_spec(model):
  shape = model.input_shape
  if isinstance(shape, list):
    raise ValueError('models with several inputs need an explicit element_spec')
  return (tf.TensorSpec(shape[1:], tf.float32), tf.TensorSpec([], tf.int32))


def client_strategy(sap_strategy: str = execution.SIMULATED) -> execution.Strategy:
  """The `fedmef_tf.execution` strategy the clients' computation is traced under:
  `execution.TFF_SIMULATION` (no native kernel: TFF runs the traced graphs in its own worker
  process, whose TensorFlow has none of fedmef_tf's native kernels) with `sap_strategy` as the
  SAP storage (`execution.SIMULATED` or `execution.STORED`)."""
  return execution.TFF_SIMULATION.replace(sap_storage=sap_strategy)


def build_fedmef_process(
  model_fn: Callable[[], tf.keras.Model],
  *,
  algorithm: str = 'fedmef',
  density: float = 0.1,
  delta_t: int = 10,
  t_end: int = 300,
  alpha: float = 0.2,
  lambda_bae: float = 0.01,
  gamma: float = 0.7,
  client_lr: float = 0.1,
  client_lr_min: float = 0.01,
  total_rounds: int = 500,
  local_epochs: int = 5,
  batch_size: int = 64,
  seed: int = 0,
  element_spec=None,
  loss_fn: Optional[Callable] = None,
  sap_strategy: str = execution.SIMULATED,
) -> tff.learning.templates.LearningProcess:
  """Builds the FedMef (or baseline) learning process.

  The defaults are the paper's protocol (ALGORITHM.md, "Symbols and defaults").

  Args:
    model_fn: no-argument callable returning a new, built Keras model whose prunable layers are
      `fedmef_tf.sparse_layers.MaskedLayer`s and which outputs logits (see `make_model_fn`).
      It is called once eagerly here (to read shapes and the initial weights) and once inside
      each client computation; every call must build the same architecture.
    algorithm: one of `ALGORITHMS`.
    density: target density d of the prunable kernels, in (0, 1]. The initial masks are ERK
      random masks of this density drawn from `seed` (`fedmef_tf.masks.init_sparse`); an
      algorithm that starts dense (`tfmot`) reaches it at the last pruning round; a dense one
      (`fedavg`) ignores it.
    delta_t: rounds between mask adjustments (dT).
    t_end: last adjustment round (T_end); the mask is frozen afterwards.
    alpha: initial adjustment fraction (0 for an algorithm that never adjusts its mask, whatever
      is passed).
    lambda_bae: BaE penalty weight (0 for an algorithm without BaE).
    gamma: SAP drop ratio of the algorithms with SAP; the model must have been built with
      `sap_gamma_for(algorithm, gamma)` (checked).
    client_lr: eta_0, client SGD learning rate of round 1 (and BaE's scale).
    client_lr_min: eta_min, the client learning rate of round `total_rounds` (exponential decay).
    total_rounds: R, used by the learning rate schedule.
    local_epochs: E.
    batch_size: B.
    seed: seed of the initial random masks.
    element_spec: the `(x, y)` element spec of the (unbatched) client datasets; default
      `(float32 model input, int32 scalar label)`.
    loss_fn: `loss_fn(y_true, logits)` -> scalar mean loss; default sparse categorical
      cross-entropy on logits.
    sap_strategy: how the clients' SAP layers keep what they keep (the `sap_storage` of
      the clients' strategy, `client_strategy`): `execution.SIMULATED` (default) gives SAP's
      kept sets and gradients at about the cost of plain layers, without the memory saving,
      which a simulation does not measure; `execution.STORED` traces the memory-saving
      storage (TensorFlow ops, since TFF's worker has no native kernels), several times
      slower.

  Returns:
    A `tff.learning.templates.LearningProcess` with `initialize`, `next`,
    `get_model_weights` and `set_model_weights`. `next` has type signature
    `(<state@SERVER, {sequence<(x, y)>}@CLIENTS> -> <state=state@SERVER, metrics=...@SERVER>)`.

  Raises:
    ValueError: an argument is out of range, or the model does not fit the algorithm.
  """
  if not callable(model_fn):
    raise ValueError(f'model_fn must be callable, got {model_fn!r}')
  entry = algorithms.get(algorithm)
  density = _check_float('density', density, 0.0, 1.0, low_open=True)
  delta_t = _check_positive_int('delta_t', delta_t)
  t_end = _check_positive_int('t_end', t_end, minimum=0)
  alpha = _check_float('alpha', alpha, 0.0, 1.0)
  lambda_bae = _check_float('lambda_bae', lambda_bae, 0.0, float('inf'))
  gamma = _check_float('gamma', gamma, 0.0, 1.0)
  client_lr = _check_float('client_lr', client_lr, 0.0, float('inf'), low_open=True)
  client_lr_min = _check_float('client_lr_min', client_lr_min, 0.0, client_lr, low_open=True)
  total_rounds = _check_positive_int('total_rounds', total_rounds)
  local_epochs = _check_positive_int('local_epochs', local_epochs)
  batch_size = _check_positive_int('batch_size', batch_size)
  seed = _check_positive_int('seed', seed, minimum=0)
  if sap_strategy not in execution.SAP_STORAGES:
    raise ValueError(f'sap_strategy must be one of {execution.SAP_STORAGES}, got {sap_strategy!r}')
  strategy = client_strategy(sap_strategy)
  mode = entry.mode
  if mode == server_lib.MODE_TFMOT and density >= 1.0:
    raise ValueError(f'{algorithm} needs a target density below 1')
  if mode == server_lib.MODE_TFMOT and t_end < delta_t:
    raise ValueError(f'{algorithm} needs t_end >= delta_t (at least one pruning round)')

  use_bae = entry.uses_bae
  alpha = entry.adjustment_fraction(alpha)
  lambda_bae = entry.bae_lambda(lambda_bae)
  initial_density = entry.initial_density(density)
  loss_fn = loss_fn or client_lib.default_loss_fn

  # Eager model: layout, initial weights and masks, and the checks.
  model = model_fn()
  if not isinstance(model, tf.keras.Model):
    raise ValueError(f'model_fn must return a tf.keras.Model, got {type(model)!r}')
  layout = client_lib.WeightLayout(model)
  _check_model_gamma(model, entry.sap_gamma(gamma), algorithm)
  masks_lib.init_sparse(model, initial_density, seed)
  init_trainable = [v.numpy() for v in model.trainable_weights]
  init_non_trainable = [v.numpy() for v in model.non_trainable_weights]
  if element_spec is None:
    element_spec = _default_element_spec(model)
  del model

  schedule = server_lib.ScheduleConfig(
    mode=mode,
    delta_t=delta_t,
    t_end=t_end,
    alpha=alpha,
    eta_0=client_lr,
    eta_min=client_lr_min,
    total_rounds=total_rounds,
    density=density,
  )

  @tff.tensorflow.computation
  def initial_state_tf():
    return server_lib.ServerState(
      round_num=tf.constant(0, tf.int32),
      trainable=[tf.constant(a) for a in init_trainable],
      non_trainable=[tf.constant(a) for a in init_non_trainable],
      # Dense FedAvg never sends a mask; every other algorithm sends it in round 1.
      mask_changed=tf.constant(mode != server_lib.MODE_NONE),
    )

  state_type = initial_state_tf.type_signature.result
  trainable_type = state_type.trainable
  non_trainable_type = state_type.non_trainable

  @tff.federated_computation
  def initialize_fn():
    return tff.federated_eval(initial_state_tf, tff.SERVER)

  @tff.tensorflow.computation(state_type)
  def round_config_tf(state):
    return server_lib.round_config(state, layout, schedule)

  config_type = round_config_tf.type_signature.result
  dataset_type = tff.SequenceType(tff.types.tensorflow_to_type(element_spec))

  @tff.tensorflow.computation(dataset_type, trainable_type, non_trainable_type, config_type)
  def client_update_tf(dataset, trainable, non_trainable, config):
    with execution.scope(strategy):
      client_model = model_fn()
      update = client_lib.build_client_update(
        client_model,
        client_lib.WeightLayout(client_model),
        local_epochs=local_epochs,
        batch_size=batch_size,
        eta_0=client_lr,
        lambda_bae=lambda_bae,
        use_bae=use_bae,
        server_adjust=(mode == server_lib.MODE_SERVER_ADJUST),
        client_regrow=(mode == server_lib.MODE_FEDDST),
        loss_fn=loss_fn,
        gradient_clipping=agc.clipping_for(entry.variant),
      )
      return update(dataset, list(trainable), list(non_trainable), client_lib.RoundConfig(*config))

  client_output_type = client_update_tf.type_signature.result

  @tff.tensorflow.computation(state_type, config_type, client_output_type)
  def server_update_tf(state, config, sums):
    state = server_lib.ServerState(
      round_num=state.round_num,
      trainable=list(state.trainable),
      non_trainable=list(state.non_trainable),
      mask_changed=state.mask_changed,
    )
    sums = client_lib.ClientOutput(
      weight=sums.weight,
      weighted_trainable=list(sums.weighted_trainable),
      weighted_stats=list(sums.weighted_stats),
      weighted_masks=list(sums.weighted_masks),
      weighted_grads=list(sums.weighted_grads),
      metrics=sums.metrics,
    )
    return server_lib.server_update(state, client_lib.RoundConfig(*config), sums, layout, schedule)

  @tff.federated_computation(
    tff.FederatedType(state_type, tff.SERVER), tff.FederatedType(dataset_type, tff.CLIENTS)
  )
  def next_fn(state, client_datasets):
    config = tff.federated_map(round_config_tf, state)
    trainable = tff.federated_broadcast(state.trainable)
    non_trainable = tff.federated_broadcast(state.non_trainable)
    client_config = tff.federated_broadcast(config)
    outputs = tff.federated_map(
      client_update_tf, (client_datasets, trainable, non_trainable, client_config)
    )
    sums = tff.federated_sum(outputs)
    new_state, metrics = tff.federated_map(server_update_tf, (state, config, sums))
    return tff.learning.templates.LearningProcessOutput(state=new_state, metrics=metrics)

  model_weights_type = tff.StructWithPythonType(
    [('trainable', trainable_type), ('non_trainable', non_trainable_type)],
    tff.learning.models.ModelWeights,
  )

  @tff.tensorflow.computation(state_type)
  def get_model_weights(state):
    return tff.learning.models.ModelWeights(
      trainable=list(state.trainable), non_trainable=list(state.non_trainable)
    )

  @tff.tensorflow.computation(state_type, model_weights_type)
  def set_model_weights(state, weights):
    trainable = list(weights.trainable)
    non_trainable = list(weights.non_trainable)
    for l, i in enumerate(layout.kernel_indices):
      trainable[i] = trainable[i] * non_trainable[layout.mask_indices[l]]
    return server_lib.ServerState(
      round_num=state.round_num,
      trainable=trainable,
      non_trainable=non_trainable,
      mask_changed=tf.constant(True),
    )

  return tff.learning.templates.LearningProcess(
    initialize_fn, next_fn, get_model_weights, set_model_weights
  )
