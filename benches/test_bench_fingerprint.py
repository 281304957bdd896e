"""Fingerprint: replay.fingerprint of one tensor against torch.sum of the same tensor.

torch.sum reads every element once and is memory-bound at 16M elements: the yardstick of a
one-pass reduction. Goal: replay.fingerprint >= 0.9x torch.sum's speed at 16M float32.
"""

from __future__ import annotations

import pytest
import torch

import replay

from ._timing import Interleaved, check_info, goal

ROUNDS, WARMUP = 30, 3


@pytest.mark.benchmark(group="fingerprint")
@pytest.mark.parametrize("size", [1_000_000, 16_000_000], ids=["1M", "16M"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fingerprint(benchmark, smoke, dtype, size):
    n = 4096 if smoke else size
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    timing = Interleaved({"torch.sum": lambda: x.sum(), "replay.fingerprint": lambda: replay.fingerprint(x)})
    timing.run(benchmark, rounds=1 if smoke else ROUNDS, warmup=0 if smoke else WARMUP)
    med = timing.medians_ms()
    speed = med["torch.sum"] / med["replay.fingerprint"]
    goals = []
    if dtype == "float32" and size == 16_000_000:
        goals.append(goal("replay.fingerprint speed vs torch.sum, 16M float32", speed, ">=", 0.9, "x",
                          ">= 0.9x torch.sum at 16M float32"))
    benchmark.extra_info.update({"smoke": smoke, "rounds": timing.measured_rounds, "size": size, "elements": n,
                                 "dtype": dtype, "median_ms": med, "speed_vs_sum": speed, "goals": goals})
    check_info(benchmark.extra_info, ["size", "elements", "dtype", "speed_vs_sum"])
