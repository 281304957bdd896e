"""Exact forgetting (issue 13): `replay forget`, its certificate and `verify --certificate`.

The semantics under test: a forget equals a full recording of the same program with the ids
dropped from every batch from step 0 (`record --drop-examples`), bit for bit, for ids first seen
early and late, on the examples; the certificate's every part is recomputed from the ledgers and a
tampered one fails; a forget that stops is finished by `replay resume`, certificate included.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from replay.cli import main
from replay.engine import digest_of
from replay.forget import (
    CERTIFICATE,
    ForgetError,
    check_certificate,
    forget,
    parse_ids,
    plan_forget,
    read_ids_file,
)
from replay.session import RecordSession
from replay.store import RunDir

from conftest import QUEUE, ROOT, TINY, flat_tensors

MLP = str(ROOT / "examples" / "digits_mlp.py") + ":program"
CONTRASTIVE = str(ROOT / "examples" / "contrastive.py") + ":program"


def run_main(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def batches(run_dir) -> dict[int, list[int]]:
    with RunDir.open(run_dir) as run:
        return {step: ids for step, ids, _ in run.ledger.batches()}


def rows(run_dir) -> dict:
    with RunDir.open(run_dir) as run:
        return {r.step: r for r in run.ledger.rows()}


def first_seen_by_scan(run_dir, ids) -> dict[int, int | None]:
    """The reference: the first step of each id, by a plain scan of every row."""
    seen = {}
    for step, batch in sorted(batches(run_dir).items()):
        for i in batch:
            if i in ids:
                seen.setdefault(i, step)
    return {i: seen.get(i) for i in ids}


def first_seen_near(run_dir, share: float, count: int = 2) -> tuple[int, list[int]]:
    """(T, ids): `count` ids first seen at step T, the step nearest `share` of the run that has
    them (in a run of several epochs, ids first seen late are the ones left out of earlier
    epochs' incomplete last batches)."""
    b = batches(run_dir)
    seen, fresh = set(), {}
    for step in sorted(b):
        new = [i for i in dict.fromkeys(b[step]) if i not in seen]
        if len(new) >= count:
            fresh[step] = sorted(new[:count])
        seen.update(b[step])
    target = share * len(b)
    step = min(fresh, key=lambda s: (abs(s - target), s))
    return step, fresh[step]


def ids_first_seen_at(run_dir, share: float, count: int = 2) -> list[int]:
    """`count` ids whose first appearance is the step at `share` of the run."""
    step, ids = first_seen_near(run_dir, share, count)
    assert step == int(share * len(batches(run_dir))), f"no {count} ids are first seen at {share} of the run"
    return ids


def final_state(run_dir):
    with RunDir.open(run_dir) as run:
        return run.load_checkpoint(run.manifest["steps"])


def assert_same_bits(a, b):
    fa, fb = flat_tensors(a), flat_tensors(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = fa[key], fb[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        if x.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            x, y = x.contiguous().view(bits), y.contiguous().view(bits)
        assert torch.equal(x, y), key


def assert_forget_equals_full_recording(parent: Path, child: Path, full: Path, ids: list[int], fork_step: int):
    """Rows [0, T) of the parent, rows [T, end) of the child: the full recording's rows, bit for
    bit (batch ids, loss, metrics, every fingerprint, digest), and the final states equal."""
    p, c, f = rows(parent), rows(child), rows(full)
    assert sorted(c) == list(range(fork_step, len(f)))
    assert len(p) == len(f)
    for step, expected in f.items():
        got = p[step] if step < fork_step else c[step]
        assert got.batch_ids == expected.batch_ids, step
        assert got.batch_hash == expected.batch_hash, step
        assert got.fingerprints == expected.fingerprints, step
        assert got.digest == expected.digest, step
        assert repr(got.loss) == repr(expected.loss) and got.metrics.keys() == expected.metrics.keys(), step
        assert all(repr(got.metrics[k]) == repr(expected.metrics[k]) for k in got.metrics), step
        assert not set(ids) & set(expected.batch_ids), step
    # the forget changed something: the parent trained on the ids at T, the child did not
    assert set(ids) & set(p[fork_step].batch_ids)
    assert p[fork_step].digest != c[fork_step].digest
    assert_same_bits(final_state(child), final_state(full))


# -------------------------------------------------------------------------------- ids ----


def test_parse_ids_reads_commas_spaces_ranges_and_comments():
    assert parse_ids("3,17 40-42\n# a comment\n5  # trailing\n3") == [3, 5, 17, 40, 41, 42]
    assert parse_ids("0") == [0]


@pytest.mark.parametrize("text, message", [
    ("", "none given"), ("# only a comment", "none given"), ("3,x", "'x' is not an id"),
    ("-3", "is not an id"), ("5-2", "is empty"), ("1.5", "is not an id"), ("0-2000000", "more than"),
])
def test_parse_ids_refuses_what_is_not_ids(text, message):
    with pytest.raises(ValueError, match=message):
        parse_ids(text)


def test_ids_file_json_or_text(tmp_path):
    (tmp_path / "a.json").write_text("[9, 2, 2]")
    (tmp_path / "b.txt").write_text("1-3\n7\n")
    assert read_ids_file(tmp_path / "a.json") == [2, 9]
    assert read_ids_file(tmp_path / "b.txt") == [1, 2, 3, 7]
    for name, text, message in (("c.json", "[1, true]", "list of integers"), ("d.json", "[1, -2]", ">= 0"),
                                ("e.json", "[1,", "not a JSON list"), ("f.json", "[]", "no example ids")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_ids_file(tmp_path / name)
    (tmp_path / "g.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a text file"):
        read_ids_file(tmp_path / "g.bin")


# ---------------------------------------------------------------------------- the plan ----


def test_plan_names_each_ids_first_step_and_the_share_replayed(recorded_run):
    parent = recorded_run(TINY, seed=3)
    b = batches(parent)
    ids = sorted({b[2][0], b[2][1], b[17][-1], b[29][0]})
    never = sorted(set(range(1500)) - {i for batch in b.values() for i in batch})[:2]
    plan = plan_forget(parent, ids + never)
    assert plan.first_seen == first_seen_by_scan(parent, set(ids + never))
    assert all(plan.first_seen[i] is None for i in never)
    assert plan.fork_step == min(s for s in plan.first_seen.values() if s is not None)
    assert plan.total == 30
    assert plan.share(plan.fork_step) == (30 - plan.fork_step) / 30
    text = plan.describe()
    for i in ids:
        assert f"step {plan.first_seen[i]}" in text
    assert "never" in text and f"fork at step {plan.fork_step}" in text


def test_repeated_examples_flags_add_up(recorded_run, capsys):
    parent = recorded_run(TINY, seed=3)
    b = batches(parent)
    rc, out, _ = run_main(capsys, "forget", parent, "--examples", b[2][0], "--examples", f"{b[5][0]},{b[6][0]}",
                          "--dry-run")
    assert rc == 0 and "forgetting 3 example(s)" in out


def test_dry_run_prints_the_plan_and_writes_nothing(recorded_run, capsys, tmp_path):
    parent = recorded_run(TINY, seed=3)
    b = batches(parent)
    early, late = b[1][0], next(i for i in b[25] if i not in {j for s in range(25) for j in b[s]})
    rc, out, err = run_main(capsys, "forget", parent, "--examples", f"{early},{late}", "--dry-run",
                            "--out", tmp_path / "never-written")
    assert rc == 0, err
    assert "fork at step 1, replay steps 1..29 (29 of 30 steps, 96.7% of the run)" in out
    assert f"{late:>10}  {'step 25':>22}     16.7%" in out
    assert "fork step (first seen)" in out
    assert not (tmp_path / "never-written").exists()


# ------------------------------------------------------------------- the semantics ----


@pytest.mark.parametrize("reference, steps", [(MLP, 60), (CONTRASTIVE, 50), (TINY, None), (QUEUE, None)],
                         ids=["digits_mlp", "contrastive", "tiny", "queue_sgd"])
@pytest.mark.parametrize("when", [0.1, 0.8], ids=["early", "late"])
def test_forget_equals_a_full_recording_without_the_ids(reference, steps, when, recorded_run, tmp_path):
    overrides = {"seed": 5} if steps is None else {"seed": 5, "steps": steps}
    parent = recorded_run(reference, **overrides)
    fork_step, ids = first_seen_near(parent, when)
    assert (fork_step < len(batches(parent)) / 3) == (when < 0.5)  # early is early, late is late
    child = forget(parent, ids, tmp_path / "child", progress=False)
    full = RecordSession(reference, tmp_path / "full", progress=False, drop_examples=ids, **overrides).run()
    assert_forget_equals_full_recording(parent, child, full, ids, fork_step)
    cert = json.loads((child / CERTIFICATE).read_text())
    assert cert["fork_step"] == fork_step and cert["ids"] == ids


def test_ids_first_seen_at_different_steps_fork_at_the_earliest(recorded_run, tmp_path):
    parent = recorded_run(TINY, seed=5)
    ids = ids_first_seen_at(parent, 0.3, 1) + ids_first_seen_at(parent, 0.7, 1)
    child = forget(parent, ids, tmp_path / "child", progress=False)
    full = RecordSession(TINY, tmp_path / "full", progress=False, drop_examples=ids, seed=5).run()
    assert_forget_equals_full_recording(parent, child, full, ids, 9)


# ------------------------------------------------------------------- the certificate ----


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory):
    """A 30-step parent and a forget of two ids first seen at step 4 and one at step 20."""
    folder = tmp_path_factory.mktemp("forgotten")
    parent = RecordSession(TINY, folder / "parent", seed=7, progress=False).run()
    ids = sorted(ids_first_seen_at(parent, 4 / 30) + ids_first_seen_at(parent, 20 / 30, 1))
    child = forget(parent, ids, folder / "child", progress=False)
    return parent, child, ids


def test_certificate_states_what_the_issue_asks(forgotten):
    parent, child, ids = forgotten
    cert = json.loads((child / CERTIFICATE).read_text())
    with RunDir.open(parent) as p, RunDir.open(child) as c:
        parent_id, child_manifest = p.manifest["run_id"], c.manifest
        last = c.ledger.step_row(29)
    assert cert["format"] == "replay.forget-certificate" and cert["version"] == 1
    assert cert["run_id"] == child_manifest["run_id"]
    assert cert["parent_id"] == parent_id
    assert cert["parent_digest"] == child_manifest["lineage"]["parent_digest"]
    assert cert["ids"] == ids
    assert cert["first_seen"] == {str(i): s for i, s in first_seen_by_scan(parent, set(ids)).items()}
    assert cert["fork_step"] == 4
    assert (cert["steps_replayed"], cert["steps_total"]) == (26, 30)
    absence = cert["proof"]
    assert absence["before_fork"]["steps"] == [0, 4] and absence["before_fork"]["steps_read"] == 4
    assert absence["after_fork"]["steps"] == [4, 30] and absence["after_fork"]["steps_read"] == 26
    assert absence["before_fork"]["ids_found"] == absence["after_fork"]["ids_found"] == 0
    assert cert["final_step"] == 29
    assert cert["final_state_digest"] == f"{last.digest:016x}"
    assert cert["final_model_tensors"] == {k: f"{v:016x}" for k, v in last.fingerprints["model"].items()}
    assert cert["final_model_fingerprint"] == f"{digest_of({'model': last.fingerprints['model']}):016x}"
    assert cert["command"] == f"replay verify {child} --certificate"


def test_verify_certificate_passes_on_an_honest_forget(forgotten, capsys):
    _, child, _ = forgotten
    rc, out, err = run_main(capsys, "verify", child, "--certificate", "--no-progress")
    assert rc == 0, out + err
    assert out.startswith("CERTIFICATE OK")
    assert "[FAIL]" not in out and "the child replays bit for bit" in out


def _copy(forgotten, tmp_path):
    parent, child, ids = forgotten
    shutil.copytree(parent, tmp_path / "parent")
    shutil.copytree(child, tmp_path / "child")
    return tmp_path / "parent", tmp_path / "child", ids


@pytest.mark.parametrize("field, value", [
    ("fork_step", 5), ("ids", "drop-one"), ("steps_replayed", 30), ("first_seen", "shift"),
    ("final_model_fingerprint", "0" * 16), ("final_state_digest", "0" * 16), ("proof", "hash"), ("parent_id", "0" * 32),
])
def test_a_tampered_certificate_fails(forgotten, tmp_path, capsys, field, value):
    _, child, _ = _copy(forgotten, tmp_path)
    path = child / CERTIFICATE
    cert = json.loads(path.read_text())
    if value == "drop-one":
        cert["ids"] = cert["ids"][1:]
    elif value == "shift":
        key = next(iter(cert["first_seen"]))
        cert["first_seen"][key] += 1
    elif value == "hash":
        cert["proof"]["after_fork"]["batch_hashes_sha256"] = "0" * 64
    else:
        cert[field] = value
    path.write_text(json.dumps(cert))
    rc, out, _ = run_main(capsys, "verify", child, "--certificate", "--no-progress")
    assert rc == 1 and out.startswith("CERTIFICATE FAILS") and "[FAIL]" in out


def test_a_changed_or_missing_parent_fails_the_check(forgotten, tmp_path, capsys):
    parent, child, _ = _copy(forgotten, tmp_path)
    with RunDir.open(parent, writable=True) as run:
        run.ledger.add_event("unrelated", {})  # changes nothing the lineage digest covers
    assert check_certificate(child, progress=False).ok
    with RunDir.open(parent, writable=True) as run:
        run.truncate_after(2)  # the parent's steps before the fork are gone
    report = check_certificate(child, progress=False)
    assert not report.ok and "changed since the fork" in report.describe()
    shutil.rmtree(parent)
    rc, out, _ = run_main(capsys, "verify", child, "--certificate", "--no-progress")
    assert rc == 1 and "gone" in out


def test_no_or_hostile_certificate_is_a_clear_error(forgotten, tmp_path, capsys):
    parent, child, _ = _copy(forgotten, tmp_path)
    rc, _, err = run_main(capsys, "verify", parent, "--certificate")
    assert rc == 2 and "no forget certificate" in err
    (child / CERTIFICATE).write_text("{not json")
    rc, _, err = run_main(capsys, "verify", child, "--certificate")
    assert rc == 2 and "not valid JSON" in err
    (child / CERTIFICATE).write_text(json.dumps({"format": "something else"}))
    rc, _, err = run_main(capsys, "verify", child, "--certificate")
    assert rc == 2 and "not a replay forget certificate" in err
    (child / CERTIFICATE).unlink()
    (child / CERTIFICATE).symlink_to(tmp_path / "elsewhere.json")
    rc, _, err = run_main(capsys, "verify", child, "--certificate")
    assert rc == 2 and "no forget certificate" in err


def test_a_certificate_check_that_replays_differently_fails(forgotten, tmp_path, monkeypatch):
    """The replay is part of the check: a child whose recorded rows the program no longer
    reproduces fails it (simulated by shifting the loss of one replayed step)."""
    _, child, _ = _copy(forgotten, tmp_path)
    import replay.engine as engine_module

    original = engine_module.Engine.run_step

    def shifted(self):
        record = original(self)
        if record.step == 20:
            record.loss = record.loss + 1.0
        return record

    monkeypatch.setattr(engine_module.Engine, "run_step", shifted)
    report = check_certificate(child, progress=False)
    assert not report.ok
    assert any(what == "the child replays bit for bit" and not ok for what, ok, _ in report.checks)


# ------------------------------------------------------------------------- the CLI ----


def test_cli_forget_writes_the_child_and_certificate(recorded_run, tmp_path, capsys):
    parent = recorded_run(TINY, seed=3)
    ids = ids_first_seen_at(parent, 0.5)
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids)) + "\n")
    rc, out, err = run_main(capsys, "forget", parent, "--examples-file", tmp_path / "ids.txt", "--out",
                            tmp_path / "child", "--no-progress")
    assert rc == 0, err
    assert "forked at step 15 (the first step any was seen), replayed steps 15..29 (15 of 30, 50.0%)" in out
    assert (tmp_path / "child" / CERTIFICATE).is_file()
    assert all(not set(ids) & set(b) for b in batches(tmp_path / "child").values())


