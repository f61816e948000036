"""The checks of `tflite_export.verify`, each a function of measured values returning its numbers.

Each check takes what was measured (arrays or dicts of arrays keyed by the file's signature
names, losses, signature lists) and returns a small result object: the numbers it measured and
compared (largest difference, its tolerance, losses, counts of entries), whether the check
holds (`ok`, None where it does not apply) and the `detail` line that `verify` prints. The
checks run no interpreter and build no model: `tflite_export.verify` runs the file and the TF
reference and hands the results to these functions, and a test can hand them broken values.

Tolerances (see "Step tolerance" in `tflite_export.verify`):

- `INFER_TOL`: logits of `infer` against TF, relative to the largest TF logit (absolute below
  1);
- `LOSS_RTOL`: the loss of one step against TF's, relative (absolute below 1);
- `STEP_RTOL`, `SPREAD_FACTOR`: one step's update of each variable (or a growth gradient)
  against TF's, relative to the TF update's largest entry and norm, or `SPREAD_FACTOR` times
  the TF reference's own spread under rounding-sized nudges where that is larger;
- `SAP_EFFECT_MIN`: how far, relative as `STEP_RTOL`, the on-device step must be from the TF
  step without SAP.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
  'Check',
  'Mismatch',
  'step_mismatch',
  'mask_pairs',
  'required_signatures',
  'finite_weights',
  'litert_compatible',
  'infer_matches',
  'dense_gradients_match',
  'train_step_matches',
  'bae_step_matches',
  'sap_effect',
  'masked_zeros',
  'loss_falls',
  'round_trip',
  'save_restore',
  'learning_rate_applies',
  'SIGNATURES',
  'LOSS_RTOL',
  'STEP_RTOL',
  'SPREAD_FACTOR',
  'SAP_EFFECT_MIN',
  'INFER_TOL',
]

#: Signatures every export has (`tflite_export.train_module.TrainModule`); `dense_gradients`
#: only exports with masks.
SIGNATURES = (
  'train',
  'infer',
  'get_weights',
  'set_weights',
  'save',
  'restore',
  'metadata',
  'set_learning_rate',
)

#: Relative tolerance of the loss of one TFLite step against the TF step.
LOSS_RTOL = 1e-4
#: Tolerance of one step's update of every variable against TF, relative to the largest entry
#: of that variable's TF update (and of the growth gradients, relative to their largest entry),
#: where the reference's own spread is smaller (see "Step tolerance" in `verify`). Not float
#: rounding alone: a ReLU (or BitReLU) mask entry flips where a pre-activation lies within
#: rounding of zero (the two runtimes sum convolutions in different orders, about 1e-6 apart),
#: and each flip moves one output channel's weight gradient by one position's share, about
#: 1 / (B * H_out * W_out).
STEP_RTOL = 0.02
#: A variable may differ from TF by this many times the reference's spread.
SPREAD_FACTOR = 2.0
#: The on-device step must differ from the TF step without SAP by more than this (relative,
#: as STEP_RTOL), so that the match shows that SAP is active on the device.
SAP_EFFECT_MIN = 0.1
#: Tolerance of the logits of `infer` against the TF model, relative to the largest logit
#: (absolute below 1).
INFER_TOL = 1e-4

Weights = Mapping[str, np.ndarray]


class Check:
  """A check's result: its `name`, `ok` (None: not applicable), the `detail` line, `line()`.

  The subclasses are dataclasses whose fields are the measured numbers; `ok` and `detail` are
  derived from them.
  """

  name: ClassVar[str] = ''

  @property
  def ok(self) -> Optional[bool]:
    raise NotImplementedError

  @property
  def detail(self) -> str:
    raise NotImplementedError

  def line(self) -> str:
    status = {True: 'PASS', False: 'FAIL', None: 'N/A '}[self.ok]
    return f'{status} {self.name}: {self.detail}'


# -- the file ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Signatures(Check):
  """The signatures of `SIGNATURES` that the file lacks (`missing`)."""

  name: ClassVar[str] = 'signatures present'
  missing: Tuple[str, ...]

  @property
  def ok(self) -> bool:
    return not self.missing

  @property
  def detail(self) -> str:
    return f'missing signatures {list(self.missing)}' if self.missing else 'all present'


def required_signatures(signatures: Sequence[str]) -> Signatures:
  """Which of `SIGNATURES` are not among `signatures` (the file's signature keys)."""
  return Signatures(tuple(s for s in SIGNATURES if s not in signatures))


@dataclasses.dataclass(frozen=True)
class FiniteWeights(Check):
  """`non_finite`: per weight holding NaN or infinite values, (how many, its size)."""

  name: ClassVar[str] = 'weights finite'
  non_finite: Dict[str, Tuple[int, int]]

  @property
  def ok(self) -> bool:
    return not self.non_finite

  @property
  def detail(self) -> str:
    if not self.non_finite:
      return 'every weight finite'
    name, (bad, size) = next(iter(self.non_finite.items()))
    return f'weight {name} holds {bad} NaN or infinite values of {size}'


def finite_weights(weights: Weights) -> FiniteWeights:
  """The weights (in the order of `weights`) with NaN or infinite entries."""
  bad = {}
  for name, value in weights.items():
    finite = np.isfinite(value)
    if not np.all(finite):
      bad[name] = (int(np.size(value) - np.count_nonzero(finite)), int(np.size(value)))
  return FiniteWeights(bad)


@dataclasses.dataclass(frozen=True)
class LiteRTCompatible(Check):
  """`select_tf_ops`: the select-TF operators the file needs (stock LiteRT has none)."""

  name: ClassVar[str] = 'runs on stock LiteRT'
  select_tf_ops: Tuple[str, ...]

  @property
  def ok(self) -> bool:
    return not self.select_tf_ops

  @property
  def detail(self) -> str:
    if not self.select_tf_ops:
      return 'needs no select-TF op'
    return f'needs select-TF ops ({", ".join(self.select_tf_ops)})'


def litert_compatible(flatbuffer: bytes) -> LiteRTCompatible:
  """Whether a TFLite file (its bytes) needs select-TF ops (`tflite_export.select_ops`)."""
  from tflite_export import select_ops  # pylint: disable=import-outside-toplevel

  return LiteRTCompatible(tuple(select_ops.select_tf_ops(flatbuffer)))


def mask_pairs(names: Sequence[str]) -> List[Tuple[str, str]]:
  """(kernel name, mask name) pairs of the masked layers, from the signature names
  (`w<index>_<layer>_kernel`, `w<index>_<layer>_mask`)."""
  pairs = []
  for n in names:
    if n.endswith('_kernel'):
      prefix = n[5 : -len('_kernel')]
      masks = [m for m in names if m.endswith(prefix + '_mask') and m[5 : -len('_mask')] == prefix]
      if masks:
        pairs.append((n, masks[0]))
  return pairs


# -- agreement with the TF model -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InferMatch(Check):
  """`infer`'s logits against the TF model's: shapes, `max_abs_diff` and its `tolerance`."""

  name: ClassVar[str] = 'infer matches TF'
  shape: Tuple[int, ...]
  reference_shape: Tuple[int, ...]
  max_abs_diff: float
  tolerance: float

  @property
  def ok(self) -> bool:
    return self.shape == self.reference_shape and self.max_abs_diff <= self.tolerance

  @property
  def detail(self) -> str:
    return f'logits {self.shape}, max |diff| {self.max_abs_diff:.2e} (tol {self.tolerance:.2e})'


def infer_matches(logits: np.ndarray, reference: np.ndarray) -> InferMatch:
  """`logits` [B, classes] of the file against the TF model's `reference`, within
  `INFER_TOL * max(1, max |reference|)`."""
  logits, reference = np.asarray(logits), np.asarray(reference)
  return InferMatch(
    tuple(logits.shape),
    tuple(reference.shape),
    float(np.max(np.abs(logits - reference))),
    INFER_TOL * max(1.0, float(np.max(np.abs(reference)))),
  )


@dataclasses.dataclass
class Mismatch:
  """How far a TFLite result is from the TF reference, relative to the reference's change.

  `max_rel`/`l2_rel`: worst over variables of `max|got - ref| / max|ref - before|` and of
  `||got - ref|| / ||ref - before||`, at `max_name`/`l2_name`; `max_allowed`/`l2_allowed`:
  what they may be (see "Step tolerance" in `tflite_export.verify`).
  """

  max_rel: float = 0.0
  max_name: str = ''
  l2_rel: float = 0.0
  l2_name: str = ''
  max_allowed: float = STEP_RTOL
  l2_allowed: float = STEP_RTOL

  @property
  def ok(self) -> bool:
    return self.max_rel <= self.max_allowed and self.l2_rel <= self.l2_allowed

  def text(self, what: str = 'update') -> str:
    return (
      f'max |diff| / max |{what}| {self.max_rel:.2e} ({self.max_name or "-"}; allowed '
      f'{self.max_allowed:.2e}), ||diff|| / ||{what}|| {self.l2_rel:.2e} '
      f'({self.l2_name or "-"}; allowed {self.l2_allowed:.2e})'
    )


def step_mismatch(
  before: Weights, got: Weights, ref: Weights, reruns: Sequence[Weights] = ()
) -> Mismatch:
  """Mismatch of `got` against `ref`, both changes of `before` (dicts keyed alike).

  `reruns`: the reference rerun on nudged inputs and weights; the allowed mismatches
  are `max(STEP_RTOL, SPREAD_FACTOR * the reruns' worst mismatch against ref)`, model-wide.
  A variable that `ref` does not change (masks, marked sets) must be equal to within 1e-7.
  """

  def measure(other):
    m = Mismatch()
    for n in ref:
      if not np.size(ref[n]):
        continue
      r = np.asarray(ref[n], np.float64)
      d = np.asarray(other[n], np.float64) - r
      u = r - np.asarray(before[n], np.float64)
      scale, norm = float(np.max(np.abs(u))), float(np.linalg.norm(u))
      if scale > 0:
        rel_max, rel_l2 = float(np.max(np.abs(d))) / scale, float(np.linalg.norm(d)) / norm
      else:
        rel_max = rel_l2 = 0.0 if float(np.max(np.abs(d))) <= 1e-7 else float('inf')
      if rel_max > m.max_rel:
        m.max_rel, m.max_name = rel_max, n
      if rel_l2 > m.l2_rel:
        m.l2_rel, m.l2_name = rel_l2, n
    return m

  m = measure(got)
  spread = [measure(r) for r in reruns]
  m.max_allowed = max([STEP_RTOL] + [SPREAD_FACTOR * s.max_rel for s in spread])
  m.l2_allowed = max([STEP_RTOL] + [SPREAD_FACTOR * s.l2_rel for s in spread])
  return m


@dataclasses.dataclass(frozen=True)
class GradientsMatch(Check):
  """`dense_gradients` against TF's growth gradients: `kernels` compared, the `mismatch`
  (None when the names differ), `differing_names` (names in only one of the two)."""

  name: ClassVar[str] = 'dense_gradients matches TF'
  kernels: int
  mismatch: Optional[Mismatch]
  differing_names: Tuple[str, ...]

  @property
  def ok(self) -> bool:
    return not self.differing_names and self.mismatch is not None and self.mismatch.ok

  @property
  def detail(self) -> str:
    if self.differing_names:
      return f'names differ: {list(self.differing_names[:4])}'
    return f'{self.kernels} kernels, {self.mismatch.text("gradient")}'


def dense_gradients_match(
  got: Weights, ref: Weights, reruns: Sequence[Weights] = ()
) -> GradientsMatch:
  """The file's growth gradients `got` against TF's `ref` (by gradient name), with the
  tolerance of `step_mismatch` relative to each kernel's largest gradient entry."""
  if got.keys() != ref.keys():
    return GradientsMatch(len(ref), None, tuple(sorted(set(got) ^ set(ref))))
  zeros = {n: np.zeros_like(g) for n, g in ref.items()}
  return GradientsMatch(len(ref), step_mismatch(zeros, got, ref, reruns), ())


@dataclasses.dataclass(frozen=True)
class StepMatch(Check):
  """One `train` step against TF's: `loss` and `loss_tf`, `loss_diff` and its
  `loss_tolerance`, the variables' `mismatch`, the `nudge` of the TF reruns."""

  name: ClassVar[str] = 'train step matches TF'
  loss: float
  loss_tf: float
  loss_diff: float
  loss_tolerance: float
  mismatch: Mismatch
  nudge: float

  @property
  def ok(self) -> bool:
    return self.loss_diff <= self.loss_tolerance and self.mismatch.ok

  @property
  def detail(self) -> str:
    return (
      f'loss {self.loss:.6f} vs {self.loss_tf:.6f} (|diff| {self.loss_diff:.2e}, rtol '
      f'{LOSS_RTOL}), {self.mismatch.text()}; TF reruns nudged by {self.nudge:.1e}'
    )


def _step_numbers(loss, loss_tf, before, got, ref, reruns):
  loss, loss_tf = float(loss), float(loss_tf)
  return (
    loss,
    loss_tf,
    abs(loss - loss_tf),
    LOSS_RTOL * max(1.0, abs(loss_tf)),
    step_mismatch(before, got, ref, reruns),
  )


def train_step_matches(
  loss: float,
  loss_tf: float,
  before: Weights,
  got: Weights,
  ref: Weights,
  reruns: Sequence[Weights] = (),
  nudge: float = 0.0,
) -> StepMatch:
  """The file's step (`loss`, variables after it `got`) against TF's from the same `before`:
  the loss within `LOSS_RTOL * max(1, |loss_tf|)`, the variables as `step_mismatch`."""
  return StepMatch(*_step_numbers(loss, loss_tf, before, got, ref, reruns), float(nudge))


@dataclasses.dataclass(frozen=True)
class BaEStepMatch(StepMatch):
  """A step with BaE's marked set and lambda loaded, as `StepMatch`, plus `bae_lambda` and
  `bae_effect`: how far BaE moved the kernels against the step without it (must be > 0)."""

  name: ClassVar[str] = 'train step with BaE matches TF'
  bae_lambda: float
  bae_effect: float

  @property
  def ok(self) -> bool:
    return super().ok and self.bae_effect > 0

  @property
  def detail(self) -> str:
    return (
      f'lambda {self.bae_lambda}, half of each mask marked: {self.mismatch.text()}; BaE moved '
      f'kernels by up to {self.bae_effect:.2e} against the plain step'
    )


def bae_step_matches(
  loss: float,
  loss_tf: float,
  before: Weights,
  got: Weights,
  ref: Weights,
  plain_step: Weights,
  kernels: Sequence[str],
  bae_lambda: float,
  reruns: Sequence[Weights] = (),
  nudge: float = 0.0,
) -> BaEStepMatch:
  """As `train_step_matches` for a step with BaE on; `plain_step`: the file's variables after
  the same step without BaE, compared on `kernels` (names)."""
  effect = float(max(np.max(np.abs(np.asarray(got[k]) - plain_step[k])) for k in kernels))
  numbers = _step_numbers(loss, loss_tf, before, got, ref, reruns)
  return BaEStepMatch(*numbers, float(nudge), float(bae_lambda), effect)


@dataclasses.dataclass(frozen=True)
class SapEffect(Check):
  """How far the file's step is from the TF step without SAP (`effect`, largest at
  `variable`), which must exceed `minimum`; `gamma`: the export's SAP drop ratio."""

  name: ClassVar[str] = 'train step uses SAP'
  gamma: float
  effect: float
  variable: str
  minimum: float

  @property
  def ok(self) -> bool:
    return self.effect > self.minimum

  @property
  def detail(self) -> str:
    return (
      f'gamma {self.gamma}: on-device step differs from the TF step without SAP by '
      f'{self.effect:.2e} ({self.variable}; must exceed {self.minimum})'
    )


def sap_effect(before: Weights, got: Weights, without_sap: Weights, gamma: float) -> SapEffect:
  """The file's step `got` against the TF step of the same model at gamma 0 (`without_sap`),
  both from `before`: the largest entry's difference relative to the TF update."""
  m = step_mismatch(before, got, without_sap)
  return SapEffect(gamma, m.max_rel, m.max_name, SAP_EFFECT_MIN)


# -- training on the device -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskedZeros(Check):
  """After `steps` steps: of the `masked` entries (mask 0) in `kernels` masked kernels,
  `nonzero` are not exactly zero; `changed_masks`: masks that differ from before. An export
  without masks (`kernels == 0`) is not applicable: `zeros_before` / `zeros_after` count the
  zero kernel entries instead."""

  name: ClassVar[str] = 'masked weights stay zero'
  steps: int
  kernels: int
  masked: int
  nonzero: int
  changed_masks: Tuple[str, ...]
  zeros_before: int = 0
  zeros_after: int = 0

  @property
  def ok(self) -> Optional[bool]:
    if not self.kernels:
      return None
    return self.nonzero == 0 and not self.changed_masks

  @property
  def detail(self) -> str:
    if not self.kernels:
      return (
        f'no mask variables in this export; zero kernel entries {self.zeros_before} before, '
        f'{self.zeros_after} after {self.steps} steps'
      )
    return (
      f'{self.masked} masked entries in {self.kernels} kernels, {self.nonzero} nonzero after '
      f'{self.steps} steps, masks changed: {list(self.changed_masks) or "none"}'
    )


def masked_zeros(
  before: Weights, after: Weights, pairs: Sequence[Tuple[str, str]], steps: int
) -> MaskedZeros:
  """Masked entries of the kernels after `steps` steps (`after`) from `before`; `pairs`:
  (kernel, mask) names (`mask_pairs`), the mask of `after` deciding what is masked."""
  if not pairs:
    kernels = [n for n in before if n.endswith('kernel')]
    return MaskedZeros(
      steps,
      0,
      0,
      0,
      (),
      sum(int(np.count_nonzero(before[n] == 0)) for n in kernels),
      sum(int(np.count_nonzero(after[n] == 0)) for n in kernels),
    )
  return MaskedZeros(
    steps,
    len(pairs),
    sum(int(np.count_nonzero(before[m] == 0)) for _, m in pairs),
    sum(int(np.count_nonzero(after[k][after[m] == 0])) for k, m in pairs),
    tuple(m for _, m in pairs if not np.array_equal(after[m], before[m])),
  )


@dataclasses.dataclass(frozen=True)
class LossFalls(Check):
  """The file's `losses` of several steps on one batch at `learning_rate`, and TF's
  `tf_losses` beside them: the last below the first, all finite."""

  name: ClassVar[str] = 'loss falls'
  learning_rate: float
  losses: Tuple[float, ...]
  tf_losses: Tuple[float, ...]

  @property
  def ok(self) -> bool:
    return bool(self.losses[-1] < self.losses[0] and all(np.isfinite(self.losses)))

  @property
  def detail(self) -> str:
    return (
      f"lr {self.learning_rate:g} (the export's own): losses "
      + ', '.join(f'{v:.4f}' for v in self.losses)
      + ' (TF: '
      + ', '.join(f'{v:.4f}' for v in self.tf_losses)
      + ')'
    )


def loss_falls(
  losses: Sequence[float], tf_losses: Sequence[float], learning_rate: float
) -> LossFalls:
  """`losses` (at least two) of consecutive steps on one batch; `tf_losses` printed beside."""
  if len(losses) < 2:
    raise ValueError(f'loss_falls needs at least 2 losses, got {len(losses)}')
  return LossFalls(
    float(learning_rate), tuple(float(v) for v in losses), tuple(float(v) for v in tf_losses)
  )


def _differing(a: Weights, b: Weights) -> Tuple[str, ...]:
  """Names in only one of `a`, `b`, or whose values differ in a bit."""
  only = set(a) ^ set(b)
  diff = {k for k in set(a) & set(b) if np.asarray(a[k]).tobytes() != np.asarray(b[k]).tobytes()}
  return tuple(sorted(only | diff))


@dataclasses.dataclass(frozen=True)
class RoundTrip(Check):
  """`set_weights` then `get_weights`: of `variables`, `differing` came back changed."""

  name: ClassVar[str] = 'set_weights/get_weights round trip'
  variables: int
  differing: Tuple[str, ...]

  @property
  def ok(self) -> bool:
    return not self.differing

  @property
  def detail(self) -> str:
    return f'{self.variables} variables, bitwise' + (
      f'; differing: {list(self.differing[:4])}' if self.differing else ''
    )


def round_trip(set_values: Weights, got: Weights) -> RoundTrip:
  """What `get_weights` returned (`got`) after `set_weights(**set_values)`, bitwise."""
  return RoundTrip(len(set_values), _differing(got, set_values))


@dataclasses.dataclass(frozen=True)
class SaveRestore(Check):
  """`save`, the checkpoint file, other weights, `restore`: of `variables`, `differing` were
  not restored bitwise, `restored_differing` not returned so by `restore`; the learning rate
  saved and restored; `checkpoint_bytes`: the file's size."""

  name: ClassVar[str] = 'save/restore round trip'
  variables: int
  differing: Tuple[str, ...]
  restored_differing: Tuple[str, ...]
  learning_rate_saved: float
  learning_rate_restored: float
  checkpoint_bytes: int

  @property
  def ok(self) -> bool:
    return (
      not self.differing
      and not self.restored_differing
      and self.learning_rate_restored == np.float32(self.learning_rate_saved)
    )

  @property
  def detail(self) -> str:
    text = (
      f'{self.variables} variables and the learning rate, bitwise '
      f'({self.checkpoint_bytes} bytes checkpoint)'
    )
    if not self.ok:
      text += (
        f'; differing after restore: {list(self.differing[:4])}, returned by restore: '
        f'{list(self.restored_differing[:4])}, learning rate {self.learning_rate_restored!r} '
        f'for {self.learning_rate_saved!r}'
      )
    return text


def save_restore(
  saved: Weights,
  got: Weights,
  restored: Weights,
  learning_rate_saved: float,
  learning_rate_restored: float,
  checkpoint_bytes: int,
) -> SaveRestore:
  """`saved`: the variables when `save` ran; `got`: `get_weights` after `restore`;
  `restored`: the variables `restore` returned (its learning rate apart)."""
  return SaveRestore(
    len(saved),
    _differing(got, saved),
    _differing(restored, saved),
    float(learning_rate_saved),
    float(learning_rate_restored),
    int(checkpoint_bytes),
  )


@dataclasses.dataclass(frozen=True)
class LearningRateApplies(Check):
  """A step at learning rate 0: the trainable variables it `changed` (of `trainable`)."""

  name: ClassVar[str] = 'set_learning_rate applies'
  trainable: int
  changed: Tuple[str, ...]

  @property
  def ok(self) -> bool:
    return not self.changed

  @property
  def detail(self) -> str:
    return f'a step at lr 0 changed {"some" if self.changed else "no"} trainable weight'


def learning_rate_applies(
  before: Weights, after: Weights, trainable: Sequence[str]
) -> LearningRateApplies:
  """`after`: the variables after one step at learning rate 0 from `before`; `trainable`:
  the names of the trainable variables, which must be unchanged."""
  changed = tuple(n for n in trainable if not np.array_equal(after[n], before[n]))
  return LearningRateApplies(len(trainable), changed)
