"""Characterizing training memory: is an effect stable, linear or chaotic?

Four analyses of an experiment's stored probe evaluations (nothing is run here), each a section
of results.json and of the report; the statistics are replay.estimands':

* `witness`     (kind "witness") the back-flow witness W = D2 - D1 per program, fork step,
                instrument length k, length of the common instrument B and distance; with the
                causal break (optimizer state reset when B begins) beside it, and the measured
                amplification over k against the momentum theory;
* `additivity`  (arm pairs) the interaction of two perturbations at the same step: the probe-
                logit displacement of both together against the sum of each alone, and the same
                for every distance;
* `divergence`  (any experiment with a reference arm and 3+ horizons) the growth rate of the
                distance between a one-bit-flip child and its parent (parameters and the primary
                function distance), per fork step, and early against late;
* `calibration` (any experiment estimating "ece") each arm's ECE beside its parent's and the
                seed-paired difference against the seed floor.
"""

from __future__ import annotations

import math

import numpy as np

from .estimation import _pair
from .probe import calibration_error, displacement, observable
from .spec import SIGNED

NAN = float("nan")
WITNESS_THEORY = (
    "Momentum SGD with the instruments' gradient difference e_j at step j of k: the buffers then "
    "differ by sum_j mu^(k-j) e_j, which keeps moving the weights during B; a causal break removes "
    "it. Relative to the shortest instrument, that stored difference grows like (1 - mu^k) / "
    "(1 - mu) when the e_j point the same way (coherent) and like sqrt((1 - mu^2k) / (1 - mu^2)) "
    "when they are independent draws (incoherent: other dropout masks each step). Both ignore the "
    "gradient's feedback on the displaced weights.")


def _key_of(spec, ref: str | None) -> str:
    programs = spec.programs()
    ref = ref or spec.program
    return next(k for k, r in programs.items() if r == ref)


def _effect(values, n_resamples: int) -> dict:
    from .. import estimands as est

    e = est.paired_effect(np.asarray(values, dtype=float), n_resamples=n_resamples)
    return {"mean": e["mean"], "interval": _pair(e["interval"]), "p_value": e["p_value"],
            "per_seed": [float(v) for v in np.asarray(values, dtype=float)]}


# ----------------------------------------------------------------------------- witness ----


