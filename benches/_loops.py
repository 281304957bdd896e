"""Training loops with and without recording, shared by the recording-overhead and fork-latency
benches: the bare loop, whole default recordings, the lockstep observer and the breakdown.

The loops:

  bare         the program's own step function, model, EMA and batches (the program's data
               order) with replay.optim.AdamW(fingerprint=False): the same arithmetic, but no
               ledger, no checkpoints, no optimizer fingerprints, no per-step seeding (torch
               seeded once). replay.EMA still fingerprints what it writes: it has no switch.
  torch.optim  the same with torch.optim.AdamW (same hyper-parameters; torch's CPU default, the
               single-tensor path): the loop a user would write without replay.
  recorded     RecordSession(...).run() at default settings (fingerprints of every component
               every step, checkpoints on the program's schedule and at both ends, written on a
               background thread) into a fresh run directory.

Lockstep: a recording (or a fork child) runs one bare step right after each of its own steps,
from its observe callback, so that load on the machine hits both alike; each step is
classified as clean, checkpoint (a checkpoint submitted or being written) or epoch (an epoch's
order hash recorded). The steady-state overhead is the median over clean steps of (recorded -
bare), plus the checkpoints' and epoch records' excess amortised over their spacing.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

import replay
import replay.driver as driver_module
import replay.engine as engine_module
import replay.session as session_module
import replay.store.checkpoint as checkpoint_module
from replay.engine import Engine, default_step
from replay.program import StepContext, load_program
from replay.session import RecordSession
from replay.store.ledger import Ledger
from replay.store.run import RunDir

from ._timing import Interleaved

HERE = Path(__file__).resolve().parent
PROGRAMS = {
    "digits MLP": str(HERE.parent / "examples" / "digits_mlp.py") + ":program",
    "5M MLP": str(HERE / "programs" / "five_million.py") + ":program",
}
TORCH_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def program_facts(reference: str) -> dict:
    """Parameters, default steps and checkpoint spacing of a program (what 'default settings'
    means for it)."""
    program, _ = load_program(reference)
    torch.manual_seed(0)
    return {"parameters": sum(p.numel() for p in program.model().parameters()), "steps": program.steps,
            "checkpoint_every": program.checkpoint_every, "batch_size": program.batch_size,
            "dataset_size": program.dataset_size()}


# ---------------------------------------------------------------------------- loops ----


def _torch_adamw(replay_optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim.AdamW with the hyper-parameters of a replay.optim.AdamW (one param group)."""
    if not isinstance(replay_optimizer, replay.optim.AdamW) or len(replay_optimizer.param_groups) != 1:
        raise TypeError("the benchmark programs use one replay.optim.AdamW param group")
    group = replay_optimizer.param_groups[0]
    return torch.optim.AdamW(model.parameters(), **{k: group[k] for k in TORCH_ADAMW_KEYS})


class BareLoop:
    """The program's training loop without recording (see the module docstring)."""

    def __init__(self, reference: str, optimizer: str = "replay"):
        program, _ = load_program(reference)
        base = program.optimizer

        def factory(model):
            opt = base(model)
            if optimizer == "replay":
                opt.fingerprint = False
                return opt
            return _torch_adamw(opt, model)

        self.program = program.with_overrides(optimizer=factory)
        # The engine builds the model, optimizer and EMA under the init stream (as a recording
        # does) and owns the data-order policy; its stepping and describing code is never called.
        self.engine = Engine(self.program, Engine.contract_for(self.program))
        self.policy, self.step_fn = self.engine.policy, self.program.step or default_step
        self.t = 0
        torch.manual_seed(self.program.seed)  # once, as a plain loop would

    def step(self) -> None:
        t, e = self.t, self.engine
        ids = self.policy.batch_ids(t)
        self.step_fn(StepContext(step=t, epoch=self.policy.epoch_of(t), ids=ids, batch=self.program.make_batch(ids),
                                 model=e.model, optimizer=e.optimizer, scheduler=None, ema=e.ema,
                                 components=e.components, generators={}, program=self.program))
        self.t = t + 1


