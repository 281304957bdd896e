"""Estimands against hand-computed values, and interval coverage on synthetic data."""

import math

import numpy as np
import pytest

from replay import estimands as est

P = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
Q = np.array([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]])


def test_distances_by_hand():
    # Row 0: |0.25| + 0 + |0.25| = 0.5, TV 0.25; row 1: 0. Mean 0.125.
    assert est.total_variation(P, Q) == pytest.approx(0.125, abs=1e-15)
    # Hellinger row 0: sqrt(1/2 * ((sqrt.5 - sqrt.25)^2 + 0 + (0 - sqrt.25)^2)).
    h0 = math.sqrt(0.5 * ((math.sqrt(0.5) - 0.5) ** 2 + 0.25))
    assert est.hellinger(P, Q) == pytest.approx(h0 / 2, abs=1e-15)
    # JS row 0 with m = (0.375, 0.5, 0.125), natural log.
    kl_p = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.5)
    kl_q = 0.25 * math.log(0.25 / 0.375) + 0.5 * math.log(1.0) + 0.25 * math.log(0.25 / 0.125)
    assert est.jensen_shannon(P, Q) == pytest.approx((0.5 * kl_p + 0.5 * kl_q) / 2, abs=1e-15)
    # argmax row 0: P ties 0 and 1 -> 0; Q -> 1. Row 1 agrees.
    assert est.disagreement(P, Q) == 0.5
    assert est.accuracy(Q, [1, 2]) == 1.0 and est.accuracy(P, [1, 2]) == 0.5
    assert est.loss(Q, [1, 2]) == pytest.approx((-math.log(0.5) - math.log(0.5)) / 2)


def test_identical_inputs_give_exact_zero_and_bounds_hold():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=50)
    q = rng.dirichlet(np.ones(10), size=50)
    for fn in (est.total_variation, est.jensen_shannon, est.hellinger, est.disagreement):
        assert fn(p, p) == 0.0
        assert fn(p, q) == pytest.approx(fn(q, p))
    assert 0 < est.total_variation(p, q) <= 1
    assert 0 < est.jensen_shannon(p, q) <= math.log(2)
    assert 0 < est.hellinger(p, q) <= 1


def test_linear_cka_properties():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8))
    rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    assert est.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert est.linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-12)
    assert est.linear_cka(x, rng.standard_normal((200, 8))) < 0.2


def test_parameter_distance_per_layer():
    a = {"w": np.array([0.0, 3.0], dtype=np.float32), "b": np.array([1.0], dtype=np.float32), "n": np.array([5])}
    b = {"w": np.array([4.0, 0.0], dtype=np.float32), "b": np.array([1.0], dtype=np.float32), "n": np.array([7])}
    total, per = est.parameter_distance(a, b)
    assert total == 5.0 and per == {"b": 0.0, "w": 5.0}


def test_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.20, float("nan")]
    q, rejected = est.benjamini_hochberg(p, alpha=0.05)
    # sorted 0.01, 0.03, 0.04, 0.20 (m = 4): 0.04, 0.06, 0.0533, 0.20 -> monotone 0.04, 0.0533, 0.0533, 0.20
    assert q[0] == pytest.approx(0.04) and q[2] == pytest.approx(0.04 * 4 / 3) and q[1] == pytest.approx(0.04 * 4 / 3)
    assert q[3] == pytest.approx(0.20) and math.isnan(q[4])
    assert rejected == [True, False, False, False, False]


def test_tost():
    assert est.tost([0.001, -0.002, 0.0015, 0.0, -0.001, 0.002], margin=0.05)["equivalent"]
    assert not est.tost([0.1, 0.12, 0.09, 0.11], margin=0.05)["equivalent"]
    exact = est.tost([0.0] * 5, margin=0.01)
    assert exact["equivalent"] is True and exact["p_value"] == 0.0


def test_placebo_values_give_exact_zero_intervals():
    e = est.paired_effect([0.0] * 5)
    assert e["mean"] == 0.0 and e["bca"] == (0.0, 0.0) and e["t"] == (0.0, 0.0) and e["p_value"] == 1.0


@pytest.mark.parametrize("method", ["bca", "t"])
def test_interval_coverage_on_synthetic_data(method):
    """300 synthetic experiments of 8 seeds with true mean 0.3: the 95% intervals cover it at a
    rate within [0.88, 0.99] (BCa is known to undercover a little at n = 8)."""
    rng = np.random.default_rng(123)
    covered = 0
    trials = 300
    for _ in range(trials):
        values = 0.3 + 0.1 * rng.standard_normal(8)
        lo, hi = est.paired_effect(values, n_resamples=400)[method]
        covered += lo <= 0.3 <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_decay_fit_recovers_a_half_life_and_flags_no_decay():
    rng = np.random.default_rng(7)
    h = np.array([0, 5, 10, 20, 40, 80], dtype=float)
    curve = 0.5 * 2 ** (-h / 15.0)
    seeds = curve + 0.01 * rng.standard_normal((6, h.size))
    fit = est.fit_decay(h, seeds, n_resamples=200)
    assert fit["fit_ok"] and abs(fit["half_life"] - 15.0) < 2.0
    assert fit["interval"][0] <= fit["half_life"] <= fit["interval"][1]
    flat = est.fit_decay(h, 0.3 + 0.0 * seeds, n_resamples=50)
    assert math.isinf(flat["half_life"]) and not flat["fit_ok"] and flat["interval"] == (math.inf, math.inf)
    none = est.fit_decay(h, np.zeros_like(seeds), n_resamples=50)
    assert math.isnan(none["half_life"]) and "no positive excess" in none["reason"]
