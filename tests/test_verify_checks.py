"""The checks of `tflite_export.verify` (`tflite_export.checks`) on hand-made values.

Each check passes on values as a good export gives them and fails, with the measured number,
on values broken on purpose. The same checks on a real export are in `test_tflite_export.py`.
"""

import numpy as np
import pytest

from tflite_export import checks

# -- the step tolerance -------------------------------------------------------------------------


def test_step_tolerance_passes_flips_within_the_reference_spread_only():
  rng = np.random.RandomState(0)
  before = {'w': np.zeros(1000, np.float32)}
  ref = {'w': rng.standard_normal(1000).astype(np.float32)}
  flipped = {'w': ref['w'].copy()}
  flipped['w'][7] += 0.05 * np.max(np.abs(ref['w']))  # one entry 5% off: a ReLU flip
  # Without a measured spread the fixed STEP_RTOL rejects it ...
  alone = checks.step_mismatch(before, flipped, ref)
  assert not alone.ok and alone.max_rel == pytest.approx(0.05, rel=1e-3)
  assert alone.max_name == 'w' and alone.max_allowed == checks.STEP_RTOL
  # ... a reference that itself moves one entry by 4% under a one-ulp change accepts it ...
  rerun = {'w': ref['w'].copy()}
  rerun['w'][300] -= 0.04 * np.max(np.abs(ref['w']))
  with_spread = checks.step_mismatch(before, flipped, ref, [rerun])
  assert with_spread.ok and with_spread.max_allowed == pytest.approx(0.08, rel=1e-3)
  assert with_spread.l2_rel < checks.STEP_RTOL
  # ... but not a step 10% too large everywhere, whose norm is 10% off.
  scaled = {'w': ref['w'] * 1.1}
  wrong = checks.step_mismatch(before, scaled, ref, [rerun])
  assert not wrong.ok and wrong.l2_rel == pytest.approx(0.1, rel=1e-3)


def test_a_variable_the_reference_leaves_unchanged_must_stay_within_1e7():
  before = {'mask': np.ones(4, np.float32), 'k': np.zeros(4, np.float32)}
  ref = {'mask': np.ones(4, np.float32), 'k': np.full(4, 0.5, np.float32)}
  moved = {'mask': np.array([1, 1, 0, 1], np.float32), 'k': ref['k']}
  m = checks.step_mismatch(before, moved, ref)
  assert m.max_rel == float('inf') and m.max_name == 'mask' and not m.ok
  assert checks.step_mismatch(before, dict(ref), ref).max_rel == 0.0


# -- the file -------------------------------------------------------------------------------------


def test_required_signatures_names_the_missing_ones():
  assert checks.required_signatures(list(checks.SIGNATURES) + ['dense_gradients']).ok
  result = checks.required_signatures(['train', 'infer', 'metadata'])
  assert not result.ok
  assert result.missing == ('get_weights', 'set_weights', 'save', 'restore', 'set_learning_rate')
  assert result.detail.startswith("missing signatures ['get_weights'")


def test_finite_weights_counts_non_finite_entries_per_weight():
  w = {'a': np.ones(5, np.float32), 'b': np.array([1.0, np.nan, np.inf, 2.0], np.float32)}
  result = checks.finite_weights(w)
  assert not result.ok and result.non_finite == {'b': (2, 4)}
  assert result.detail == 'weight b holds 2 NaN or infinite values of 4'
  assert checks.finite_weights({'a': w['a']}).ok


def test_mask_pairs_match_kernels_with_their_own_layers_mask():
  names = ['w000_c1_kernel', 'w001_c1_bias', 'w002_c1_mask', 'w003_c2_kernel', 'w004_xc1_mask']
  assert checks.mask_pairs(names) == [('w000_c1_kernel', 'w002_c1_mask')]


# -- agreement with TF ----------------------------------------------------------------------------


def _logits():
  rng = np.random.RandomState(1)
  ref = rng.standard_normal((8, 10)).astype(np.float32)
  ref[3, 4] = 5.0  # largest |logit|: the tolerance is INFER_TOL * 5
  return ref


