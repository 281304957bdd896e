"""Mixed precision (issue 10, item 2): Program.autocast (bf16, fp16) and Program.grad_scaler.

A bf16 run records and verifies bit for bit; an fp16 run with a GradScaler whose gradients are
inf at a known step (an inf feature in one example) records that step as skipped, leaves the
weights and the optimizer state untouched there, halves the scale, and verifies and resumes bit
for bit from the checkpoint right after it; the scaler's fork primitives change the scaler and
replay; what cannot be delivered is refused. Every comparison is on bits.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import replay
from replay import precision
from replay.engine import Engine
from replay.fork import ForkSession
from replay.perturb import PerturbationRefused, from_spec
from replay.program import load_program
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

PROGRAMS = Path(__file__).parent / "programs" / "mixed_precision.py"
SKIP = 4  # mixed_precision.OVERFLOW_STEP: the step whose batch holds the inf example


def ref(name: str) -> str:
    return f"{PROGRAMS}:{name}"


def rows(run) -> list:
    with RunDir.open(run) as r:
        return list(r.ledger.rows())


def bits(x):
    return struct.pack("<d", x)


def ledger_bits(run) -> list:
    return [(r.step, tuple(r.batch_ids), bits(r.loss), tuple(sorted((k, bits(v)) for k, v in r.metrics.items())),
             json.dumps(r.fingerprints, sort_keys=True), r.digest) for r in rows(run)]


def checkpoint_hashes(run) -> dict:
    with RunDir.open(run) as r:
        return r.ledger.checkpoints()


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "run"
    RecordSession(ref("fp16"), out, progress=False).run()
    return out


# ------------------------------------------------------------------------ validation ----


def _program(**changes):
    return replay.Program(model=lambda: torch.nn.Linear(2, 2), dataset=(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)),
                          loss=F.cross_entropy, batch_size=2, **changes)


def test_program_refuses_bad_precision_options():
    for bad in ("fp32", "bfloat16", "BF16", torch.bfloat16, True, 16, ""):
        with pytest.raises(ValueError, match="autocast"):
            _program(autocast=bad)
    for bad in ("yes", 1, [1], {"enabled": True}, {"init_scale": 0}, {"init_scale": math.inf},
                {"init_scale": 0.1},  # not a float32 value: the scale would be rounded on its first step
                {"growth_factor": 1.0}, {"backoff_factor": 1.0}, {"backoff_factor": 0}, {"growth_interval": 0},
                {"growth_interval": 2.0}, {"growth_interval": True}):
        with pytest.raises(ValueError, match="grad_scaler"):
            _program(autocast="fp16", grad_scaler=bad)
    assert precision.scaler_arguments(True) == precision.SCALER_DEFAULTS
    assert precision.scaler_arguments({"growth_interval": 3})["growth_interval"] == 3
    assert precision.scaler_arguments(False) is None


def test_autocast_refuses_where_torch_would_only_warn(monkeypatch):
    # torch.autocast on CPU with a dtype it does not support warns and runs in float32.
    monkeypatch.setitem(precision.AUTOCAST_DTYPES, "fp64", torch.float64)
    with pytest.raises(RuntimeError, match="does not autocast to torch.float64"):
        with precision.autocast("cpu", "fp64"):
            pass
    assert not torch.is_autocast_enabled("cpu")  # nothing left switched on
    with pytest.raises(RuntimeError, match="no autocast for device type 'meta'"):
        with precision.autocast("meta", "bf16"):
            pass
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):  # torch 2.13's CPU has both
        with precision.autocast("cpu", name):
            assert torch.nn.Linear(2, 2)(torch.zeros(1, 2)).dtype == dtype


def test_replay_optim_refuses_low_precision_parameters():
    """fp32 master weights (master_weights=True) are not implemented: bf16/fp16 parameters are
    refused when added, and at step() when they became low precision afterwards."""
    for cls in (replay.optim.SGD, replay.optim.Adam, replay.optim.AdamW):
        for dtype in (torch.bfloat16, torch.float16):
            with pytest.raises(TypeError, match="master_weights"):
                cls(torch.nn.Linear(2, 2).to(dtype).parameters(), lr=0.1)
            model = torch.nn.Linear(2, 2)
            opt = cls(model.parameters(), lr=0.1)
            model.to(dtype)  # the same Parameter objects, now low precision
            model(torch.zeros(1, 2, dtype=dtype)).sum().backward()
            with pytest.raises(TypeError, match="master_weights"):
                opt.step()


# ---------------------------------------------------------------------------- bf16 ----


def test_bf16_autocast_records_and_verifies(tmp_path):
    run, plain = tmp_path / "bf16", tmp_path / "float32"
    RecordSession(ref("bf16"), run, progress=False).run()
    RecordSession(ref("float32"), plain, progress=False).run()
    recorded, reference = rows(run), rows(plain)
    assert [r.batch_ids for r in recorded] == [r.batch_ids for r in reference]
    assert bits(recorded[0].loss) != bits(reference[0].loss)  # autocast did run the forward pass in bf16
    assert recorded[0].loss == pytest.approx(reference[0].loss, rel=2e-2)
    assert "scaler" not in recorded[0].fingerprints and "loss_scale" not in recorded[0].metrics
    assert ReplaySession(run).verify(progress=False).ok
    assert ReplaySession(run).verify(start=5, progress=False).ok


# ----------------------------------------------------------------- fp16 + GradScaler ----


def test_fp16_skipped_step_is_recorded_and_changes_nothing_but_the_scaler(fp16_run, tmp_path):
    recorded = rows(fp16_run)
    skipped = [r.step for r in recorded if r.metrics["scaler_skipped"] == 1.0]
    assert skipped == [SKIP] and all(r.metrics["scaler_skipped"] in (0.0, 1.0) for r in recorded)
    assert math.isnan(recorded[SKIP].loss) and math.isnan(recorded[SKIP].metrics["grad_norm"])
    before, at = recorded[SKIP - 1].fingerprints, recorded[SKIP].fingerprints
    assert at["model"] == before["model"] and at["optimizer"] == before["optimizer"]
    assert at["scaler"] != before["scaler"]
    # init_scale 2**8, growth every 4 clean steps: grown after step 3, halved by the skip at 4
    scales = [r.metrics["loss_scale"] for r in recorded]
    assert scales[:SKIP + 2] == [256.0] * SKIP + [512.0, 256.0]
    # the scale a step uses is the scale the previous step left (its fingerprint, bit for bit)
    with RunDir.open(fp16_run) as run:
        scaler = run.load_checkpoint(SKIP + 1)["scaler"]
    assert scaler == {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 4,
                      "_growth_tracker": 0}
    # Without the scaler the same program trains on the NaN gradients: every later loss is NaN.
    unscaled = tmp_path / "unscaled"
    RecordSession(ref("fp16_unscaled"), unscaled, progress=False).run()
    plain = rows(unscaled)
    assert all(math.isfinite(r.loss) for r in plain[:SKIP]) and all(math.isnan(r.loss) for r in plain[SKIP:])
    assert all(math.isfinite(r.loss) for r in recorded if r.step != SKIP)
    # Clipping saw the unscaled gradients: the norm is the unscaled run's (not 256 times it).
    assert recorded[0].metrics["grad_norm"] == pytest.approx(plain[0].metrics["grad_norm"], rel=1e-6)


def test_fp16_run_verifies_and_resumes_bit_for_bit_after_the_skipped_step(fp16_run, tmp_path):
    assert ReplaySession(fp16_run).verify(progress=False).ok
    assert ReplaySession(fp16_run).verify(start=SKIP + 1, progress=False).ok  # the checkpoint after the skip
    for cut in (SKIP + 1, 10):
        copy = tmp_path / f"cut-{cut}"
        shutil.copytree(fp16_run, copy)
        with RunDir.open(copy, writable=True) as run:
            run.truncate_after(cut - 1, keep_checkpoint=cut)
            run.update_manifest({"status": "incomplete"})
        RecordSession.resume(copy, progress=False)
        assert ledger_bits(copy) == ledger_bits(fp16_run)
        assert checkpoint_hashes(copy) == checkpoint_hashes(fp16_run)


def test_custom_step_with_ctx_autocast_and_ctx_scaler_equals_the_default_step(fp16_run, tmp_path):
    custom = tmp_path / "custom"
    RecordSession(ref("fp16_custom"), custom, progress=False).run()
    assert [r.digest for r in rows(custom)] == [r.digest for r in rows(fp16_run)]
    assert [r.metrics for r in rows(custom)][SKIP]["scaler_skipped"] == 1.0


def test_a_skipped_step_never_reports_the_kernel_fingerprints_of_an_earlier_step():
    """reset_exp_avg acts when the skipped step begins: the optimizer kernel does not run in that
    step, so what the ledger records must be the state as it is (exp_avg zero), not the kernel's
    fingerprints from the step before."""
    program, _ = load_program(ref("fp16"))
    engine = Engine(program, Engine.contract_for(program), perturbations=[from_spec("reset_exp_avg", start=SKIP)])
    for _ in range(SKIP + 2):
        record = engine.run_step()
        assert record.fingerprints == engine.fingerprints(use_optimizer=False), record.step
        if record.step == SKIP:
            assert record.metrics["scaler_skipped"] == 1.0
            assert all(torch.equal(s["exp_avg"], torch.zeros_like(s["exp_avg"])) for s in engine.optimizer.state.values())


def test_reserved_metric_names_are_refused():
    def step(ctx):
        return {"loss": torch.tensor(1.0), "loss_scale": 2.0}

    program = replay.Program(model=lambda: torch.nn.Linear(2, 2), dataset=(torch.zeros(4, 2),), step=step,
                             batch_size=2, autocast="fp16", grad_scaler=True)
    with pytest.raises(ValueError, match="loss_scale"):
        Engine(program, Engine.contract_for(program)).run_step()


def test_checkpoint_scaler_state_must_match_the_program():
    fp16, _ = load_program(ref("fp16"))
    bf16, _ = load_program(ref("bf16"))
    scaled, plain = Engine(fp16, Engine.contract_for(fp16)), Engine(bf16, Engine.contract_for(bf16))
    with pytest.raises(ValueError, match="no Program.grad_scaler"):
        plain.load_state_dict(scaled.state_dict())
    with pytest.raises(ValueError, match="holds no GradScaler state"):
        scaled.load_state_dict(plain.state_dict())
    state = scaled.state_dict()
    state["scaler"]["growth_interval"] = 5
    with pytest.raises(ValueError, match="growth_interval"):
        scaled.load_state_dict(state)


# --------------------------------------------------------------------------- forks ----


def test_scaler_primitives_fork_differ_and_replay(fp16_run, tmp_path):
    at = 7  # scale 256 (halved at 4), growth tracker 2
    parent = {r.step: r for r in rows(fp16_run)}
    session = ForkSession(fp16_run, at, progress=False)
    expected = {"reset_scaler": (256.0, 0), "scale_scaler:factor=0.25": (64.0, 2)}
    for spec, (scale, tracker) in expected.items():
        child = session.fork(tmp_path / spec.replace(":", "-"), spec, until=12)
        child_rows = {r.step: r for r in rows(child)}
        assert child_rows[at].batch_ids == parent[at].batch_ids
        assert child_rows[at].metrics["loss_scale"] == scale
        assert child_rows[at].fingerprints["scaler"] != parent[at].fingerprints["scaler"]
        if spec == "reset_scaler":  # the same scale (only the tracker restarts): the same weights
            assert child_rows[at].fingerprints["model"] == parent[at].fingerprints["model"]
        assert child_rows[11].digest != parent[11].digest
        assert ReplaySession(child).verify(progress=False).ok
        with RunDir.open(child) as run:  # the checkpoint at the fork step holds the parent's scaler
            assert run.load_checkpoint(at)["scaler"]["_growth_tracker"] == 2
        engine = session._child_engine(session.perturbations(spec, 1))
        engine.run_step()
        state = engine.scaler.state_dict()
        # after step `at` (clean): tracker + 1
        assert (state["scale"], state["_growth_tracker"]) == (scale, tracker + 1)


def test_scaler_primitives_are_refused_without_a_scaler_and_validate_their_spec(tmp_path):
    run = tmp_path / "bf16"
    RecordSession(ref("bf16"), run, progress=False, steps=4, checkpoint_every=2).run()
    for spec in ("reset_scaler", "scale_scaler:factor=2"):
        with pytest.raises(PerturbationRefused, match="no loss scaler"):
            ForkSession(run, 2, progress=False).fork(tmp_path / spec.replace(":", "-"), spec)
    for bad in ("scale_scaler", "scale_scaler:factor=0", "scale_scaler:factor=-1", "scale_scaler:factor=nan",
                "scale_scaler:factor=inf", "reset_scaler:factor=2"):
        with pytest.raises(ValueError, match="scale"):
            from_spec(bad)


def test_a_checkpoint_scaler_state_is_validated_before_it_is_loaded(fp16_run):
    from replay.store.schema import SchemaError, check_checkpoint_state

    with RunDir.open(fp16_run) as run:
        folder = Path(run.checkpoints_dir) / f"step-{SKIP + 1:08d}"
    skeleton = json.loads((folder / "state.json").read_text())
    check_checkpoint_state(skeleton, folder, SKIP + 1)  # as written: accepted
    for key, bad in (("scale", "256"), ("scale", -1.0), ("backoff_factor", 2.0), ("growth_interval", 0),
                     ("_growth_tracker", 1.5), ("extra", 1)):
        broken = json.loads(json.dumps(skeleton))
        broken["scaler"][key] = bad
        with pytest.raises(SchemaError, match="scaler"):
            check_checkpoint_state(broken, folder, SKIP + 1)
