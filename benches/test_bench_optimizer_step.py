"""Optimizer step: replay.optim against torch.optim and a bandwidth yardstick.

For N parameters (in 8 equal tensors) it times, interleaved, one step of torch.optim
single-tensor (foreach=False, torch's CPU default), foreach=True and fused=True; replay.optim
portable with fingerprints (the default), without (fingerprint=False), and, for AdamW,
numerics="torch"; and for AdamW replay's bandwidth yardstick (a kernel that reads and writes
exactly an AdamW step's bytes with no arithmetic: what a memory-bound step could reach).

Goals (AdamW): replay with fingerprints >= 1.0x the speed of torch fused=True; the fingerprints'
extra time (with - without) <= 5% of torch's fused step.
"""

from __future__ import annotations

import pytest
import torch

import replay
from replay import _ops

from ._timing import Interleaved, check_info, goal

TENSORS = 8
ROUNDS, WARMUP = 25, 3


def make_params(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = n // TENSORS
    params = [torch.randn(size, generator=gen).requires_grad_() for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn(size, generator=gen) * 1e-3
    return params


def shared_candidates(torch_opt, replay_opt) -> dict:
    """The candidates every optimizer has: torch's three CPU paths, replay's with and without
    fingerprints (each argument makes an optimizer from keyword arguments and returns its step)."""
    return {
        "torch single-tensor": torch_opt(foreach=False),
        "torch foreach": torch_opt(foreach=True),
        "torch fused": torch_opt(fused=True),
        "replay portable + fingerprints": replay_opt(),
        "replay portable, no fingerprints": replay_opt(fingerprint=False),
    }


def adamw_candidates(n: int) -> dict:
    def torch_opt(**kw):
        return torch.optim.AdamW(make_params(n), lr=1e-3, **kw).step

    def replay_opt(**kw):
        return replay.optim.AdamW(make_params(n), lr=1e-3, **kw).step

    ps = make_params(n)
    grads = [p.grad for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    yard = [p.detach() for p in ps]
    return {
        **shared_candidates(torch_opt, replay_opt),
        "replay torch-numerics + fingerprints": replay_opt(numerics="torch"),
        "yardstick (bytes of a step)": lambda: _ops.bandwidth_yardstick_(yard, grads, ms, vs),
    }


def sgd_candidates(n: int) -> dict:
    def torch_opt(**kw):
        return torch.optim.SGD(make_params(n), lr=1e-3, momentum=0.9, **kw).step

    def replay_opt(**kw):
        return replay.optim.SGD(make_params(n), lr=1e-3, momentum=0.9, **kw).step

    return shared_candidates(torch_opt, replay_opt)


@pytest.mark.benchmark(group="optimizer step")
@pytest.mark.parametrize("size", [1_000_000, 16_000_000], ids=["1M", "16M"])
@pytest.mark.parametrize("optimizer", ["AdamW", "SGD momentum"])
def test_optimizer_step(benchmark, smoke, optimizer, size):
    n = TENSORS * 512 if smoke else size
    make = adamw_candidates if optimizer == "AdamW" else sgd_candidates
    timing = Interleaved(make(n))
    timing.run(benchmark, rounds=1 if smoke else ROUNDS, warmup=0 if smoke else WARMUP)
    med = timing.medians_ms()
    fused, ours, bare = med["torch fused"], med["replay portable + fingerprints"], med["replay portable, no fingerprints"]
    speed = fused / ours
    fp_share = (ours - bare) / fused
    info = {
        "smoke": smoke, "rounds": timing.measured_rounds, "size": size, "parameters": n, "optimizer": optimizer,
        "median_ms": med,
        "speed_vs_fused": {name: fused / t for name, t in med.items()},
        "fingerprints_over_fused": fp_share,
        "fingerprints_over_replay_step": (ours - bare) / bare,
        "goals": [],
    }
    if "yardstick (bytes of a step)" in med:
        yard = med["yardstick (bytes of a step)"]
        info["yardstick_share"] = {"with fingerprints": yard / ours, "without fingerprints": yard / bare}
    if optimizer == "AdamW":
        info["goals"] = [
            goal(f"AdamW {size / 1e6:g}M: replay + fingerprints, speed vs torch fused=True", speed, ">=", 1.0, "x",
                 ">= 1.0x torch.optim.AdamW(fused=True)"),
            goal(f"AdamW {size / 1e6:g}M: fingerprints' extra time, share of torch's fused step", fp_share, "<=", 0.05,
                 "%", "<= 5% of the fused step"),
        ]
    benchmark.extra_info.update(info)
    check_info(benchmark.extra_info, ["size", "parameters", "optimizer", "speed_vs_fused", "fingerprints_over_fused"])
