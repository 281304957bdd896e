"""replay.estimands.verdict: one verdict per arm and horizon from the per-seed excess over the
reference arm. Each verdict by hand, the consistency with the intervals on many random draws,
the calibration of both sides, and the edge cases. Fixed seeds throughout."""

import math

import numpy as np
import pytest
from scipy import stats

from replay import estimands as est

MEMORY, NO_MEMORY, INCONCLUSIVE = est.VERDICTS


def test_memory_beyond_chaos_by_hand():
    v = [0.05, 0.06, 0.055, 0.07, 0.065]
    r = est.verdict(v, floor=0.1)
    assert r["verdict"] == MEMORY and r["margin_abs"] == pytest.approx(0.01) and r["margin_rel"] == 0.1
    # mean 0.06, sd = sqrt((1e-4 + 0 + 2.5e-5 + 1e-4 + 2.5e-5) / 4) = 0.0079057, se = 0.0035355
    se = math.sqrt(2.5e-4 / 4 / 5)
    assert r["mean"] == pytest.approx(0.06) and r["p_value"] == pytest.approx(stats.ttest_1samp(v, 0).pvalue)
    assert r["interval"] == pytest.approx((0.06 - 2.776445105 * se, 0.06 + 2.776445105 * se))
    assert r["interval_90"] == pytest.approx((0.06 - 2.131846786 * se, 0.06 + 2.131846786 * se))  # t_{4, 0.95}
    assert r["interval"] == est.paired_effect(v)["interval"]  # the default interval
    assert "0.06" in r["reason"] and "p = " in r["reason"] and math.isnan(r["q_value"])
    assert r["tost"] == est.tost(v, r["margin_abs"], 0.05)
    # the same excess against a floor ten times higher: significant, but below the margin -- said so
    small = est.verdict(v, floor=1.0)
    assert small["verdict"] == MEMORY and "smaller than the margin" in small["reason"]


def test_no_memory_beyond_chaos_by_hand():
    v = [0.001, -0.002, 0.0, 0.0015, -0.001]
    r = est.verdict(v, floor=0.1)
    assert r["verdict"] == NO_MEMORY and r["interval_90"][1] < r["margin_abs"] == pytest.approx(0.01)
    se = float(np.std(v, ddof=1)) / math.sqrt(5)
    assert r["tost"]["p_upper"] == pytest.approx(stats.t.cdf((np.mean(v) - 0.01) / se, 4)) and r["tost"]["p_upper"] < 0.05
    assert r["tost"]["margin"] == pytest.approx(0.01) and "margin 0.01" in r["reason"]
    # the margin is relative to the floor: at a floor 20 times lower (m = 0.0005) it is not shown
    assert est.verdict(v, floor=0.005)["verdict"] == INCONCLUSIVE
    # a wider relative margin at the same floor: shown again
    assert est.verdict(v, floor=0.005, margin=1.0)["verdict"] == NO_MEMORY


def test_a_negative_excess_is_no_memory_beyond_chaos_though_not_equivalent():
    v = [-0.05, -0.06, -0.04, -0.07, -0.05]  # the arm moves the model less than the bit flip
    r = est.verdict(v, floor=0.1)
    assert r["verdict"] == NO_MEMORY and not r["tost"]["equivalent"] and r["tost"]["p_lower"] > 0.5


def test_inconclusive_by_hand():
    r = est.verdict([0.02, -0.03, 0.05, -0.01, 0.04], floor=0.1)
    assert r["verdict"] == INCONCLUSIVE and r["p_value"] > 0.05 and r["interval_90"][1] >= r["margin_abs"]
    assert r["reason"].startswith("neither")


def test_q_value_decides_the_memory_side():
    v = [0.05, 0.06, 0.055, 0.07, 0.065]
    adjusted = est.verdict(v, floor=0.1, q_value=0.2)  # not a discovery after BH across arms
    assert adjusted["verdict"] == INCONCLUSIVE and adjusted["q_value"] == 0.2 and "q = 0.2" in adjusted["reason"]
    assert est.verdict(v, floor=0.1, q_value=0.04)["verdict"] == MEMORY
    # a q-value smaller than the p-value (not from BH) cannot override an interval containing 0
    noisy = [0.02, -0.03, 0.05, -0.01, 0.04]
    assert est.verdict(noisy, floor=0.1, q_value=0.001)["verdict"] == INCONCLUSIVE
    assert est.verdict(v, floor=0.1, q_value=float("nan"))["verdict"] == INCONCLUSIVE
    # with the q-values of benjamini_hochberg over three arms
    arms = [v, noisy, [0.001, -0.002, 0.0, 0.0015, -0.001]]
    q, _ = est.benjamini_hochberg([est.paired_effect(a)["p_value"] for a in arms])
    assert [est.verdict(a, floor=0.1, q_value=qa)["verdict"] for a, qa in zip(arms, q)] == [MEMORY, INCONCLUSIVE,
                                                                                            NO_MEMORY]


