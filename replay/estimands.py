"""Estimands: function-space distances, seed-paired effects, intervals, tests and lifetimes.

The definitions are those of docs/estimands.md (after the project's estimands note). Everything
here is a pure function of numpy arrays (torch tensors are accepted and converted): no I/O, no
global random state (every resampling takes a fixed ``random_state``), so equal inputs give equal
outputs bit for bit.

Conventions
-----------
* Predictive distributions are ``[n, k]`` arrays: n probe examples, k classes, each row a
  probability vector (non-negative, summing to 1 within 1e-4, so float32 softmax outputs pass).
  A 1-D array is one example. Inputs are computed on in float64.
* Distances are per-example distances averaged over the n examples (the mean over the probe set).
* Logarithms are natural (nats): Jensen-Shannon lies in [0, ln 2], cross-entropy is in nats.
* Exact zeros are allowed in probabilities: 0 * log(0 / x) is taken as 0, never NaN.
* Every distance of an input with itself is exactly 0.0 (bit for bit, not 1e-17), and each
  distance is clipped into its mathematical range so rounding never leaves it.
* Per-seed values are the unit of resampling for every interval ("seed-paired": a value is the
  difference between a seed's fork and the same seed's factual run, so resampling values
  resamples seeds with their pairing intact).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

LN2 = math.log(2.0)
ROW_SUM_TOLERANCE = 1e-4  # |sum_k p_k - 1| allowed per row (float32 softmax over many classes)
LOSS_EPS = 1e-12  # cross-entropy clamp: -log(max(p[label], eps)) <= 27.63 nats
NAN = float("nan")
#: The interval paired_effect reports as "interval": the paired t interval (see interval_coverage
#: and docs/estimands.md for the measured coverage that chose it).
DEFAULT_INTERVAL = "t"

__all__ = [
    "total_variation", "jensen_shannon", "hellinger", "disagreement", "accuracy", "loss",
    "parameter_distance", "linear_cka", "DISTANCES",
    "paired_effect", "interval_coverage", "DEFAULT_INTERVAL", "noise_floor", "noise_ratio", "benjamini_hochberg", "tost",
    "excess_effect", "fit_decay", "fit_excess_curve", "CURVE_MODELS", "verdict", "VERDICTS",
    "expected_calibration_error", "backflow_witness", "additivity", "divergence_exponent",
]


# ------------------------------------------------------------------------------ helpers ----


def _numpy(x, *, dtype=np.float64) -> np.ndarray:
    """A float64 numpy copy/view of a numpy array, a sequence or a (CPU or device) torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if dtype is not None and x.is_floating_point():
            import torch

            x = x.to(torch.float64)
        x = x.numpy()
    return np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)


def _is_floating(x) -> bool:
    if hasattr(x, "is_floating_point"):  # torch.Tensor (bf16 has no numpy dtype)
        return bool(x.is_floating_point())
    return bool(np.issubdtype(np.asarray(x).dtype, np.floating))


def _probabilities(p, name: str) -> np.ndarray:
    p = _numpy(p)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"{name}: expected an [n, k] probability array, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name}: probabilities must be finite")
    if np.any(p < 0):
        raise ValueError(f"{name}: probabilities must be non-negative")
    sums = p.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE):
        worst = float(sums[np.argmax(np.abs(sums - 1.0))])
        raise ValueError(f"{name}: rows must sum to 1 (within {ROW_SUM_TOLERANCE}); a row sums to {worst!r} "
                         "(logits? apply softmax first)")
    return p


def _pq(p, q) -> tuple[np.ndarray, np.ndarray]:
    p, q = _probabilities(p, "p"), _probabilities(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"distances take two probability arrays of one shape, got {p.shape} and {q.shape}")
    if p.shape[0] == 0:
        raise ValueError("distances need at least one probe example")
    return p, q


def _labels(labels, n: int) -> np.ndarray:
    y = _numpy(labels, dtype=None)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, got shape {y.shape} and dtype {y.dtype}")
    return y


# ---------------------------------------------------------------------------- distances ----


def total_variation(p, q) -> float:
    """Total variation distance, the primary distance.

    TV(p, q) = mean over examples x of 1/2 * sum_k |p_k(x) - q_k(x)|, in [0, 1]. Symmetric;
    exactly 0.0 when p and q are equal; 1 for disjoint supports.
    """
    p, q = _pq(p, q)
    per_example = np.minimum(0.5 * np.abs(p - q).sum(axis=1), 1.0)
    return float(np.mean(per_example))