def bare_run(reference: str, steps: int, optimizer: str) -> float:
    """Seconds per step of the program's training loop without recording (setup excluded)."""
    loop = BareLoop(reference, optimizer)
    start = time.perf_counter()
    for _ in range(steps):
        loop.step()
    return (time.perf_counter() - start) / steps


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def recorded_run(reference: str, steps: int, checkpoint_every: int | None = None, session_hook=None) -> dict:
    """A default recording into a temporary folder: seconds per step and what it stored.

    Timed from the first observe call (the engine is built, the run directory not yet made:
    like the bare loop's clock, which starts once its engine is built) to the return of run(),
    setup, every checkpoint and the wait for the last one included."""
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
        out = Path(tmp) / "run"
        session = RecordSession(reference, out, steps=steps, checkpoint_every=checkpoint_every, progress=False)
        if session_hook is not None:
            session_hook(session)
        marks: list[float] = []

        def observe(_engine):
            if not marks:
                marks.append(time.perf_counter())

        session.run(observe=observe)
        end = time.perf_counter()
        checkpoints = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
        return {
            "per_step": (end - marks[0]) / steps,
            "ledger_bytes": sum(p.stat().st_size for p in out.glob("ledger.sqlite*")),
            "checkpoint_bytes": _dir_bytes(checkpoints[-1]),
            "checkpoints": len(checkpoints),
            "manifest_bytes": (out / "manifest.json").stat().st_size,
        }


# ------------------------------------------------------------------------- lockstep ----


class _Counted:
    """Patches, for the length of a `with`: counts checkpoint writes started and finished (the
    background writer calls replay.store.checkpoint.write_checkpoint, looked up at each
    submit), checkpoint submissions and epoch records."""

    def __init__(self):
        self.started = self.finished = self.submits = self.epochs = 0
        self._originals = {}

    def __enter__(self):
        original_write = checkpoint_module.write_checkpoint
        original_submit = driver_module._CheckpointWriter.submit
        original_epoch = Ledger.record_epoch
        self._originals = {"write": original_write, "submit": original_submit, "epoch": original_epoch}

        def write_checkpoint(*args, **kwargs):
            self.started += 1
            try:
                return original_write(*args, **kwargs)
            finally:
                self.finished += 1

        def submit(*args, **kwargs):
            self.submits += 1
            return original_submit(*args, **kwargs)

        def record_epoch(*args, **kwargs):
            self.epochs += 1
            return original_epoch(*args, **kwargs)

        checkpoint_module.write_checkpoint = write_checkpoint
        driver_module._CheckpointWriter.submit = submit
        Ledger.record_epoch = record_epoch
        return self

    def __exit__(self, *exc):
        checkpoint_module.write_checkpoint = self._originals["write"]
        driver_module._CheckpointWriter.submit = self._originals["submit"]
        Ledger.record_epoch = self._originals["epoch"]

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.started, self.finished, self.submits, self.epochs


