"""Benchmark: one optimizer step, replay.optim against torch.optim and a bandwidth yardstick.

    python benches/optimizer_step.py [--sizes 1000000 16000000] [--rounds 30] [--threads N]

For N parameters (in 8 equal tensors) it times, interleaved, one AdamW step of:
torch.optim.AdamW single-tensor (foreach=False, torch's CPU default), foreach=True, fused=True;
replay.optim.AdamW portable with and without fingerprints, and numerics="torch"; and
replay's bandwidth yardstick (a kernel reading and writing exactly an AdamW step's bytes with
no arithmetic). The same for SGD with momentum (no yardstick: SGD moves other bytes).
Prints medians and the ratios a user cares about, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import replay  # noqa: E402
from replay import _ops  # noqa: E402
from _timing import interleaved_medians  # noqa: E402

TENSORS = 8


def make_params(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = n // TENSORS
    params = [torch.randn(size, generator=gen).requires_grad_() for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn(size, generator=gen) * 1e-3
    return params


def adamw_candidates(n: int):
    def torch_opt(**kw):
        opt = torch.optim.AdamW(make_params(n), lr=1e-3, **kw)
        return opt.step

    def replay_opt(**kw):
        opt = replay.optim.AdamW(make_params(n), lr=1e-3, **kw)
        return opt.step

    ps = make_params(n)
    grads = [p.grad for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    yard_params = [p.detach() for p in ps]

    return {
        "torch single-tensor": torch_opt(foreach=False),
        "torch foreach": torch_opt(foreach=True),
        "torch fused": torch_opt(fused=True),
        "replay portable + fingerprints": replay_opt(),
        "replay portable, no fingerprints": replay_opt(fingerprint=False),
        "replay torch-numerics + fingerprints": replay_opt(numerics="torch"),
        "yardstick (bytes of a step)": lambda: _ops.bandwidth_yardstick_(yard_params, grads, ms, vs),
    }


def sgd_candidates(n: int):
    def torch_opt(**kw):
        return torch.optim.SGD(make_params(n), lr=1e-3, momentum=0.9, **kw).step

    def replay_opt(**kw):
        return replay.optim.SGD(make_params(n), lr=1e-3, momentum=0.9, **kw).step

    return {
        "torch single-tensor": torch_opt(foreach=False),
        "torch foreach": torch_opt(foreach=True),
        "torch fused": torch_opt(fused=True),
        "replay portable + fingerprints": replay_opt(),
        "replay portable, no fingerprints": replay_opt(fingerprint=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 16_000_000])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, {args.rounds} interleaved rounds, medians\n")
    for label, make in (("AdamW", adamw_candidates), ("SGD momentum", sgd_candidates)):
        for n in args.sizes:
            medians = interleaved_medians(make(n), args.rounds)
            fused = medians["torch fused"]
            print(f"### {label}, {n:,} parameters\n")
            print("| step | median ms | torch fused / this |")
            print("|---|---:|---:|")
            for name, t in medians.items():
                print(f"| {name} | {t * 1e3:.2f} | {fused / t:.2f} |")
            ours = medians["replay portable + fingerprints"]
            bare = medians["replay portable, no fingerprints"]
            print(f"\nfingerprints add {100 * (ours / bare - 1):.1f}% to a replay step")
            if "yardstick (bytes of a step)" in medians:
                yard = medians["yardstick (bytes of a step)"]
                print(f"replay portable + fingerprints runs at {100 * yard / ours:.0f}% of the yardstick's bandwidth "
                      f"({100 * yard / bare:.0f}% without fingerprints)")
            print()


if __name__ == "__main__":
    main()