def _half_kl_to_mid(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per example sum_k p_k * log(p_k / m_k), m = (p + q) / 2, written as p * log(2p / (p + q)):
    p + q >= p > 0 wherever the term is taken, so no division by an underflowed m, and p == q
    gives log(2p / (p + p)) = log(1) = 0 exactly. Terms with p_k = 0 are 0."""
    out = np.zeros_like(p)
    mask = p > 0
    pm = p[mask]
    out[mask] = pm * np.log((2.0 * pm) / (pm + q[mask]))
    return out.sum(axis=1)


def jensen_shannon(p, q) -> float:
    """Jensen-Shannon divergence in nats (natural log).

    JS(p, q) = mean over examples of 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2,
    with 0 * log 0 = 0. In [0, ln 2] (ln 2 for disjoint supports); symmetric; exactly 0.0 for
    equal inputs. It is the divergence, not its square root (the JS distance).
    """
    p, q = _pq(p, q)
    per_example = 0.5 * _half_kl_to_mid(p, q) + 0.5 * _half_kl_to_mid(q, p)
    return float(np.mean(np.clip(per_example, 0.0, LN2)))


def hellinger(p, q) -> float:
    """Hellinger distance.

    H(p, q) = mean over examples of sqrt(1/2 * sum_k (sqrt p_k - sqrt q_k)^2), in [0, 1]
    (1 for disjoint supports). Symmetric; exactly 0.0 for equal inputs.
    """
    p, q = _pq(p, q)
    per_example = np.sqrt(0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(axis=1))
    return float(np.mean(np.minimum(per_example, 1.0)))


def disagreement(p, q) -> float:
    """Disagreement (churn): the fraction of examples whose predicted class differs,
    argmax p(x) != argmax q(x). Ties are broken by the lowest class index (numpy's argmax), for
    both inputs alike. In [0, 1]; exactly 0.0 for equal inputs."""
    p, q = _pq(p, q)
    return float(np.mean(np.argmax(p, axis=1) != np.argmax(q, axis=1)))


def accuracy(p, labels) -> float:
    """Accuracy: the fraction of examples whose argmax (ties: lowest index) equals the integer
    label. The signed effect of a fork is accuracy(q) - accuracy(p)."""
    p = _probabilities(p, "p")
    y = _labels(labels, p.shape[0])
    return float(np.mean(np.argmax(p, axis=1) == y))


def loss(p, labels, eps: float = LOSS_EPS) -> float:
    """Mean cross-entropy in nats: mean over examples of -log(max(p[label], eps)).

    The clamp at ``eps`` (default 1e-12, so at most 27.63 nats per example) keeps a probability
    of exactly zero on the label finite. The signed effect of a fork is loss(q) - loss(p)."""
    p = _probabilities(p, "p")
    y = _labels(labels, p.shape[0])
    if np.any((y < 0) | (y >= p.shape[1])):
        raise ValueError(f"labels must lie in [0, {p.shape[1]})")
    picked = p[np.arange(p.shape[0]), y]
    return float(np.mean(-np.log(np.maximum(picked, eps))))


def expected_calibration_error(p, labels, n_bins: int = 15) -> float:
    """Expected calibration error (ECE) of one model on the probe: the examples are put in
    ``n_bins`` equal-width bins of their confidence max_k p_k (bin b holds confidence in
    ((b-1)/B, b/B], the first bin includes 0), and ECE = sum_b (n_b / n) * |accuracy_b -
    mean confidence_b| (accuracy by argmax, ties to the lowest index, as ``accuracy``). In [0, 1].
    The signed effect of a fork is ECE(q) - ECE(p)."""
    p = _probabilities(p, "p")
    y = _labels(labels, p.shape[0])
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ValueError("n_bins must be a positive integer")
    confidence = p.max(axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        members = bins == b
        m = int(members.sum())
        if m:
            total += m * abs(float(correct[members].mean()) - float(confidence[members].mean()))
    return float(min(max(total / p.shape[0], 0.0), 1.0))


def parameter_distance(state_a: Mapping, state_b: Mapping) -> tuple[float, dict[str, float]]:
    """Weight-space L2 distance of two state dicts with the same names.

    Returns (total, per_layer): per_layer[name] = ||a[name] - b[name]||_2 over every floating
    entry (parameters and floating buffers such as BatchNorm running statistics; integer entries
    such as ``num_batches_tracked`` are skipped), computed in float64; total = sqrt(sum of the
    squared per-layer distances) = the L2 distance of the concatenated floating entries. Names
    are visited in sorted order and summed with math.fsum, so the result does not depend on the
    dicts' order. Equal states give exactly 0.0. Torch tensors (any device, bf16/fp16) and numpy
    arrays are accepted. Raises ValueError on different names, shapes or kinds.
    """
    if set(state_a) != set(state_b):
        missing = sorted(set(state_a) ^ set(state_b))
        raise ValueError(f"parameter_distance needs two states with the same names; differing: {missing[:5]}")
    per: dict[str, float] = {}
    squares = []
    for name in sorted(state_a):
        float_a, float_b = _is_floating(state_a[name]), _is_floating(state_b[name])
        if float_a != float_b:
            raise ValueError(f"parameter_distance: {name!r} is floating in one state and not the other")
        if not float_a:
            continue
        a, b = _numpy(state_a[name]), _numpy(state_b[name])
        if a.shape != b.shape:
            raise ValueError(f"parameter_distance: {name!r} has shapes {a.shape} and {b.shape}")
        sq = float(np.sum((a - b) ** 2))
        per[name] = math.sqrt(sq)
        squares.append(sq)
    return math.sqrt(math.fsum(squares)), per


def linear_cka(x, y) -> float:
    """Linear centered kernel alignment (Kornblith et al. 2019) of two representations of the
    same n examples, x: [n, d1], y: [n, d2] (e.g. one layer's activations in two runs).

    With column-centered Xc, Yc:  CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F),
    a similarity in [0, 1]: 1 for identical representations, invariant to orthogonal transforms
    and isotropic scaling of either input (not to arbitrary invertible maps). Identical inputs
    return exactly 1.0; equivalent ones (rotated, scaled) 1.0 up to float64 rounding (~1e-15).
    The result is clipped into [0, 1]. NaN when either representation is constant over the
    examples (zero after centering). Computed in float64 in the feature-space form, or in the
    equivalent Gram form <Kx, Ky>_F / (||Kx||_F ||Ky||_F), Kx = Xc Xc^T, when n is smaller than
    the widths. The experiment reports 1 - CKA as a distance.
    """
    x, y = _numpy(x), _numpy(y)
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs [n, d] representations of the same n examples, got {x.shape} and {y.shape}")
    if x.shape[0] < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return NAN
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return NAN
    if np.array_equal(x, y):
        return 1.0
    x, y = x / nx, y / ny  # CKA is scale invariant; this keeps the squares far from overflow
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if n * n * (d1 + d2) < n * (d1 * d2 + d1 * d1 + d2 * d2):
        kx, ky = x @ x.T, y @ y.T
        cross = float(np.sum(kx * ky))
        norm = float(np.linalg.norm(kx) * np.linalg.norm(ky))
    else:
        cross = float(np.linalg.norm(y.T @ x) ** 2)
        norm = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    if norm == 0:
        return NAN
    return float(min(max(cross / norm, 0.0), 1.0))


#: The probability distances by the names experiment specs use.
DISTANCES: dict[str, Callable] = {
    "tv": total_variation,
    "js": jensen_shannon,
    "hellinger": hellinger,
    "disagreement": disagreement,
}


# ------------------------------------------------------------------- effects, intervals ----


def _values(values) -> np.ndarray:
    v = np.atleast_1d(_numpy(values))
    if v.ndim > 1:
        v = v.squeeze()
    if v.ndim != 1:
        raise ValueError(f"expected a 1-D array of per-seed values, got shape {v.shape}")
    return v


def _se(v: np.ndarray) -> float:
    """Standard error of the mean, sd(ddof=1) / sqrt(n), scaled first so tiny values (1e-300)
    do not underflow to a zero variance."""
    scale = float(np.max(np.abs(v)))
    return scale * float((v / scale).std(ddof=1)) / math.sqrt(v.size) if scale > 0 else 0.0


def _bootstrap_kwargs(random_state) -> dict:
    # scipy >= 1.15 takes rng=Generator; older versions only random_state. An int seeds a new
    # generator; a Generator is used as it is (default_rng returns it unaltered).
    from scipy import stats

    if "rng" in inspect.signature(stats.bootstrap).parameters:
        return {"rng": np.random.default_rng(random_state)}
    return {"random_state": random_state}


def paired_effect(values, *, n_resamples: int = 2000, confidence: float = 0.95, random_state: int = 0) -> dict:
    """The seed-paired effect tau = mean over seeds of the per-seed values, with intervals.

    ``values`` are the n per-seed values (one per seed: D(p^s, q^s) for a distance, or
    metric(q^s) - metric(p^s) for a signed metric, or the excess over a reference arm). Returns

    * ``mean``: tau; ``n``: number of seeds; ``se``: sample sd (ddof=1) / sqrt(n);
    * ``interval``: (lo, hi), the default interval at ``confidence``, and ``interval_method``, its
      name: "t", the paired t interval below (DEFAULT_INTERVAL). It is the default because it is
      the one that covers at the small n of these experiments: measured nominal-95% coverage at
      n = 5 is 0.947 (normal values), 0.916 (lognormal sigma 0.5) and 0.823 (lognormal sigma 1),
      against 0.838 / 0.813 / 0.741 for BCa (interval_coverage, 10000 replicates; the table and
      the command are in docs/estimands.md);
    * ``bca``: (lo, hi), the BCa bootstrap interval of the mean at ``confidence``
      (scipy.stats.bootstrap, method="BCa", resampling seeds with replacement, ``n_resamples``
      resamples, generator seeded with ``random_state``: reproducible). Where BCa is undefined
      (e.g. a single non-zero value among zeros makes the jackknife degenerate) the percentile
      interval is given instead and ``method``/``reason`` say so. BCa undercovers at small n (it
      uses the plug-in sd and normal quantiles): kept for comparison, not the default;
    * ``t``: (lo, hi), the paired (one-sample) t interval mean +- t_{n-1, (1+confidence)/2} * se;
    * ``p_value``: the two-sided one-sample t test of mean == 0; ``t_stat``;
    * ``method`` (of ``bca``: "BCa" or "percentile"), ``confidence``, ``n_resamples``, ``reason``
      ("" when nothing is degenerate).

    Degenerate cases never crash and never invent precision:
    * all values equal to v (a placebo arm: exactly 0.0): mean v, se 0, every interval (v, v);
      p_value 1.0 when v == 0 (no evidence of an effect), NaN when v != 0 (zero variance: the
      t test is undefined) -- ``reason`` says which;
    * fewer than two seeds: intervals, se and p_value NaN, ``reason`` says so;
    * non-finite values: everything NaN, ``reason`` says so.
    """
    from scipy import stats

    v = _values(values)
    n = int(v.size)
    out = {"mean": NAN, "n": n, "se": NAN, "interval": (NAN, NAN), "interval_method": DEFAULT_INTERVAL,
           "bca": (NAN, NAN), "t": (NAN, NAN), "p_value": NAN, "t_stat": NAN, "method": "BCa", "confidence": float(confidence), "n_resamples": int(n_resamples), "reason": ""}
    if not 0 < confidence < 1:
        raise ValueError("confidence must lie in (0, 1)")
    if n == 0:
        out["reason"] = "no seeds"
        return out
    if not np.all(np.isfinite(v)):
        out["reason"] = "non-finite per-seed values"
        return out
    out["mean"] = float(v.mean()) + 0.0  # + 0.0: -0.0 becomes 0.0
    if n < 2:
        out["reason"] = "fewer than two seeds: no interval, no test"
        return out
    if np.all(v == v[0]):
        c = float(v[0]) + 0.0
        out.update(mean=c, se=0.0, interval=(c, c), bca=(c, c), t=(c, c))
        if c == 0.0:
            out.update(p_value=1.0, t_stat=0.0, reason="all seeds exactly zero")
        else:
            out["reason"] = "all seeds equal and non-zero: zero variance, the t test is undefined"
        return out
    se = _se(v)
    tcrit = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    m = out["mean"]
    out["se"] = se
    out["t"] = (m - tcrit * se, m + tcrit * se)
    out["t_stat"] = m / se if se > 0 else math.copysign(math.inf, m)
    out["p_value"] = float(2 * stats.t.sf(abs(out["t_stat"]), n - 1)) if se > 0 else 0.0
    out["bca"] = _bootstrap_mean(v, n_resamples, confidence, random_state, out)
    out["interval"] = out[DEFAULT_INTERVAL]
    return out


def _bootstrap_mean(v: np.ndarray, n_resamples: int, confidence: float, random_state: int, out: dict) -> tuple:
    from scipy import stats

    def run(method):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning, divide warnings: handled below
            res = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                                  method=method, **_bootstrap_kwargs(random_state))
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    try:
        lo, hi = run("BCa")
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("BCa interval undefined for these values")
        return lo, hi
    except (ValueError, FloatingPointError, ZeroDivisionError) as error:
        out["method"] = "percentile"
        out["reason"] = f"BCa not computable ({error}); percentile bootstrap interval instead"
        return run("percentile")


def _sampler(sampler, truth):
    """(draw, truth) for interval_coverage: a named distribution or a callable with its mean."""
    if callable(sampler):
        if truth is None or not math.isfinite(truth):
            raise ValueError("a callable sampler needs the true mean: truth=...")
        return sampler, float(truth)
    if sampler == "normal":
        return (lambda rng, shape: rng.standard_normal(shape)), 0.0
    if isinstance(sampler, str) and sampler.startswith("lognormal:"):
        sigma = float(sampler.split(":", 1)[1])
        if not sigma > 0:
            raise ValueError("lognormal:SIGMA needs a positive sigma")
        return (lambda rng, shape: np.exp(sigma * rng.standard_normal(shape))), math.exp(sigma * sigma / 2)
    raise ValueError(f"unknown sampler {sampler!r}: 'normal', 'lognormal:SIGMA' or a callable(rng, shape)")


def interval_coverage(method: str, sampler, n: int, replicates: int = 2000, *, truth: float | None = None,
                      confidence: float = 0.95, random_state: int = 0, n_resamples: int = 2000) -> float:
    """Coverage of an interval for the mean of n per-seed values, by simulation: the fraction of
    ``replicates`` synthetic experiments whose interval contains the true mean.

    ``method``: "t" (paired t, the default interval of paired_effect), "bca" or "percentile"
    (scipy.stats.bootstrap over the n values, ``n_resamples`` resamples: the same computation as
    paired_effect's ``bca`` key, run on all replicates at once). ``sampler``: "normal" (N(0, 1),
    mean 0), "lognormal:SIGMA" (exp(SIGMA * Z), mean exp(SIGMA^2 / 2); skewness 1.75 at SIGMA 0.5,
    6.2 at SIGMA 1), or a callable ``sampler(rng, shape) -> array`` with its mean as ``truth``.
    Coverage of these three methods does not depend on the location or scale of the values, so
    N(0, 1) stands for every normal. Deterministic: one generator seeded with ``random_state``
    draws the data [replicates, n], then the resamples (blocks of replicates in order).
    """
    draw, true_mean = _sampler(sampler, truth)
    if method not in ("t", "bca", "percentile"):
        raise ValueError(f"unknown interval method {method!r}: 't', 'bca' or 'percentile'")
    if n < 2 or replicates < 1:
        raise ValueError("coverage needs n >= 2 values per experiment and at least one replicate")
    rng = np.random.default_rng(random_state)
    x = np.asarray(draw(rng, (replicates, n)), dtype=np.float64)
    lo, hi = _batch_intervals(method, x, confidence, n_resamples, rng)
    return float(np.mean((lo <= true_mean) & (true_mean <= hi)))


def _batch_intervals(method: str, x: np.ndarray, confidence: float, n_resamples: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The ``method`` interval of the mean of each row of x [replicates, n], all rows at once."""
    from scipy import stats

    n = x.shape[1]
    if method == "t":
        m = x.mean(axis=1)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * x.std(axis=1, ddof=1) / math.sqrt(n)
        return m - half, m + half
    block = max(1, 2_000_000 // (n_resamples * n))  # resamples held at once: block * n_resamples * n
    lo, hi = np.empty(x.shape[0]), np.empty(x.shape[0])
    for start in range(0, x.shape[0], block):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((x[start:start + block],), np.mean, axis=-1, vectorized=True,
                                  n_resamples=n_resamples, confidence_level=confidence,
                                  method="BCa" if method == "bca" else "percentile", **_bootstrap_kwargs(rng))
        lo[start:start + block] = res.confidence_interval.low
        hi[start:start + block] = res.confidence_interval.high
    return lo, hi


def noise_floor(per_seed_predictions: Sequence, distance: Callable | str = "tv", *, n_resamples: int = 1000,
                confidence: float = 0.95, random_state: int = 0) -> dict:
    """The seed noise floor tau_seed = mean over unordered pairs {s, s'} of different seeds of
    distance(p^s, p^s'): the run-to-run variability of the whole recipe at one step.

    ``per_seed_predictions`` holds one [n, k] array per seed (factual runs at the same step);
    ``distance`` is a function of two of them (for a signed metric pass |metric(a) - metric(b)|)
    or a name in DISTANCES. Returns ``mean``, ``pairs`` (the pair values, in the order of
    ``pair_index``), ``pair_index`` [(i, j), i < j], ``n_seeds``, ``interval`` and ``reason``.

    Interval: a percentile bootstrap over seeds. Each resample draws k seed indices with
    replacement and recomputes the mean over its pairs of two *different* seeds (a seed drawn
    twice is never paired with itself: D(p, p) = 0 is not run-to-run variation); resamples
    with fewer than two distinct seeds are skipped and counted in ``skipped``. Generator seeded
    with ``random_state``. Fewer than two seeds: mean NaN; two seeds: one pair, interval
    (value, value) with a reason.
    """
    if isinstance(distance, str):
        distance = DISTANCES[distance]
    preds = list(per_seed_predictions)
    k = len(preds)
    index = [(i, j) for i in range(k) for j in range(i + 1, k)]
    pairs = [float(distance(preds[i], preds[j])) for i, j in index]
    out = {"mean": NAN, "pairs": pairs, "pair_index": index, "n_seeds": k, "interval": (NAN, NAN),
           "confidence": float(confidence), "n_resamples": int(n_resamples), "skipped": 0, "reason": ""}
    if k < 2:
        out["reason"] = "fewer than two seeds: no pair"
        return out
    if not all(math.isfinite(x) for x in pairs):
        out["reason"] = "non-finite pair distances"
        return out
    out["mean"] = float(np.mean(pairs))
    if k == 2:
        out["interval"] = (pairs[0], pairs[0])
        out["reason"] = "two seeds: a single pair, the interval is degenerate"
        return out
    matrix = np.zeros((k, k))
    for (i, j), value in zip(index, pairs):
        matrix[i, j] = matrix[j, i] = value
    rng = np.random.default_rng(random_state)
    picks = rng.integers(0, k, size=(n_resamples, k))
    sub = matrix[picks[:, :, None], picks[:, None, :]]  # [B, k, k]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)[None]
    use = upper & (picks[:, :, None] != picks[:, None, :])
    counts = use.sum(axis=(1, 2))
    ok = counts > 0
    means = (sub * use).sum(axis=(1, 2))[ok] / counts[ok]
    out["skipped"] = int((~ok).sum())
    if means.size:
        tail = 100 * (1 - confidence) / 2
        out["interval"] = (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))
    return out


def noise_ratio(effect: float, floor: float) -> float:
    """tau / tau_seed: the share of ordinary run-to-run variation one perturbation causes
    (1.0: as much as changing the seed). NaN when the floor is not a positive finite number."""
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0 and math.isfinite(effect)):
        return NAN
    return float(effect) / float(floor)


def benjamini_hochberg(p_values, alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Benjamini-Hochberg false discovery rate control across hypotheses (e.g. arms).

    With the m non-NaN p-values sorted, p_(1) <= ... <= p_(m), the adjusted value of rank i is
    q_(i) = min over j >= i of min(1, p_(j) * m / j) (monotone in p; ties get equal q), and a
    hypothesis is rejected when q <= alpha -- the same set as the BH step-up rule "reject the i
    smallest for the largest i with p_(i) <= i * alpha / m". NaN p-values (untestable, e.g. the
    placebo's undefined test) keep q = NaN, are not rejected and do not count in m. Returns
    (q_values, rejected) as lists in the input order. Matches scipy.stats.false_discovery_control.
    """
    p = _numpy(p_values).ravel()
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    valid = ~np.isnan(p)
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    q = np.full(p.shape, NAN)
    m = int(valid.sum())
    if m:
        pv = p[valid]
        order = np.argsort(pv, kind="stable")
        ranked = pv[order] * m / np.arange(1, m + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        adjusted = np.empty(m)
        adjusted[order] = np.minimum(ranked, 1.0)
        q[valid] = adjusted
    rejected = [bool(not math.isnan(x) and x <= alpha) for x in q]
    return [float(x) for x in q], rejected


def tost(values, margin: float, alpha: float = 0.05) -> dict:
    """Equivalence test (two one-sided t tests, TOST) that the mean of the per-seed values lies
    inside (-margin, margin): the way to claim "no memory" (a failed difference test is not).

    H0a: mean <= -margin, p_lower = P(T_{n-1} >= (mean + margin) / se);
    H0b: mean >= +margin, p_upper = P(T_{n-1} <= (mean - margin) / se).
    p_value = max(p_lower, p_upper); ``equivalent`` when p_value < alpha, i.e. exactly when the
    (1 - 2 alpha) t interval lies inside (-margin, margin). All values equal to v: the exact
    limit (p 0.0 and equivalent when -margin < v < margin, else p 1.0). Fewer than two seeds or
    non-finite values: p NaN, not equivalent, with a reason. Returns p_value, p_lower, p_upper,
    equivalent, mean, se, n, margin, reason.
    """
    from scipy import stats

    if not margin > 0:
        raise ValueError("the equivalence margin must be positive")
    v = _values(values)
    n = int(v.size)
    out = {"p_value": NAN, "p_lower": NAN, "p_upper": NAN, "equivalent": False, "mean": NAN, "se": NAN,
           "n": n, "margin": float(margin), "reason": ""}
    if n < 2 or not np.all(np.isfinite(v)):
        out["reason"] = "fewer than two seeds" if n < 2 else "non-finite per-seed values"
        if n and np.all(np.isfinite(v)):
            out["mean"] = float(v.mean())
        return out
    mean = float(v.mean())
    out["mean"] = mean
    if np.all(v == v[0]):
        inside = -margin < mean < margin
        p = 0.0 if inside else 1.0
        out.update(p_value=p, p_lower=0.0 if mean > -margin else 1.0, p_upper=0.0 if mean < margin else 1.0,
                   equivalent=bool(inside), se=0.0, reason="all seeds equal: exact decision")
        return out
    se = _se(v)
    df = n - 1
    p_lower = float(stats.t.sf((mean + margin) / se, df))
    p_upper = float(stats.t.cdf((mean - margin) / se, df))
    p = max(p_lower, p_upper)
    out.update(p_value=p, p_lower=p_lower, p_upper=p_upper, equivalent=bool(p < alpha), se=se)
    return out


# ----------------------------------------------------------------------------- lifetimes ----


def excess_effect(arm_per_seed, reference_per_seed) -> np.ndarray:
    """Per-seed excess effect e_s(h) = D_s(P, h) - D_s(bitflip, h), arrays [n_seeds, n_h] of the
    same seeds (rows) and delays (columns). Averaging the rows gives e(h) = tau(P, h) -
    tau(bitflip, h); fit_decay takes the per-seed rows so that its interval resamples seeds."""
    a, r = np.atleast_2d(_numpy(arm_per_seed)), np.atleast_2d(_numpy(reference_per_seed))
    if a.shape != r.shape:
        raise ValueError(f"arm and reference values must have one shape, got {a.shape} and {r.shape}")
    return a - r


_GRID_COARSE = 481  # log-spaced half-lives over the search range
_GRID_FINE = 201  # refinement inside one coarse step either side: relative resolution ~ 1e-4


def _profile_fit(h: np.ndarray, curves: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of curves [B, n_h] (already floored at zero) against A * 2^(-(h - h0)/T),
    A >= 0, T in [lo, hi], profiled over T: for a fixed T the best amplitude is
    A(T) = max(0, <e, g> / <g, g>) with g = 2^(-(h - h0)/T). A log-spaced grid over [lo, hi],
    then a finer grid within one coarse step either side of the best point (vectorized over the
    B curves, in blocks; deterministic, no starting point, no local minimum to fall into).
    h0 = min(h) keeps g in (0, 1]. Returns (T, A at h0, SSE) per curve."""
    h0 = h.min()
    coarse = np.geomspace(lo, hi, _GRID_COARSE)
    step = coarse[1] / coarse[0]
    offsets = np.geomspace(1 / step, step, _GRID_FINE)

    def best(e: np.ndarray, ts: np.ndarray):  # e [b, n_h], ts [b, G]
        g = np.exp2(-(h - h0)[None, None, :] / ts[:, :, None])  # [b, G, n_h]
        amp = np.maximum(np.einsum("bgh,bh->bg", g, e) / np.einsum("bgh,bgh->bg", g, g), 0.0)
        sse = ((e[:, None, :] - amp[:, :, None] * g) ** 2).sum(axis=2)
        pick = np.argmin(sse, axis=1)  # first minimum: ties go to the shorter half-life
        rows = np.arange(e.shape[0])
        return ts[rows, pick], amp[rows, pick], sse[rows, pick]

    results = []
    for start in range(0, curves.shape[0], 128):
        e = curves[start:start + 128]
        t, _, _ = best(e, np.broadcast_to(coarse, (e.shape[0], coarse.size)))
        results.append(best(e, np.clip(t[:, None] * offsets[None, :], lo, hi)))
    return tuple(np.concatenate([r[i] for r in results]) for i in range(3))


def _delays(h: np.ndarray, e: np.ndarray, max_span_ratio: float, what: str):
    """The delay grid both lifetime fits share: (distinct delays, span, smallest gap, limit
    beyond which a half-life counts as none, search range lo..hi, first delay h0), or a reason
    string when the inputs cannot be fitted."""
    if not (np.all(np.isfinite(h)) and np.all(np.isfinite(e))):
        return "non-finite delays or excess values" + ("" if what == "a decay" else ": no fit")
    uniq = np.unique(h)
    if uniq.size < 2 or e.shape[0] == 0:
        return f"{what} needs at least two distinct delays and one seed" + ("" if what == "a decay" else ": no fit")
    span = float(uniq[-1] - uniq[0])
    gap = float(np.min(np.diff(uniq)))
    limit = max_span_ratio * span
    return uniq, span, gap, limit, gap / 10.0, 10.0 * limit, float(uniq[0])


def fit_decay(horizons, excess_per_seed, *, n_resamples: int = 500, confidence: float = 0.95,
              random_state: int = 0, max_span_ratio: float = 10.0) -> dict:
    """Lifetime of an effect: fit e(h) = A * exp(-ln 2 * h / half_life) = A * 2^(-h / half_life),
    A >= 0, to the mean excess effect over delays h and report the half-life with an interval.

    ``horizons``: the n_h delays h after the intervention window (steps); ``excess_per_seed``:
    [n_seeds, n_h] per-seed excess effects (see excess_effect), averaged over seeds first.

    Floor at zero (our choice): the mean excess curve is clipped at zero before fitting -- a
    negative mean excess (the perturbation moves the model less than the one-bit reference)
    is "no excess memory", and an exponential cannot go below zero -- and the amplitude is
    bounded A >= 0. The fit is ordinary least squares on the clipped mean curve, profiled over the
    half-life on a log grid (see _profile_fit): the same objective as scipy's curve_fit with
    bounds, without its sensitivity to the starting point. Returns

    * ``half_life`` (in the units of h), ``rate`` = ln 2 / half_life, ``amplitude`` = A (the
      fitted excess at h = 0), ``r2`` of the fit to the clipped mean curve, ``mean_excess`` (the
      clipped mean curve that was fitted);
    * ``interval``: percentile interval at ``confidence`` from ``n_resamples`` bootstrap resamples
      of seeds (rows), refitting each (generator seeded with ``random_state``; order statistics,
      lower/higher, so it is conservative and inf-safe). Resamples whose excess does not decay
      count as inf; resamples with no positive excess at all are left out and counted in
      ``boot_no_excess``;
    * ``fit_ok`` (a finite half-life was fitted), ``reason`` (why not, else ""), ``note``
      (caveats of a finite fit, else "");
    * ``extrapolated``: True when the half-life is finite and longer than the span of the delays
      (the fit extrapolates past the last delay; ``note`` says so too); ``interval_open``: True
      when the interval's upper end is inf (some resampled seed sets show no decay).

    This is the pure decay to zero from the first delay. It is the fit for a state-space lifetime
    (a difference that can only shrink, e.g. the per-step update difference of a momentum reset,
    beta^h); for an excess curve over delays, which may rise first, level off at a persistent
    part or go negative, use fit_excess_curve.

    Conventions: half_life = inf (fit_ok False) when the excess does not decay over the delays
    measured -- flat or growing; precisely, when the best fit is slower than ``max_span_ratio``
    (10) times the span of the delays, i.e. it loses under 7% over the span, so any finite
    value would be an extrapolation ("a wild number"). half_life = NaN (fit_ok False, amplitude
    0) when the clipped mean excess is zero everywhere: no effect beyond the reference, nothing
    decays. The half-life search runs from a tenth of the smallest gap between delays to
    10 * max_span_ratio * span; a half-life below that smallest gap is reported with a note (the
    delays measured do not resolve it: read it as "< gap"), as is an interval open above (some
    resampled sets of seeds show no decay). Fewer than two seeds: no interval (NaN), a note.
    """
    h = _numpy(horizons).ravel()
    e = np.atleast_2d(_numpy(excess_per_seed))
    if e.ndim != 2 or e.shape[1] != h.size:
        raise ValueError(f"excess_per_seed must be [n_seeds, {h.size}], got {e.shape}")
    out = {"amplitude": NAN, "rate": NAN, "half_life": NAN, "interval": (NAN, NAN), "fit_ok": False,
           "reason": "", "note": "", "r2": NAN, "mean_excess": [], "n_seeds": int(e.shape[0]),
           "confidence": float(confidence), "n_resamples": int(n_resamples), "boot_no_excess": 0,
           "extrapolated": False, "interval_open": False}
    grid = _delays(h, e, max_span_ratio, "a decay")
    if isinstance(grid, str):
        out["reason"] = grid
        return out
    uniq, span, gap, limit, lo, hi, h0 = grid  # search lo..hi; beyond `limit` counts as no decay

    mean = np.maximum(e.mean(axis=0), 0.0)
    out["mean_excess"] = [float(x) for x in mean]
    if not np.any(mean > 0):
        out.update(amplitude=0.0, reason="no positive excess over the reference: nothing to fit (half-life NaN)")
        return out

    def to_half_life(t: np.ndarray) -> np.ndarray:
        return np.where(t > limit, np.inf, t)

    t_fit, a_fit, sse = _profile_fit(h, mean[None, :], lo, hi)
    t_fit, a0, sse = float(t_fit[0]), float(a_fit[0]), float(sse[0])
    sst = float(((mean - mean.mean()) ** 2).sum())
    out["r2"] = 1.0 - sse / sst if sst > 0 else NAN
    half_life = float(to_half_life(np.array(t_fit)))

    notes = []
    if e.shape[0] >= 2 and n_resamples > 0:
        rng = np.random.default_rng(random_state)
        picks = rng.integers(0, e.shape[0], size=(n_resamples, e.shape[0]))
        curves = np.maximum(e[picks].mean(axis=1), 0.0)  # [B, n_h]
        has = np.any(curves > 0, axis=1)
        out["boot_no_excess"] = int((~has).sum())
        boot = to_half_life(_profile_fit(h, curves[has], lo, hi)[0]) if has.any() else np.array([])
        if boot.size:
            tail = 100 * (1 - confidence) / 2
            out["interval"] = (float(np.percentile(boot, tail, method="lower")),
                               float(np.percentile(boot, 100 - tail, method="higher")))
            out["interval_open"] = math.isinf(out["interval"][1])
        if out["boot_no_excess"]:
            notes.append(f"{out['boot_no_excess']} of {n_resamples} resamples had no positive excess and were left out")
    elif e.shape[0] < 2:
        notes.append("fewer than two seeds: no interval")

    if math.isinf(half_life):
        out.update(amplitude=a0, half_life=math.inf, rate=0.0,
                   reason=f"the excess does not decay over the delays measured (best fit loses under "
                          f"{100 * (1 - 2 ** (-1 / max_span_ratio)):.0f}% over their span of {span:g}): half-life inf")
        out["note"] = "; ".join(notes)
        return out
    with np.errstate(over="ignore"):
        amplitude = float(a0 * np.exp2(h0 / t_fit))
    if t_fit < gap:
        notes.append(f"half-life below the smallest gap between delays ({gap:g}): not resolved by these delays, "
                     f"read it as < {gap:g} (the search stops at {lo:g})")
    if t_fit > span:
        notes.append(f"half-life beyond the span of the delays ({span:g}): extrapolated")
        out["extrapolated"] = True
    if out["interval_open"]:
        notes.append("interval open above: some resampled seed sets show no decay")
    out.update(amplitude=amplitude, half_life=half_life, rate=LN2 / half_life, fit_ok=True, note="; ".join(notes))
    return out


# ------------------------------------------------------------------- excess curve model ----

#: The models of fit_excess_curve, in the order ties go (fewer parameters first).
CURVE_MODELS = ("flat", "decay", "rise", "rise and fall to 0", "rise and fall")
_CURVE_K = {"flat": 1, "decay": 3, "rise": 3, "rise and fall to 0": 3, "rise and fall": 4}
_CURVE_FORMULAS = {
    "flat": "e(h) = c",
    "decay": "e(h) = c + A * 2^(-(h - h0) / T), A > 0",
    "rise": "e(h) = c - A * 2^(-(h - h0) / T), A > 0",
    "rise and fall to 0": "e(h) = (A + B * (h - h0)) * 2^(-(h - h0) / T), B >= 0, B >= A * ln2 / T "
                          "(rising at h0); plateau fixed at 0",
    "rise and fall": "e(h) = c + (A + B * (h - h0)) * 2^(-(h - h0) / T), B >= 0, B >= A * ln2 / T (rising at h0)",
}
_SSE_FLOOR_REL = 1e-4  # residuals below 1e-4 of the curve's largest |value| (rms) count as an exact fit


def _ls_column(f: np.ndarray, e: np.ndarray, intercept: bool, sign: int):
    """Least squares of e [b, n] on one column f [b, G, n] (plus a constant when ``intercept``),
    the coefficient clamped to sign (+1: >= 0, -1: <= 0, 0: free). Returns (coef, c, sse) [b, G]."""
    if intercept:
        fm, em = f.mean(axis=-1), e.mean(axis=-1)
        fc, ec = f - fm[..., None], (e - em[:, None])[:, None, :]
    else:
        fc, ec = f, e[:, None, :]
    ff = np.einsum("bgn,bgn->bg", fc, fc)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(ff > 0, np.einsum("bgn,bgn->bg", fc, np.broadcast_to(ec, fc.shape)) / ff, 0.0)
    if sign > 0:
        a = np.maximum(a, 0.0)
    elif sign < 0:
        a = np.minimum(a, 0.0)
    sse = ((ec - a[..., None] * fc) ** 2).sum(axis=-1)
    c = em[:, None] - a * fm if intercept else np.zeros_like(a)
    return a, c, sse


def _curve_sse(model: str, x: np.ndarray, e: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, ...]:
    """For curves e [b, n] at offsets x = h - h0 and half-lives ts [b, G]: the least-squares
    (sse, c, A, B, interior) [b, G] of ``model`` at each half-life, with its sign constraints
    (exact: a convex problem in (c, A, B) for fixed T, solved in closed form over its active
    sets). ``interior``: no constraint is active (A != 0 for decay and rise; for the rise-and-fall
    models B > 0 and B T > A ln2: the curve rises at h0 and falls later)."""
    g = np.exp2(-x[None, None, :] / ts[:, :, None])  # [b, G, n]
    zero = np.zeros(ts.shape)
    if model in ("decay", "rise"):
        a, c, sse = _ls_column(g, e, True, 1 if model == "decay" else -1)
        return sse, c, a, zero, a != 0
    intercept = model == "rise and fall"
    xg = x[None, None, :] * g
    # interior: free (A, B) by the 2x2 normal equations, kept where it satisfies both constraints
    if intercept:
        f1, f2 = g - g.mean(axis=-1, keepdims=True), xg - xg.mean(axis=-1, keepdims=True)
        ec = (e - e.mean(axis=-1, keepdims=True))[:, None, :]
    else:
        f1, f2, ec = g, xg, e[:, None, :]
    s11, s12, s22 = (np.einsum("bgn,bgn->bg", u, v) for u, v in ((f1, f1), (f1, f2), (f2, f2)))
    r1, r2 = np.einsum("bgn,bgn->bg", f1, np.broadcast_to(ec, f1.shape)), np.einsum(
        "bgn,bgn->bg", f2, np.broadcast_to(ec, f2.shape))
    det = s11 * s22 - s12 * s12
    ok = det > 1e-12 * s11 * s22
    with np.errstate(invalid="ignore", divide="ignore"):
        a_in = np.where(ok, (s22 * r1 - s12 * r2) / det, 0.0)
        b_in = np.where(ok, (s11 * r2 - s12 * r1) / det, 0.0)
    ok &= (b_in >= 0) & (b_in * ts >= a_in * LN2)
    sse_in = np.where(ok, ((ec - a_in[..., None] * f1 - b_in[..., None] * f2) ** 2).sum(axis=-1), np.inf)
    # boundary B = 0 (then A <= 0), and boundary B = A ln2 / T (then A >= 0)
    a_b0, c_b0, sse_b0 = _ls_column(g, e, intercept, -1)
    a_b1, c_b1, sse_b1 = _ls_column(g * (1 + x[None, None, :] * LN2 / ts[:, :, None]), e, intercept, 1)
    pick = np.argmin(np.stack([sse_in, sse_b0, sse_b1]), axis=0)
    a = np.choose(pick, [a_in, a_b0, a_b1])
    b = np.choose(pick, [b_in, zero, a_b1 * LN2 / ts])
    sse = np.choose(pick, [sse_in, sse_b0, sse_b1])
    if intercept:
        c = e.mean(axis=-1)[:, None] - a * g.mean(axis=-1) - b * xg.mean(axis=-1)
    else:
        c = zero
    return sse, c, a, b, pick == 0


def _profile_curve(model: str, x: np.ndarray, curves: np.ndarray, lo: float, hi: float) -> dict:
    """Best (T, c, A, B, sse) per curve [B, n] for a transient model: the least squares at each
    half-life of a log grid over [lo, hi], then of a finer grid within one coarse step either side
    of the best (as _profile_fit: deterministic, no starting point). Ties go to the shorter T."""
    coarse = np.geomspace(lo, hi, _GRID_COARSE)
    step = coarse[1] / coarse[0]
    offsets = np.geomspace(1 / step, step, _GRID_FINE)

    def best(e: np.ndarray, ts: np.ndarray):
        sse, c, a, b, interior = _curve_sse(model, x, e, ts)
        pick = np.argmin(sse, axis=1)
        rows = np.arange(e.shape[0])
        return (ts[rows, pick], c[rows, pick], a[rows, pick], b[rows, pick], sse[rows, pick],
                interior[rows, pick])

    parts = []
    for start in range(0, curves.shape[0], 64):
        e = curves[start:start + 64]
        t = best(e, np.broadcast_to(coarse, (e.shape[0], coarse.size)))[0]
        parts.append(best(e, np.clip(t[:, None] * offsets[None, :], lo, hi)))
    keys = ("T", "c", "A", "B", "sse", "interior")
    return {key: np.concatenate([p[i] for p in parts]) for i, key in enumerate(keys)}


def _curve_values(model: str, x: np.ndarray, fit: dict) -> np.ndarray:
    """Model values [B, n] of fits (arrays [B]) at offsets x."""
    if model == "flat":
        return np.broadcast_to(fit["c"][:, None], (fit["c"].size, x.size))
    g = np.exp2(-x[None, :] / fit["T"][:, None])
    return fit["c"][:, None] + (fit["A"][:, None] + fit["B"][:, None] * x[None, :]) * g


def _fit_model(model: str, x: np.ndarray, curves: np.ndarray, lo: float, hi: float) -> dict:
    if model == "flat":
        c = curves.mean(axis=1)
        return {"c": c, "sse": ((curves - c[:, None]) ** 2).sum(axis=1), "T": np.full(c.shape, NAN),
                "A": np.zeros(c.shape), "B": np.zeros(c.shape), "interior": np.ones(c.shape, dtype=bool)}
    return _profile_curve(model, x, curves, lo, hi)


def _curve_params(model: str, fit: dict, h0: float) -> dict:
    """The fitted parameters of the first curve in ``fit``, as in the formula (A > 0 for rise)."""
    c, t, a, b = (float(fit[k][0]) for k in ("c", "T", "A", "B"))
    if model == "flat":
        return {"c": c}
    if model in ("decay", "rise"):
        return {"c": c, "A": abs(a), "T": t}
    # the maximum of (A + B x) 2^(-x/T) over x >= 0: at x = T/ln2 - A/B; on the constraint B T = A ln2
    # (flat start) at h0; with B = 0 (a rise, no fall) never reached: inf
    if b <= 0:
        peak = math.inf
    elif not fit["interior"][0]:
        peak = h0
    else:
        peak = h0 + max(t / LN2 - a / b, 0.0)
    return {"c": c, "A": a, "B": b, "T": t, "peak": peak}


_RISE_AND_FALL = ("rise and fall to 0", "rise and fall")


def _fall_half_time(a, b, t) -> np.ndarray:
    """For transients (A + B x) 2^(-x/T) (arrays), the delay from their peak until they have
    fallen to half the peak's value: the half-life of a rise and fall, defined by the curve
    itself rather than by T (with a large T the fitted transient is nearly a parabola, whose
    fall T does not describe). NaN where there is no positive peak (B <= 0)."""
    a, b, t = (np.asarray(v, dtype=float) for v in (a, b, t))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        xp = np.where(b > 0, np.maximum(t / LN2 - a / b, 0.0), 0.0)

        def tau(x):
            return (a + b * x) * np.exp2(-x / t)

        target = 0.5 * tau(xp)
        valid = (b > 0) & np.isfinite(target) & (target > 0)
        lo, hi = xp.copy(), xp + np.where(np.isfinite(t), t, 1.0)
        for _ in range(200):  # widen until the curve is below half its peak
            need = valid & (tau(hi) > target)
            if not need.any():
                break
            hi = np.where(need, xp + 2.0 * (hi - xp), hi)
        for _ in range(200):  # then bisect: the curve falls monotonically after its peak
            mid = 0.5 * (lo + hi)
            above = tau(mid) > target
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.where(valid, 0.5 * (lo + hi) - xp, NAN)


def fit_excess_curve(horizons, excess_per_seed, *, n_resamples: int = 500, confidence: float = 0.95,
                     random_state: int = 0, max_span_ratio: float = 10.0) -> dict:
    """A persistent part and a transient part of an excess curve: fit the per-seed-mean excess
    e(h) (not clipped: an excess may be negative) with the models of CURVE_MODELS and keep the
    one of lowest BIC.

    ``horizons``: the n_h delays h; ``excess_per_seed``: [n_seeds, n_h] (see excess_effect).
    With x = h - h0, h0 = the first delay, the models are (A, B, c, T as in ``formula``)

    * "flat":  e = c (persistent part only, 1 parameter);
    * "decay": e = c + A 2^(-x/T), A > 0: a transient decaying to the plateau c (3 parameters);
    * "rise":  e = c - A 2^(-x/T), A > 0: a rise to the plateau c, T its half-time (3);
    * "rise and fall": e = c + (A + B x) 2^(-x/T), B >= 0 and B >= A ln2 / T (the curve rises at
      h0, peaks at h0 + T/ln2 - A/B, then decays to the plateau c with the factor 2^(-x/T)) (4);
    * "rise and fall to 0": the same with c fixed at 0, not estimated (3): the stand-in where
      "rise and fall" is not eligible (exactly four distinct delays), and only there.

    A model is eligible when its number of parameters k (T counted) is below the number of
    distinct delays. It is selectable unless its best fit lies on its constraint (then it is a
    simpler model: a decay or rise with A = 0; a rise and fall without the rise) and, for a rise
    and fall, unless its peak lies strictly between the first and the last delay (else the data
    show no rise, or no fall). Selection: the lowest BIC = SSE / s^2 + k ln n over the n points of
    the mean curve, s^2 the variance of one point of the mean curve estimated from the seeds
    (the per-delay variance over seeds, ddof 1, averaged over delays, / n_seeds; floored at
    (1e-4 max|e|)^2, so a fit closer than that counts as exact and an exact curve goes to the
    fewest parameters); with one seed the variance is profiled out: BIC = n ln(SSE / n) + k ln n,
    the SSE floored alike. Ties go to the earlier model in CURVE_MODELS. AICc would need
    n >= k + 2 and so rule out every transient model at four delays. The noise is treated as
    independent across delays (a seed-level shift of the whole curve goes into c).

    Fits: for each half-life T on the log grid of _profile_fit (from a tenth of the smallest gap
    between delays to 10 * max_span_ratio * span), the best c, A, B are linear least squares under
    the sign constraints (closed form, exact); T is the grid point of least SSE: deterministic, no
    starting point, no local minimum. Intervals: ``n_resamples`` bootstrap resamples of seeds
    (rows), each refitted WITH THE CHOSEN MODEL, percentile ends as order statistics (lower /
    higher), generator seeded with ``random_state``.

    Returns ``model``, ``formula``, ``plateau`` (c: the model's value as h -> inf, the persistent
    part), ``plateau_interval``, ``half_life`` (T of the transient: NaN for "flat"; inf when T is
    beyond ``max_span_ratio`` times the span of the delays -- then the transient does not level
    off over the delays measured, the plateau is not determined (NaN) and ``fit_ok`` is False),
    ``interval`` (of the half-life), ``extrapolated`` (a finite half-life beyond the span),
    ``interval_open`` (the half-life interval's upper end is inf), ``fit_ok``, ``reason`` (why the
    result is special, else ""), ``note`` (caveats, else ""), ``r2``, ``fitted`` (the model at the
    delays), ``mean_excess``, ``candidates`` ({model: {"k", "sse", "bic", "selectable", "params"}}
    of the eligible models; params as in the formula, T the fitted grid value, plus "peak", the
    delay of the maximum, for a rise and fall), ``criterion`` ("BIC"), ``noise_var`` (s^2; NaN
    with one seed), ``n_seeds``, ``confidence``, ``n_resamples`` and
    ``boot_no_transient`` (resamples whose refit has no transient, A = B = 0: left out of the
    half-life interval, kept in the plateau interval).

    Bootstrap conventions: a resample whose transient does not level off (T beyond the limit) has
    half-life inf and plateau -inf or +inf, on the side the transient points away from at the last
    delay (a decay still falling has its plateau below: -inf). Special cases: every per-seed value
    exactly 0 -> "flat", plateau 0.0, interval (0.0, 0.0), half-life NaN, with a reason; a mean
    curve exactly 0 -> "flat" at 0.0; fewer than two distinct delays, no seeds or non-finite values
    -> no fit, a reason; fewer than two seeds -> a fit, no intervals (NaN), a note.
    """
    h = _numpy(horizons).ravel()
    e = np.atleast_2d(_numpy(excess_per_seed))
    if e.ndim != 2 or e.shape[1] != h.size:
        raise ValueError(f"excess_per_seed must be [n_seeds, {h.size}], got {e.shape}")
    out = {"model": "", "formula": "", "plateau": NAN, "plateau_interval": (NAN, NAN), "half_life": NAN,
           "interval": (NAN, NAN), "extrapolated": False, "interval_open": False, "fit_ok": False, "reason": "",
           "note": "", "r2": NAN, "fitted": [], "mean_excess": [], "candidates": {}, "criterion": "BIC",
           "noise_var": NAN, "n_seeds": int(e.shape[0]), "confidence": float(confidence),
           "n_resamples": int(n_resamples), "boot_no_transient": 0}
    grid = _delays(h, e, max_span_ratio, "a curve")
    if isinstance(grid, str):
        out["reason"] = grid
        return out
    uniq, span, gap, limit, lo, hi, h0 = grid
    x = h - h0
    mean = e.mean(axis=0)
    out["mean_excess"] = [float(v) + 0.0 for v in mean]
    n_pts = h.size
    scale = float(np.max(np.abs(mean)))
    notes = []

    # ---- selection on the mean curve
    fits = {}
    if scale == 0:
        eligible = ["flat"]
    else:
        eligible = [m for m in CURVE_MODELS if _CURVE_K[m] < uniq.size]
        if "rise and fall" in eligible:  # the stand-in with its plateau fixed at 0 only where needed
            eligible.remove("rise and fall to 0")
        left_out = [m for m in CURVE_MODELS if m not in eligible and _CURVE_K[m] >= uniq.size]
        if left_out:
            notes.append(f"not eligible with {uniq.size} distinct delays (parameters must be fewer): "
                         + ", ".join(f"{m} ({_CURVE_K[m]})" for m in left_out))
    # BIC = chi2 + k ln n with the variance of a mean-curve point estimated from the seeds (pooled
    # over delays, floored at (1e-4 max|e|)^2); one seed: the variance profiled out, n ln(SSE / n).
    floor_var = (_SSE_FLOOR_REL * scale) ** 2
    noise_var = float(e.var(axis=0, ddof=1).mean()) / e.shape[0] if e.shape[0] >= 2 else NAN
    out["noise_var"] = noise_var

    def bic(sse: float, k: int) -> float:
        if scale == 0:
            return NAN
        if e.shape[0] >= 2:
            return sse / max(noise_var, floor_var) + k * math.log(n_pts)
        return n_pts * math.log(max(sse, n_pts * floor_var) / n_pts) + k * math.log(n_pts)

    chosen, best_bic = None, math.inf
    degenerate = False
    for i, m in enumerate(eligible + ["rise and fall to 0"]):
        if i == len(eligible) and (m in fits or not degenerate):
            continue  # the plateau-free stand-in: only where the four-parameter model is out
        fit = _fit_model(m, x, mean[None, :], lo, hi)
        sse = float(fit["sse"][0])
        fits[m] = fit
        params = _curve_params(m, fit, h0)
        # a transient model on its constraint is a simpler model; a rise and fall must also peak
        # strictly between the first and the last delay (else the data show no rise, or no fall)
        selectable = m == "flat" or bool(fit["interior"][0])
        if "peak" in params:
            selectable = selectable and h0 < params["peak"] < float(uniq[-1])
        if m == "rise and fall" and selectable and float(fit["T"][0]) > limit:
            # T beyond the limit: the transient is nearly a parabola whose size cancels against
            # the plateau (c -> -inf, A -> +inf), so c is no plateau and T no rate. Not chosen;
            # the plateau-free rise and fall is tried in its place.
            selectable, degenerate = False, True
            notes.append("the four-parameter rise and fall degenerates here (T at the search bound, c and A "
                         "cancelling): not chosen, the rise and fall to 0 tried in its place")
        out["candidates"][m] = {"k": _CURVE_K[m], "sse": sse, "bic": bic(sse, _CURVE_K[m]), "selectable": selectable,
                                "params": params}
        if selectable and (chosen is None or out["candidates"][m]["bic"] < best_bic):
            chosen, best_bic = m, out["candidates"][m]["bic"]
    fit = fits[chosen]
    fitted = _curve_values(chosen, x, fit)[0]
    sst = float(((mean - mean.mean()) ** 2).sum())
    out.update(model=chosen, formula=_CURVE_FORMULAS[chosen], fitted=[float(v) + 0.0 for v in fitted],
               r2=1.0 - float(fit["sse"][0]) / sst if sst > 0 else NAN)
    t_fit = float(fit["T"][0])
    transient = chosen != "flat" and (fit["A"][0] != 0 or fit["B"][0] != 0)
    if chosen == "flat":
        out.update(plateau=float(fit["c"][0]) + 0.0, fit_ok=True)
    elif chosen in _RISE_AND_FALL and transient:
        peak_x = out["candidates"][chosen]["params"]["peak"] - h0
        fall = float(_fall_half_time(fit["A"], fit["B"], fit["T"])[0])
        if not math.isfinite(fall) or fall > limit:
            out.update(half_life=math.inf,
                       reason=f"the {chosen} transient does not fall to half its peak within {max_span_ratio:g} x the "
                              f"span of the delays ({span:g}): half-life inf, plateau not determined")
        else:
            out.update(half_life=fall, fit_ok=True, extrapolated=bool(peak_x + fall > span))
            if t_fit <= limit:
                out["plateau"] = float(fit["c"][0]) + 0.0
            else:
                notes.append(f"the tail's rate T = {t_fit:.3g} is beyond {max_span_ratio:g} x the span: the "
                             "transient is nearly a parabola over these delays, its plateau is not determined")
            notes.append("half-life of a rise and fall: the delay from its peak until the transient has halved")
            if peak_x + fall > span:
                notes.append(f"the transient reaches half its peak beyond the last delay ({float(uniq[-1]):g}): "
                             "extrapolated")
    elif t_fit > limit:
        out.update(half_life=math.inf,
                   reason=f"the {chosen} transient does not level off over the delays measured (its half-life is "
                          f"beyond {max_span_ratio:g} x their span of {span:g}): half-life inf, plateau not determined")
    else:
        out.update(half_life=t_fit, plateau=float(fit["c"][0]) + 0.0, fit_ok=True,
                   extrapolated=bool(t_fit > span))
        if t_fit < gap:
            notes.append(f"half-life below the smallest gap between delays ({gap:g}): not resolved by these "
                         f"delays, read it as < {gap:g}")
        if t_fit > span:
            notes.append(f"half-life beyond the span of the delays ({span:g}): extrapolated")
    if chosen in ("rise and fall", "rise and fall to 0") and transient:
        peak = out["candidates"][chosen]["params"]["peak"]
        notes.append(f"rises from h = {h0:g} to a peak at h = {peak:.3g}, then decays with factor 2^(-(h - h0)/T)")
    if chosen == "rise and fall to 0":
        notes.append("the plateau is fixed at 0 by this model, not estimated: no plateau interval")

    # ---- intervals: bootstrap over seeds, refitting the chosen model
    if scale == 0 and not np.any(e != 0):
        out.update(plateau_interval=(0.0, 0.0), fit_ok=True,
                   reason="every per-seed excess is exactly 0: flat at 0.0, no effect beyond the reference at "
                          "any delay (half-life NaN)")
        out["note"] = "; ".join(notes)
        return out
    if scale == 0:
        out["reason"] = "the mean excess is exactly 0 at every delay: flat at 0.0 (half-life NaN)"
    if e.shape[0] >= 2 and n_resamples > 0:
        rng = np.random.default_rng(random_state)
        picks = rng.integers(0, e.shape[0], size=(n_resamples, e.shape[0]))
        curves = e[picks].mean(axis=1)
        boot = _fit_model(chosen, x, curves, lo, hi)
        tail = 100 * (1 - confidence) / 2

        def ends(values: np.ndarray) -> tuple[float, float]:
            return (float(np.percentile(values, tail, method="lower")) + 0.0,
                    float(np.percentile(values, 100 - tail, method="higher")) + 0.0)

        if chosen == "flat":
            out["plateau_interval"] = ends(boot["c"])
        else:
            has = (boot["A"] != 0) | (boot["B"] != 0)
            out["boot_no_transient"] = int((~has).sum())
            open_ = boot["T"] > limit
            last = _curve_values(chosen, np.array([uniq[-1] - h0]), boot)[:, 0] - boot["c"]
            away = np.where(last > 0, -np.inf, np.where(last < 0, np.inf, boot["c"]))
            plateaus = np.where(open_ & has, away, boot["c"])
            if chosen != "rise and fall to 0":
                out["plateau_interval"] = ends(plateaus)
            if chosen in _RISE_AND_FALL:
                halves = _fall_half_time(boot["A"], boot["B"], boot["T"])
                has = has & np.isfinite(halves)
                out["boot_no_transient"] = int((~has).sum())
                halves = np.where(halves > limit, np.inf, halves)
            else:
                halves = np.where(open_, np.inf, boot["T"])
            if has.any():
                out["interval"] = ends(halves[has])
                out["interval_open"] = math.isinf(out["interval"][1])
            if out["boot_no_transient"]:
                notes.append(f"{out['boot_no_transient']} of {n_resamples} resamples had no transient (A = B = 0): "
                             "left out of the half-life interval")
            if out["interval_open"]:
                notes.append("half-life interval open above: some resampled seed sets do not level off")
    elif e.shape[0] < 2:
        notes.append("fewer than two seeds: no interval")
    out["note"] = "; ".join(notes)
    return out


# ---------------------------------------------------------------------------- verdicts ----

MEMORY = "memory beyond chaos"
NO_MEMORY = "no memory beyond chaos"
INCONCLUSIVE = "inconclusive"
#: The three verdicts, in the order the rule tries them.
VERDICTS = (MEMORY, NO_MEMORY, INCONCLUSIVE)


def verdict(excess_per_seed, *, floor: float, margin: float = 0.1, alpha: float = 0.05, q_value: float | None = None) -> dict:
    """One verdict for one arm at one horizon, from its per-seed excess over the reference arm.

    ``excess_per_seed``: the n per-seed values (arm - reference) at this horizon; ``floor``: the
    seed noise floor tau_seed at this horizon (positive); ``margin``: the equivalence margin as a
    fraction of the floor, so the margin is m = margin * floor (``margin_abs``); ``q_value``: the
    Benjamini-Hochberg adjusted value of this arm's p-value across the arms (benjamini_hochberg),
    when there are several. The rule, with the paired t machinery of paired_effect and tost:

    1. "memory beyond chaos" when q (or, without q_value, the two-sided paired t p-value) <= alpha,
       the mean excess is > 0 and the (1 - alpha) default interval (``interval``, the t interval)
       lies above 0. For the t interval the last condition follows from the first two (p <= alpha
       is 0 outside the interval, and q >= p); it is checked so that a q-value from elsewhere can
       never contradict the interval.
    2. Otherwise "no memory beyond chaos" when the excess is shown to be below +m: the upper
       one-sided test of TOST, p_upper = P(T_{n-1} <= (mean - m) / se) < alpha, which is the upper
       end of the (1 - 2 alpha) t interval (``interval_90``) lying below m. Only the upper side:
       an arm that moves the model less than the bit flip (a negative excess) has no memory beyond
       chaos either. Both TOST p-values are reported (``tost``: tost(values, m, alpha)).
    3. Otherwise "inconclusive": neither shown, more seeds (or a larger margin) are needed.

    A significant excess smaller than m is "memory beyond chaos" (rule 1 comes first) and the
    reason says it is below the margin. Zero variance (every seed's excess exactly c; the t test
    is undefined and q_value is not used): the exact limit of the equivalence side decides --
    c < m (every seed exactly 0 among them) "no memory beyond chaos", c >= m "memory beyond
    chaos". Fewer than two seeds, a non-finite value, or a floor that is not a positive finite
    number: "inconclusive" with the reason. ``margin`` must be positive and finite and ``alpha``
    in (0, 0.5) (ValueError otherwise).

    Returns ``verdict`` (one of VERDICTS), ``reason`` (one sentence with the numbers),
    ``margin_abs`` (m), ``margin_rel`` (``margin``), ``mean``, ``interval`` (the default
    (1 - alpha) interval, 95% at the default alpha), ``interval_90`` (the (1 - 2 alpha) t interval,
    90% at the default alpha), ``p_value`` (two-sided paired t), ``q_value`` (as given, NaN if
    not), ``tost`` (the tost() dict at m; None when no test ran), ``n``, ``alpha``, ``floor``.
    """
    from scipy import stats

    def as_float(x) -> float:
        try:
            return float(x)
        except (TypeError, ValueError):
            return NAN

    if not (math.isfinite(as_float(margin)) and as_float(margin) > 0):
        raise ValueError("the margin (a fraction of the floor) must be a positive finite number")
    margin, floor_value = as_float(margin), as_float(floor)
    if not 0 < alpha < 0.5:
        raise ValueError("alpha must lie in (0, 0.5)")
    v = _values(excess_per_seed)
    n = int(v.size)
    out = {"verdict": INCONCLUSIVE, "reason": "", "margin_abs": NAN, "margin_rel": float(margin), "mean": NAN,
           "interval": (NAN, NAN), "interval_90": (NAN, NAN), "p_value": NAN,
           "q_value": NAN if q_value is None else float(q_value), "tost": None, "n": n, "alpha": float(alpha),
           "floor": floor_value}
    if not (math.isfinite(floor_value) and floor_value > 0):
        out["reason"] = f"the noise floor must be a positive finite number (got {floor!r}): no verdict"
        return out
    floor = floor_value
    m = margin * floor
    out["margin_abs"] = m
    if n < 2 or not np.all(np.isfinite(v)):
        out["reason"] = ("fewer than two seeds" if n < 2 else "non-finite per-seed excess") + ": no verdict"
        if n and np.all(np.isfinite(v)):
            out["mean"] = float(v.mean()) + 0.0
        return out
    effect = paired_effect(v, confidence=1 - alpha)
    mean = effect["mean"]
    out.update(mean=mean, interval=effect["interval"], p_value=effect["p_value"], tost=tost(v, m, alpha))
    if effect["se"] == 0:
        out["interval_90"] = (mean, mean)
        if mean >= m:
            out.update(verdict=MEMORY, reason=f"every seed's excess is exactly {mean:.4g} >= the margin {m:.4g} "
                                              f"({margin:g} x floor {floor:.4g}): no seed-to-seed variation, exact")
        else:
            out.update(verdict=NO_MEMORY, reason=f"every seed's excess is exactly {mean:.4g} < the margin {m:.4g} "
                                                 f"({margin:g} x floor {floor:.4g}): no seed-to-seed variation, exact")
        return out
    half90 = float(stats.t.ppf(1 - alpha, n - 1)) * effect["se"]
    lo90, hi90 = mean - half90, mean + half90
    out["interval_90"] = (lo90, hi90)
    name, test = ("q", float(q_value)) if q_value is not None else ("p", effect["p_value"])
    lo, hi = effect["interval"]
    level = f"{100 * (1 - alpha):g}%"
    if math.isfinite(test) and test <= alpha and mean > 0 and lo > 0:
        small = (f"; smaller than the margin {m:.4g} ({100 * (1 - 2 * alpha):g}% interval below it)"
                 if hi90 < m else "")
        out.update(verdict=MEMORY, reason=f"mean excess {mean:.4g} > 0 with {name} = {test:.3g} <= {alpha:g}, "
                                          f"{level} interval [{lo:.4g}, {hi:.4g}] above 0{small}")
    elif out["tost"]["p_upper"] < alpha and hi90 < m:
        out.update(verdict=NO_MEMORY, reason=f"mean excess {mean:.4g} shown below the margin {m:.4g} ({margin:g} x "
                                             f"floor {floor:.4g}): upper TOST p = {out['tost']['p_upper']:.3g} < "
                                             f"{alpha:g}, {100 * (1 - 2 * alpha):g}% interval ends at {hi90:.4g}")
    else:
        out["reason"] = (f"neither: mean excess {mean:.4g}, {name} = {test:.3g} (memory needs <= {alpha:g} and a "
                         f"positive mean), {100 * (1 - 2 * alpha):g}% interval ends at {hi90:.4g} >= the margin "
                         f"{m:.4g} ({margin:g} x floor {floor:.4g})")
    return out


# ------------------------------------------------------------------ memory characterization ----


def backflow_witness(d1_per_seed, d2_per_seed, *, n_resamples: int = 2000) -> dict:
    """The back-flow witness of training memory (docs/estimands.md): per seed, D1 is the distance
    between the two branches after the instruments A and A' (k steps each, the same batches,
    other random draws) and D2 the distance after the common instrument B that follows; the
    witness is W = D2 - D1. A memoryless (Markovian) process cannot make two states more
    distinguishable by applying the same map to both when that map is a contraction, so W > 0
    beyond the interval certifies memory carried past the instruments. Returns ``paired_effect``
    of W (``mean``, ``interval``, ``p_value``, ...) plus ``per_seed``, ``d1_mean``, ``d2_mean``,
    ``positive`` (the interval lies above 0) and ``amplification`` = mean D2 / mean D1."""
    d1, d2 = _values(d1_per_seed), _values(d2_per_seed)
    if d1.shape != d2.shape:
        raise ValueError(f"D1 and D2 need one value per seed each, got {d1.shape} and {d2.shape}")
    w = d2 - d1
    out = paired_effect(w, n_resamples=n_resamples)
    d1_mean, d2_mean = float(np.mean(d1)) if d1.size else NAN, float(np.mean(d2)) if d2.size else NAN
    out.update(per_seed=[float(v) for v in w], d1_mean=d1_mean, d2_mean=d2_mean,
               positive=bool(np.isfinite(out["interval"][0]) and out["interval"][0] > 0),
               amplification=d2_mean / d1_mean if d1_mean > 0 else NAN)
    return out


def additivity(delta_p, delta_q, delta_pq, *, n_resamples: int = 2000) -> dict:
    """How far the effect of two perturbations together departs from the sum of their effects.

    ``delta_p``, ``delta_q``, ``delta_pq``: [seeds, ...] displacements of the probe logits of the
    children with P, with Q and with both from the same seed's factual run (same step). Per seed:
    the interaction I = delta_pq - delta_p - delta_q, its size ||I|| (L2 over every probe entry,
    divided by sqrt(number of entries): an RMS logit), and the relative interaction
    ||I|| / (||delta_p|| + ||delta_q||): 0 when the effects add, 0.5 when Q repeats P (P and Q
    together do what P does, e.g. the same reset twice), 1 when two equal effects undo each other
    together (the pair changes nothing); above 1 when together they move the logits further than
    both alone could. Returns
    ``relative`` and ``size`` as ``paired_effect`` results with ``per_seed`` lists; a seed whose
    two single effects are both exactly zero has no relative value (NaN, and the mean is NaN)."""
    p, q, pq = (np.asarray(_numpy(a), dtype=np.float64) for a in (delta_p, delta_q, delta_pq))
    if not (p.shape == q.shape == pq.shape) or p.ndim < 1 or p.shape[0] == 0:
        raise ValueError(f"displacements need equal shapes [seeds, ...], got {p.shape}, {q.shape}, {pq.shape}")
    n = p.shape[0]
    p, q, pq = p.reshape(n, -1), q.reshape(n, -1), pq.reshape(n, -1)
    scale = math.sqrt(p.shape[1]) if p.shape[1] else 1.0
    inter = np.linalg.norm(pq - p - q, axis=1) / scale
    singles = (np.linalg.norm(p, axis=1) + np.linalg.norm(q, axis=1)) / scale
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(singles > 0, inter / np.where(singles > 0, singles, 1.0), NAN)
    rel = paired_effect(relative, n_resamples=n_resamples)
    size = paired_effect(inter, n_resamples=n_resamples)
    return {"relative": {**rel, "per_seed": [float(v) for v in relative]},
            "size": {**size, "per_seed": [float(v) for v in inter]}}


def distance_additivity(d_p, d_q, d_pq, *, n_resamples: int = 2000) -> dict:
    """Additivity of a distance: per seed, d(P+Q) - (d(P) + d(Q)) (negative: the effects overlap
    or cancel, positive: they reinforce beyond their sum) and the ratio d(P+Q) / (d(P) + d(Q)).
    ``excess`` and ``ratio`` are ``paired_effect`` results with ``per_seed`` lists."""
    a, b, ab = _values(d_p), _values(d_q), _values(d_pq)
    if not (a.shape == b.shape == ab.shape):
        raise ValueError("distances need one value per seed each")
    excess = ab - (a + b)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(a + b > 0, ab / np.where(a + b > 0, a + b, 1.0), NAN)
    return {"excess": {**paired_effect(excess, n_resamples=n_resamples), "per_seed": [float(v) for v in excess]},
            "ratio": {**paired_effect(ratio, n_resamples=n_resamples), "per_seed": [float(v) for v in ratio]}}


def divergence_exponent(steps, distances_per_seed, *, min_points: int = 3, n_resamples: int = 2000) -> dict:
    """The finite-time divergence exponent of two trajectories: the growth rate lambda of their
    distance, d(t) ~ d0 * exp(lambda * t), fitted to log d against t over the window where it grows.

    ``steps``: increasing steps (or delays); ``distances_per_seed``: [seeds, steps] distances
    (each seed's child against its own parent). The window is chosen once for all seeds from the
    mean over seeds of log d: it starts at the first step where every seed's distance is positive
    and finite and ends at the step where that mean log distance is largest (after it, the
    distance no longer grows: saturation or decay). Each seed's lambda is the least-squares slope
    of log d on t over the window; the estimate is their mean with the paired t interval
    (``paired_effect``). Per step, not per epoch; ln 2 / lambda is the doubling time.

    Returns ``exponent`` (mean), ``interval``, ``per_seed``, ``window`` [first step, last step],
    ``points`` (steps in the window), ``doubling_time``, ``r2`` (of the fit to the mean log
    curve), ``fit_ok`` and ``reason`` (fewer than ``min_points`` growing points, or no growth)."""
    t = _values(steps)
    d = np.asarray(_numpy(distances_per_seed), dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != t.size:
        raise ValueError(f"distances must be [seeds, {t.size} steps], got shape {d.shape}")
    if t.size > 1 and np.any(np.diff(t) <= 0):
        raise ValueError("steps must increase")
    out = {"exponent": NAN, "interval": (NAN, NAN), "per_seed": [], "window": [NAN, NAN], "points": 0,
           "doubling_time": NAN, "r2": NAN, "fit_ok": False, "reason": "", "n": int(d.shape[0]),
           "steps": [float(x) for x in t], "mean_log": []}
    positive = np.all(np.isfinite(d) & (d > 0), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(d > 0, np.log(np.where(d > 0, d, 1.0)), -np.inf)
    mean_log = np.where(positive, logs.mean(axis=0), NAN)
    out["mean_log"] = [float(x) for x in mean_log]
    if d.shape[0] == 0 or not positive.any():
        out["reason"] = "the distance is exactly 0 (or not finite) at every step: nothing diverges"
        return out
    first = int(np.argmax(positive))
    run = first
    while run + 1 < t.size and positive[run + 1]:
        run += 1
    last = first + int(np.nanargmax(mean_log[first:run + 1]))
    idx = np.arange(first, last + 1)
    out["window"] = [float(t[first]), float(t[last])]
    out["points"] = int(idx.size)
    if idx.size < min_points:
        out["reason"] = (f"the distance grows over {idx.size} evaluated step(s) only (from {t[first]:g} to "
                         f"{t[last]:g}); a slope needs {min_points}: add delays inside the growth")
        return out
    x = t[idx] - t[idx].mean()
    slopes = (logs[:, idx] - logs[:, idx].mean(axis=1, keepdims=True)) @ x / float(x @ x)
    effect = paired_effect(slopes, n_resamples=n_resamples)
    y = mean_log[idx]
    fitted = y.mean() + (y - y.mean()) @ x / float(x @ x) * x
    ss = float(((y - y.mean()) ** 2).sum())
    lam = effect["mean"]
    out.update(exponent=lam, interval=effect["interval"], per_seed=[float(v) for v in slopes],
               doubling_time=LN2 / lam if lam > 0 else math.inf, p_value=effect["p_value"],
               r2=1.0 - float(((y - fitted) ** 2).sum()) / ss if ss > 0 else NAN, fit_ok=True)
    if lam <= 0:
        out["reason"] = "the fitted slope is not positive: the distance does not grow over the window"
    return out
