"""Checks and provenance of an experiment's runs: the placebo check, the bit-flip targets of the
reference arm, and the reporting checklist (what makes a result checkable)."""

from __future__ import annotations

import math

from ..store import RunDir
from .spec import Arm


def placebo_check(experiment, values: list[float]) -> dict:
    """Every observable of every placebo child is exactly zero, and every ledger digest of every
    placebo child equals its parent's. A NaN observable (not computable) is reported, never
    counted as a failure or as a success: the ledgers decide."""
    spec = experiment.spec
    placebos = [a for a in spec.arms if a.is_placebo]
    if not placebos:
        return {"arm": None, "exact_zero": True, "checked": 0, "detail": "no placebo arm in this experiment"}
    nonzero = [v for v in values if not math.isnan(v) and v != 0.0]
    not_computed = sum(1 for v in values if math.isnan(v))
    mismatched, compared = [], 0
    for key in spec.programs():
        for arm in (a for a in spec.arms_of(key) if a.is_placebo):
            for s in spec.seeds:
                for T in spec.fork_steps:
                    child = experiment.child_dir(key, s, T, arm.name)
                    if not child.exists():
                        continue
                    with RunDir.open(experiment.run_dir(key, s)) as p, RunDir.open(child) as c:
                        parent_rows = {r.step: r.digest for r in p.ledger.rows(T, None)}
                        compared += 1
                        for r in c.ledger.rows():
                            if parent_rows.get(r.step) != r.digest:
                                mismatched.append(f"{child.relative_to(experiment.out)} step {r.step}")
                                break
    ok = not nonzero and not mismatched
    if ok:
        detail = (f"every placebo observable is exactly 0.0 and all {compared} placebo ledgers equal their "
                  "parents' bit for bit")
    else:
        detail = f"{len(nonzero)} nonzero observables; ledgers differ at {mismatched[:5] or 'none'}"
    if not_computed:
        detail += f" ({not_computed} observables could not be computed: NaN, not counted)"
    return {"arm": placebos[0].name, "exact_zero": ok, "checked": len(values), "ledgers_compared": compared,
            "not_computed": not_computed, "detail": detail}


def reference_targets(experiment, key: str, T: int, reference: Arm) -> list[dict]:
    """What the reference arm changed in each seed's child, as its lineage records it (for the
    bit flip: the parameter, element and bit, and how the element was chosen)."""
    out = []
    for s in experiment.spec.seeds:
        child = experiment.child_dir(key, s, T, reference.name)
        with RunDir.open(child) as run:
            applied = run.manifest.get("lineage", {}).get("perturbations", [])[-len(reference.perturb):]
        for p in applied:
            out.append({"seed": s, **{k: v for k, v in p.items() if k not in ("start", "window")}})
    return out


def checklist(experiment) -> dict:
    spec = experiment.spec
    runs = []
    first_manifest = None
    for key in spec.programs():
        for s in spec.seeds:
            paths = [("factual", None, None, experiment.run_dir(key, s))]
            for T in spec.fork_steps:
                paths += [("fork", a.name, T, experiment.child_dir(key, s, T, a.name)) for a in spec.arms_of(key)]
            for kind, arm, T, path in paths:
                with RunDir.open(path) as run:
                    m = run.manifest
                    first_manifest = first_manifest or m
                    rows = run.ledger.rows()
                    fork_row = next((r for r in rows if r.step == (T if T is not None else spec.fork_steps[0]) - 1), None)
                    if kind == "fork":
                        fork_row = rows[0] if rows else None
                    runs.append({
                        "kind": kind, "seed": s, "arm": arm, "fork_step": T, "program_key": key,
                        "path": str(path.relative_to(experiment.out)), "program": m["program"]["reference"],
                        "program_sha256": m["program"]["sha256"], "order_policy": m["order"],
                        "order_hashes": {str(k): v for k, v in sorted(run.ledger.epochs().items())},
                        "fingerprint_fork": f"{fork_row.digest:016x}" if fork_row else "",
                        "fingerprint_end": f"{rows[-1].digest:016x}" if rows else "",
                        "verified": ("complete; checkpoints hash-checked on reuse; placebo children equal "
                                     "their parents bit for bit" if m["status"] == "complete" else m["status"]),
                    })
    env = first_manifest["environment"] if first_manifest else {}
    flags = {k: env.get(k) for k in ("deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark",
                                     "matmul_tf32", "cudnn_tf32", "threads", "cpu_capability")}
    return {"runs": runs, "rng_contract": first_manifest["rng"] if first_manifest else {},
            "environment": env, "determinism_flags": flags,
            "checkpoint_schedule": first_manifest["checkpoints"] if first_manifest else {}}
