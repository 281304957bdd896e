"""Shared test helpers: paths, the example programs, a small program written on the fly, and the
headless Chromium lookup of the render tests. Test files import the plain helpers
(``from conftest import ...``); fixtures are found by pytest."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# cuBLAS reads its workspace configuration once, when CUDA is first used in the process; a CUDA
# program needs a deterministic one (replay.device refuses to run after CUDA started without it),
# and test_cuda.py starts CUDA first. Set before any test runs; it means nothing to a CPU run.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # `from conftest import ...` from any test file
    sys.path.insert(0, str(HERE))

PROGRAMS = HERE / "programs"
TINY = str(PROGRAMS / "tiny.py") + ":program"  # AdamW, BatchNorm, dropout, EMA, StepLR, augment stream
QUEUE = str(PROGRAMS / "queue_sgd.py") + ":program"  # SGD with momentum, a queue component
LEAKY = str(PROGRAMS / "leaky.py") + ":program"  # a Python-level step counter changes the loss
FORGETFUL = str(PROGRAMS / "forgetful_queue.py") + ":program"  # a queue that forgets its pointer
SCALED = str(PROGRAMS / "mixed_precision.py") + ":fp16"  # fp16 autocast, a GradScaler, one skipped step


# ------------------------------------------------------------------------- recorded runs ----


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory):
    """recorded_run(reference, **overrides) -> the folder of a complete recording of that program,
    recorded once per session for each (reference, overrides) and shared: treat it as read-only
    (copy it before damaging or extending it)."""
    cache: dict = {}

    def record(reference: str, **overrides) -> Path:
        key = (reference, tuple(sorted(overrides.items())))
        if key not in cache:
            from replay.session import RecordSession

            out = tmp_path_factory.mktemp("recorded") / "run"
            RecordSession(reference, out, progress=False, **overrides).run()
            cache[key] = out
        return cache[key]

    return record


# ------------------------------------------------------------- a program written on the fly ----

_PROGRAM = '''\
import os, time
import torch
import replay
{prelude}

def model():
    {model_body}
    return torch.nn.Linear(4, 2)


def step(ctx):
    {step_prelude}
    x, y = ctx.batch
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(ctx.model(x), y)
    loss.backward()
    ctx.optimizer.step()
    return {{"loss": loss}}


def probe():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)


_g = torch.Generator().manual_seed(0)
program = replay.Program(model=model,
                         dataset=(torch.randn(64, 4, generator=_g), torch.randint(0, 2, (64,), generator=_g)),
                         step=step, optimizer=lambda m: {optimizer},
                         batch_size=8, steps={steps}, checkpoint_every=5)
{epilogue}
'''


def write_program(path: Path, *, prelude: str = "", model_body: str = "pass", step_prelude: str = "pass",
                  optimizer: str = "replay.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)", steps: int = 20,
                  epilogue: str = "") -> Path:
    """A small program file (a linear model, SGD with momentum, 64 random examples, batches of 8,
    checkpoints every 5 steps) with code inserted at the given places; returns its path."""
    path = Path(path)
    path.write_text(_PROGRAM.format(prelude=prelude, model_body=model_body, step_prelude=step_prelude,
                                    optimizer=optimizer, steps=steps, epilogue=epilogue))
    return path


@pytest.fixture
def program_file(tmp_path):
    """write_program in this test's tmp_path: program_file("name.py", **changes) -> path."""
    return lambda name="program.py", **changes: write_program(tmp_path / name, **changes)


# ------------------------------------------------------------------------------- cuda ----


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under REPLAY_REQUIRE_CUDA=1 (tools/gpu_check.sh sets it) a skipped test marked `cuda`
    fails instead: on a GPU machine a skip would hide that the CUDA path went unchecked."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("REPLAY_REQUIRE_CUDA") == "1" and item.get_closest_marker("cuda"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"REPLAY_REQUIRE_CUDA=1 but this cuda test was skipped ({reason})"


# ----------------------------------------------------------------------------- chromium ----

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    """REPLAY_CHROMIUM, else /usr/bin/chromium (Debian's package), else chromium or
    chromium-browser on PATH; None when there is none."""
    named = os.environ.get("REPLAY_CHROMIUM")
    if named:
        return named if os.path.exists(named) else None
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser binary; skips the test without one, or fails it under REPLAY_REQUIRE_BROWSER=1 (CI)."""
    found = find_chromium()
    if found is None:
        reason = "Chromium is not installed (apt-get install -y chromium fonts-liberation)"
        if os.environ.get("REPLAY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"REPLAY_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return found


def minimal_manifest(**extra) -> dict:
    """A minimal valid run manifest (the keys replay.driver writes; the store adds status and
    store_version), with ``extra`` keys merged in."""
    return {
        "format": "replay.run", "version": 1, "run_id": "ab" * 16, "first_step": 0, "steps": 10,
        "seed": 3, "program": {"reference": "mod:prog", "sha256": "0" * 64},
        "batch_size": 4, "dataset_size": 16, "environment": {"torch": "x"},
        "rng": {"version": 1, "run_seed": 3, "streams": ["init", "order", "augment", "dropout"], "reseeds": {}},
        "order": {"name": "reshuffle", "dataset_size": 16, "batch_size": 4},
        "checkpoints": {"every": 5, "log_spaced": False, "counts": [0, 5, 10]},
        "optimizer": {"class": "replay.optim.adam.AdamW", "replay_kernel": True, "numerics": "portable"},
        **extra,
    }


def flat_tensors(state, prefix="") -> dict:
    """The tensors of a nested state (dicts, lists, tuples), keyed by their path."""
    import torch

    out = {}
    if isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, dict):
        for k, v in state.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out
