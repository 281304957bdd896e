"""Estimands: function-space distances, seed-paired effects, intervals, tests and lifetimes.

Definitions (docs/estimands.md, after shared/notes/estimands.md). Probability inputs are [n, k]
arrays whose rows sum to one; distances are averaged over the n probe examples; logarithms are
natural. Every distance of an input with itself is exactly 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _pq(p, q) -> tuple[np.ndarray, np.ndarray]:
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"distances take two [n, k] probability arrays of one shape, got {p.shape} and {q.shape}")
    return p, q


# ---------------------------------------------------------------------------- distances ----


def total_variation(p, q) -> float:
    """TV = mean over examples of 1/2 * sum_k |p_k - q_k|, in [0, 1]."""
    p, q = _pq(p, q)
    return float(np.mean(0.5 * np.abs(p - q).sum(axis=1)))


def _kl_terms(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    # p * log(p / m) with 0 * log(0 / m) = 0; m >= p / 2 > 0 wherever p > 0.
    out = np.zeros_like(p)
    mask = p > 0
    out[mask] = p[mask] * np.log(p[mask] / m[mask])
    return out


def jensen_shannon(p, q) -> float:
    """JS = mean of 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, natural log: in [0, ln 2]."""
    p, q = _pq(p, q)
    if np.array_equal(p, q):
        return 0.0
    m = 0.5 * (p + q)
    js = 0.5 * _kl_terms(p, m).sum(axis=1) + 0.5 * _kl_terms(q, m).sum(axis=1)
    return float(np.mean(np.maximum(js, 0.0)))


def hellinger(p, q) -> float:
    """H = mean of sqrt(1/2 * sum_k (sqrt p_k - sqrt q_k)^2), in [0, 1]."""
    p, q = _pq(p, q)
    return float(np.mean(np.sqrt(0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(axis=1))))


def disagreement(p, q) -> float:
    """Churn: the fraction of examples whose argmax differs (ties go to the lowest index)."""
    p, q = _pq(p, q)
    return float(np.mean(np.argmax(p, axis=1) != np.argmax(q, axis=1)))


def accuracy(p, labels) -> float:
    """Fraction of examples whose argmax is the label."""
    p = np.asarray(p)
    return float(np.mean(np.argmax(p, axis=1) == np.asarray(labels)))


def loss(p, labels, eps: float = 1e-12) -> float:
    """Mean cross-entropy -log p[label] (natural log; probabilities clamped below at eps)."""
    p = np.asarray(p, dtype=np.float64)
    picked = p[np.arange(p.shape[0]), np.asarray(labels)]
    return float(np.mean(-np.log(np.maximum(picked, eps))))


def parameter_distance(state_a: Mapping, state_b: Mapping) -> tuple[float, dict[str, float]]:
    """(total L2 distance, {name: L2 distance}) over the floating tensors of two state dicts."""
    if set(state_a) != set(state_b):
        raise ValueError("parameter_distance needs two states with the same names")
    per = {}
    squares = []
    for name in sorted(state_a):  # sorted and fsum: the same value whatever the dicts' order
        raw_a, raw_b = np.asarray(state_a[name]), np.asarray(state_b[name])
        if not np.issubdtype(raw_a.dtype, np.floating):
            continue
        a, b = raw_a.astype(np.float64), raw_b.astype(np.float64)
        sq = float(((a - b) ** 2).sum())
        per[name] = math.sqrt(sq)
        squares.append(sq)
    return math.sqrt(math.fsum(squares)), per


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) of representations [n, d1] and [n, d2]:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centered Xc, Yc. 1 for identical
    representations (up to rounding), invariant to orthogonal maps and isotropic scaling."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError("linear_cka needs representations of the same examples")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if norm == 0:
        return float("nan")
    return float(cross / norm)


# ------------------------------------------------------------------- effects, intervals ----


def paired_effect(values, *, n_resamples: int = 2000, confidence: float = 0.95, random_state: int = 0) -> dict:
    """The seed-paired effect: mean of per-seed values with a BCa bootstrap interval (resampling
    seeds; scipy.stats.bootstrap), a t interval, the two-sided one-sample t test against 0 and the
    standard error. All values equal (a placebo arm's exact zeros): mean, intervals (v, v) and
    p_value 1.0 for v == 0 (nan otherwise). Fewer than two seeds: nan intervals with a reason."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    n = int(v.size)
    out = {"mean": float(v.mean()) if n else float("nan"), "n": n, "se": float("nan"),
           "bca": (float("nan"), float("nan")), "t": (float("nan"), float("nan")), "p_value": float("nan"), "reason": ""}
    if n < 2:
        out["reason"] = "fewer than two seeds: no interval"
        return out
    if np.all(v == v[0]):
        out.update(se=0.0, bca=(float(v[0]), float(v[0])), t=(float(v[0]), float(v[0])),
                   p_value=1.0 if v[0] == 0 else float("nan"), reason="all seeds equal")
        return out
    se = float(v.std(ddof=1) / math.sqrt(n))
    tcrit = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    out["se"] = se
    out["t"] = (out["mean"] - tcrit * se, out["mean"] + tcrit * se)
    out["p_value"] = float(stats.ttest_1samp(v, 0.0).pvalue)
    try:
        res = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                              method="BCa", random_state=random_state)
        out["bca"] = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    except Exception as error:  # degenerate resamples: fall back to the percentile method, said so
        res = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", random_state=random_state)
        out["bca"] = (float(res.confidence_interval.low), float(res.confidence_interval.high))
        out["reason"] = f"BCa failed ({error}); percentile interval"
    if any(math.isnan(b) for b in out["bca"]):
        out["reason"] = "BCa interval undefined for these values"
    return out