def momentum_of(experiment, key: str, step: int) -> float | None:
    """The first-moment coefficient of program `key`'s optimizer (SGD's momentum, Adam's beta1)
    in the first seed's factual run, read from its checkpoint at or before `step`; None if the
    optimizer has none."""
    from ..store import RunDir

    try:
        with RunDir.open(experiment.run_dir(key, experiment.spec.seeds[0])) as run:
            at = max(c for c in run.ledger.checkpoints() if c <= step)
            group = run.load_checkpoint(at)["optimizer"]["param_groups"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    return None


def theory_factors(mu: float | None, k: int) -> tuple[float, float]:
    """(coherent, incoherent) growth of the buffer difference after k instrument steps."""
    if mu is None or not 0 <= mu < 1:
        return NAN, NAN
    return (1 - mu ** k) / (1 - mu), math.sqrt((1 - mu ** (2 * k)) / (1 - mu ** 2))


def witness(experiment, ev, labels) -> dict | None:
    from .. import estimands as est

    spec = experiment.spec
    if spec.kind != "witness":
        return None
    w = spec.witness
    n_boot = spec.bootstrap_resamples
    distances = [d for d in spec.distances if d not in SIGNED]
    rows = []
    for ref in w["programs"]:
        key = _key_of(spec, ref)
        total = experiment.total_steps(key)
        for T in spec.fork_steps:
            mu = momentum_of(experiment, key, T)
            for k in w["instrument_steps"]:
                s1 = T + k
                names = spec.witness_arm_names(k, ref)
                runs = []
                for s in spec.seeds:
                    parent = ev(experiment.run_dir(key, s))
                    a2, b0, b1 = (ev(experiment.child_dir(key, s, T, n)) for n in names)
                    runs.append((parent, a2, b0, b1))
                coherent, incoherent = theory_factors(mu, k)
                for d in distances:
                    d1 = [observable(d, p, a2, s1, labels) for p, a2, _, _ in runs]
                    d1b = [observable(d, b0, b1, s1, labels) for _, _, b0, b1 in runs]
                    for h in spec.horizons:
                        s2 = s1 + h
                        if h == 0 or s2 > total:
                            continue
                        d2 = [observable(d, p, a2, s2, labels) for p, a2, _, _ in runs]
                        d2b = [observable(d, b0, b1, s2, labels) for _, _, b0, b1 in runs]
                        wit = est.backflow_witness(d1, d2, n_resamples=n_boot)
                        brk = est.backflow_witness(d1b, d2b, n_resamples=n_boot)
                        drop = np.asarray(wit["per_seed"]) - np.asarray(brk["per_seed"])
                        rows.append({
                            "program": key, "fork_step": T, "k": k, "b_steps": h, "distance": d,
                            "step_d1": s1, "step_d2": s2, "momentum": mu,
                            "d1_mean": wit["d1_mean"], "d2_mean": wit["d2_mean"],
                            "witness": wit["mean"], "interval": _pair(wit["interval"]), "p_value": wit["p_value"],
                            "per_seed": wit["per_seed"], "positive": wit["positive"],
                            "amplification_d2_d1": wit["amplification"],
                            "break_witness": brk["mean"], "break_interval": _pair(brk["interval"]),
                            "break_per_seed": brk["per_seed"], "break_positive": brk["positive"],
                            # The break acts when B begins: before it, both pairs are the same runs.
                            "break_d1_equal": bool(d1 == d1b),
                            "attenuation": _effect(drop, n_boot),
                            "theory_coherent": coherent, "theory_incoherent": incoherent,
                            "amplification": NAN, "theory_ratio_coherent": NAN, "theory_ratio_incoherent": NAN,
                        })
    # Amplification over k: each witness against the shortest instrument's, same everything else.
    for r in rows:
        base = min((x for x in rows if (x["program"], x["fork_step"], x["b_steps"], x["distance"])
                    == (r["program"], r["fork_step"], r["b_steps"], r["distance"])), key=lambda x: x["k"])
        # Only against a witness shown to be positive: a ratio of rounding noise means nothing.
        if base["positive"] and math.isfinite(r["witness"]):
            r["amplification"] = r["witness"] / base["witness"]
        if base["theory_coherent"] > 0:
            r["theory_ratio_coherent"] = r["theory_coherent"] / base["theory_coherent"]
            r["theory_ratio_incoherent"] = r["theory_incoherent"] / base["theory_incoherent"]
    return {"stream": w["stream"], "causal_break": w["causal_break"], "instrument_steps": w["instrument_steps"],
            "programs": {_key_of(spec, ref): ref for ref in w["programs"]}, "distances": distances,
            "primary_distance": spec.primary_distance if spec.primary_distance in distances else distances[0],
            "definition": ("D1 = distance between A (the parent) and A' (other draws of the stream over k steps, the "
                           "same batches) after the instruments (step T + k); D2 = the same after the common "
                           "instrument B of b steps (step T + k + b); witness = D2 - D1 per seed, mean with the "
                           "95% paired t interval. With the causal break, both branches have their optimizer "
                           "state reset when B begins (weights kept)."),
            "theory": WITNESS_THEORY, "rows": rows}


# -------------------------------------------------------------------------- additivity ----


def additivity(experiment, ev, labels) -> dict | None:
    from .. import estimands as est

    spec = experiment.spec
    if not spec.pairs:
        return None
    arms = {a.name: a for a in spec.arms}
    distances = [d for d in spec.distances if d not in SIGNED]
    n_boot = spec.bootstrap_resamples
    rows = []
    for p_name, q_name in spec.pairs:
        p, q, pq = arms[p_name], arms[q_name], arms[f"{p_name}+{q_name}"]
        key = _key_of(spec, p.program)
        evaluated = experiment.eval_steps(key)
        for T in spec.fork_steps:
            for h in spec.horizons:
                step = T + p.window + h
                if step not in evaluated[T]:
                    continue
                runs = [(ev(experiment.run_dir(key, s)),) + tuple(ev(experiment.child_dir(key, s, T, a.name))
                                                                   for a in (p, q, pq)) for s in spec.seeds]
                dp, dq, dpq = (np.stack([displacement(r[0], r[i], step) for r in runs]) for i in (1, 2, 3))
                inter = est.additivity(dp, dq, dpq, n_resamples=n_boot)
                by_distance = {}
                for d in distances:
                    vals = [[observable(d, r[0], r[i], step, labels) for r in runs] for i in (1, 2, 3)]
                    da = est.distance_additivity(*vals, n_resamples=n_boot)
                    by_distance[d] = {
                        "p_mean": float(np.mean(vals[0])), "q_mean": float(np.mean(vals[1])),
                        "pq_mean": float(np.mean(vals[2])),
                        "excess": da["excess"]["mean"], "excess_interval": _pair(da["excess"]["interval"]),
                        "ratio": da["ratio"]["mean"], "ratio_interval": _pair(da["ratio"]["interval"]),
                    }
                rows.append({
                    "pair": [p_name, q_name], "combined": pq.name, "program": key, "fork_step": T, "horizon": h,
                    "step": step,
                    "relative": inter["relative"]["mean"], "relative_interval": _pair(inter["relative"]["interval"]),
                    "relative_per_seed": inter["relative"]["per_seed"],
                    "size": inter["size"]["mean"], "size_interval": _pair(inter["size"]["interval"]),
                    "distances": by_distance,
                })
    return {"pairs": spec.pairs, "primary_distance": spec.primary_distance,
            "definition": ("Per seed, with delta_X the probe-logit displacement of the child with X from its parent: "
                           "relative interaction ||delta_PQ - delta_P - delta_Q|| / (||delta_P|| + ||delta_Q||) (0: "
                           "the effects add; 0.5: Q repeats P; 1: together they cancel); size: the RMS of the "
                           "interaction in logits. Per distance: d(P+Q) - (d(P) + d(Q)) and d(P+Q) / (d(P) + "
                           "d(Q)). Means over seeds with 95% paired t intervals."),
            "rows": rows}


# -------------------------------------------------------------------------- divergence ----


def divergence(experiment, ev, labels) -> dict | None:
    from .. import estimands as est

    spec = experiment.spec
    ref = spec.reference
    if ref is None or len(spec.horizons) < 3:
        return None
    distances = [d for d in dict.fromkeys(["param_l2", spec.primary_distance]) if d in spec.distances]
    if not distances:
        return None
    rows, comparisons = [], []
    for key in spec.programs():
        evaluated = experiment.eval_steps(key)
        for T in spec.fork_steps:
            hs = [h for h in spec.horizons if T + ref.window + h in evaluated[T]]
            if len(hs) < 3:
                continue
            runs = [(ev(experiment.run_dir(key, s)), ev(experiment.child_dir(key, s, T, ref.name))) for s in spec.seeds]
            for d in distances:
                vals = np.array([[observable(d, fact, child, T + ref.window + h, labels) for h in hs]
                                 for fact, child in runs], dtype=float)
                fit = est.divergence_exponent(np.asarray(hs, dtype=float), vals, n_resamples=spec.bootstrap_resamples)
                rows.append({"program": key, "fork_step": T, "distance": d, "horizons": hs,
                             "mean_distance": [float(x) for x in vals.mean(axis=0)],
                             "exponent": fit["exponent"], "interval": _pair(fit["interval"]),
                             "per_seed": fit["per_seed"], "window": fit["window"], "points": fit["points"],
                             "doubling_time": fit["doubling_time"], "r2": fit["r2"], "fit_ok": fit["fit_ok"],
                             "reason": fit["reason"]})
        for d in distances:
            mine = [r for r in rows if r["program"] == key and r["distance"] == d]
            if len(mine) < 2:
                continue
            early, late = mine[0], mine[-1]
            entry = {"program": key, "distance": d, "early": early["fork_step"], "late": late["fork_step"],
                     "difference": NAN, "interval": [NAN, NAN], "direction": "not measured",
                     "reason": ""}
            if early["fit_ok"] and late["fit_ok"]:
                diff = _effect(np.asarray(early["per_seed"]) - np.asarray(late["per_seed"]), spec.bootstrap_resamples)
                lo, hi = diff["interval"]
                entry.update(difference=diff["mean"], interval=diff["interval"], p_value=diff["p_value"],
                             direction=("early forks diverge faster" if lo > 0 else
                                        "late forks diverge faster" if hi < 0 else "no difference shown"))
            else:
                entry["reason"] = "a fit failed: " + "; ".join(r["reason"] for r in (early, late) if not r["fit_ok"])
            comparisons.append(entry)
    if not rows:
        return None
    return {"arm": ref.name, "distances": distances, "rows": rows, "comparisons": comparisons,
            "definition": ("lambda: the least-squares slope of log distance (reference child against its parent) on "
                           "the delay, per seed, over the window from the first delay where every seed's distance "
                           "is positive to the delay where the mean log distance peaks; mean over seeds with the "
                           "95% paired t interval. Per step; ln 2 / lambda is the doubling time. Early against "
                           "late: the per-seed difference of the exponents at the first and last fork step.")}


# ------------------------------------------------------------------------- calibration ----


def calibration(experiment, ev, labels) -> dict | None:
    spec = experiment.spec
    if "ece" not in spec.distances:
        return None
    n_boot = spec.bootstrap_resamples
    rows = []
    for key in spec.programs():
        for T in spec.fork_steps:
            evaluated = experiment.eval_steps(key)[T]
            for arm in spec.arms_of(key):
                for h in spec.horizons:
                    step = T + arm.window + h
                    if step not in evaluated:
                        continue
                    parent = [calibration_error(ev(experiment.run_dir(key, s)), step, labels) for s in spec.seeds]
                    child = [calibration_error(ev(experiment.child_dir(key, s, T, arm.name)), step, labels)
                             for s in spec.seeds]
                    diff = _effect(np.asarray(child) - np.asarray(parent), n_boot)
                    rows.append({"arm": arm.name, "program": key, "fork_step": T, "horizon": h, "step": step,
                                 "ece_parent": float(np.mean(parent)), "ece_child": float(np.mean(child)),
                                 "difference": diff["mean"], "interval": diff["interval"], "p_value": diff["p_value"],
                                 "per_seed": diff["per_seed"]})
    return {"definition": ("ECE with 15 equal-width confidence bins on the probe (replay.estimands."
                           "expected_calibration_error); difference = ECE(child) - ECE(parent) per seed, mean "
                           "with the 95% paired t interval; the seed floor of |ECE difference| is the 'ece' "
                           "row's floor in the estimates."),
            "rows": rows}


def analyses(experiment, ev, labels) -> dict:
    """Every memory analysis that applies to this experiment: name -> section (or None)."""
    return {name: fn(experiment, ev, labels) for name, fn in
            (("witness", witness), ("additivity", additivity), ("divergence", divergence),
             ("calibration", calibration))}