def test_cli_forget_bad_input(recorded_run, tmp_path, capsys):
    parent = recorded_run(TINY, seed=3)
    b = batches(parent)
    never = sorted(set(range(1500)) - {i for batch in b.values() for i in batch})[:3]
    cases = [
        (["--examples", "1", "--examples-file", tmp_path / "x"], "not both"),
        ([], "give the example ids"),
        (["--examples", "1500"], "outside the dataset"),
        (["--examples", "abc"], "is not an id"),
        (["--examples", ",".join(map(str, never))], "nothing to forget"),
    ]
    for extra, message in cases:
        rc, _, err = run_main(capsys, "forget", parent, *extra, "--out", tmp_path / "child")
        assert rc == 2 and message in err, (extra, err)
        assert not (tmp_path / "child").exists()
    rc, _, err = run_main(capsys, "forget", parent, "--examples", str(b[0][0]))
    assert rc == 2 and "--out" in err
    rc, _, err = run_main(capsys, "forget", parent, "--examples", str(b[0][0]), "--out", parent)
    assert rc == 2


def test_forget_refuses_an_incomplete_run(tmp_path, capsys):
    import replay.engine as engine_module

    original, calls = engine_module.Engine.run_step, []

    def interrupted(self):
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt
        return original(self)

    engine_module.Engine.run_step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            RecordSession(TINY, tmp_path / "parent", seed=1, progress=False).run()
    finally:
        engine_module.Engine.run_step = original
    rc, _, err = run_main(capsys, "forget", tmp_path / "parent", "--examples", "1", "--out", tmp_path / "c")
    assert rc == 2 and "not a complete recording" in err and "replay resume" in err


