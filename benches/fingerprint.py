"""Benchmark: replay.fingerprint against torch.sum over the same tensor.

    python benches/fingerprint.py [--sizes 1000000 16000000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import replay  # noqa: E402
from _timing import interleaved_medians  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 16_000_000])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians\n")
    print("| tensor | torch.sum ms | replay.fingerprint ms | sum / fingerprint |")
    print("|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for n in args.sizes:
            x = torch.randn(n).to(dtype)
            m = interleaved_medians({"sum": lambda: x.sum(), "fingerprint": lambda: replay.fingerprint(x)}, args.rounds)
            print(f"| {n:,} {str(dtype).replace('torch.', '')} | {m['sum'] * 1e3:.2f} | "
                  f"{m['fingerprint'] * 1e3:.2f} | {m['sum'] / m['fingerprint']:.2f} |")


if __name__ == "__main__":
    main()
