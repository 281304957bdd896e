"""Estimation: from stored probe evaluations to effects, verdicts and lifetimes.

Every statistic is computed by replay.estimands (docs/estimands.md); this module only decides
what is compared with what:

* the seed noise floor of each program and fork step at every evaluated step (pairs of
  different seeds' factual runs);
* per arm, horizon and observable: the seed-paired effect with its default interval (and BCa,
  labelled), the ratio to the floor, and the excess over the reference arm (the one-bit flip,
  paired per seed, at the same step), tested arm against reference with Benjamini-Hochberg across
  arms, an equivalence margin relative to the floor, and one verdict;
* per arm: the function-space lifetime (a model of the excess curve: plateau + transient) and
  the state-space lifetime (how long the child's per-step updates differ from the parent's more
  than the reference child's do);
* the placebo check (exactly zero, bit for bit) and a dead reference (exactly zero everywhere)
  fail the experiment; results.json is written first, so the report can show why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..store.atomic import atomic_write_bytes
from .audit import checklist, placebo_check, reference_targets
from .probe import load_evaluations, load_probe, observable, update_difference
from .spec import SIGNED, Arm, ExperimentError

NAN = float("nan")
RESULTS_VERSION = 2
STATE_MEASURE = ("L2 norm of (child's parameter update - parent's) at the step, minus the reference "
                 "child's, per seed")
VERDICT_RULE = (
    "Per arm, horizon and distance, the per-seed excess over the reference arm (arm minus one-bit "
    "flip, same seed, same step) is tested with a paired t test; q-values control the false "
    "discovery rate across arms (Benjamini-Hochberg, per distance, fork step and horizon). "
    "'memory beyond chaos': q <= alpha and the mean excess is positive (the 95% t interval of the "
    "excess lies above 0). Otherwise 'no memory beyond chaos': the excess is shown to lie below "
    "the equivalence margin (a fraction of the seed noise floor at that horizon) by the upper "
    "one-sided test of TOST (the 90% t interval ends below the margin). Otherwise 'inconclusive'. "
    "Signed metrics (accuracy and loss differences) get no verdict.")


class _Evaluations:
    """Evaluations of the experiment's runs, loaded once each and hash-checked."""

    def __init__(self, experiment):
        self.experiment = experiment
        self.cache: dict[Path, dict] = {}

    def __call__(self, run_dir: Path) -> dict:
        if run_dir not in self.cache:
            data = load_evaluations(self.experiment.eval_path(run_dir))
            if data is None:
                raise ExperimentError(f"evaluations of {run_dir} are missing or damaged; run the experiment again")
            self.cache[run_dir] = data
        return self.cache[run_dir]


def _pair(values) -> list[float]:
    return [float(values[0]), float(values[1])]


def _floors(experiment, key: str, T: int, ev, labels, n_resamples: int) -> dict:
    """(distance, step) -> estimands.noise_floor result over the factual runs of program `key`."""
    from .. import estimands as est

    spec = experiment.spec
    factual = [ev(experiment.run_dir(key, s)) for s in spec.seeds]
    out = {}
    for step in sorted(experiment.eval_steps(key)[T]):
        for d in spec.distances:
            def distance(a, b, d=d, step=step):
                v = observable(d, a, b, step, labels)
                return abs(v) if d in SIGNED else v
            out[(d, step)] = est.noise_floor(factual, distance, n_resamples=n_resamples)
    return out


def _floor_entry(experiment, key: str, T: int, d: str, floors: dict) -> dict:
    """The floor curve of one distance for the report: at the delays of a window-1 arm."""
    entry = {"fork_step": T, "program": key, "horizons": [], "steps": [], "mean": [], "lo": [], "hi": []}
    for h in experiment.spec.horizons:
        step = T + 1 + h
        if (d, step) not in floors:
            continue
        f = floors[(d, step)]
        entry["horizons"].append(h)
        entry["steps"].append(step)
        entry["mean"].append(f["mean"])
        entry["lo"].append(f["interval"][0])
        entry["hi"].append(f["interval"][1])
    return entry