def noise_floor(per_seed_predictions: Sequence, distance, *, n_resamples: int = 1000, random_state: int = 0) -> dict:
    """Mean over unordered pairs of different seeds of distance(p_s, p_s'), the pair values, and
    a percentile interval from resampling seeds (pairs of a resample with distinct seeds)."""
    preds = list(per_seed_predictions)
    k = len(preds)
    pairs = {(i, j): distance(preds[i], preds[j]) for i in range(k) for j in range(i + 1, k)}
    mean = float(np.mean(list(pairs.values()))) if pairs else float("nan")
    rng = np.random.default_rng(random_state)
    means = []
    for _ in range(n_resamples):
        pick = rng.integers(0, k, k)
        vals = [pairs[(min(a, b), max(a, b))] for x, a in enumerate(pick) for b in pick[x + 1:] if a != b]
        if vals:
            means.append(np.mean(vals))
    lo, hi = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))) if means else (float("nan"),) * 2
    return {"mean": mean, "pairs": list(pairs.values()), "interval": (lo, hi)}


def benjamini_hochberg(p_values, alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """BH-adjusted q-values (monotone) and which hypotheses are rejected at `alpha`; nan p-values
    stay nan and are not rejected."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    valid = ~np.isnan(p)
    m = int(valid.sum())
    if m:
        order = np.argsort(p[valid])
        ranked = p[valid][order] * m / np.arange(1, m + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        adjusted = np.empty(m)
        adjusted[order] = np.minimum(ranked, 1.0)
        q[valid] = adjusted
    rejected = [bool(not np.isnan(x) and x <= alpha) for x in q]
    return [float(x) for x in q], rejected


def tost(values, margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided t tests that the mean lies within (-margin, margin): equivalent when both
    reject at `alpha` (p_value is the larger of the two). Identical values: exact decision."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return {"p_value": float("nan"), "equivalent": False}
    if np.all(v == v[0]):
        inside = -margin < v[0] < margin
        return {"p_value": 0.0 if inside else 1.0, "equivalent": bool(inside)}
    se = v.std(ddof=1) / math.sqrt(v.size)
    df = v.size - 1
    p_low = 1 - stats.t.cdf((v.mean() + margin) / se, df)
    p_high = stats.t.cdf((v.mean() - margin) / se, df)
    p = float(max(p_low, p_high))
    return {"p_value": p, "equivalent": bool(p < alpha)}


# ----------------------------------------------------------------------------- lifetimes ----


def _fit(h: np.ndarray, e: np.ndarray) -> tuple[float, float] | None:
    """Least-squares fit of e(h) = A * exp(-ln2 * h / T_half), A >= 0, T_half > 0 (mean curve
    clipped at zero first: the floor at zero). None when there is nothing to fit."""
    from scipy.optimize import curve_fit

    e = np.maximum(e, 0.0)
    if not np.any(e > 0):
        return None
    span = max(float(h.max() - h.min()), 1.0)

    def model(x, amplitude, half_life):
        return amplitude * np.exp(-math.log(2) * x / half_life)

    guess = (float(e.max()), span / 2)
    try:
        (amplitude, half_life), _ = curve_fit(model, h, e, p0=guess, bounds=([0.0, 1e-6], [np.inf, 1e6]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return float(amplitude), float(half_life)


def fit_decay(horizons, excess_per_seed, *, n_resamples: int = 500, random_state: int = 0) -> dict:
    """Fit an exponential decay with a floor at zero to the mean excess effect over horizons and
    report its half-life with a percentile interval from refitting on resampled seeds.

    Half-life inf (with a reason) when the excess does not decay within 100x the observed span
    (flat or growing); nan when there is no positive excess to fit (no measurable effect)."""
    h = np.asarray(horizons, dtype=np.float64)
    e = np.atleast_2d(np.asarray(excess_per_seed, dtype=np.float64))
    mean = e.mean(axis=0)
    fit = _fit(h, mean)
    span = max(float(h.max() - h.min()), 1.0)
    if fit is None:
        return {"amplitude": 0.0, "half_life": float("nan"), "rate": float("nan"),
                "interval": (float("nan"), float("nan")), "fit_ok": False,
                "reason": "no positive excess over the reference to fit"}
    amplitude, half_life = fit
    rng = np.random.default_rng(random_state)
    boot = []
    for _ in range(n_resamples):
        sample = e[rng.integers(0, e.shape[0], e.shape[0])].mean(axis=0)
        f = _fit(h, sample)
        boot.append(f[1] if f is not None else np.inf)
    boot = np.asarray(boot)
    boot[boot > 100 * span] = np.inf  # a resample whose excess does not decay either
    # Order statistics, not interpolation: resamples whose excess does not decay are inf.
    interval = (float(np.percentile(boot, 2.5, method="lower")), float(np.percentile(boot, 97.5, method="higher")))
    reason = ""
    if half_life > 100 * span:
        reason = f"the excess does not decay over the horizons measured (fitted half-life {half_life:.3g})"
        half_life = float("inf")
    return {"amplitude": amplitude, "half_life": half_life, "rate": math.log(2) / half_life if half_life else float("inf"),
            "interval": interval, "fit_ok": not reason, "reason": reason}
