"""Experiments: seeds x fork steps x perturbation arms -> probe evaluations -> estimates.

An experiment records one factual run per (program, seed), forks every arm from it at every fork
step, and evaluates the model's predictive distribution on a fixed probe set at every step it
will need (the delays `horizons` after each arm's intervention window). The evaluations are
stored next to the runs; `estimate` turns them into seed-paired effects, the seed noise floor,
intervals, multiple-testing control, equivalence tests and lifetimes (docs/estimands.md), and
checks that the placebo arm is exactly zero.

Layout of an experiment directory:
    spec.json                      the normalized spec
    runs/<program>/seed-<s>/       factual runs (full run directories)
    runs/<program>/seed-<s>.forks/T<T>/<arm>/   child runs
    evals/<key>.safetensors + <key>.json        probe evaluations of each run (hash-checked)
    results.json                   estimates, lifetimes, placebo check, reporting checklist
Resuming reuses every run that is complete with a valid evaluation file; a crash loses at most
the runs in flight.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from .fork import ForkSession
from .perturb import from_spec
from .program import import_reference, load_program
from .session import RecordSession
from .store import RunDir, RunError
from .store.atomic import atomic_write_bytes, atomic_write_json, sha256_bytes

DISTANCES = ("tv", "js", "hellinger", "disagreement", "accuracy_diff", "loss_diff", "param_l2", "cka")
SIGNED = ("accuracy_diff", "loss_diff")


class ExperimentError(RuntimeError):
    """The experiment cannot give a trustworthy answer (e.g. the placebo arm is not zero)."""


# ------------------------------------------------------------------------------ spec ----


@dataclass
class Arm:
    name: str
    perturb: list
    window: int = 1
    reference: bool = False  # the chaos baseline (a one-bit flip): lifetimes are excess over it
    program: str | None = None  # a variant program (its own factual runs); default: the spec's

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"arm name {self.name!r} must be non-empty and contain no '/'")
        self.perturb = [self.perturb] if isinstance(self.perturb, (str, dict)) else list(self.perturb)
        if not self.perturb:
            raise ValueError(f"arm {self.name!r} needs a perturbation ('placebo' for none)")
        for spec in self.perturb:
            from_spec(spec, start=0, window=self.window)  # validates names and parameters early
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"arm {self.name!r}: window must be a positive int")


@dataclass
class ExperimentSpec:
    program: str
    seeds: list[int]
    fork_steps: list[int]
    arms: list[Arm]
    horizons: list[int]
    probe: dict
    name: str = "experiment"
    steps: int | None = None
    distances: list[str] = field(default_factory=lambda: list(DISTANCES))
    primary_distance: str = "tv"
    primary_horizon: int | None = None
    equivalence_margin: float = 0.01
    bootstrap_resamples: int = 2000
    alpha: float = 0.05

    def __post_init__(self):
        self.arms = [a if isinstance(a, Arm) else Arm(**a) for a in self.arms]
        if len(set(self.seeds)) != len(self.seeds) or len(self.seeds) < 2:
            raise ValueError("an experiment needs at least two distinct seeds (the noise floor compares seeds)")
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError("arm names must be unique")
        unknown = set(self.distances) - set(DISTANCES)
        if unknown:
            raise ValueError(f"unknown distances {sorted(unknown)}; known: {DISTANCES}")
        if self.primary_distance not in self.distances:
            raise ValueError(f"primary_distance {self.primary_distance!r} is not among the distances")
        if not self.horizons or any(h < 0 for h in self.horizons):
            raise ValueError("horizons must be non-negative delays after the intervention window")
        self.horizons = sorted(set(self.horizons))
        if self.primary_horizon is None:
            self.primary_horizon = self.horizons[len(self.horizons) // 2]
        if self.primary_horizon not in self.horizons:
            raise ValueError(f"primary_horizon {self.primary_horizon} is not among the horizons {self.horizons}")
        if "source" not in self.probe:
            raise ValueError("probe needs a 'source': 'module:callable' returning (inputs, labels)")
        if sum(a.reference for a in self.arms) > 1:
            raise ValueError("at most one arm is the reference (chaos baseline)")

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "ExperimentSpec":
        import tomllib

        with open(path, "rb") as f:
            data = tomllib.load(f)
        base = Path(path).resolve().parent
        # File references (programs, the probe source) are relative to the spec file's folder.
        holders = [(data, "program")] + [(arm, "program") for arm in data.get("arms", [])]
        holders.append((data.get("probe", {}), "source"))
        for holder, key in holders:
            ref = holder.get(key)
            if ref and ".py:" in ref and not os.path.isabs(ref):
                candidate = base / ref.split(":")[0]
                if candidate.exists():
                    holder[key] = f"{candidate}:{ref.rsplit(':', 1)[1]}"
        return cls(**data)

    def to_json(self) -> dict:
        return asdict(self)

    def programs(self) -> dict[str, str]:
        """program key -> reference, for the main program and every variant."""
        refs = [self.program] + [a.program for a in self.arms if a.program]
        out = {}
        for ref in refs:
            key = "main" if ref == self.program else _slug(ref)
            out[key] = ref
        return out

    def arms_of(self, key: str) -> list[Arm]:
        """The arms forked from program `key`; the reference arm is forked from every program."""
        ref = self.programs()[key]
        return [a for a in self.arms if (a.program or self.program) == ref or (a.reference and not a.program)]


def _slug(ref: str) -> str:
    stem = Path(ref.split(":")[0]).stem if ".py" in ref else ref.split(":")[0].split(".")[-1]
    return f"{stem}-{ref.rsplit(':', 1)[-1]}"


def load_probe(spec: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs, labels, SHA-256 of both) from the probe's source, 'module:callable' or
    'path/file.py:callable' returning (inputs, labels)."""
    source, _, _ = import_reference(spec["source"])
    x, y = source()
    x, y = torch.as_tensor(x).contiguous(), torch.as_tensor(y).contiguous()
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return x, y, h.hexdigest()


