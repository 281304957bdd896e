"""What an experiment is: a program, seeds, fork steps, perturbation arms, delays and a probe set.

`ExperimentSpec` is validated when it is built (from Python or from TOML), so a bad spec fails
before anything runs. Whether an arm is the placebo is decided here, once (`Arm.is_placebo`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..perturb import from_spec
from ..store.schema import MAX_SEED, MAX_STEPS, Int, List, SchemaError, Str, check, check_json_limits

# Limits of a spec (replay.store.schema checks them before anything else is looked at).
MAX_SEEDS = 10_000
MAX_FORK_STEPS = 10_000
MAX_HORIZONS = 10_000
MAX_ARMS = 1_000
SPEC = "experiment spec"

# The observables an experiment can estimate (replay.experiment.probe computes them with
# replay.estimands). Signed ones are differences of a metric, not distances.
OBSERVABLES = ("tv", "js", "hellinger", "disagreement", "accuracy_diff", "loss_diff", "param_l2", "cka")
SIGNED = ("accuracy_diff", "loss_diff")
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
    arms: list[Arm]
    horizons: list[int]
    probe: dict
    name: str = "experiment"
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

    def __post_init__(self):
        self._check_limits()
        if not isinstance(self.probe, dict) or not isinstance(self.probe.get("source"), str):
            raise ValueError("probe needs a 'source': 'module:callable' returning (inputs, labels)")
        layer = self.probe.get("layer")
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"probe.layer must be a module name (a string), got {layer!r}")
        self.arms = [a if isinstance(a, Arm) else Arm(**a) for a in self.arms]
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
        for holder, key in holders:
            ref = holder.get(key)
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
