"""Task start-up: a fresh process that records and forks a digits program with replay.optim
imports neither torch._dynamo (torch.optim's wrappers would, about 1.4 s) nor scikit-learn (its
import pulls in scipy.stats, about 1 s), and the bits are those of a process that has imported
torch._dynamo (torch's wrappers then run, replay.optim._common._torch_method). Experiment
workers and Ray tasks pay this start-up once per process. The seconds are measured by hand
(README, Scaling), not here: these tests check what is imported and what is computed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from replay.datasets import DIGITS_TRAIN, digits

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "programs" / "tiny.py") + ":program"

# Record 12 steps of the tiny program (digits, replay.optim.AdamW, a StepLR schedule, an EMA),
# verify it from a checkpoint (load_state_dict) and fork it with a first-moment reset; print the
# heavy modules loaded and every ledger digest and checkpoint hash of both runs.
CHILD = """
import json, sys
{preamble}
from replay.fork import ForkSession
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir
out = sys.argv[1]
RecordSession({tiny!r}, out + "/parent", seed=3, steps=12, progress=False).run()
assert ReplaySession(out + "/parent").verify(start=10, progress=False).ok
ForkSession(out + "/parent", 5, progress=False).fork(out + "/child", ["reset_exp_avg"])
bits = {{}}
for name in ("parent", "child"):
    with RunDir.open(out + "/" + name) as run:
        bits[name] = {{"digests": [row.digest for row in run.ledger.rows()],
                      "checkpoints": {{str(k): v for k, v in run.ledger.checkpoints().items()}}}}
print(json.dumps({{"loaded": sorted(m for m in ("torch._dynamo", "sklearn", "scipy.stats") if m in sys.modules),
                  "bits": bits}}))
"""


def run_child(tmp_path: Path, name: str, preamble: str = "") -> dict:
    out = tmp_path / name
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", CHILD.format(preamble=preamble, tiny=TINY), str(out)],
                          check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_fresh_process_records_verifies_and_forks_without_dynamo_or_sklearn(tmp_path):
    plain = run_child(tmp_path, "plain")
    assert plain["loaded"] == [], plain["loaded"]
    # The other path of _torch_method: torch._dynamo loaded first, torch's wrappers run.
    with_dynamo = run_child(tmp_path, "dynamo", preamble="import torch._dynamo")
    assert with_dynamo["loaded"] == ["torch._dynamo"]
    assert len(plain["bits"]["parent"]["digests"]) == 12 and len(plain["bits"]["child"]["digests"]) == 7
    assert with_dynamo["bits"] == plain["bits"]


def test_digits_are_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    (x_train, y_train), (x_probe, y_probe) = digits()
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    assert x_train.shape == (DIGITS_TRAIN, 64) and x_probe.shape == (1797 - DIGITS_TRAIN, 64)
    assert torch.equal(torch.cat([x_train, x_probe]).view(torch.int32), x.view(torch.int32))
    assert torch.equal(torch.cat([y_train, y_probe]), y) and y_train.dtype == torch.int64