def test_infer_passes_within_its_tolerance_and_fails_beyond_it():
  ref = _logits()
  good = ref.copy()
  good[0, 0] += 2e-4
  result = checks.infer_matches(good, ref)
  assert result.ok and result.tolerance == pytest.approx(5 * checks.INFER_TOL)
  assert result.max_abs_diff == pytest.approx(2e-4, rel=1e-3)
  bad = ref.copy()
  bad[2, 7] -= 1e-3
  result = checks.infer_matches(bad, ref)
  assert not result.ok and result.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
  assert 'max |diff| 1.00e-03 (tol 5.00e-04)' in result.detail


def test_infer_fails_logits_of_the_wrong_shape():
  ref = _logits()
  result = checks.infer_matches(ref[:1], ref)  # broadcasts, equal values, wrong shape
  assert not result.ok and result.shape == (1, 10) and result.reference_shape == (8, 10)


def _step():
  rng = np.random.RandomState(2)
  before = {'k': rng.standard_normal(100).astype(np.float32), 'b': np.zeros(3, np.float32)}
  update = {'k': rng.standard_normal(100).astype(np.float32), 'b': np.ones(3, np.float32)}
  ref = {n: before[n] - 0.1 * update[n] for n in before}
  return before, ref


def test_train_step_fails_a_loss_beyond_its_tolerance_with_the_measured_difference():
  before, ref = _step()
  good = checks.train_step_matches(2.0, 2.0001, before, dict(ref), ref)
  assert good.ok and good.loss_tolerance == pytest.approx(2.0001 * checks.LOSS_RTOL)
  bad = checks.train_step_matches(2.01, 2.0, before, dict(ref), ref)
  assert not bad.ok and bad.mismatch.ok
  assert bad.loss_diff == pytest.approx(0.01) and bad.loss_tolerance == pytest.approx(2e-4)


def test_train_step_fails_an_update_perturbed_beyond_the_step_tolerance():
  before, ref = _step()
  got = dict(ref)
  got['k'] = ref['k'] + 0.05 * (ref['k'] - before['k'])  # every entry 5% off
  result = checks.train_step_matches(1.0, 1.0, before, got, ref, nudge=1e-6)
  assert not result.ok and result.loss_diff == 0.0
  assert result.mismatch.max_name == 'k' and result.mismatch.l2_rel == pytest.approx(0.05)
  assert 'TF reruns nudged by 1.0e-06' in result.detail


def test_bae_step_needs_bae_to_move_the_kernels():
  before, ref = _step()
  plain = {n: v + 0.01 for n, v in ref.items()}
  moved = checks.bae_step_matches(1.0, 1.0, before, dict(ref), ref, plain, ['k'], 0.5)
  assert moved.ok and moved.bae_effect == pytest.approx(0.01, rel=1e-4)
  still = checks.bae_step_matches(1.0, 1.0, before, dict(ref), ref, dict(ref), ['k'], 0.5)
  assert not still.ok and still.bae_effect == 0.0 and still.mismatch.ok


def test_dense_gradients_fail_other_names_and_perturbed_gradients():
  rng = np.random.RandomState(3)
  ref = {'g0': rng.standard_normal(50).astype(np.float32)}
  assert checks.dense_gradients_match(dict(ref), ref).ok
  renamed = checks.dense_gradients_match({'g1': ref['g0']}, ref)
  assert not renamed.ok and renamed.differing_names == ('g0', 'g1')
  off = checks.dense_gradients_match({'g0': 1.1 * ref['g0']}, ref)
  assert not off.ok and off.mismatch.l2_rel == pytest.approx(0.1, rel=1e-4)


def test_sap_effect_must_exceed_its_minimum():
  before, ref = _step()
  sap_step = {n: v + 0.5 * (v - before[n]) for n, v in ref.items()}  # 50% away
  assert checks.sap_effect(before, sap_step, ref, 0.7).effect == pytest.approx(0.5)
  result = checks.sap_effect(before, dict(ref), ref, 0.7)  # the same as without SAP
  assert not result.ok and result.effect == 0.0 and result.minimum == checks.SAP_EFFECT_MIN


