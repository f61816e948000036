"""Tests of fedmef_tf.schedules against hand-computed values (ALGORITHM.md, "One round t")."""

import math

import numpy as np
import pytest

from fedmef_tf import schedules


@pytest.mark.parametrize(
  't,expected',
  [(0, False), (5, False), (10, True), (20, True), (300, True), (310, False), (15, False)],
)
def test_is_adjustment_round(t, expected):
  assert bool(schedules.is_adjustment_round(t, 10, 300)) is expected


def test_no_adjustment_when_t_end_zero():
  assert not bool(schedules.is_adjustment_round(10, 10, 0))


@pytest.mark.parametrize(
  't,expected',
  [
    (150, 0.1),  # cos(pi/2) = 0
    (100, 0.15),  # 0.1 * (1 + 0.5)
    (10, 0.1 * (1 + math.cos(math.pi / 30))),  # 0.19945...
    (300, 0.0),  # cos(pi) = -1
    (400, 0.0),  # after T_end
  ],
)
def test_adjustment_fraction(t, expected):
  np.testing.assert_allclose(float(schedules.adjustment_fraction(t, 0.2, 300)), expected, atol=1e-7)


def test_adjustment_counts_floor():
  # 0.15 * [100, 7, 30, 3] = [15, 1.05, 4.5, 0.45] -> floor.
  k = schedules.adjustment_counts(0.15, [100, 7, 30, 3])
  np.testing.assert_array_equal(k.numpy(), [15, 1, 4, 0])
  assert k.dtype.name == 'int32'


def test_adjustment_counts_exact_products_not_floored_down():
  # 0.1 * 30 is 3.0000000000000004 in float64 and 2.9999998 in float32: must give 3.
  np.testing.assert_array_equal(schedules.adjustment_counts(0.1, [30, 10]).numpy(), [3, 1])
  np.testing.assert_array_equal(schedules.adjustment_counts(0.3, [10]).numpy(), [3])


@pytest.mark.parametrize('nnz,expected', [(20, 7), (40, 14), (10, 3), (100, 35)])
def test_adjustment_counts_exact_at_half_t_end(nnz, expected):
  # alpha 0.7 at t = T_end / 2: alpha_t = 0.35 exactly, so 0.35 * 20 = 7 and 0.35 * 40 = 14
  # (float32 alpha_t is 0.34999999 and would floor them to 6 and 13).
  alpha_t = schedules.adjustment_fraction(150, 0.7, 300)
  assert alpha_t.dtype.name == 'float64'
  k = schedules.adjustment_counts(alpha_t, [nnz])
  np.testing.assert_array_equal(k.numpy(), [expected])
  np.testing.assert_array_equal(schedules.adjustment_counts(0.35, [nnz]).numpy(), [expected])


def test_adjustment_counts_capped_by_inactive():
  # A layer with 9 of 10 active has one inactive position: k <= 1.
  k = schedules.adjustment_counts(0.5, [9, 4], sizes=[10, 10])
  np.testing.assert_array_equal(k.numpy(), [1, 2])


@pytest.mark.parametrize(
  'n,b,e,expected', [(130, 64, 5, 15), (128, 64, 5, 10), (0, 64, 5, 0), (1, 64, 1, 1)]
)
def test_local_step_budget(n, b, e, expected):
  assert int(schedules.local_step_budget(n, b, e)) == expected


@pytest.mark.parametrize('t,expected', [(1, 0.1), (2, 0.1 * 0.1**0.5), (3, 0.01), (9, 0.01)])
def test_client_learning_rate(t, expected):
  np.testing.assert_allclose(
    float(schedules.client_learning_rate(t, 0.1, 0.01, 3)), expected, rtol=1e-6
  )


def test_client_learning_rate_single_round():
  np.testing.assert_allclose(float(schedules.client_learning_rate(1, 0.1, 0.01, 1)), 0.1)


def test_adjustment_fraction_t_end_zero_is_zero():
  assert float(schedules.adjustment_fraction(5, 0.2, 0)) == 0.0