def _arm_values(experiment, key, T, arm: Arm, ev, labels) -> dict:
    """(distance, step) -> per-seed values of the arm, and ("update", step) -> per-seed update
    differences from the parent, at every step the runs of this program and fork step were
    evaluated at."""
    spec = experiment.spec
    values = {}
    # Every evaluated step, not only the arm's own delays: the reference arm's values are needed
    # at the steps of arms with longer windows.
    for step in sorted(experiment.eval_steps(key)[T]):
        pairs = [(ev(experiment.run_dir(key, s)), ev(experiment.child_dir(key, s, T, arm.name))) for s in spec.seeds]
        for d in spec.distances:
            values[(d, step)] = [observable(d, fact, child, step, labels) for fact, child in pairs]
        values[("update", step)] = [update_difference(fact, child, step) for fact, child in pairs]
    return values


def _estimate_row(spec, arm: Arm, key, T, h, step, d, vals, ref_vals, floor) -> dict:
    from .. import estimands as est

    effect = est.paired_effect(np.asarray(vals, dtype=float), n_resamples=spec.bootstrap_resamples)
    mean = effect["mean"]
    row = {
        "arm": arm.name, "program": key, "fork_step": T, "horizon": h, "step": step, "distance": d,
        "n_seeds": len(vals), "per_seed": [float(v) for v in vals], "mean": mean,
        "interval": _pair(effect["interval"]), "interval_method": effect["interval_method"],
        "bca": _pair(effect["bca"]), "t": _pair(effect["t"]),
        "noise_floor": floor, "ratio": est.noise_ratio(abs(mean) if d in SIGNED else mean, floor),
        "reference": arm.reference, "placebo": arm.is_placebo,
        "excess_per_seed": None, "excess_mean": None, "excess_interval": None,
        "p_value": NAN, "q_value": NAN, "significant": False,
        "tost_margin": None, "tost_p": NAN, "tost_equivalent": False,
        "verdict": None, "verdict_reason": "", "zero_everywhere": False,
    }
    if arm.is_placebo:
        row.update(verdict="placebo", verdict_reason="changes nothing: must be exactly 0 (checked bit for bit)")
    elif arm.reference:
        row.update(verdict="reference", verdict_reason="the chaos baseline: a one-bit flip of one weight")
    elif ref_vals is None:
        row.update(verdict="no reference arm" if d not in SIGNED else None,
                   verdict_reason="no reference arm in the spec: a distance is never negative, so a test "
                                  "against 0 would reject for any change; add a bitflip arm with reference = true")
    else:
        excess = np.asarray(vals, dtype=float) - np.asarray(ref_vals, dtype=float)
        test = est.paired_effect(excess, n_resamples=spec.bootstrap_resamples)
        row.update(excess_per_seed=[float(v) for v in excess], excess_mean=test["mean"],
                   excess_interval=_pair(test["interval"]), p_value=test["p_value"])
    return row


def _decide(spec, rows: list[dict]) -> None:
    """Benjamini-Hochberg across the arms of one (distance, fork step, horizon), then one
    verdict per row, in place."""
    from .. import estimands as est

    tested = [r for r in rows if r["excess_per_seed"] is not None]
    if not tested:
        return
    q, _ = est.benjamini_hochberg([r["p_value"] for r in tested], alpha=spec.alpha)
    for r, qv in zip(tested, q):
        r["q_value"] = float(qv)
        if r["distance"] in SIGNED:
            r["verdict_reason"] = "signed metric: no verdict (the distances carry it)"
            continue
        v = est.verdict(np.asarray(r["excess_per_seed"]), floor=r["noise_floor"], margin=spec.equivalence_margin,
                        alpha=spec.alpha, q_value=r["q_value"])
        tost = v.get("tost") or {}
        r.update(verdict=v["verdict"], verdict_reason=v["reason"], tost_margin=v.get("margin_abs"),
                 tost_p=tost.get("p_value", NAN), tost_equivalent=bool(tost.get("equivalent", False)),
                 significant=v["verdict"] == "memory beyond chaos")


def _bands(values: np.ndarray, n_resamples: int) -> tuple[list, list, list]:
    """Per-column mean and default interval of a [seeds, horizons] array."""
    from .. import estimands as est

    effects = [est.paired_effect(values[:, j], n_resamples=n_resamples) for j in range(values.shape[1])]
    return ([e["mean"] for e in effects], [e["interval"][0] for e in effects], [e["interval"][1] for e in effects])