class Lockstep:
    """An observe callback that runs one bare step after each recorded step and classifies it.

    rec[i] is the time from the end of the previous callback to this one: the recorded step
    plus the previous step's bookkeeping (ledger row, epoch record, checkpoint submission).
    The first interval of a RecordSession also holds the run's setup (run directory, manifest,
    the first checkpoint's submission): it is kept apart as "setup". Use inside `with
    lockstep.counting():`, then call `finish()` right after the recording returns."""

    def __init__(self, reference: str, warmup_steps: int = 3):
        warm = BareLoop(reference, "replay")  # allocator, caches, lazy imports
        for _ in range(warmup_steps):
            warm.step()
        self.bare_loop = BareLoop(reference, "replay")
        self.rec: list[float] = []
        self.bare: list[float] = []
        self.kinds: list[str] = []
        self.finish_s = 0.0
        self.counter = _Counted()
        self._last: float | None = None
        self._snapshot = None

    def counting(self) -> _Counted:
        return self.counter

    def __call__(self, _engine) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.rec.append(now - self._last)
            t0 = time.perf_counter()
            self.bare_loop.step()
            self.bare.append(time.perf_counter() - t0)
            after = self.counter.snapshot()
            first = self._snapshot
            writing = first[0] != first[1] or after[0] != after[1]  # a write in flight at either end
            if not self.kinds:
                self.kinds.append("setup")
            elif writing or first[:3] != after[:3]:
                self.kinds.append("checkpoint")
            elif first[3] != after[3]:
                self.kinds.append("epoch")
            else:
                self.kinds.append("clean")
        self._snapshot = self.counter.snapshot()
        self._last = time.perf_counter()

    def finish(self) -> None:
        """The time from the last callback to the end of the run: the last rows, the last
        checkpoint (submitted and waited for) and marking the run complete."""
        self.finish_s = time.perf_counter() - self._last

    def summary(self, checkpoint_every: int) -> dict:
        """Milliseconds and fractions of the bare step (see the module docstring).

        per_step_ms: median over clean steps of (recorded - bare), the fixed cost of a step;
        per_checkpoint_ms: the checkpoint steps' excess over a clean recorded step (the
          background write competes with training for the cores) over the checkpoints whose
          work falls in them (all but the last, which is in finish_ms);
        per_epoch_ms: the epoch-record steps' excess, per epoch record;
        steady_state: per-step cost plus one checkpoint per `checkpoint_every` steps plus the
          epoch records at the rate this run made them, over the bare step;
        run_overhead: the whole lockstep run (setup and finish included) over its bare steps."""
        pairs = [(r, b) for r, b, k in zip(self.rec, self.bare, self.kinds) if k == "clean"]
        if not pairs:  # a smoke run too short for a clean step: compare every step instead
            pairs = list(zip(self.rec, self.bare))
        bare = statistics.median(b for _, b in pairs)
        rec_clean = statistics.median(r for r, _ in pairs)
        per_step = statistics.median(r - b for r, b in pairs)

        def excess(kind: str) -> float:
            return sum(r - rec_clean for r, k in zip(self.rec, self.kinds) if k == kind)

        kinds = {k: self.kinds.count(k) for k in ("setup", "clean", "checkpoint", "epoch")}
        checkpoints = self.counter.finished
        per_checkpoint = excess("checkpoint") / max(checkpoints - 1, 1)
        epochs = self.counter.epochs
        per_epoch = excess("epoch") / max(epochs, 1)
        n = len(self.rec)
        steady = per_step + per_checkpoint / checkpoint_every + per_epoch * epochs / n
        total_rec = sum(self.rec) + self.finish_s
        return {
            "steps": n, "kinds": kinds, "checkpoints": checkpoints, "epoch_records": epochs,
            "bare_ms": 1e3 * bare, "recorded_clean_ms": 1e3 * rec_clean, "per_step_ms": 1e3 * per_step,
            "per_step": per_step / bare,
            "setup_ms": 1e3 * (self.rec[0] - rec_clean) if self.rec else 0.0,
            "per_checkpoint_ms": 1e3 * per_checkpoint, "per_epoch_ms": 1e3 * per_epoch,
            "finish_ms": 1e3 * self.finish_s, "steady_state_ms": 1e3 * steady, "steady_state": steady / bare,
            "run_overhead": total_rec / sum(self.bare) - 1,
        }


def lockstep_recording(reference: str, steps: int, checkpoint_every: int | None = None) -> Lockstep:
    """One default recording with a bare step after each of its steps."""
    lockstep = Lockstep(reference)
    with lockstep.counting(), tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
        RecordSession(reference, Path(tmp) / "run", steps=steps, checkpoint_every=checkpoint_every,
                      progress=False).run(observe=lockstep)
        lockstep.finish()
    return lockstep


def median_of(dicts: list[dict], key: str) -> float:
    return statistics.median(d[key] for d in dicts)


# ------------------------------------------------------------------------ breakdown ----

PARTS = {
    "rng": "RNG contract: per-step seeding and stream generators",
    "kernel_fp": "fingerprints inside the optimizer kernel (fingerprint=True vs False)",
    "engine_fp": "fingerprints assembled by the engine (Engine.fingerprints, digest_of)",
    "ledger": "ledger: rows, SQLite transactions, epoch hashes",
    "ckpt_main": "checkpoints, main thread: state_dict, snapshot copy, waits for the writer",
    "setup": "run setup and finish: manifest, run directory, mark complete",
    "rest": "engine and session bookkeeping, the rest",
}


