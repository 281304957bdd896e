"""replay.estimands: distances against hand-worked values, CKA, parameter distance, seed-paired
effects and their intervals (with coverage on synthetic data of a known effect), the noise floor,
Benjamini-Hochberg, TOST and decay fits. Fixed seeds throughout: every test is deterministic."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from replay import estimands as est

# Three probe examples, three classes. Row 0 partly overlaps, row 1 is identical, row 2 has
# disjoint supports (and exact zeros everywhere).
P = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
Q = np.array([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
DISTANCES = [est.total_variation, est.jensen_shannon, est.hellinger, est.disagreement]


# ---------------------------------------------------------------------------- distances ----


def test_total_variation_by_hand():
    # row 0: 1/2 (|0.5-0.25| + |0.5-0.5| + |0-0.25|) = 1/2 * 0.5 = 0.25
    # row 1: identical -> 0;  row 2: 1/2 (1 + 0 + 1) = 1
    assert est.total_variation(P, Q) == pytest.approx((0.25 + 0.0 + 1.0) / 3, abs=1e-15)


def test_jensen_shannon_by_hand_natural_log():
    # row 0: m = (0.375, 0.5, 0.125)
    #   KL(p||m) = 0.5 ln(0.5/0.375) + 0.5 ln(0.5/0.5) + 0 = 0.5 ln(4/3)
    #   KL(q||m) = 0.25 ln(0.25/0.375) + 0.5 ln 1 + 0.25 ln(0.25/0.125) = 0.25 (ln(2/3) + ln 2) = 0.25 ln(4/3)
    #   JS = 1/2 * 0.5 ln(4/3) + 1/2 * 0.25 ln(4/3) = 0.375 ln(4/3)
    # row 1: 0;  row 2 (disjoint): m = (0.5, 0, 0.5), JS = 1/2 ln 2 + 1/2 ln 2 = ln 2
    row0 = 0.375 * math.log(4 / 3)
    assert est.jensen_shannon(P, Q) == pytest.approx((row0 + 0.0 + math.log(2)) / 3, abs=1e-15)
    # the natural log, not log2: disjoint supports give ln 2 = 0.693..., not 1
    assert est.jensen_shannon(P[2:], Q[2:]) == pytest.approx(math.log(2), abs=1e-15)


def test_hellinger_by_hand():
    # row 0: 1/2 ((sqrt .5 - sqrt .25)^2 + 0 + (0 - sqrt .25)^2) = 1/2 ((0.75 - sqrt .5) + 0.25)
    #        = (1 - 1/sqrt 2) / 2, H = sqrt of that = 0.3826834...
    # row 1: 0;  row 2: sqrt(1/2 (1 + 1)) = 1
    row0 = math.sqrt((1 - 1 / math.sqrt(2)) / 2)
    assert row0 == pytest.approx(0.3826834323650898)
    assert est.hellinger(P, Q) == pytest.approx((row0 + 0.0 + 1.0) / 3, abs=1e-15)


def test_disagreement_by_hand_ties_go_to_lowest_index():
    # argmax P = (0 [tie 0/1 -> 0], 2, 0); argmax Q = (1, 2, 2): rows 0 and 2 differ -> 2/3
    assert est.disagreement(P, Q) == pytest.approx(2 / 3, abs=1e-15)
    tie = np.array([[0.4, 0.4, 0.2]])
    assert est.disagreement(tie, np.array([[0.5, 0.3, 0.2]])) == 0.0  # tie -> class 0 == argmax
    assert est.disagreement(tie, np.array([[0.3, 0.5, 0.2]])) == 1.0


def test_accuracy_and_loss_by_hand():
    labels = np.array([1, 2, 2])
    # argmax P = (0, 2, 0): only row 1 right -> 1/3; argmax Q = (1, 2, 2): all right -> 1
    assert est.accuracy(P, labels) == pytest.approx(1 / 3)
    assert est.accuracy(Q, labels) == 1.0
    # loss(P): -ln 0.5 - ln 0.5 - ln max(0, 1e-12) = 2 ln 2 + 12 ln 10, over 3 examples
    assert est.loss(P, labels) == pytest.approx((2 * math.log(2) + 12 * math.log(10)) / 3, rel=1e-14)
    # loss(Q): -ln 0.5 - ln 0.5 - ln 1 = 2 ln 2, over 3
    assert est.loss(Q, labels) == pytest.approx(2 * math.log(2) / 3, rel=1e-14)
    assert est.loss(P, labels, eps=1e-6) == pytest.approx((2 * math.log(2) + 6 * math.log(10)) / 3, rel=1e-14)
    with pytest.raises(ValueError):
        est.loss(P, [0, 1, 3])
    with pytest.raises(ValueError):
        est.accuracy(P, [0, 1])


def _random_pairs():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(10, 0.3), size=200)
    q = rng.dirichlet(np.full(10, 0.3), size=200)
    p[::7, :5] = 0.0  # exact zeros in the mix
    p /= p.sum(axis=1, keepdims=True)
    return p, q


def test_identical_inputs_give_exactly_zero_without_warnings():
    p, q = _random_pairs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 * log 0, division by zero, ... would raise here
        for fn in DISTANCES:
            assert fn(p, p) == 0.0 and math.copysign(1.0, fn(p, p)) == 1.0  # +0.0, bit for bit
            assert fn(p, p.copy()) == 0.0
            assert fn(p.astype(np.float32), p.astype(np.float32)) == 0.0
            assert fn(P, P) == 0.0
            assert np.isfinite(fn(p, q))


def test_symmetry_and_bounds():
    p, q = _random_pairs()
    for fn in DISTANCES:
        assert fn(p, q) == fn(q, p)  # exactly: every formula is symmetric term by term
    tv, js, h = est.total_variation(p, q), est.jensen_shannon(p, q), est.hellinger(p, q)
    assert 0 < tv <= 1 and 0 < js <= math.log(2) and 0 < h <= 1 and 0 < est.disagreement(p, q) <= 1
    # known inequalities between them (per example, hence for the means where convex/linear):
    assert js <= math.log(2) * tv + 1e-15  # JS <= ln2 * TV
    per_h = [est.hellinger(p[i], q[i]) for i in range(len(p))]
    per_tv = [est.total_variation(p[i], q[i]) for i in range(len(p))]
    for hi, ti in zip(per_h, per_tv):
        assert hi ** 2 - 1e-15 <= ti <= hi * math.sqrt(2 - hi ** 2) + 1e-15  # Le Cam
    # disjoint supports reach the upper bounds and never exceed them
    a, b = np.eye(4)[[0, 1, 2]], np.eye(4)[[3, 3, 0]]
    assert est.total_variation(a, b) == 1.0
    assert est.hellinger(a, b) == 1.0
    assert est.jensen_shannon(a, b) == pytest.approx(math.log(2), abs=1e-15) and est.jensen_shannon(a, b) <= math.log(2)


def test_distances_accept_torch_and_one_row_and_refuse_bad_input():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    p, q = torch.softmax(logits, 1), torch.softmax(2 * logits, 1)
    assert est.total_variation(p, q) == pytest.approx(est.total_variation(p.numpy(), q.numpy()))
    assert est.total_variation(P[0], Q[0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="non-negative"):
        est.total_variation(logits, logits)  # logits are not probabilities
    with pytest.raises(ValueError, match="sum to 1"):
        est.total_variation(logits.exp(), logits.exp())  # nor are unnormalized scores
    with pytest.raises(ValueError, match="non-negative"):
        est.hellinger(np.array([[1.5, -0.5]]), np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="one shape"):
        est.jensen_shannon(P, Q[:2])
    with pytest.raises(ValueError, match="finite"):
        est.disagreement(np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]))


# -------------------------------------------------------------------------- linear CKA ----


def test_linear_cka_by_hand_one_feature_is_squared_correlation():
    x = np.array([[1.0], [2.0], [3.0]])  # centered: (-1, 0, 1)
    y = np.array([[1.0], [0.0], [2.0]])  # centered: (0, -1, 1)
    # ||Y^T X||^2 = (0 + 0 + 1)^2 = 1;  ||X^T X|| = 2;  ||Y^T Y|| = 2  ->  1 / (2 * 2)
    assert est.linear_cka(x, y) == pytest.approx(0.25, abs=1e-15)


def test_linear_cka_identical_rotated_scaled_independent():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))  # correlated features
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert est.linear_cka(x, x) == 1.0  # identical: exactly
    assert est.linear_cka(x, x.copy()) == 1.0
    assert est.linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-12)  # orthogonal
    assert est.linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert est.linear_cka(x, -0.01 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-12)  # + offset
    assert est.linear_cka(x, x) == pytest.approx(est.linear_cka(x @ rotation, x), abs=1e-12)
    # not invariant to anisotropic scaling (this is CKA, not CCA)
    assert est.linear_cka(x, x * np.linspace(0.1, 10, 12)) < 0.99
    # independent representations: CKA ~ sqrt(d1 d2) / n = 12 / 300 = 0.04
    independent = est.linear_cka(x, rng.standard_normal((300, 12)))
    assert 0 <= independent < 0.1
    assert math.isnan(est.linear_cka(np.ones((300, 3)), x))  # constant over the examples
    # symmetric, torch accepted
    y = rng.standard_normal((300, 5))
    assert est.linear_cka(x, y) == pytest.approx(est.linear_cka(y, x), abs=1e-14)
    assert est.linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(est.linear_cka(x, y), abs=1e-14)


def test_linear_cka_gram_form_matches_feature_form_when_wide():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((6, 40)), rng.standard_normal((6, 30))  # n < d: the Gram form is used
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert est.linear_cka(x, y) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ parameter distance ----


def test_parameter_distance_per_layer_by_hand():
    a = {"fc.weight": torch.tensor([[0.0, 3.0]]), "fc.bias": torch.tensor([1.0]),
         "conv.weight": torch.ones(2, 2), "bn.num_batches_tracked": torch.tensor(5)}
    b = {"fc.weight": torch.tensor([[4.0, 0.0]]), "fc.bias": torch.tensor([1.0]),
         "conv.weight": torch.zeros(2, 2), "bn.num_batches_tracked": torch.tensor(9)}
    total, per = est.parameter_distance(a, b)
    # fc.weight: sqrt(4^2 + 3^2) = 5;  fc.bias: 0;  conv.weight: sqrt(4 * 1) = 2;  the int buffer is skipped
    assert per == {"conv.weight": 2.0, "fc.bias": 0.0, "fc.weight": 5.0}
    assert total == pytest.approx(math.sqrt(25 + 0 + 4), abs=1e-15)
    assert est.parameter_distance(a, a) == (0.0, {"conv.weight": 0.0, "fc.bias": 0.0, "fc.weight": 0.0})
    # dict order does not matter; numpy, bf16 and requires_grad tensors are accepted
    assert est.parameter_distance(dict(reversed(list(a.items()))), b) == (total, per)
    bf = {k: (v.to(torch.bfloat16).requires_grad_() if v.is_floating_point() else v) for k, v in a.items()}
    assert est.parameter_distance(bf, b)[0] == pytest.approx(total)
    assert est.parameter_distance({k: v.numpy() for k, v in a.items()}, b)[0] == pytest.approx(total)
    with pytest.raises(ValueError, match="same names"):
        est.parameter_distance(a, {k: v for k, v in b.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match="shapes"):
        est.parameter_distance(a, {**b, "fc.bias": torch.zeros(2)})


# ----------------------------------------------------------------- seed-paired effects ----


def test_paired_effect_by_hand():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    e = est.paired_effect(values, n_resamples=1000)
    # mean 3; sd = sqrt((4 + 1 + 0 + 1 + 4) / 4) = sqrt(2.5); se = sqrt(2.5 / 5) = sqrt(0.5)
    se = math.sqrt(0.5)
    assert e["mean"] == 3.0 and e["n"] == 5 and e["se"] == pytest.approx(se)
    # t_{4, 0.975} = 2.776445105 (tables)
    assert e["t"] == pytest.approx((3 - 2.776445105 * se, 3 + 2.776445105 * se), abs=1e-8)
    # t = 3 / sqrt(0.5) = 4.2426; two-sided p with 4 df, as scipy's one-sample t test
    assert e["t_stat"] == pytest.approx(3 / se)
    assert e["p_value"] == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, rel=1e-12)
    # BCa: the same as scipy's bootstrap with the same generator, inside the data's range
    ref = stats.bootstrap((np.array(values),), np.mean, n_resamples=1000, method="BCa", rng=np.random.default_rng(0))
    assert e["bca"] == (ref.confidence_interval.low, ref.confidence_interval.high)
    assert 1.0 <= e["bca"][0] < 3.0 < e["bca"][1] <= 5.0 and e["method"] == "BCa" and e["reason"] == ""
    assert est.paired_effect(values, n_resamples=1000) == e  # reproducible
    assert est.paired_effect(values, n_resamples=1000, random_state=1)["bca"] != e["bca"]


def test_paired_effect_degenerate_cases():
    placebo = est.paired_effect([0.0] * 6)
    assert placebo["mean"] == 0.0 and placebo["bca"] == (0.0, 0.0) and placebo["t"] == (0.0, 0.0)
    assert placebo["p_value"] == 1.0 and placebo["se"] == 0.0 and "zero" in placebo["reason"]
    negzero = est.paired_effect([-0.0] * 3)
    assert math.copysign(1.0, negzero["mean"]) == 1.0 and negzero["bca"] == (0.0, 0.0)
    const = est.paired_effect([0.2] * 4)
    assert const["mean"] == 0.2 and const["bca"] == (0.2, 0.2) and math.isnan(const["p_value"]) and const["reason"]
    one = est.paired_effect([0.3])
    assert one["mean"] == 0.3 and all(math.isnan(x) for x in one["bca"] + one["t"]) and "two seeds" in one["reason"]
    none = est.paired_effect([])
    assert none["n"] == 0 and math.isnan(none["mean"]) and none["reason"]
    bad = est.paired_effect([0.1, float("nan"), 0.2])
    assert math.isnan(bad["mean"]) and "non-finite" in bad["reason"]
    # one non-zero seed among zeros: BCa's jackknife is degenerate -> percentile, said so
    lone = est.paired_effect([0.0, 0.0, 1e-300, 0.0, 0.0])
    assert lone["method"] == "percentile" and "BCa" in lone["reason"] and not any(math.isnan(x) for x in lone["bca"])
    assert lone["se"] > 0  # no underflow to a zero variance


def _coverage(draw, truth, trials=400, n=8):
    rng = np.random.default_rng(123)
    covered = {"bca": 0, "t": 0}
    for _ in range(trials):
        e = est.paired_effect(draw(rng, n), n_resamples=1000)
        for method in covered:
            covered[method] += e[method][0] <= truth <= e[method][1]
    return {m: c / trials for m, c in covered.items()}


def test_interval_coverage_on_synthetic_data_with_a_known_effect():
    """400 synthetic experiments of 8 seeds, per-seed values ~ N(0.3, 0.1^2): the paired t
    interval is exact for normal data, so its 95% interval covers 0.3 in 95% of experiments; the
    band [0.92, 0.98] is about +-2.7 binomial sd (sqrt(.95 * .05 / 400) = 0.011). Bootstrap
    intervals use the plug-in sd and normal quantiles, so at n = 8 they undercover: about
    P(|T_7| < 1.96 sqrt(7/8)) = 0.89; band [0.85, 0.93] (+-2.5 sd). A 90% interval by mistake
    (t: 0.90, BCa: ~0.83) or an interval about the wrong centre falls outside both bands."""
    cov = _coverage(lambda rng, n: 0.3 + 0.1 * rng.standard_normal(n), 0.3)
    assert 0.92 <= cov["t"] <= 0.98, cov
    assert 0.85 <= cov["bca"] <= 0.93, cov


def test_t_test_is_calibrated_under_no_effect():
    """Under a zero effect the two-sided test rejects at 5% in 5% of 400 experiments (+-0.027)."""
    rng = np.random.default_rng(11)
    rejections = sum(est.paired_effect(rng.standard_normal(8), n_resamples=10)["p_value"] < 0.05 for _ in range(400))
    assert 0.023 <= rejections / 400 <= 0.077


# ------------------------------------------------------------------------ noise floor ----


def test_noise_floor_by_hand():
    # three seeds' predictions on one example; TV of pairs: (0,1): 0.1, (0,2): 0.3, (1,2): 0.2
    seeds = [np.array([[0.6, 0.4]]), np.array([[0.5, 0.5]]), np.array([[0.3, 0.7]])]
    f = est.noise_floor(seeds, est.total_variation, n_resamples=500)
    assert f["pair_index"] == [(0, 1), (0, 2), (1, 2)]
    assert f["pairs"] == pytest.approx([0.1, 0.3, 0.2], abs=1e-15)
    assert f["mean"] == pytest.approx(0.2, abs=1e-15) and f["n_seeds"] == 3
    # a resample's pairs of different seeds give a single pair value, or all three (mean 0.2):
    # (a seed drawn twice is never paired with itself), so the interval's ends are among them
    lo, hi = f["interval"]
    possible = [0.1, 0.2, 0.3]
    assert any(lo == pytest.approx(v) for v in possible) and any(hi == pytest.approx(v) for v in possible)
    assert lo < hi and lo <= f["mean"] <= hi
    assert est.noise_floor(seeds, "tv", n_resamples=500) == f  # by name; reproducible
    assert est.noise_floor([seeds[0]] * 4, "js")["mean"] == 0.0


def test_noise_floor_degenerate_and_ratio():
    one = est.noise_floor([P], "tv")
    assert math.isnan(one["mean"]) and one["reason"]
    two = est.noise_floor([P, Q], "tv")
    assert two["interval"] == (two["mean"], two["mean"]) and "single pair" in two["reason"]
    assert est.noise_ratio(0.05, 0.2) == 0.25
    assert math.isnan(est.noise_ratio(0.05, 0.0)) and math.isnan(est.noise_ratio(0.05, float("nan")))


# ------------------------------------------------------------------ multiple testing ----


def test_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.20, float("nan")]
    q, rejected = est.benjamini_hochberg(p, alpha=0.05)
    # m = 4 valid; sorted 0.01, 0.03, 0.04, 0.20 -> p * m / rank = 0.04, 0.06, 0.0533.., 0.20;
    # running minimum from the top: 0.04, 0.0533.., 0.0533.., 0.20
    assert q[0] == pytest.approx(0.04) and q[2] == pytest.approx(0.16 / 3) and q[1] == pytest.approx(0.16 / 3)
    assert q[3] == pytest.approx(0.20) and math.isnan(q[4])
    assert rejected == [True, False, False, False, False]
    assert est.benjamini_hochberg(p, alpha=0.06)[1] == [True, True, True, False, False]
    assert est.benjamini_hochberg([]) == ([], [])
    assert est.benjamini_hochberg([0.5, 0.5])[0] == [0.5, 0.5]  # ties: equal q
    assert est.benjamini_hochberg([0.9, 0.95])[0] == [0.95, 0.95]  # capped at 1 and monotone
    with pytest.raises(ValueError):
        est.benjamini_hochberg([0.1, 1.2])


def test_benjamini_hochberg_matches_scipy_and_the_step_up_rule():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = np.concatenate([rng.uniform(0, 1, 15), rng.uniform(0, 0.01, 5)])
        q, rejected = est.benjamini_hochberg(p, alpha=0.1)
        assert q == pytest.approx(stats.false_discovery_control(p, method="bh"), rel=1e-12)
        # step-up: reject the k smallest for the largest k with p_(k) <= k alpha / m
        order = np.sort(p)
        k = max([i + 1 for i in range(p.size) if order[i] <= (i + 1) * 0.1 / p.size], default=0)
        assert sum(rejected) == k and all(r == (x <= (order[k - 1] if k else -1)) for r, x in zip(rejected, p))
        # monotone: a smaller p never gets a larger q
        idx = np.argsort(p)
        assert all(np.diff(np.asarray(q)[idx]) >= 0)


# ---------------------------------------------------------------------- equivalence ----


def test_tost_by_hand():
    values = [0.01, -0.01, 0.02, 0.0]
    # mean 0.005; deviations 0.005, -0.015, 0.015, -0.005 -> sum of squares 5e-4, sd = sqrt(5e-4 / 3)
    se = math.sqrt(5e-4 / 3) / 2
    r = est.tost(values, margin=0.05)
    assert r["mean"] == pytest.approx(0.005) and r["se"] == pytest.approx(se)
    assert r["p_lower"] == pytest.approx(stats.t.sf((0.005 + 0.05) / se, 3))
    assert r["p_upper"] == pytest.approx(stats.t.cdf((0.005 - 0.05) / se, 3))
    assert r["p_value"] == max(r["p_lower"], r["p_upper"]) < 0.05 and r["equivalent"] is True
    narrow = est.tost(values, margin=0.01)  # the 90% t interval sticks out of (-0.01, 0.01)
    assert narrow["equivalent"] is False and narrow["p_value"] > 0.05
    assert est.tost([0.1, 0.12, 0.09, 0.11], margin=0.05)["equivalent"] is False


def test_tost_is_the_90_percent_interval_inside_the_margin_and_calibrated():
    rng = np.random.default_rng(4)
    for _ in range(200):
        v = rng.normal(rng.uniform(-0.05, 0.05), 0.03, size=6)
        lo, hi = stats.t.interval(0.90, 5, loc=v.mean(), scale=v.std(ddof=1) / math.sqrt(6))
        assert est.tost(v, margin=0.05)["equivalent"] == (-0.05 < lo and hi < 0.05)
    # at the margin (true mean = margin) it claims equivalence at most alpha of the time
    claims = sum(est.tost(rng.normal(0.05, 0.03, size=8), margin=0.05)["equivalent"] for _ in range(400))
    assert claims / 400 <= 0.075


def test_tost_degenerate():
    assert est.tost([0.0] * 5, margin=0.01)["equivalent"] is True
    assert est.tost([0.0] * 5, margin=0.01)["p_value"] == 0.0
    assert est.tost([0.02] * 5, margin=0.01)["equivalent"] is False
    one = est.tost([0.0], margin=0.01)
    assert one["equivalent"] is False and math.isnan(one["p_value"]) and one["reason"]
    with pytest.raises(ValueError):
        est.tost([0.0, 0.1], margin=0.0)


# ------------------------------------------------------------------------- lifetimes ----

H = np.array([0, 5, 10, 20, 40, 80], dtype=float)


def test_excess_effect_is_per_seed_difference():
    arm, ref = np.array([[0.3, 0.2], [0.5, 0.1]]), np.array([[0.1, 0.1], [0.2, 0.2]])
    np.testing.assert_allclose(est.excess_effect(arm, ref), [[0.2, 0.1], [0.3, -0.1]], atol=1e-15)
    with pytest.raises(ValueError):
        est.excess_effect(arm, ref[:1])


def test_decay_fit_recovers_a_known_half_life():
    rng = np.random.default_rng(7)
    truth = 15.0
    seeds = 0.5 * 2 ** (-H / truth) + 0.02 * rng.standard_normal((8, H.size))
    fit = est.fit_decay(H, seeds, n_resamples=400)
    assert fit["fit_ok"] and fit["reason"] == ""
    assert abs(fit["half_life"] - truth) < 1.5 and abs(fit["amplitude"] - 0.5) < 0.03
    assert fit["rate"] == pytest.approx(math.log(2) / fit["half_life"])
    assert fit["interval"][0] <= truth <= fit["interval"][1]
    assert fit["interval"][0] <= fit["half_life"] <= fit["interval"][1] and fit["r2"] > 0.99
    assert est.fit_decay(H, seeds, n_resamples=400) == fit  # reproducible
    # noiseless: exact up to the grid's resolution (1e-4 relative)
    exact = est.fit_decay(H, np.tile(0.5 * 2 ** (-H / truth), (3, 1)), n_resamples=20)
    assert exact["half_life"] == pytest.approx(truth, rel=2e-4) and exact["amplitude"] == pytest.approx(0.5, rel=1e-3)
    # shifting every delay shifts nothing but the amplitude at h = 0
    shifted = est.fit_decay(H + 3, np.tile(0.5 * 2 ** (-H / truth), (3, 1)), n_resamples=20)
    assert shifted["half_life"] == pytest.approx(truth, rel=2e-4)
    assert shifted["amplitude"] == pytest.approx(0.5 * 2 ** (3 / truth), rel=1e-3)


def test_decay_interval_covers_the_truth_in_repeated_experiments():
    """40 synthetic experiments (8 seeds, noise sd 0.02): the 95% percentile interval over seeds
    covers the true half-life in at least 85% (percentile intervals undercover a little at n=8)."""
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(40):
        seeds = 0.4 * 2 ** (-H / 25.0) + 0.02 * rng.standard_normal((8, H.size))
        lo, hi = est.fit_decay(H, seeds, n_resamples=200)["interval"]
        covered += lo <= 25.0 <= hi
    assert covered >= 34


def test_decay_fit_reports_inf_when_the_excess_does_not_decay():
    rng = np.random.default_rng(8)
    flat = est.fit_decay(H, np.full((6, H.size), 0.3), n_resamples=50)
    assert math.isinf(flat["half_life"]) and not flat["fit_ok"] and "does not decay" in flat["reason"]
    assert flat["interval"] == (math.inf, math.inf) and flat["rate"] == 0.0
    noisy_flat = est.fit_decay(H, 0.3 + 0.01 * rng.standard_normal((6, H.size)), n_resamples=100)
    assert math.isinf(noisy_flat["half_life"]) and not noisy_flat["fit_ok"]
    growing = est.fit_decay(H, 0.1 + 0.002 * H + 0.01 * rng.standard_normal((6, H.size)), n_resamples=100)
    assert math.isinf(growing["half_life"]) and "does not decay" in growing["reason"]


def test_decay_fit_no_effect_and_floor_at_zero():
    none = est.fit_decay(H, np.zeros((5, H.size)), n_resamples=50)
    assert math.isnan(none["half_life"]) and none["amplitude"] == 0.0 and not none["fit_ok"]
    assert "no positive excess" in none["reason"]
    # the reference moves the model more than the arm: a negative mean excess is no excess memory
    negative = est.fit_decay(H, -0.1 + 0.001 * np.arange(5)[:, None] + 0 * H, n_resamples=50)
    assert math.isnan(negative["half_life"]) and "no positive excess" in negative["reason"]
    # a tail below zero is clipped to zero before fitting (floor at zero), not fitted through
    # 0.5 * 2^(-h/10) - 0.02 at h = 40: 0.03125 - 0.02 = 0.01125 > 0; at h = 80: 0.00195 - 0.02 < 0 -> 0
    curve = 0.5 * 2 ** (-H / 10.0) - 0.02
    fit = est.fit_decay(H, np.tile(curve, (4, 1)), n_resamples=20)
    assert fit["mean_excess"][-1] == 0.0 and fit["mean_excess"][-2] == pytest.approx(0.01125)
    assert fit["fit_ok"] and 7.0 < fit["half_life"] < 10.0  # the floor pulls the tail to zero: a bit faster
    # all of the excess at the first delay: decays faster than the delays resolve, said so
    fast = est.fit_decay(H, np.tile([0.5, 0, 0, 0, 0, 0.0], (3, 1)), n_resamples=20)
    assert fast["fit_ok"] and fast["half_life"] < 5 and "not resolved" in fast["note"]
    single = est.fit_decay(H, np.tile(0.5 * 2 ** (-H / 15.0), (1, 1)))
    assert single["fit_ok"] and math.isnan(single["interval"][0]) and "no interval" in single["note"]
    with pytest.raises(ValueError):
        est.fit_decay(H, np.zeros((3, 4)))
    assert "two distinct delays" in est.fit_decay([5.0, 5.0], np.ones((3, 2)))["reason"]


def test_decay_fit_flags_extrapolated_and_open_intervals_as_keys():
    rng = np.random.default_rng(9)
    h = np.array([0, 5, 10, 20], dtype=float)  # span 20
    slow = est.fit_decay(h, 0.5 * 2 ** (-h / 60) + 0.002 * rng.standard_normal((5, h.size)), n_resamples=200)
    assert slow["fit_ok"] and slow["half_life"] > 20 and slow["extrapolated"] is True
    assert "extrapolated" in slow["note"]
    assert slow["interval_open"] == math.isinf(slow["interval"][1])
    quick = est.fit_decay(H, 0.5 * 2 ** (-H / 15) + 0.02 * rng.standard_normal((8, H.size)), n_resamples=200)
    assert quick["fit_ok"] and quick["extrapolated"] is False and quick["interval_open"] is False
    # three seeds decay, one grows: the mean decays (0.3 -> 0.18), but a resample with the growing
    # seed twice or more (P = 0.26) does not -> the interval is open above, said in both
    mixed = np.vstack([np.tile(0.3 * 2 ** (-h / 10), (3, 1)), 0.3 + 0.01 * h])
    wobbly = est.fit_decay(h, mixed, n_resamples=200)
    assert wobbly["fit_ok"] and wobbly["interval_open"] is True and math.isinf(wobbly["interval"][1])
    assert "interval open above" in wobbly["note"]
    flat = est.fit_decay(H, np.full((4, H.size), 0.3), n_resamples=20)
    assert flat["extrapolated"] is False and flat["interval_open"] is True  # (inf, inf)
    none = est.fit_decay(H, np.zeros((4, H.size)), n_resamples=20)
    assert none["extrapolated"] is False and none["interval_open"] is False


@pytest.mark.parametrize("beta, delays", [(0.9, [0, 1, 2, 4, 8, 16, 32]), (0.99, [0, 10, 25, 50, 100, 200])])
def test_fit_decay_reads_the_momentum_reset_lifetime(beta, delays):
    """State-space lifetime: zeroing the momentum buffer of SGD (momentum beta) leaves an update
    difference that shrinks like beta^h: half-life ln 2 / ln(1 / beta) = 6.579 steps
    at 0.9 and 68.968 at 0.99; fit_decay reads it back (up to its grid, 2e-4 relative)."""
    h = np.array(delays, dtype=float)
    truth = math.log(2) / math.log(1 / beta)
    assert truth == pytest.approx({0.9: 6.579, 0.99: 68.968}[beta], abs=1e-3)
    per_seed = 0.02 * np.array([[1.0], [1.1], [0.9]]) * beta ** h  # three seeds, different sizes
    fit = est.fit_decay(h, per_seed, n_resamples=50)
    assert fit["fit_ok"] and fit["half_life"] == pytest.approx(truth, rel=2e-4) and not fit["extrapolated"]
    assert fit["amplitude"] == pytest.approx(0.02, rel=1e-3)