def _lifetime(spec, arm: Arm, key, T, values: dict, ref_values: dict, floors: dict, steps_of) -> dict:
    """Function-space lifetime (model of the excess curve) and state-space lifetime of one arm."""
    from .. import estimands as est

    d = spec.primary_distance
    hs = [h for h in spec.horizons if (d, steps_of(h)) in values]
    raw = np.array([values[(d, steps_of(h))] for h in hs], dtype=float).T  # [seeds, horizons]
    ref = np.array([ref_values[(d, steps_of(h))] for h in hs], dtype=float).T
    excess = raw - ref
    fit = est.fit_excess_curve(np.asarray(hs, dtype=float), excess, n_resamples=min(spec.bootstrap_resamples, 1000))
    raw_mean, raw_lo, raw_hi = _bands(raw, spec.bootstrap_resamples)
    ex_mean, ex_lo, ex_hi = _bands(excess, spec.bootstrap_resamples)
    last_floor = floors.get((d, steps_of(hs[-1])), {}).get("mean", NAN) if hs else NAN
    out = {
        "arm": arm.name, "program": key, "fork_step": T, "distance": d, "horizons": hs,
        "raw_mean": raw_mean, "raw_lo": raw_lo, "raw_hi": raw_hi,
        "excess_mean": ex_mean, "excess_lo": ex_lo, "excess_hi": ex_hi,
        "model": fit["model"], "formula": fit["formula"], "plateau": fit["plateau"],
        "plateau_interval": _pair(fit["plateau_interval"]), "plateau_ratio": est.noise_ratio(fit["plateau"], last_floor),
        "half_life": fit["half_life"], "interval": _pair(fit["interval"]), "extrapolated": bool(fit["extrapolated"]),
        "fit_ok": bool(fit["fit_ok"]), "reason": fit.get("reason", ""), "note": fit.get("note", ""),
        "fitted": [float(v) for v in fit.get("fitted", [])], "state": None,
    }
    state_hs = [h for h in hs if np.all(np.isfinite(values[("update", steps_of(h))]))
                and np.all(np.isfinite(ref_values[("update", steps_of(h))]))]
    if len(state_hs) >= 2:
        u = np.array([values[("update", steps_of(h))] for h in state_hs], dtype=float).T
        ur = np.array([ref_values[("update", steps_of(h))] for h in state_hs], dtype=float).T
        state_excess = u - ur
        decay = est.fit_decay(np.asarray(state_hs, dtype=float), state_excess,
                              n_resamples=min(spec.bootstrap_resamples, 1000))
        s_mean, s_lo, s_hi = _bands(state_excess, spec.bootstrap_resamples)
        out["state"] = {
            "measure": STATE_MEASURE, "horizons": state_hs, "raw_mean": [float(x) for x in u.mean(axis=0)],
            "reference_mean": [float(x) for x in ur.mean(axis=0)],
            "excess_mean": s_mean, "excess_lo": s_lo, "excess_hi": s_hi,
            "half_life": decay["half_life"], "interval": _pair(decay["interval"]),
            "amplitude": decay["amplitude"], "extrapolated": bool(decay.get("extrapolated", False)),
            "fit_ok": bool(decay["fit_ok"]), "reason": decay.get("reason", ""), "note": decay.get("note", ""),
        }
    return out


