"""A fork acting on one micro-step (issue 10, item 4): a perturbation with `micro_step=i` acts
just before micro-batch i of the fork step (Program.accumulate micro-batches), not when the step
begins. Known answers: what is only read by the optimizer step (momentum) gives the same bits
whichever micro-step it is reset before; the weights, read by every micro-batch's forward, give
the step-start result before micro-batch 0 and another one before micro-batch 2; the placebo
changes nothing. Every child verifies bit for bit; misuse is refused with the reason."""

from pathlib import Path

import pytest
import torch

from replay.fork import ForkSession
from replay.perturb import PerturbationRefused, from_spec
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

PROGRAMS = Path(__file__).parent / "programs" / "clipped.py"


def digests(run):
    with RunDir.open(run) as r:
        return [(row.step, row.digest) for row in r.ledger.rows()]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "parent"
    RecordSession(f"{PROGRAMS}:accumulate_3", out, seed=2, progress=False).run()
    return out


def fork(parent, out, spec):
    ForkSession(parent, 12, progress=False).fork(out, spec, steps=4)
    return digests(out)


def test_the_manifest_records_the_split(parent, capsys):
    with RunDir.open(parent) as run:
        assert run.manifest["accumulate"] == 3
    from replay.cli import main

    assert main(["inspect", str(parent)]) == 0
    assert "3 micro-batches a step" in capsys.readouterr().out


def test_micro_step_forks_have_the_known_answers_and_replay(parent, tmp_path):
    plain = digests(parent)
    parent_tail = [d for d in plain if d[0] >= 12][:4]
    assert fork(parent, tmp_path / "placebo1", "placebo:micro_step=1") == parent_tail
    momentum = fork(parent, tmp_path / "m", "reset_momentum")
    for i in (0, 2):  # momentum is read only by the optimizer step, after every micro-batch
        assert fork(parent, tmp_path / f"m{i}", f"reset_momentum:micro_step={i}") == momentum
    assert momentum != parent_tail
    noise = fork(parent, tmp_path / "w", "weight_noise:std=0.05")
    assert fork(parent, tmp_path / "w0", "weight_noise:std=0.05,micro_step=0") == noise
    later = fork(parent, tmp_path / "w2", "weight_noise:std=0.05,micro_step=2")
    assert later != noise and later[0] != parent_tail[0]  # micro-batches 0, 1 saw the old weights
    for name in ("w2", "m2", "placebo1"):
        report = ReplaySession(tmp_path / name).verify(progress=False)
        assert report.ok, report.describe()
    with RunDir.open(tmp_path / "w2") as run:
        assert run.manifest["lineage"]["perturbations"][0]["micro_step"] == 2


def test_a_micro_step_beyond_the_split_is_refused(parent, tmp_path):
    with pytest.raises(PerturbationRefused, match=r"micro_step 3, but step 12 has 3 micro-batch"):
        fork(parent, tmp_path / "beyond", "weight_noise:std=0.05,micro_step=3")


def test_a_step_function_that_never_begins_micro_batches_is_refused(tmp_path):
    parent = tmp_path / "custom"
    RecordSession(f"{PROGRAMS}:custom_accumulate_3", parent, seed=2, progress=False).run()
    with pytest.raises(PerturbationRefused, match=r"ctx.begin_micro_batch\(1\)"):
        ForkSession(parent, 12, progress=False).fork(tmp_path / "child", "weight_noise:std=0.05,micro_step=1", steps=2)
    # without micro_step the same custom step forks as ever
    ForkSession(parent, 12, progress=False).fork(tmp_path / "plain", "weight_noise:std=0.05", steps=2)


@pytest.mark.parametrize("spec, message", [
    ("lr_scale:factor=2,micro_step=1", "micro_step is not supported"),
    ("swap_windows:b=5,micro_step=0", "micro_step is not supported"),
    ("weight_noise:std=0.1,micro_step=-1", "non-negative micro-batch index"),
    ("weight_noise:std=0.1,micro_step=true", "non-negative micro-batch index"),
])
def test_bad_micro_steps_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        from_spec(spec, start=3)


def test_micro_step_needs_a_window_of_one():
    with pytest.raises(ValueError, match="window must be 1"):
        from_spec("reset_bn:micro_step=1", start=3, window=4)