def test_a_batch_left_empty_is_refused(tmp_path):
    parent = RecordSession(TINY, tmp_path / "parent", seed=2, steps=3, progress=False).run()
    ids = batches(parent)[1]
    with pytest.raises(ValueError, match="every example of step 1's batch was dropped"):
        forget(parent, ids, tmp_path / "child", progress=False)
    assert not (tmp_path / "child").exists()


# --------------------------------------------------- forgetting again, and crashes ----


def test_forgetting_from_a_forget(forgotten, tmp_path):
    """A second request whose ids are first seen after the first forget's fork step forks the
    forget; one first seen before it is refused, naming the parent to forget from."""
    parent, child, ids = forgotten
    later = [i for i in ids_first_seen_at(child, 0.9, 3) if i not in ids][:1]
    second = forget(child, later, tmp_path / "second", progress=False)
    full = RecordSession(TINY, tmp_path / "full", progress=False, drop_examples=ids + later, seed=7).run()
    assert rows(second)[29].digest == rows(full)[29].digest
    assert_same_bits(final_state(second), final_state(full))
    assert check_certificate(second, progress=False).ok
    early = [i for i in batches(parent)[1] if i not in ids][:1]
    with pytest.raises(ForgetError, match=r"first seen at step 1, in its parent's part.*forget them from the parent"):
        forget(child, early, tmp_path / "third", progress=False)


