"""What the per-step protocol of a run of several processes costs, without a second process:
one engine in a world of one (replay.distributed: rank 0's command broadcast and the digest
all_gather every step; nothing to exchange) and one without, stepped alternately in this
process, 25 steps each, 16 times, one torch thread. Prints the medians and the paired
differences (ms a step).

    python tools/ddp_protocol_cost.py [--program REF] [--port PORT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", default="benches/programs/ddp_mlp.py:program")
    parser.add_argument("--port", default="29779", help="a free TCP port on 127.0.0.1 for the process group")
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=args.port)
    from replay import distributed
    from replay.engine import Engine
    from replay.program import load_program

    program, _ = load_program(args.program)
    program = program.with_overrides(steps=10**6)
    plain = Engine(program, Engine.contract_for(program))
    world = distributed.World.from_environment()
    distributed.set_current(world)
    ranked = Engine(program, Engine.contract_for(program))
    distributed.set_current(None)
    times = {"plain": [], "world of one": []}
    for engine in (plain, ranked):
        for _ in range(10):  # warm-up
            engine.run_step()
    for k in range(args.repeats):
        order = [("plain", plain), ("world of one", ranked)]
        for name, engine in order if k % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.run_step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    world.close()
    differences = sorted(b - a for a, b in zip(times["plain"], times["world of one"]))
    print(f"plain {statistics.median(times['plain']):.2f} ms a step, world of one "
          f"{statistics.median(times['world of one']):.2f} ms (medians of {args.repeats} x {args.steps} steps)")
    print(f"paired difference: median {statistics.median(differences):.2f} ms, "
          f"range {differences[0]:.2f} to {differences[-1]:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