# ------------------------------------------------------------------------ evaluation ----


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, layer: str | None) -> dict[str, torch.Tensor]:
    """Logits on the probe (and the chosen layer's representations), in eval mode; every
    module's train/eval flag is restored afterwards, so training is not disturbed."""
    modes = [(m, m.training) for m in model.modules()]
    captured = {}
    handle = None
    if layer is not None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ExperimentError(f"probe layer {layer!r} is not a module of the model ({list(modules)[1:8]} ...)")
        handle = modules[layer].register_forward_hook(lambda m, i, o: captured.__setitem__("rep", o.detach().reshape(o.shape[0], -1)))
    try:
        model.eval()
        logits = model(x).detach()
    finally:
        if handle is not None:
            handle.remove()
        for m, mode in modes:
            m.training = mode
    out = {"logits": logits.float().contiguous()}
    if "rep" in captured:
        out["rep"] = captured["rep"].float().contiguous()
    return out


class Recorder:
    """Collects the probe evaluations of one run at the steps it is asked for."""

    def __init__(self, x: torch.Tensor, layer: str | None, steps: set[int]):
        self.x, self.layer, self.steps = x, layer, steps
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, engine) -> None:
        t = engine.completed
        if t not in self.steps:
            return
        for name, value in evaluate(engine.model, self.x, self.layer).items():
            self.tensors[f"{name}@{t}"] = value
        for name, p in engine.model.named_parameters():
            self.tensors[f"param:{name}@{t}"] = p.detach().float().clone()

    def save(self, path: Path) -> None:
        from safetensors.torch import save

        data = save(self.tensors)
        atomic_write_bytes(_with(path, ".safetensors"), data)
        atomic_write_json(_with(path, ".json"), {"sha256": sha256_bytes(data), "steps": sorted(self.steps)})


def _with(path: Path, suffix: str) -> Path:
    # Not Path.with_suffix: run names contain dots ("seed-1.forks").
    return path.parent / (path.name + suffix)


