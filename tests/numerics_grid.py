"""The numerics="torch" grid: replay.optim vs torch.optim over option grids and sizes.

Used by test_torch_numerics.py in-process (this machine's CPU capability) and in a fresh
process under ATEN_CPU_CAPABILITY=default (`python tests/numerics_grid.py THREADS` prints the
mismatches as JSON), because torch reads the capability once, at start-up.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

import replay

SIZES = (0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 1000, 65537, 1_000_003)
STEPS = 20


def sgd_configs():
    for momentum, dampening, nesterov, weight_decay, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 0.01), (False, True)
    ):
        if momentum == 0 and (dampening != 0 or nesterov):
            continue
        if nesterov and dampening != 0:
            continue  # torch refuses nesterov with dampening
        yield dict(lr=0.01, momentum=momentum, dampening=dampening, nesterov=nesterov,
                   weight_decay=weight_decay, maximize=maximize)


def adam_configs():
    # betas[0] = 0.3 puts lerp's weight (0.7) on its second branch.
    for betas, weight_decay, amsgrad, maximize in itertools.product(
        ((0.9, 0.999), (0.3, 0.99)), (0.0, 0.1), (False, True), (False, True)
    ):
        yield dict(lr=0.01, betas=betas, eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad,
                   maximize=maximize)


def all_cases():
    for kw in sgd_configs():
        yield "SGD", kw
    for name in ("Adam", "AdamW"):
        for kw in adam_configs():
            yield name, kw


def _values(n: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    """Random float32 values with the awkward ones mixed in: signed zeros, subnormals, large."""
    x = torch.randn(n, generator=generator) * scale
    if n >= 8:
        special = torch.tensor([0.0, -0.0, 1e-41, -1e-41, 3e-39, 1e12, -1e12, 1.0])
        pos = torch.randint(0, n, (8,), generator=generator)
        x[pos] = special
    return x


def compare(name: str, kw: dict, sizes=SIZES, steps: int = STEPS) -> list[str]:
    """Runs torch.optim.<name> and replay.optim.<name>(numerics="torch") side by side; returns
    a description of every tensor whose bits differ (empty when all agree)."""
    generator = torch.Generator().manual_seed(1234)
    initial = [_values(n, generator, 1.0) for n in sizes]
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    opt_ours = getattr(replay.optim, name)(ours, numerics="torch", **kw)
    opt_theirs = getattr(torch.optim, name)(theirs, **kw)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            g = _values(a.numel(), generator, 0.1)
            a.grad = g.clone()
            b.grad = g.clone()
        opt_ours.step()
        opt_theirs.step()
    mismatches = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        pairs = [("param", a, b)]
        for key, value in opt_theirs.state[b].items():
            pairs.append((key, opt_ours.state[a][key], value))
        for key, x, y in pairs:
            if not torch.equal(x.view(torch.int32) if x.dtype == torch.float32 else x,
                               y.view(torch.int32) if y.dtype == torch.float32 else y):
                diff = (x.view(torch.int32) != y.view(torch.int32)).sum().item() if x.dtype == torch.float32 else "?"
                mismatches.append(f"{name} {kw} size={sizes[i]} {key}: {diff} elements differ")
    return mismatches


def run(threads: int, sizes=SIZES) -> list[str]:
    torch.set_num_threads(threads)
    out = []
    for name, kw in all_cases():
        out.extend(compare(name, kw, sizes=sizes))
    return out


if __name__ == "__main__":
    # python tests/numerics_grid.py THREADS [MAX_SIZE]: the sizes up to MAX_SIZE (default: all)
    max_size = int(sys.argv[2]) if len(sys.argv) > 2 else max(SIZES)
    sizes = tuple(n for n in SIZES if n <= max_size)
    result = {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": int(sys.argv[1]),
        "sizes": list(sizes),
        "mismatches": run(int(sys.argv[1]), sizes),
    }
    print(json.dumps(result))