# -- training on the device -----------------------------------------------------------------------


def _masked_weights():
  mask = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  kernel = np.array([[0.3, 0.0, -0.2], [0.0, 0.0, 0.7]], np.float32)
  return {'w0_c_kernel': kernel, 'w1_c_mask': mask}, [('w0_c_kernel', 'w1_c_mask')]


def test_masked_zeros_count_a_masked_entry_set_nonzero():
  before, pairs = _masked_weights()
  after = {n: v.copy() for n, v in before.items()}
  after['w0_c_kernel'][0, 0] = 0.1  # an active entry may move
  good = checks.masked_zeros(before, after, pairs, 3)
  assert good.ok and good.masked == 3 and good.nonzero == 0 and good.kernels == 1
  after['w0_c_kernel'][1, 1] = 0.25  # a masked one may not
  bad = checks.masked_zeros(before, after, pairs, 3)
  assert not bad.ok and bad.nonzero == 1 and bad.changed_masks == ()
  assert '3 masked entries in 1 kernels, 1 nonzero after 3 steps' in bad.detail


def test_masked_zeros_fail_a_changed_mask():
  before, pairs = _masked_weights()
  after = {n: v.copy() for n, v in before.items()}
  after['w1_c_mask'][0, 1] = 1.0
  result = checks.masked_zeros(before, after, pairs, 2)
  assert not result.ok and result.changed_masks == ('w1_c_mask',) and result.nonzero == 0


def test_masked_zeros_do_not_apply_without_masks():
  before, _ = _masked_weights()
  after = {n: v + 1.0 for n, v in before.items()}
  result = checks.masked_zeros(before, after, [], 2)
  assert result.ok is None and result.zeros_before == 3 and result.zeros_after == 0
  assert result.line().startswith('N/A  masked weights stay zero: no mask variables')


def test_loss_falls_passes_a_falling_sequence_only():
  good = checks.loss_falls([2.3, 2.1, 1.9], [2.3, 2.1, 1.9], 0.05)
  assert good.ok and good.losses == (2.3, 2.1, 1.9)
  rising = checks.loss_falls([2.3, 2.4, 2.5], [2.3, 2.1, 1.9], 0.05)
  assert not rising.ok and rising.losses[-1] - rising.losses[0] == pytest.approx(0.2)
  assert 'losses 2.3000, 2.4000, 2.5000 (TF: 2.3000, 2.1000, 1.9000)' in rising.detail
  assert not checks.loss_falls([2.3, float('nan'), 1.0], [], 0.05).ok
  with pytest.raises(ValueError, match='at least 2'):
    checks.loss_falls([2.3], [2.3], 0.05)


def test_round_trips_name_what_came_back_different():
  w = {'a': np.ones(3, np.float32), 'b': np.zeros(2, np.float32)}
  assert checks.round_trip(w, {n: v.copy() for n, v in w.items()}).ok
  changed = dict(w, b=np.array([0.0, -0.0], np.float32))  # equal, but not bitwise
  result = checks.round_trip(w, changed)
  assert not result.ok and result.differing == ('b',) and result.variables == 2
  restored = checks.save_restore(w, dict(w), dict(w), 0.0123, float(np.float32(0.0123)), 64)
  assert restored.ok and restored.checkpoint_bytes == 64
  wrong_lr = checks.save_restore(w, dict(w), dict(w), 0.0123, 0.05, 64)
  assert not wrong_lr.ok and wrong_lr.learning_rate_restored == 0.05


def test_learning_rate_zero_must_leave_the_trainable_weights():
  w = {'k': np.ones(3, np.float32), 'mask': np.ones(3, np.float32)}
  assert checks.learning_rate_applies(w, dict(w), ['k']).ok
  result = checks.learning_rate_applies(w, dict(w, k=w['k'] * 0.9), ['k'])
  assert not result.ok and result.changed == ('k',) and result.trainable == 1