def estimate(experiment) -> dict:
    """Every estimate of an experiment from its stored evaluations; raises ExperimentError (after
    writing results.json) when the placebo is not exactly zero or the reference arm is dead."""
    spec = experiment.spec
    x, y, probe_sha = load_probe(spec.probe)
    labels = y.numpy()
    ev = _Evaluations(experiment)
    reference = spec.reference
    estimates, lifetimes, references, placebo_values = [], [], [], []
    noise_floor: dict = {}
    for key in spec.programs():
        for T in spec.fork_steps:
            floors = _floors(experiment, key, T, ev, labels, n_resamples=min(spec.bootstrap_resamples, 1000))
            for d in spec.distances:
                entry = _floor_entry(experiment, key, T, d, floors)
                noise_floor.setdefault(d, {}).setdefault("by_fork_step", {})[f"{key}@{T}"] = entry
                if key == "main" and T == spec.fork_steps[0]:
                    noise_floor[d].update(entry)
            arms = spec.arms_of(key)
            values = {arm.name: _arm_values(experiment, key, T, arm, ev, labels) for arm in arms}
            ref_values = values.get(reference.name) if reference is not None else None
            rows = []
            for arm in arms:
                for h in spec.horizons:
                    step = T + arm.window + h
                    for d in spec.distances:
                        if (d, step) not in values[arm.name]:
                            continue
                        vals = values[arm.name][(d, step)]
                        if arm.is_placebo:
                            placebo_values.extend(vals)
                        floor = floors[(d, step)]["mean"]
                        refs = ref_values[(d, step)] if ref_values is not None and not arm.reference else None
                        rows.append(_estimate_row(spec, arm, key, T, h, step, d, vals, refs, floor))
            for arm in arms:
                for d in spec.distances:
                    mine = [r for r in rows if r["arm"] == arm.name and r["distance"] == d]
                    dead = bool(mine) and all(v == 0.0 for r in mine for v in r["per_seed"])
                    for r in mine:
                        r["zero_everywhere"] = dead
            estimates.extend(rows)
            if reference is not None:
                dead = all(r["zero_everywhere"] for r in rows
                           if r["arm"] == reference.name and r["distance"] == spec.primary_distance)
                references.append({"program": key, "fork_step": T, "arm": reference.name, "zero_everywhere": dead,
                                   "targets": reference_targets(experiment, key, T, reference)})
                for arm in arms:
                    if arm.is_placebo or arm.reference:
                        continue
                    lifetimes.append(_lifetime(spec, arm, key, T, values[arm.name], ref_values, floors,
                                               steps_of=lambda h, arm=arm: T + arm.window + h))
    # One family per distance, fork step and horizon: every tested arm of every program.
    families: dict[tuple, list[dict]] = {}
    for r in estimates:
        families.setdefault((r["distance"], r["fork_step"], r["horizon"]), []).append(r)
    for rows in families.values():
        _decide(spec, rows)

    placebo = placebo_check(experiment, placebo_values)
    from .memory import analyses

    memory = analyses(experiment, ev, labels)
    results = {
        "version": RESULTS_VERSION,
        "experiment": {
            **{k: v for k, v in spec.to_json().items() if k not in ("arms", "probe")},
            "arms": [{**a.__dict__, "placebo": a.is_placebo} for a in spec.arms],
            "programs": spec.programs(),
            "program_sha256": experiment.program_sha256(),
            "probe": {"definition": json.dumps(spec.probe, sort_keys=True), "size": int(x.shape[0]), "sha256": probe_sha},
            "interval_method": "paired t (Student) over seeds, 95%; BCa bootstrap kept for comparison "
                               f"({spec.bootstrap_resamples} resamples), it undercovers with few seeds",
            "multiple_testing": f"Benjamini-Hochberg at alpha={spec.alpha} across arms, per distance, fork step and horizon",
            "equivalence_margin": spec.equivalence_margin,
            "verdict_rule": VERDICT_RULE,
            "reference_arm": reference.name if reference is not None else None,
            "steps": experiment.total_steps("main"),
        },
        "noise_floor": noise_floor,
        "references": references,
        "estimates": estimates,
        "lifetimes": lifetimes,
        "placebo": placebo,
        "checklist": checklist(experiment),
        **{name: section for name, section in memory.items() if section is not None},
    }
    if not placebo["exact_zero"]:
        write_results(experiment.out, results)
        raise ExperimentError(f"the placebo arm is not exactly zero: {placebo['detail']}. "
                              "Some training state is not captured; run `replay check` on a factual run.")
    dead = [f"{r['program']} at step {r['fork_step']}" for r in references if r["zero_everywhere"]]
    if dead:
        write_results(experiment.out, results)
        raise ExperimentError(
            f"the reference arm {reference.name!r} measures exactly 0 ({spec.primary_distance}) at every horizon "
            f"and seed for {', '.join(dead)}: the chaos baseline is dead, so every excess would be the raw effect. "
            "Flip a weight that influences the output (the default bitflip target does; check an explicit "
            "param/index) or use a higher bit.")
    return results


def write_results(out: Path, results: dict) -> None:
    """results.json, atomically; NaN and inf are kept (Python's json writes NaN / Infinity)."""
    data = json.dumps(_json_safe(results), indent=1, sort_keys=True, allow_nan=True).encode()
    atomic_write_bytes(Path(out) / "results.json", data + b"\n")


def _json_safe(obj):
    """Plain JSON types; numpy scalars become Python numbers; NaN/inf stay (Python's json)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
