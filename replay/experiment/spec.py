"""What an experiment is: a program, seeds, fork steps, perturbation arms, delays and a probe set.

`ExperimentSpec` is validated when it is built (from Python or from TOML), so a bad spec fails
before anything runs. Whether an arm is the placebo is decided here, once (`Arm.is_placebo`).

An experiment has a kind (KINDS): "effects" (the default: each arm's effect against the seed
floor and the chaos baseline), "witness" (the back-flow witness: its arms are generated from
the `witness` table), "additivity" (pairs of arms and each pair together: `pairs`, default every
pair), "divergence" (how fast a one-bit flip diverges: the reference arm at every fork step) and
"calibration" (requires the ECE difference among the distances). Every kind runs on the same
machinery; a kind adds the arms its analysis needs (replay.experiment.memory), and each analysis
runs wherever its inputs exist (pairs, a reference with 3+ horizons, 'ece').
Generated arms carry `generated = true` and are made again, never read back, from a spec's JSON.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..perturb import from_spec, parse_spec
from ..store.schema import MAX_SEED, MAX_STEPS, Int, List, SchemaError, Str, check, check_json_limits

# Limits of a spec (replay.store.schema checks them before anything else is looked at).
MAX_SEEDS = 10_000
MAX_FORK_STEPS = 10_000
MAX_HORIZONS = 10_000
MAX_ARMS = 1_000
SPEC = "experiment spec"

# The observables an experiment can estimate (replay.experiment.probe computes them with
# replay.estimands). Signed ones are differences of a metric, not distances.
OBSERVABLES = ("tv", "js", "hellinger", "disagreement", "accuracy_diff", "loss_diff", "ece", "param_l2", "cka")
SIGNED = ("accuracy_diff", "loss_diff", "ece")
KINDS = ("effects", "witness", "additivity", "divergence", "calibration")
WITNESS_KEYS = {"instrument_steps", "stream", "salt", "causal_break", "programs"}
NEEDS_LAYER = ("cka",)


class ExperimentError(RuntimeError):
    """The experiment cannot give a trustworthy answer (e.g. the placebo arm is not zero)."""


def _perturbation_name(spec) -> str:
    if isinstance(spec, dict):
        return str(spec.get("name", ""))
    return str(spec).split(":", 1)[0].strip()


@dataclass
class Arm:
    name: str
    perturb: list
    window: int = 1
    reference: bool = False  # the chaos baseline (a one-bit flip): lifetimes are excess over it
    program: str | None = None  # a variant program (its own factual runs); default: the spec's
    generated: bool = False  # made by the experiment's kind (witness arms, pair arms, ...)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"arm name {self.name!r} must be a non-empty string without '/' or a leading '.'")
        self.perturb = [self.perturb] if isinstance(self.perturb, (str, dict)) else list(self.perturb)
        if not self.perturb:
            raise ValueError(f"arm {self.name!r} needs a perturbation ('placebo' for none)")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"arm {self.name!r}: window must be a positive int")
        for spec in self.perturb:
            from_spec(spec, start=0, window=self.window)  # validates names and parameters early
        if self.reference and self.is_placebo:
            raise ValueError(f"arm {self.name!r}: the placebo cannot be the reference arm (it changes nothing)")

    @property
    def is_placebo(self) -> bool:
        """The one definition: an arm whose every perturbation is `placebo` changes nothing, so its
        effect must be exactly zero (checked, never estimated)."""
        return all(_perturbation_name(p) == "placebo" for p in self.perturb)


@dataclass
class ExperimentSpec:
    program: str
    seeds: list[int]
    fork_steps: list[int]
    horizons: list[int]
    probe: dict
    arms: list[Arm] = field(default_factory=list)  # kinds witness and divergence generate theirs
    name: str = "experiment"
    kind: str = "effects"
    witness: dict | None = None  # kind "witness": instrument_steps, stream, salt, causal_break, programs
    pairs: list | None = None  # additivity: [[arm P, arm Q], ...]; kind "additivity" defaults to every pair
    steps: int | None = None
    distances: list[str] | None = None  # default: every observable the probe allows (cka needs a layer)
    primary_distance: str = "tv"
    primary_horizon: int | None = None
    equivalence_margin: float = 0.1  # as a fraction of the seed noise floor at each horizon
    bootstrap_resamples: int = 2000
    alpha: float = 0.05

    def _check_limits(self) -> None:
        """Sizes, ranges and nesting first (replay.store.schema): a spec with a billion seeds,
        a step beyond MAX_STEPS or a deeply nested probe is refused in one line (SchemaError,
        a ValueError naming the key) before anything is allocated for it."""
        check(self.seeds, List(Int(0, MAX_SEED), max_len=MAX_SEEDS), SPEC, "seeds")
        check(self.fork_steps, List(Int(0, MAX_STEPS), max_len=MAX_FORK_STEPS), SPEC, "fork_steps")
        check(self.horizons, List(Int(0, MAX_STEPS), max_len=MAX_HORIZONS), SPEC, "horizons")
        check(self.program, Str(4096, nonempty=True), SPEC, "program")
        check(self.name, Str(256, nonempty=True), SPEC, "name")
        check(self.primary_distance, Str(64), SPEC, "primary_distance")
        if self.steps is not None:
            check(self.steps, Int(1, MAX_STEPS), SPEC, "steps")
        if self.primary_horizon is not None:
            check(self.primary_horizon, Int(0, MAX_STEPS), SPEC, "primary_horizon")
        if self.distances is not None:
            check(self.distances, List(Str(64), max_len=100), SPEC, "distances")
        if not isinstance(self.arms, list) or len(self.arms) > MAX_ARMS:
            shown = len(self.arms) if isinstance(self.arms, list) else type(self.arms).__name__
            raise SchemaError(SPEC, "arms", f"must be a list of at most {MAX_ARMS} arms, found {shown}")
        for i, arm in enumerate(self.arms):
            raw = asdict(arm) if isinstance(arm, Arm) else arm
            if not isinstance(raw, dict):
                continue  # Arm(**arm) says what is wrong with it
            check_json_limits(raw, SPEC, "spec")
            if isinstance(raw.get("window"), int):
                check(raw["window"], Int(1, MAX_STEPS), SPEC, f"arms[{i}].window")
        check_json_limits(self.probe, SPEC, "spec")
        for extra in (self.witness, self.pairs):
            if extra is not None:
                check_json_limits(extra, SPEC, "spec")

    def __post_init__(self):
        self._check_limits()
        if self.kind not in KINDS:
            raise ValueError(f"unknown experiment kind {self.kind!r}; known: {', '.join(KINDS)}")
        # Arms a kind generates are made again from the rest of the spec (a spec read back from
        # its JSON holds them already).
        self.arms = [a for a in (self.arms if isinstance(self.arms, list) else [])
                     if not (a.generated if isinstance(a, Arm) else isinstance(a, dict) and a.get("generated"))]
        if not isinstance(self.probe, dict) or not isinstance(self.probe.get("source"), str):
            raise ValueError("probe needs a 'source': 'module:callable' returning (inputs, labels)")
        layer = self.probe.get("layer")
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"probe.layer must be a module name (a string), got {layer!r}")
        self.arms = [a if isinstance(a, Arm) else Arm(**a) for a in self.arms]
        if self.witness is not None and self.kind != "witness":
            raise ValueError("a `witness` table belongs to kind = \"witness\"")
        if self.kind == "witness":
            self._witness_arms()
        if self.kind == "divergence" and not any(a.reference for a in self.arms):
            self.arms.append(Arm("bitflip", ["bitflip"], reference=True, generated=True))
        if self.kind in ("witness", "divergence") and not any(a.is_placebo and not a.program for a in self.arms):
            self.arms.insert(0, Arm("placebo", ["placebo"], generated=True))
        self._pair_arms()
        if not self.arms:
            raise ValueError("an experiment needs at least one arm")
        for name, values in (("seeds", self.seeds), ("fork_steps", self.fork_steps), ("horizons", self.horizons)):
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{name} must be a list of integers, got {values!r}")
        if len(set(self.seeds)) != len(self.seeds) or len(self.seeds) < 2:
            raise ValueError("an experiment needs at least two distinct seeds (the noise floor compares seeds)")
        if not self.fork_steps:
            raise ValueError("an experiment needs at least one fork step")
        self.fork_steps = sorted(set(self.fork_steps))
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError("arm names must be unique")
        if self.distances is None:
            self.distances = [d for d in OBSERVABLES if d not in NEEDS_LAYER or layer is not None]
        self.distances = list(self.distances)
        if self.kind == "calibration" and "ece" not in self.distances:
            raise ValueError("kind = \"calibration\" estimates the ECE difference: keep 'ece' among the distances")
        if self.kind == "divergence" and len(set(self.horizons)) < 3:
            raise ValueError("kind = \"divergence\" fits a growth rate: give at least 3 horizons (delays), "
                             "dense where the distance grows, e.g. [0, 1, 2, 4, 8, 16, 32]")
        if self.kind == "witness" and (0 not in self.horizons or max(self.horizons) <= 0):
            raise ValueError("kind = \"witness\" compares the distance right after the instruments (horizon 0: D1) "
                             "with the distance after the common instrument B (each positive horizon is a length "
                             "of B: D2); give horizons = [0, m, ...] with m > 0")
        unknown = set(self.distances) - set(OBSERVABLES)
        if unknown:
            raise ValueError(f"unknown distances {sorted(unknown)}; known: {list(OBSERVABLES)}")
        if layer is None and set(self.distances) & set(NEEDS_LAYER):
            raise ValueError("distance 'cka' compares one layer's representations: give probe.layer "
                             "(a module name of the model, e.g. layer = \"3\") or leave 'cka' out")
        if self.primary_distance not in self.distances:
            raise ValueError(f"primary_distance {self.primary_distance!r} is not among the distances")
        if not self.horizons or any(h < 0 for h in self.horizons):
            raise ValueError("horizons must be non-negative delays after the intervention window")
        self.horizons = sorted(set(self.horizons))
        if self.primary_horizon is None:
            self.primary_horizon = self.horizons[len(self.horizons) // 2]
        if self.primary_horizon not in self.horizons:
            raise ValueError(f"primary_horizon {self.primary_horizon} is not among the horizons {self.horizons}")
        if sum(a.reference for a in self.arms) > 1:
            raise ValueError("at most one arm is the reference (chaos baseline)")
        if not (isinstance(self.equivalence_margin, (int, float)) and 0 < self.equivalence_margin < 10):
            raise ValueError("equivalence_margin is a fraction of the noise floor, in (0, 10)")
        if not (isinstance(self.alpha, float) and 0 < self.alpha < 0.5):
            raise ValueError("alpha must lie in (0, 0.5)")
        if not (isinstance(self.bootstrap_resamples, int) and 100 <= self.bootstrap_resamples <= 100_000):
            raise ValueError("bootstrap_resamples must be an integer in [100, 100000]")
        if self.steps is not None and not (isinstance(self.steps, int) and self.steps > 0):
            raise ValueError("steps must be a positive integer")

    def _witness_arms(self) -> None:
        """The instruments of the back-flow witness, per program and instrument length k: A' (the
        same batches with other draws of one stream over k steps: `redraw`), the causal break
        alone (optimizer state reset when B begins, k steps after the fork: `break_k`) and both
        (A' then the break). The parent is A; B is the parent's own continuation."""
        w = self.witness if self.witness is not None else {}
        if not isinstance(w, dict):
            raise ValueError("witness must be a table: instrument_steps, stream, salt, causal_break, programs")
        unknown = set(w) - WITNESS_KEYS
        if unknown:
            raise ValueError(f"witness: unknown key(s) {sorted(unknown)}; known: {sorted(WITNESS_KEYS)}")
        ks = w.get("instrument_steps", [1, 4, 16])
        check(ks, List(Int(1, MAX_STEPS), max_len=100), SPEC, "witness.instrument_steps")
        if not ks:
            raise ValueError("witness.instrument_steps must name at least one instrument length k >= 1")
        stream = w.get("stream", "dropout")
        salt = w.get("salt", 1)
        brk = w.get("causal_break", "reset_optimizer")
        programs = w.get("programs", [self.program])
        check(programs, List(Str(4096, nonempty=True), max_len=100), SPEC, "witness.programs")
        if not programs or len(set(programs)) != len(programs):
            raise ValueError("witness.programs must list distinct program references (default: the spec's program)")
        redraw = {"name": "redraw", "stream": stream, "salt": salt}
        from_spec(redraw, start=0, window=1)  # the stream and salt are valid
        brk_spec = dict(parse_spec(brk)) if isinstance(brk, str) else dict(brk) if isinstance(brk, dict) else None
        if brk_spec is None:
            raise ValueError("witness.causal_break must be a perturbation spec (default 'reset_optimizer')")
        if "start" in brk_spec or "starts_after" in brk_spec:
            raise ValueError("witness.causal_break acts when B begins (k steps after the fork): give it no start")
        from_spec(brk_spec, start=0, window=1)
        self.witness = {"instrument_steps": sorted(set(ks)), "stream": stream, "salt": salt,
                        "causal_break": brk, "programs": list(programs)}
        taken = {a.name for a in self.arms}
        for ref in programs:
            variant = None if ref == self.program else ref
            if variant is not None:  # every program's forks get their placebo check
                self.arms.append(Arm(f"placebo{self._witness_suffix(ref)}", ["placebo"], program=variant,
                                     generated=True))
            for k in self.witness["instrument_steps"]:
                brk_k = {**brk_spec, "starts_after": k}
                for name, perturb in zip(self.witness_arm_names(k, ref), ([redraw], [brk_k], [redraw, brk_k])):
                    if name in taken:
                        raise ValueError(f"arm name {name!r} is taken by the witness's generated arms; rename yours")
                    self.arms.append(Arm(name, perturb, window=k, program=variant, generated=True))

    def _witness_suffix(self, ref: str) -> str:
        return "" if ref == self.program else f"@{_slug(ref)}"

    def witness_arm_names(self, k: int, ref: str) -> tuple[str, str, str]:
        """The witness's arms of program `ref` and instrument length k: A' (redraw), the causal
        break alone, and both (the one naming rule, for making and for reading them)."""
        suffix = self._witness_suffix(ref)
        return f"redraw_k{k}{suffix}", f"break_k{k}{suffix}", f"redraw_k{k}+break{suffix}"

    def _pair_arms(self) -> None:
        """Additivity: for every pair (P, Q), the arm with both perturbations (named 'P+Q')."""
        eligible = [a for a in self.arms if not (a.is_placebo or a.reference or a.generated)]
        if self.pairs is None:
            if self.kind != "additivity":
                return
            self.pairs = [[a.name, b.name] for i, a in enumerate(eligible) for b in eligible[i + 1:]
                          if a.program == b.program and a.window == b.window]
        if not isinstance(self.pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in self.pairs):
            raise ValueError("pairs must be a list of [arm P, arm Q] name pairs")
        if len(self.pairs) > MAX_ARMS:
            raise SchemaError(SPEC, "pairs", f"at most {MAX_ARMS} pairs")
        if self.kind == "additivity" and not self.pairs:
            raise ValueError("kind = \"additivity\" needs two arms (not the placebo or the reference) with the "
                             "same program and window, or a `pairs` list")
        by_name = {a.name: a for a in self.arms}
        seen = set()
        for p_name, q_name in self.pairs:
            for n in (p_name, q_name):
                if n not in by_name or by_name[n].generated:
                    raise ValueError(f"pairs: {n!r} is not an arm of this spec")
                if by_name[n].is_placebo or by_name[n].reference:
                    raise ValueError(f"pairs: {n!r} is the placebo or the reference (its interaction is known)")
            p, q = by_name[p_name], by_name[q_name]
            if p_name == q_name:
                raise ValueError(f"pairs: [{p_name!r}, {q_name!r}] pairs an arm with itself")
            if p.program != q.program or p.window != q.window:
                raise ValueError(f"pairs: {p_name!r} and {q_name!r} need the same program and window")
            name = f"{p_name}+{q_name}"
            if name in seen:
                raise ValueError(f"pairs: [{p_name!r}, {q_name!r}] is listed twice")
            seen.add(name)
            if name in by_name:
                raise ValueError(f"arm name {name!r} is taken: it names the pair's combined arm")
            self.arms.append(Arm(name, p.perturb + q.perturb, window=p.window, program=p.program, generated=True))

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "ExperimentSpec":
        import tomllib

        with open(path, "rb") as f:
            raw = f.read((1 << 20) + 1)
        if len(raw) > 1 << 20:
            raise SchemaError(path, "", "larger than the 1 MiB an experiment spec may be")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except RecursionError:
            raise SchemaError(path, "", "nested too deeply") from None
        except UnicodeDecodeError as error:
            raise SchemaError(path, "", f"not UTF-8 text: {error}") from None
        base = Path(path).resolve().parent
        # File references (programs, the probe source) are relative to the spec file's folder.
        holders = [(data, "program")] + [(arm, "program") for arm in data.get("arms", []) if isinstance(arm, dict)]
        if isinstance(data.get("probe"), dict):
            holders.append((data["probe"], "source"))
        witness = data.get("witness")
        if isinstance(witness, dict) and isinstance(witness.get("programs"), list):
            witness["programs"] = list(witness["programs"])
            holders += [(witness["programs"], i) for i in range(len(witness["programs"]))]
        for holder, key in holders:
            ref = holder[key] if isinstance(holder, list) else holder.get(key)
            if isinstance(ref, str) and ".py:" in ref and not os.path.isabs(ref):
                candidate = base / ref.split(":")[0]
                if candidate.exists():
                    holder[key] = f"{candidate}:{ref.rsplit(':', 1)[1]}"
        try:
            return cls(**data)
        except TypeError as error:  # unknown or missing keys: one line, not a traceback
            raise ValueError(f"{path}: {error}") from None
        except SchemaError as error:  # name the file, not "experiment spec"
            raise SchemaError(path, error.key, error.detail) from None

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def reference(self) -> Arm | None:
        return next((a for a in self.arms if a.reference), None)

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
