"""The catalogue of the algorithms fedmef-tf trains: what each one is made of.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737); ../shared/ALGORITHM.md describes the algorithm and its baselines.

Every program, the TFF process builder (`tff_programs.fedmef_process`), the comparison and the
benchmarks read an algorithm's parts from here, so that which model variant it trains, whether
it uses SAP or BaE, how its server treats the mask and whether it starts dense are decided in
one place:

| name            | variant  | SAP | BaE | mask policy     | starts dense | mask adjusted |
|-----------------|----------|-----|-----|-----------------|--------------|---------------|
| `fedmef`        | fedmef   | yes | yes | server_adjust   | no           | yes           |
| `fedmef_no_bae` | fedmef   | yes | no  | server_adjust   | no           | yes           |
| `fedmef_no_sap` | fedmef   | no  | yes | server_adjust   | no           | yes           |
| `rigl`          | baseline | no  | no  | server_adjust   | no           | yes           |
| `feddst`        | baseline | no  | no  | feddst          | no           | yes           |
| `static`        | baseline | no  | no  | server_adjust   | no           | no (alpha 0)  |
| `tfmot`         | baseline | no  | no  | tfmot           | yes          | yes           |
| `fedavg`        | baseline | no  | no  | none            | yes (dense)  | no            |

The variants are those of `fedmef_tf.models.VARIANTS`: 'fedmef' (NSConv, SAP-capable
activations, no BatchNorm) and 'baseline' (Conv + BatchNorm). The mask policies are those of
`fedmef_tf.server` (`MODES`): `server_adjust` (FedMef's prune/grow on the server from the
clients' top-k gradient pairs, RigL-style), `feddst` (FedDST's local regrowth and mask vote),
`tfmot` (tfmot's polynomial-decay magnitude masks set on the server), `none` (dense FedAvg).

This module imports nothing but the standard library, so a program can list the algorithms in
its flags before TensorFlow is loaded.
"""

import dataclasses
from typing import Dict, Tuple

#: Mask policies of the server (`fedmef_tf.server.round_config` and `server_update`).
MODE_SERVER_ADJUST = 'server_adjust'
MODE_FEDDST = 'feddst'
MODE_TFMOT = 'tfmot'
MODE_NONE = 'none'
MODES = (MODE_SERVER_ADJUST, MODE_FEDDST, MODE_TFMOT, MODE_NONE)


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """What one algorithm is made of.

  Attributes:
    name: the algorithm's name (`--algorithm` of the programs).
    variant: the model variant it trains, 'fedmef' or 'baseline' (`fedmef_tf.models`).
    uses_sap: whether its model keeps activations with SAP at the given ratio gamma (otherwise
      its model is built with gamma 0).
    uses_bae: whether its clients use BaE (the penalty lambda and the budget-aware learning
      rate); otherwise lambda is 0.
    mode: the server's mask policy, one of `MODES`.
    adjusts_mask: False when the initial random mask is kept for the whole run (alpha is 0
      whatever is passed).
    starts_dense: whether the initial model is dense (density 1) rather than a random ERK mask
      of the target density.
    dense: whether the model stays dense: the target density is 1 whatever is passed.
    summary: one line for help texts.
  """

  name: str
  variant: str
  uses_sap: bool
  uses_bae: bool
  mode: str
  adjusts_mask: bool = True
  starts_dense: bool = False
  dense: bool = False
  summary: str = ''

  def sap_gamma(self, gamma: float) -> float:
    """The SAP drop ratio its model is built with: `gamma` with SAP, 0.0 without."""
    return float(gamma) if self.uses_sap else 0.0

  def bae_lambda(self, lambda_bae: float) -> float:
    """BaE's penalty weight its clients use: `lambda_bae` with BaE, 0.0 without."""
    return float(lambda_bae) if self.uses_bae else 0.0

  def adjustment_fraction(self, alpha: float) -> float:
    """The initial adjustment fraction alpha it uses (0.0 when it never adjusts the mask)."""
    return float(alpha) if self.adjusts_mask else 0.0

  def target_density(self, density: float) -> float:
    """The density of its final model: `density`, or 1.0 for a dense algorithm."""
    return 1.0 if self.dense else float(density)

  def initial_density(self, density: float) -> float:
    """The density of its initial model: 1.0 when it starts dense, else `density`."""
    return 1.0 if self.starts_dense else float(density)


_CATALOGUE: Tuple[Algorithm, ...] = (
  Algorithm(
    'fedmef',
    'fedmef',
    uses_sap=True,
    uses_bae=True,
    mode=MODE_SERVER_ADJUST,
    summary='FedMef: NSConv model with SAP, BaE, server prune/grow',
  ),
  Algorithm(
    'fedmef_no_bae',
    'fedmef',
    uses_sap=True,
    uses_bae=False,
    mode=MODE_SERVER_ADJUST,
    summary='FedMef without BaE (lambda 0, plain rate)',
  ),
  Algorithm(
    'fedmef_no_sap',
    'fedmef',
    uses_sap=False,
    uses_bae=True,
    mode=MODE_SERVER_ADJUST,
    summary='FedMef without SAP (gamma 0)',
  ),
  Algorithm(
    'rigl',
    'baseline',
    uses_sap=False,
    uses_bae=False,
    mode=MODE_SERVER_ADJUST,
    summary='FedTiny-style RigL: server prune/grow, BatchNorm model',
  ),
  Algorithm(
    'feddst',
    'baseline',
    uses_sap=False,
    uses_bae=False,
    mode=MODE_FEDDST,
    summary='FedDST: local regrowth, mask vote on the server',
  ),
  Algorithm(
    'static',
    'baseline',
    uses_sap=False,
    uses_bae=False,
    mode=MODE_SERVER_ADJUST,
    adjusts_mask=False,
    summary='random ERK mask, never adjusted',
  ),
  Algorithm(
    'tfmot',
    'baseline',
    uses_sap=False,
    uses_bae=False,
    mode=MODE_TFMOT,
    starts_dense=True,
    summary="tfmot's polynomial-decay magnitude pruning, from dense",
  ),
  Algorithm(
    'fedavg',
    'baseline',
    uses_sap=False,
    uses_bae=False,
    mode=MODE_NONE,
    adjusts_mask=False,
    starts_dense=True,
    dense=True,
    summary='dense FedAvg',
  ),
)

#: The algorithm names, in the order the programs list and compare them.
NAMES: Tuple[str, ...] = tuple(a.name for a in _CATALOGUE)

_BY_NAME: Dict[str, Algorithm] = {a.name: a for a in _CATALOGUE}


def get(name: str) -> Algorithm:
  """The catalogue entry of algorithm `name`.

  Raises:
    ValueError: `name` is not one of `NAMES`.
  """
  try:
    return _BY_NAME[name]
  except (KeyError, TypeError):
    raise ValueError(f'algorithm must be one of {NAMES}, got {name!r}') from None