class Parts:
    """Exclusive wall time per category of wrapped functions on the main thread, and the wall
    time of each call of the background checkpoint writer."""

    def __init__(self):
        self.main: dict[str, float] = defaultdict(float)
        self.background: list[float] = []
        self._stack: list[list[float]] = []
        self._restore: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, category: str) -> None:
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        function = original.__func__ if isinstance(original, classmethod) else original
        parts = self

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    parts.background.append(time.perf_counter() - start)
            frame = [time.perf_counter(), 0.0]  # start, time spent in wrapped children
            parts._stack.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                parts._stack.pop()
                elapsed = time.perf_counter() - frame[0]
                parts.main[category] += elapsed - frame[1]
                if parts._stack:
                    parts._stack[-1][1] += elapsed

        self._restore.append((owner, attr, original))
        setattr(owner, attr, classmethod(wrapper) if isinstance(original, classmethod) else wrapper)

    def undo(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()


def breakdown(reference: str, steps: int, checkpoint_every: int | None = None, kernel_rounds: int = 40) -> dict:
    """Where a recording's time goes: one default recording with engine, driver and store
    functions wrapped (ms per step by part, main thread, exclusive; the program's own step and
    data are timed as 'step' and 'data' so the rest can be computed), the background writer's
    ms per checkpoint, and the optimizer kernel's fingerprints priced by an interleaved
    micro-benchmark (the same optimizer, state and gradients, fingerprint on and off)."""
    parts = Parts()

    def hook(session: RecordSession) -> None:
        session.program.step = session.program.step or default_step
        parts.wrap(session.program, "step", "step")
        parts.wrap(session.program, "make_batch", "data")

    # Names are patched where they are looked up: record_steps finds _row and _CheckpointWriter
    # in replay.driver's globals, RecordSession.run finds root_manifest in replay.session's,
    # Engine finds digest_of and make_policy in replay.engine's.
    original_make_policy = engine_module.make_policy
    try:
        parts.wrap(Engine, "seed_step", "rng")
        parts.wrap(Engine, "fingerprints", "engine_fp")
        parts.wrap(engine_module, "digest_of", "engine_fp")
        parts.wrap(driver_module, "_row", "ledger")
        for name in ("append_steps", "record_epoch", "record_checkpoint", "remove_checkpoint", "checkpoint_files",
                     "epochs", "checkpoints", "add_event"):
            parts.wrap(Ledger, name, "ledger")
        parts.wrap(Engine, "state_dict", "ckpt_main")
        for name in ("submit", "collect", "close"):
            parts.wrap(driver_module._CheckpointWriter, name, "ckpt_main")
        parts.wrap(checkpoint_module, "write_checkpoint", "ckpt_background")
        parts.wrap(session_module, "root_manifest", "setup")
        parts.wrap(RunDir, "create", "setup")
        parts.wrap(RunDir, "mark_complete", "setup")
        parts.wrap(RunDir, "close", "setup")

        def make_policy(*args, **kwargs):
            policy = original_make_policy(*args, **kwargs)
            parts.wrap(policy, "batch_ids", "data")  # the data order is the bare loop's too: not overhead
            parts.wrap(policy, "epoch_order_hash", "ledger")
            return policy

        engine_module.make_policy = make_policy
        result = recorded_run(reference, steps, checkpoint_every, session_hook=hook)
    finally:
        engine_module.make_policy = original_make_policy
        parts.undo()
    total = result["per_step"] * steps
    ms = {k: 1e3 * v / steps for k, v in parts.main.items() if k in PARTS}
    ms["rest"] = 1e3 * (total - sum(parts.main.values())) / steps
    ms["kernel_fp"] = kernel_fingerprint_ms(reference, kernel_rounds)
    return {"ms_per_step": {k: ms.get(k, 0.0) for k in PARTS},
            "program_step_ms": 1e3 * (parts.main["step"] + parts.main["data"]) / steps,
            "background_ms_per_checkpoint": statistics.median(1e3 * b for b in parts.background) if parts.background else 0.0,
            "background_writes": len(parts.background)}


def kernel_fingerprint_ms(reference: str, rounds: int) -> float:
    """Milliseconds the optimizer kernel's fingerprints add to one step of the program's model
    (their sums; turning sums into fingerprints happens in Engine.fingerprints, counted there).
    Part of the 'step' time in the breakdown, so it is priced separately."""
    program, _ = load_program(reference)
    engine = Engine(program, Engine.contract_for(program))
    for _ in range(2):  # state allocated, gradients in place
        engine.run_step()
    opt = engine.optimizer

    def step(flag: bool):
        def run():
            opt.fingerprint = flag
            opt.step()
        return run

    timing = Interleaved({"on": step(True), "off": step(False)})
    for _ in range(max(rounds, 1)):
        timing.round()
    medians = timing.medians_ms()
    return medians["on"] - medians["off"]