def load_evaluations(path: Path) -> dict[str, torch.Tensor] | None:
    """The evaluations of a run, or None if missing or failing their hash."""
    from safetensors.torch import load

    meta_path, data_path = _with(path, ".json"), _with(path, ".safetensors")
    if not (meta_path.exists() and data_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        data = data_path.read_bytes()
    except (OSError, ValueError):
        return None
    if sha256_bytes(data) != meta.get("sha256"):
        return None
    return load(data)


# ---------------------------------------------------------------------------- runner ----


class Experiment:
    def __init__(self, spec: ExperimentSpec, out: str | os.PathLike):
        self.spec = spec
        self.out = Path(out)

    # Where things go.
    def run_dir(self, key: str, seed: int) -> Path:
        return self.out / "runs" / key / f"seed-{seed}"

    def child_dir(self, key: str, seed: int, fork_step: int, arm: str) -> Path:
        return self.out / "runs" / key / f"seed-{seed}.forks" / f"T{fork_step}" / arm

    def eval_path(self, run_dir: Path) -> Path:
        return self.out / "evals" / str(run_dir.relative_to(self.out / "runs")).replace(os.sep, "__")

    def eval_steps(self, key: str) -> dict[int, set[int]]:
        """fork step -> the absolute steps every run of program `key` is evaluated at."""
        steps = self.total_steps(key)
        out = {}
        for T in self.spec.fork_steps:
            wanted = {T + a.window + h for a in self.spec.arms_of(key) for h in self.spec.horizons}
            out[T] = {s for s in wanted if s <= steps}
        return out

    def total_steps(self, key: str) -> int:
        if self.spec.steps is not None:
            return self.spec.steps
        program, _ = load_program(self.spec.programs()[key])
        return program.steps

    def tasks(self) -> list[tuple[str, int]]:
        return [(key, seed) for key in self.spec.programs() for seed in self.spec.seeds]

    def _prepare(self) -> None:
        (self.out / "evals").mkdir(parents=True, exist_ok=True)
        spec_path = self.out / "spec.json"
        spec_json = self.spec.to_json()
        if spec_path.exists():
            previous = json.loads(spec_path.read_text())
            if previous != json.loads(json.dumps(spec_json)):
                raise ExperimentError(
                    f"{self.out} holds an experiment with a different spec; use another --out or delete it"
                )
        else:
            atomic_write_json(spec_path, spec_json)
        for key in self.spec.programs():
            steps = self.total_steps(key)
            bad = [T for T in self.spec.fork_steps if not 0 < T < steps]
            if bad:
                raise ValueError(f"fork steps {bad} are outside program {key}'s run of {steps} steps")

    def _reusable(self, run_dir: Path) -> bool:
        if not (run_dir / "manifest.json").exists():
            return False
        try:
            with RunDir.open(run_dir) as run:
                if not run.is_complete:
                    return False
                last = max(run.ledger.checkpoints())
                run.load_checkpoint(last)  # the final state passes its hash check
        except (RunError, ValueError):
            return False
        return load_evaluations(self.eval_path(run_dir)) is not None

    def run_seed(self, key: str, seed: int, progress: bool = False, log: Callable[[str], None] = print) -> None:
        """The factual run of (program, seed) and all its forks, each skipped if reusable."""
        x, _, _ = load_probe(self.spec.probe)
        layer = self.spec.probe.get("layer")
        eval_steps = self.eval_steps(key)
        every_eval = set().union(*eval_steps.values()) | set(self.spec.fork_steps)
        parent = self.run_dir(key, seed)
        if not self._reusable(parent):
            _remove_run(parent)
            recorder = Recorder(x, layer, every_eval)
            parent.parent.mkdir(parents=True, exist_ok=True)
            RecordSession(self.spec.programs()[key], parent, seed=seed, steps=self.spec.steps,
                          progress=progress).run(observe=recorder)
            recorder.save(self.eval_path(parent))
            log(f"recorded {parent.relative_to(self.out)}")
        for T in self.spec.fork_steps:
            session = None
            for arm in self.spec.arms_of(key):
                child = self.child_dir(key, seed, T, arm.name)
                if self._reusable(child):
                    continue
                _remove_run(child)
                if session is None:
                    session = ForkSession(parent, T, progress=progress)
                recorder = Recorder(x, layer, eval_steps[T])
                child.parent.mkdir(parents=True, exist_ok=True)
                session.fork(child, arm.perturb, window=arm.window, observe=recorder)
                recorder.save(self.eval_path(child))
                log(f"forked {child.relative_to(self.out)}")

    def run(self, workers: int = 1, progress: bool = True) -> dict:
        """Run everything that is missing, then estimate; returns the results."""
        self._prepare()
        tasks = self.tasks()
        started = time.time()
        if workers <= 1:
            for i, (key, seed) in enumerate(tasks, 1):
                self.run_seed(key, seed, progress=progress,
                              log=lambda m, i=i: print(f"[{i}/{len(tasks)}] {m}", file=sys.stderr, flush=True))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_run_seed_task, self.spec.to_json(), str(self.out), key, seed): (key, seed)
                           for key, seed in tasks}
                for i, future in enumerate(as_completed(futures), 1):
                    future.result()
                    key, seed = futures[future]
                    print(f"[{i}/{len(tasks)}] program {key}, seed {seed}: done", file=sys.stderr, flush=True)
        results = self.estimate()
        results["experiment"]["duration_s"] = time.time() - started
        write_results(self.out, results)
        return results

    # ---------------------------------------------------------------------- estimates ----

    def estimate(self) -> dict:
        from . import estimands as est  # scipy: imported only when estimating

        spec = self.spec
        x, y, probe_sha = load_probe(spec.probe)
        labels = y.numpy()
        reference = next((a for a in spec.arms if a.reference), None)
        evals: dict[Path, dict] = {}

        def ev(path: Path) -> dict:
            if path not in evals:
                data = load_evaluations(self.eval_path(path))
                if data is None:
                    raise ExperimentError(f"evaluations of {path} are missing or damaged; run the experiment again")
                evals[path] = data
            return evals[path]

        def value(distance: str, a: dict, b: dict, step: int) -> float:
            return _distance(distance, a, b, step, labels)

        estimates, lifetimes, placebo_values = [], [], []
        noise_floor: dict = {}
        for key in spec.programs():
            for T in spec.fork_steps:
                # Noise floor at every evaluated step: pairs of different seeds' factual runs.
                floor_at: dict[tuple[str, int], dict] = {}
                for step in sorted(self.eval_steps(key)[T]):
                    factual = [ev(self.run_dir(key, s)) for s in spec.seeds]
                    for d in spec.distances:
                        pairs = [abs(value(d, a, b, step)) if d in SIGNED else value(d, a, b, step)
                                 for a, b in itertools.combinations(factual, 2)]
                        floor_at[(d, step)] = {"mean": float(np.mean(pairs)), "pairs": pairs}
                for d in spec.distances:
                    entry = {"fork_step": T, "program": key, "horizons": [], "steps": [], "mean": [], "lo": [], "hi": []}
                    for h in spec.horizons:
                        step = T + 1 + h
                        if (d, step) not in floor_at:
                            continue
                        pairs = np.asarray(floor_at[(d, step)]["pairs"])
                        boot = _bootstrap_pairs(spec.seeds, floor_at[(d, step)]["pairs"])
                        entry["horizons"].append(h)
                        entry["steps"].append(step)
                        entry["mean"].append(float(pairs.mean()))
                        entry["lo"].append(boot[0])
                        entry["hi"].append(boot[1])
                    noise_floor.setdefault(d, {}).setdefault("by_fork_step", {})[f"{key}@{T}"] = entry
                    if key == "main" and T == spec.fork_steps[0]:
                        noise_floor[d].update(entry)
                for arm in spec.arms_of(key):
                    per_h = {}
                    for h in spec.horizons:
                        step = T + arm.window + h
                        if step > self.total_steps(key):
                            continue
                        for d in spec.distances:
                            vals = []
                            refs = []
                            for s in spec.seeds:
                                fact = ev(self.run_dir(key, s))
                                child = ev(self.child_dir(key, s, T, arm.name))
                                vals.append(value(d, fact, child, step))
                                if reference is not None:
                                    refc = ev(self.child_dir(key, s, T, reference.name))
                                    refs.append(value(d, fact, refc, step))
                            if arm.name == "placebo" or all(p.get("name", p) == "placebo" if isinstance(p, dict) else p == "placebo" for p in arm.perturb):
                                placebo_values.extend(vals)
                            per_h[(d, h)] = (vals, refs)
                            floor = floor_at.get((d, step), {}).get("mean", float("nan"))
                            effect = est.paired_effect(np.asarray(vals), n_resamples=spec.bootstrap_resamples)
                            excess = (np.asarray(vals) - np.asarray(refs)) if refs and not arm.reference else None
                            test_values = excess if excess is not None else np.asarray(vals)
                            test = est.paired_effect(test_values, n_resamples=spec.bootstrap_resamples)
                            tost = est.tost(test_values, spec.equivalence_margin, alpha=spec.alpha)
                            estimates.append({
                                "arm": arm.name, "program": key, "fork_step": T, "horizon": h, "step": step,
                                "distance": d, "n_seeds": len(vals), "mean": effect["mean"],
                                "bca": list(effect["bca"]), "t": list(effect["t"]), "per_seed": [float(v) for v in vals],
                                "noise_floor": floor,
                                "ratio": effect["mean"] / floor if floor and math.isfinite(floor) and floor > 0 else float("nan"),
                                "excess_mean": None if excess is None else float(excess.mean()),
                                "p_value": test["p_value"], "q_value": float("nan"), "significant": False,
                                "tost_equivalent": bool(tost["equivalent"]), "reference": arm.reference,
                            })
                    if reference is not None and not arm.reference:
                        lifetimes.append(self._lifetime(arm, key, T, per_h))
        # Benjamini-Hochberg across arms at the primary horizon and distance.
        primary = [e for e in estimates if e["horizon"] == spec.primary_horizon and e["distance"] == spec.primary_distance
                   and not e["reference"] and e["arm"] != "placebo"]
        if primary:
            q, rejected = est.benjamini_hochberg([e["p_value"] for e in primary], alpha=spec.alpha)
            for e, qv, r in zip(primary, q, rejected):
                e["q_value"], e["significant"] = float(qv), bool(r)
        placebo = self._placebo_check(placebo_values)
        results = {
            "experiment": {
                **{k: v for k, v in spec.to_json().items() if k not in ("arms", "probe")},
                "arms": [asdict(a) for a in spec.arms],
                "program_sha256": self._program_sha(),
                "probe": {"definition": json.dumps(spec.probe, sort_keys=True), "size": int(x.shape[0]), "sha256": probe_sha},
                "interval_method": f"BCa bootstrap over seeds ({spec.bootstrap_resamples} resamples) and paired t",
                "multiple_testing": f"Benjamini-Hochberg at alpha={spec.alpha} across arms "
                                    f"({spec.primary_distance}, horizon {spec.primary_horizon})",
                "steps": self.total_steps("main"),
            },
            "noise_floor": noise_floor,
            "estimates": estimates,
            "lifetimes": lifetimes,
            "placebo": placebo,
            "checklist": self._checklist(),
        }
        if not placebo["exact_zero"]:
            write_results(self.out, results)
            raise ExperimentError(f"the placebo arm is not exactly zero: {placebo['detail']}. "
                                  "Some training state is not captured; run `replay check` on a factual run.")
        return results

    def _lifetime(self, arm: Arm, key: str, T: int, per_h: dict) -> dict:
        from . import estimands as est

        d = self.spec.primary_distance
        hs = [h for h in self.spec.horizons if (d, h) in per_h]
        raw = np.array([per_h[(d, h)][0] for h in hs]).T  # [seeds, horizons]
        ref = np.array([per_h[(d, h)][1] for h in hs]).T
        excess = raw - ref
        fit = est.fit_decay(np.asarray(hs, dtype=float), excess)
        def band(values):
            effects = [est.paired_effect(values[:, j], n_resamples=self.spec.bootstrap_resamples) for j in range(values.shape[1])]
            return ([e["mean"] for e in effects], [e["bca"][0] for e in effects], [e["bca"][1] for e in effects])
        raw_mean, raw_lo, raw_hi = band(raw)
        ex_mean, ex_lo, ex_hi = band(excess)
        return {"arm": arm.name, "program": key, "fork_step": T, "distance": d, "half_life": fit["half_life"],
                "interval": list(fit["interval"]), "amplitude": fit["amplitude"], "fit_ok": bool(fit["fit_ok"]),
                "reason": fit.get("reason", ""), "horizons": hs, "raw_mean": raw_mean, "raw_lo": raw_lo,
                "raw_hi": raw_hi, "excess_mean": ex_mean, "excess_lo": ex_lo, "excess_hi": ex_hi}

    def _placebo_check(self, values: list[float]) -> dict:
        """Every distance of every placebo child is exactly zero, and so is every ledger digest
        difference from its parent."""
        if not any(a.name == "placebo" for a in self.spec.arms):
            return {"arm": None, "exact_zero": True, "checked": 0, "detail": "no placebo arm in this experiment"}
        nonzero = [v for v in values if v != 0.0]
        mismatched = []
        for key in self.spec.programs():
            for s in self.spec.seeds:
                for T in self.spec.fork_steps:
                    child = self.child_dir(key, s, T, "placebo")
                    if not child.exists():
                        continue
                    with RunDir.open(self.run_dir(key, s)) as p, RunDir.open(child) as c:
                        parent_rows = {r.step: r.digest for r in p.ledger.rows(T, None)}
                        for r in c.ledger.rows():
                            if parent_rows.get(r.step) != r.digest:
                                mismatched.append(f"{child.relative_to(self.out)} step {r.step}")
                                break
        ok = not nonzero and not mismatched
        detail = ("every placebo distance is exactly 0.0 and every placebo ledger equals its parent's bit for bit"
                  if ok else f"{len(nonzero)} nonzero distances; ledgers differ at {mismatched[:5]}")
        return {"arm": "placebo", "exact_zero": ok, "checked": len(values), "detail": detail}

    def _program_sha(self) -> str:
        program, source = load_program(self.spec.program)
        return source.sha256

    def _checklist(self) -> dict:
        runs = []
        first_manifest = None
        for key in self.spec.programs():
            for s in self.spec.seeds:
                paths = [("factual", None, None, self.run_dir(key, s))]
                for T in self.spec.fork_steps:
                    paths += [("fork", a.name, T, self.child_dir(key, s, T, a.name)) for a in self.spec.arms_of(key)]
                for kind, arm, T, path in paths:
                    with RunDir.open(path) as run:
                        m = run.manifest
                        first_manifest = first_manifest or m
                        rows = run.ledger.rows()
                        fork_row = next((r for r in rows if r.step == (T if T is not None else self.spec.fork_steps[0]) - 1), None)
                        if kind == "fork":
                            fork_row = rows[0] if rows else None
                        runs.append({
                            "kind": kind, "seed": s, "arm": arm, "fork_step": T, "program_key": key,
                            "path": str(path.relative_to(self.out)), "program": m["program"]["reference"],
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


def _bootstrap_pairs(seeds: Sequence[int], pair_values: Sequence[float], n: int = 1000) -> tuple[float, float]:
    """Percentile interval of the noise floor: resample seeds, recompute the mean over pairs."""
    k = len(seeds)
    idx = list(itertools.combinations(range(k), 2))
    table = {pair: v for pair, v in zip(idx, pair_values)}
    rng = np.random.default_rng(0)
    means = []
    for _ in range(n):
        pick = rng.integers(0, k, k)
        vals = [table[(min(a, b), max(a, b))] for a, b in itertools.combinations(pick, 2) if a != b]
        if vals:
            means.append(float(np.mean(vals)))
    if not means:
        return float("nan"), float("nan")
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1).numpy()


def _distance(name: str, a: dict, b: dict, step: int, labels: np.ndarray) -> float:
    from . import estimands as est

    la, lb = a[f"logits@{step}"], b[f"logits@{step}"]
    if torch.equal(la.view(torch.int32), lb.view(torch.int32)) and name not in ("param_l2", "cka"):
        return 0.0
    pa, pb = _probabilities(la), _probabilities(lb)
    if name == "tv":
        return float(est.total_variation(pa, pb))
    if name == "js":
        return float(est.jensen_shannon(pa, pb))
    if name == "hellinger":
        return float(est.hellinger(pa, pb))
    if name == "disagreement":
        return float(est.disagreement(pa, pb))
    if name == "accuracy_diff":
        return float(est.accuracy(pb, labels) - est.accuracy(pa, labels))
    if name == "loss_diff":
        return float(est.loss(pb, labels) - est.loss(pa, labels))
    if name == "param_l2":
        prefix, suffix = "param:", f"@{step}"
        sa = {k[len(prefix):-len(suffix)]: v for k, v in a.items() if k.startswith(prefix) and k.endswith(suffix)}
        sb = {k[len(prefix):-len(suffix)]: v for k, v in b.items() if k.startswith(prefix) and k.endswith(suffix)}
        return float(est.parameter_distance(sa, sb)[0])
    if name == "cka":
        ra, rb = a.get(f"rep@{step}"), b.get(f"rep@{step}")
        if ra is None or rb is None:
            return float("nan")
        if torch.equal(ra.view(torch.int32), rb.view(torch.int32)):
            return 0.0
        return float(1.0 - est.linear_cka(ra.double().numpy(), rb.double().numpy()))
    raise ValueError(name)


def _remove_run(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _run_seed_task(spec_json: dict, out: str, key: str, seed: int) -> None:
    Experiment(ExperimentSpec(**spec_json), out).run_seed(key, seed, progress=False,
                                                          log=lambda m: print(m, file=sys.stderr, flush=True))


def write_results(out: Path, results: dict) -> None:
    """results.json, atomically; NaN and inf are kept (Python's json writes NaN / Infinity)."""
    data = json.dumps(_json_safe(results), indent=1, sort_keys=True, allow_nan=True).encode()
    atomic_write_bytes(out / "results.json", data + b"\n")


def _json_safe(obj):
    """Plain JSON types; numpy scalars become Python numbers; NaN/inf stay (Python's json)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