def test_verdicts_agree_with_their_intervals_on_random_draws():
    """600 random experiments (n 3 to 8, means around 0 and the margin): never "memory" with an
    interval containing 0, never "no memory" with the 90% interval reaching the margin; the
    verdict is exactly the rule, and every verdict occurs."""
    rng = np.random.default_rng(42)
    seen = set()
    for _ in range(600):
        n = int(rng.integers(3, 9))
        v = rng.normal(rng.uniform(-0.02, 0.04), rng.uniform(0.002, 0.03), n)
        r = est.verdict(v, floor=0.1)
        seen.add(r["verdict"])
        memory_rule = r["p_value"] <= 0.05 and r["mean"] > 0
        if r["verdict"] == MEMORY:
            assert memory_rule and r["interval"][0] > 0
        else:
            assert not (memory_rule and r["interval"][0] > 0)
            assert (r["verdict"] == NO_MEMORY) == (r["tost"]["p_upper"] < 0.05)
        if r["verdict"] == NO_MEMORY:
            assert r["interval_90"][1] < r["margin_abs"]
    assert seen == set(est.VERDICTS)


def test_both_sides_are_calibrated():
    """Per-seed excess ~ N(mu, 0.01^2), 5 seeds, 600 experiments (binomial sd of 0.05: 0.009).
    At mu = 0 "memory" occurs in ~2.5% (the upper half of a two-sided 5% test); at mu = +m, the
    edge of the margin, "no memory" occurs in ~5% (the one-sided test at alpha)."""
    rng = np.random.default_rng(7)
    at_zero = [est.verdict(rng.normal(0.0, 0.01, 5), floor=0.1)["verdict"] for _ in range(600)]
    at_margin = [est.verdict(rng.normal(0.01, 0.01, 5), floor=0.1)["verdict"] for _ in range(600)]
    assert 0.005 <= at_zero.count(MEMORY) / 600 <= 0.05
    assert 0.025 <= at_margin.count(NO_MEMORY) / 600 <= 0.08


def test_zero_variance_is_decided_exactly():
    zeros = est.verdict([0.0] * 5, floor=0.1)
    assert zeros["verdict"] == NO_MEMORY and zeros["interval"] == (0.0, 0.0) and "exactly 0" in zeros["reason"]
    assert zeros["interval_90"] == (0.0, 0.0) and zeros["p_value"] == 1.0
    assert est.verdict([0.005] * 4, floor=0.1)["verdict"] == NO_MEMORY  # exactly below m = 0.01
    assert est.verdict([-0.3] * 4, floor=0.1)["verdict"] == NO_MEMORY
    above = est.verdict([0.02] * 4, floor=0.1, q_value=float("nan"))
    assert above["verdict"] == MEMORY and above["interval"] == (0.02, 0.02) and "exact" in above["reason"]
    assert est.verdict([0.25] * 3, floor=0.5, margin=0.5)["verdict"] == MEMORY  # c == m: not shown below m


def test_edge_cases_are_inconclusive_with_a_reason():
    assert est.verdict([0.05, 0.06, 0.055, 0.07, 0.065], floor=np.float32(0.1))["verdict"] == MEMORY
    for floor in (0.0, -0.1, float("nan"), float("inf"), None, "0.1x"):
        r = est.verdict([0.1, 0.2, 0.3], floor=floor)
        assert r["verdict"] == INCONCLUSIVE and "floor" in r["reason"] and r["tost"] is None
    one = est.verdict([0.3], floor=0.1)
    assert one["verdict"] == INCONCLUSIVE and "two seeds" in one["reason"] and one["mean"] == 0.3
    bad = est.verdict([0.1, float("nan"), 0.2], floor=0.1)
    assert bad["verdict"] == INCONCLUSIVE and "non-finite" in bad["reason"]
    assert est.verdict([], floor=0.1)["verdict"] == INCONCLUSIVE
    with pytest.raises(ValueError):
        est.verdict([0.1, 0.2], floor=0.1, margin=0.0)
    with pytest.raises(ValueError):
        est.verdict([0.1, 0.2], floor=0.1, alpha=0.5)