def test_an_interrupted_forget_is_finished_by_resume(recorded_run, tmp_path, monkeypatch, capsys):
    parent = recorded_run(TINY, seed=3)
    ids = ids_first_seen_at(parent, 0.2)
    reference = forget(parent, ids, tmp_path / "reference", progress=False)
    import replay.engine as engine_module

    original, calls = engine_module.Engine.run_step, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(engine_module.Engine, "run_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        forget(parent, ids, tmp_path / "child", progress=False)
    monkeypatch.setattr(engine_module.Engine, "run_step", original)
    assert not (tmp_path / "child" / CERTIFICATE).exists()
    rc, _, err = run_main(capsys, "resume", tmp_path / "child", "--no-progress")
    assert rc == 0, err
    assert [r.digest for r in rows(tmp_path / "child").values()] == [r.digest for r in rows(reference).values()]
    cert, expected = (json.loads((d / CERTIFICATE).read_text()) for d in (tmp_path / "child", reference))
    for key in ("ids", "first_seen", "fork_step", "proof", "final_model_fingerprint", "final_model_tensors"):
        assert cert[key] == expected[key], key
    assert check_certificate(tmp_path / "child", progress=False).ok
    # complete but without its certificate (stopped just before it): resume writes it
    (tmp_path / "child" / CERTIFICATE).unlink()
    rc, _, err = run_main(capsys, "resume", tmp_path / "child", "--no-progress")
    assert rc == 0 and "wrote its certificate" in err
    assert json.loads((tmp_path / "child" / CERTIFICATE).read_text())["final_state_digest"] == expected["final_state_digest"]


# --------------------------------------------------------- record --drop-examples ----


def test_record_drop_examples_leaves_them_out_and_replays(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_main(capsys, "record", TINY, "--seed", "4", "--steps", "12", "--out", out,
                          "--drop-examples", "0-99", "500", "--no-progress")
    assert rc == 0, err
    with RunDir.open(out) as run:
        assert run.manifest["dropped_examples"] == list(range(100)) + [500]
    assert all(not set(range(100)) & set(b) and 500 not in b for b in batches(out).values())
    assert any(len(b) < 32 for b in batches(out).values())
    rc, out_text, err = run_main(capsys, "verify", out, "--no-progress")
    assert rc == 0 and out_text.startswith("OK"), out_text + err


def test_record_drop_examples_bad_ids_leave_no_run(tmp_path, capsys):
    for extra, message in ((["--drop-examples", "1500"], "outside the dataset"),
                           (["--drop-examples", "1", "--drop-examples-file", tmp_path / "f"], "not both")):
        rc, _, err = run_main(capsys, "record", TINY, "--steps", "3", "--out", tmp_path / "run", *extra)
        assert rc == 2 and message in err, err
        assert not (tmp_path / "run").exists()


def test_forget_equals_a_fork_at_step_0_that_drops_the_ids(recorded_run, tmp_path):
    """The same full retraining, made the other way: a child of step 0 with drop_examples."""
    from replay.fork import fork

    parent = recorded_run(TINY, seed=3)
    ids = ids_first_seen_at(parent, 0.5)
    child = forget(parent, ids, tmp_path / "child", progress=False)
    spec = "drop_examples:ids=" + "+".join(map(str, ids))
    whole = fork(parent, tmp_path / "whole", at=0, perturb=spec, progress=False)
    assert [r.digest for s, r in rows(whole).items() if s >= 15] == [r.digest for r in rows(child).values()]
    assert_same_bits(final_state(child), final_state(whole))


def test_forget_from_a_recording_that_already_drops_examples(tmp_path):
    """The dropped ids of the parent stay dropped: the forget equals a recording with the union."""
    first = RecordSession(TINY, tmp_path / "parent", seed=3, progress=False, drop_examples=[5, 6]).run()
    ids = ids_first_seen_at(first, 0.5)
    child = forget(first, ids, tmp_path / "child", progress=False)
    full = RecordSession(TINY, tmp_path / "full", seed=3, progress=False, drop_examples=[5, 6] + ids).run()
    assert_forget_equals_full_recording(first, child, full, ids, 15)
    assert check_certificate(child, progress=False).ok
