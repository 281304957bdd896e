"""Interleaved timing: every candidate runs once per round, so that a noisy neighbour slows
all of them alike and the ratios measured in one run stay meaningful."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(candidates: dict[str, Callable[[], None]], rounds: int, warmup: int = 3) -> dict[str, float]:
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
