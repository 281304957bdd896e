"""Interleaved timing and the goal records every bench writes into `benchmark.extra_info`.

Why interleaved: the machine is shared (2 cores, other jobs come and go), so a candidate timed
for a minute and then another for the next minute can differ by the neighbour alone. Every
round runs every candidate once (the order reversed every other round, so that neither always
runs on caches warmed by the other), and ratios are taken within one run: a noisy neighbour
slows all candidates of a round alike.

pytest-benchmark only times what it is given: `benchmark.pedantic(Interleaved.round, ...)` makes
its statistics those of a whole round (every candidate), which say how long the bench took and
nothing more. The figures that matter are the per-candidate medians and ratios, computed here
and stored in `benchmark.extra_info` (benches/tables.py prints them).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable


class Interleaved:
    """Candidates run once each per `round()`, in alternating order.

    `samples[name]` holds each call's wall time (perf_counter seconds); `results[name]` holds
    what each call returned (for candidates that time themselves, e.g. a whole training run
    that reports its own seconds per step without its setup)."""

    def __init__(self, candidates: dict[str, Callable[[], object]]):
        self.candidates = candidates
        self.samples: dict[str, list[float]] = {name: [] for name in candidates}
        self.results: dict[str, list[object]] = {name: [] for name in candidates}
        self.rounds = 0

    def round(self) -> None:
        names = list(self.candidates)
        if self.rounds % 2:
            names.reverse()
        for name in names:
            start = time.perf_counter()
            result = self.candidates[name]()
            self.samples[name].append(time.perf_counter() - start)
            self.results[name].append(result)
        self.rounds += 1

    def run(self, benchmark, rounds: int, warmup: int = 0) -> None:
        """All rounds under pytest-benchmark. Its warm-up rounds call round() too: `kept`
        drops them. In smoke mode (benchmark disabled) pedantic calls round() exactly once."""
        self.kept_rounds = rounds
        benchmark.pedantic(self.round, rounds=rounds, warmup_rounds=warmup, iterations=1)

    def kept(self, name: str, results: bool = False) -> list:
        """The samples (or results) of the measured rounds: the last `rounds` (warm-up dropped)."""
        values = (self.results if results else self.samples)[name]
        return values[-getattr(self, "kept_rounds", len(values)):]

    @property
    def measured_rounds(self) -> int:
        """Rounds behind the medians: `rounds`, or 1 in smoke mode."""
        return len(self.kept(next(iter(self.candidates))))

    def medians_ms(self) -> dict[str, float]:
        return {name: 1e3 * statistics.median(self.kept(name)) for name in self.candidates}


def goal(figure: str, value: float, op: str, target: float, unit: str, text: str) -> dict:
    """One goal checked against one measured figure, as plain JSON for extra_info.

    unit: "x" (a speed ratio), "%" (value and target are fractions, printed as percent) or
    "ms". `met` is decided here, once, so that tables.py only prints it."""
    if op not in (">=", "<="):
        raise ValueError(f"goal op must be '>=' or '<=', not {op!r}")
    met = value >= target if op == ">=" else value <= target
    return {"figure": figure, "value": float(value), "op": op, "goal": float(target), "unit": unit,
            "text": text, "met": bool(met)}


def assert_finite(info, path: str = "extra_info") -> None:
    """Every number in a (nested) extra_info is finite: what the smoke mode checks, since it
    runs each bench once at tiny sizes and cannot judge the goals themselves."""
    if isinstance(info, bool) or info is None or isinstance(info, str):
        return
    if isinstance(info, (int, float)):
        assert math.isfinite(info), f"{path} = {info!r} is not finite"
    elif isinstance(info, dict):
        for key, value in info.items():
            assert isinstance(key, str), f"{path} has a non-string key {key!r}"
            assert_finite(value, f"{path}.{key}")
    elif isinstance(info, (list, tuple)):
        for i, value in enumerate(info):
            assert_finite(value, f"{path}[{i}]")
    else:
        raise AssertionError(f"{path} holds a {type(info).__name__}, not plain JSON")


def check_info(info: dict, keys: list[str]) -> None:
    """The keys benches/tables.py reads are present, every number is finite, and every goal
    record is complete."""
    missing = [k for k in keys + ["smoke", "rounds", "median_ms", "goals"] if k not in info]
    assert not missing, f"extra_info lacks {missing}"
    assert_finite(info)
    for g in info["goals"]:
        assert set(g) == {"figure", "value", "op", "goal", "unit", "text", "met"}, g
