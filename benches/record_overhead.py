"""Benchmark: what recording costs, against the same training loop without replay.

    python benches/record_overhead.py [--steps-mlp 300] [--steps-5m 150] [--repeats 3] [--quick]

For each program it times, alternating `repeats` times, (a) the bare loop: the same model,
optimizer (replay.optim.AdamW with fingerprint=False), batches and step, but no ledger,
checkpoints or fingerprints; (b) the same loop with torch.optim.AdamW; (c) `RecordSession.run`
at default settings (fingerprints every step, a checkpoint every 100 steps and at both ends).
It prints median per-step times, the overhead, bytes stored per step outside checkpoints and the
checkpoint size, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import replay  # noqa: E402
from replay.engine import Engine, default_step  # noqa: E402
from replay.program import StepContext, load_program  # noqa: E402
from replay.session import RecordSession  # noqa: E402

PROGRAMS = {
    "digits MLP (examples/digits_mlp.py)": str(HERE.parent / "examples" / "digits_mlp.py") + ":program",
    "5M-parameter MLP (benches/programs/five_million.py)": str(HERE / "programs" / "five_million.py") + ":program",
}


def bare_loop(reference: str, steps: int, optimizer: str) -> float:
    """Seconds per step of the program's loop without replay's recording."""
    program, _ = load_program(reference)
    base = program.optimizer

    def factory(m):
        opt = base(m)  # both benchmark programs use replay.optim.AdamW
        if optimizer == "replay":
            opt.fingerprint = False
            return opt
        group = opt.param_groups[0]
        return torch.optim.AdamW(m.parameters(), lr=group["lr"], weight_decay=group["weight_decay"])

    program = program.with_overrides(optimizer=factory)
    engine = Engine(program, Engine.contract_for(program))  # for the same model, batches and seeds
    step_fn = program.step or default_step
    start = time.perf_counter()
    for t in range(steps):
        ids = engine.policy.batch_ids(t)
        batch = program.make_batch(ids)
        generators = engine.seed_step(t)
        ctx = StepContext(step=t, epoch=engine.policy.epoch_of(t), ids=ids, batch=batch, model=engine.model,
                          optimizer=engine.optimizer, scheduler=None, ema=engine.ema, components=engine.components,
                          generators=generators, program=program)
        step_fn(ctx)
    return (time.perf_counter() - start) / steps


def recorded(reference: str, steps: int) -> tuple[float, int, int]:
    """(seconds per step, ledger bytes, bytes of one checkpoint) of a default recording."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        RecordSession(reference, out, steps=steps, progress=False).run()
        elapsed = time.perf_counter() - start
        ledger = sum(p.stat().st_size for p in out.glob("ledger.sqlite*"))
        checkpoint = sum(p.stat().st_size for p in sorted((out / "checkpoints").iterdir())[-1].iterdir())
    return elapsed / steps, ledger, checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-mlp", type=int, default=300)
    parser.add_argument("--steps-5m", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.steps_mlp, args.steps_5m, args.repeats = 30, 12, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} alternating repeats, medians\n")
    print("| program | steps | bare loop ms/step | torch.optim loop ms/step | recorded ms/step | overhead vs bare | "
          "ledger bytes/step | checkpoint MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, ref), steps in zip(PROGRAMS.items(), (args.steps_mlp, args.steps_5m)):
        bare, plain, rec, ledger, ckpt = [], [], [], 0, 0
        for _ in range(args.repeats):
            bare.append(bare_loop(ref, steps, "replay"))
            plain.append(bare_loop(ref, steps, "torch"))
            r, ledger, ckpt = recorded(ref, steps)
            rec.append(r)
        b, p, r = statistics.median(bare), statistics.median(plain), statistics.median(rec)
        print(f"| {name} | {steps} | {b * 1e3:.2f} | {p * 1e3:.2f} | {r * 1e3:.2f} | {100 * (r / b - 1):+.1f}% | "
              f"{ledger / steps:,.0f} | {ckpt / 1e6:.1f} |")


if __name__ == "__main__":
    main()
