"""Determinism category: the same tiny training program, run in fresh processes with different
PYTHONHASHSEED values and intra-op thread counts, ends in bit-identical states.

The program trains two small MLPs for 30 steps, one with replay.optim.AdamW (portable numerics)
followed by an EMA of it, one with replay.optim.SGD (Nesterov momentum), and prints every
fingerprint it can see as JSON. The outputs must be equal as strings: no tolerance, no retry.
Each process trains once per (thread count, seed) it is given on argv: importing torch.optim
costs about 3 s of a process's life, the training itself a fraction of a second.
"""

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

PROGRAM = textwrap.dedent(
    """
    import json
    import sys

    import torch
    import torch.nn.functional as F

    import replay


    def mlp():
        return torch.nn.Sequential(
            torch.nn.Linear(8, 33), torch.nn.Tanh(), torch.nn.Linear(33, 17), torch.nn.Tanh(),
            torch.nn.Linear(17, 4),
        )


    def optimizer_state(opt):
        return {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


    def step_fingerprints(opt):
        return {str(i): fps for i, fps in opt.fingerprints.items()}


    def train(seed):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1000)
        adam_model, sgd_model = mlp(), mlp()
        adamw = replay.optim.AdamW(adam_model.parameters(), lr=1e-2, weight_decay=0.05, numerics="portable")
        sgd = replay.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        ema = replay.EMA(adam_model, decay=0.9)
        inputs = torch.randn(256, 8, generator=gen)
        targets = torch.sin(inputs @ torch.randn(8, 4, generator=gen))
        losses = []
        for step in range(30):
            batch = torch.randint(0, 256, (32,), generator=gen)
            for model, opt in ((adam_model, adamw), (sgd_model, sgd)):
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(model(inputs[batch]), targets[batch])
                loss.backward()
                opt.step()
                losses.append(loss.item().hex())
            ema_fingerprints = ema.update()
        consistent = (
            all(adamw.fingerprints[i]["param"] == replay.fingerprint(p) for i, p in enumerate(adam_model.parameters()))
            and all(sgd.fingerprints[i]["param"] == replay.fingerprint(p) for i, p in enumerate(sgd_model.parameters()))
            and all(ema_fingerprints[k] == replay.fingerprint(v) for k, v in ema.state_dict().items())
        )
        return {
            "adamw_model": replay.state_fingerprint(adam_model.state_dict()),
            "adamw_state": replay.state_fingerprint(optimizer_state(adamw)),
            "adamw_step": step_fingerprints(adamw),
            "sgd_model": replay.state_fingerprint(sgd_model.state_dict()),
            "sgd_state": replay.state_fingerprint(optimizer_state(sgd)),
            "sgd_step": step_fingerprints(sgd),
            "ema": replay.state_fingerprint(ema.state_dict()),
            "ema_update": ema_fingerprints,
            "losses": losses,
        }, consistent


    # argv: comma-separated thread counts, comma-separated seeds; one JSON line per pair.
    for threads in map(int, sys.argv[1].split(",")):
        for seed in map(int, sys.argv[2].split(",")):
            torch.set_num_threads(threads)
            result, consistent = train(seed)
            meta = {"threads": torch.get_num_threads(), "seed": seed, "consistent": consistent}
            print(json.dumps(meta, sort_keys=True) + "\t" + json.dumps(result, sort_keys=True))
    """
)


def run_program(hash_seed: int, threads: str, seeds: str) -> list[tuple[dict, str]]:
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, threads, seeds],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(threads.split(",")) * len(seeds.split(",")), proc.stdout
    return [(json.loads(meta), result) for meta, result in (line.split("\t") for line in lines)]


# Three fresh processes, each with its own PYTHONHASHSEED, each training from scratch once per
# (thread count, seed) it is given. Every seed-0 run must print the same line; the seed-1 run
# must differ (so that equality is not vacuous).
RUNS = [(0, "1,2", "0,1"), (1, "2,1", "0"), (2, "2", "0")]


def test_fresh_processes_thread_counts_and_hash_seeds_agree_bitwise():
    with ThreadPoolExecutor(max_workers=len(RUNS)) as pool:
        runs = [line for lines in pool.map(lambda r: run_program(*r), RUNS) for line in lines]
    for meta, _ in runs:
        assert meta["consistent"], meta
    assert [(m["threads"], m["seed"]) for m, _ in runs] == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 0), (1, 0), (2, 0)]
    seed0 = [out for meta, out in runs if meta["seed"] == 0]
    assert len(seed0) == 5
    assert all(out == seed0[0] for out in seed0), "fingerprints differ between runs"

    reference = json.loads(seed0[0])
    assert len(reference["losses"]) == 60
    assert len(set(reference["losses"])) > 50  # training moved
    assert set(reference["adamw_step"]) == set(reference["sgd_step"]) == {str(i) for i in range(6)}
    assert set(reference["adamw_step"]["0"]) == {"param", "exp_avg", "exp_avg_sq", "step"}
    assert set(reference["sgd_step"]["0"]) == {"param", "momentum_buffer"}
    assert len(reference["ema_update"]) == 6

    seed1 = [json.loads(out) for meta, out in runs if meta["seed"] == 1]
    assert len(seed1) == 2 and seed1[0] == seed1[1]
    for key in ("adamw_model", "adamw_state", "sgd_model", "sgd_state", "ema"):
        assert seed1[0][key] != reference[key], key
