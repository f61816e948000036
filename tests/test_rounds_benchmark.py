"""The per-round ratios of `benchmarks.rounds` (the figure its round-time target is read from)."""

import os
import statistics

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

from benchmarks import rounds  # pylint: disable=g-import-not-at-top


def test_ratio_summary_pairs_rounds_and_leaves_out_the_tracing_round():
  # Round 1 (tracing) is far off and must not count; the others pair round by round.
  fedmef = [30.0, 1.2, 1.5, 1.1, 2.0]
  rigl = [5.0, 1.0, 1.0, 1.0, 1.6]
  middle, low, high = rounds.ratio_summary(fedmef, rigl)
  # Ratios of rounds 2..5: 1.2, 1.5, 1.1, 1.25 -> median (1.2 + 1.25) / 2.
  assert middle == pytest.approx(1.225)
  assert (low, high) == (pytest.approx(1.1), pytest.approx(1.5))
  # A ratio of medians would be 1.35 / 1.0 here: the per-round figure is a different number.
  assert statistics.median(fedmef[1:]) / statistics.median(rigl[1:]) == pytest.approx(1.35)


def test_ratio_summary_of_a_single_round_uses_it_and_refuses_unequal_runs():
  assert rounds.ratio_summary([3.0], [2.0]) == (1.5, 1.5, 1.5)
  with pytest.raises(ValueError, match='equally many rounds'):
    rounds.ratio_summary([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match='equally many rounds'):
    rounds.ratio_summary([], [])
