"""Per-op traces (issue 12): `replay trace`, `replay trace-diff`, the nondeterminism finder,
reference traces recorded inside a run and diffed by `verify`.

The programs: tests/programs/noisy_op.py (a custom op adding os.urandom noise: `--repeat`
must name it), thread_op.py (an op that depends on the thread count: `--threads` must name it),
env_nudge.py (one op changes under an environment variable: recorded without it, replayed with
it, verify diverges and the diff names that op and its module), tiny.py (clean: equal traces).
"""

from __future__ import annotations

import json
import shutil

import pytest

from replay.cli import main
from replay.session import RecordSession
from replay.store import RunDir
from replay.trace import TraceError, diff_traces, read_trace, trace_step

from conftest import PROGRAMS, TINY

NOISY = str(PROGRAMS / "noisy_op.py") + ":program"
THREADED = str(PROGRAMS / "thread_op.py") + ":program"
NUDGE = str(PROGRAMS / "env_nudge.py") + ":program"
NUDGE_LINE = f"{PROGRAMS / 'env_nudge.py'}:19"  # return torch.mul(x, factor)


def run_main(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def rows(run_dir):
    with RunDir.open(run_dir) as run:
        return [(r.step, r.digest, r.batch_ids) for r in run.ledger.rows()]


@pytest.fixture(scope="module")
def nudge_run(tmp_path_factory):
    """env_nudge recorded without REPLAY_TEST_NUDGE, with reference traces of steps 0 and 3."""
    folder = tmp_path_factory.mktemp("nudge")
    return RecordSession(NUDGE, folder / "run", progress=False, trace_steps=[0, 3]).run()


# ------------------------------------------------------------------- the trace file ----


def test_a_trace_records_every_phase_module_source_and_fingerprints(recorded_run, tmp_path, capsys):
    run = recorded_run(TINY, seed=3)
    rc, out, err = run_main(capsys, "trace", run, "--step", 12, "--out", tmp_path / "t.jsonl", "--no-progress")
    assert rc == 0, err
    assert "ops into" in out and "note:" not in out  # the step reproduced the ledger
    header, ops = read_trace(tmp_path / "t.jsonl")
    assert header["step"] == 12 and header["matches_ledger"] is True and header["diverged_before"] is None
    assert header["environment"]["torch"] and header["threads"] >= 1
    assert {op["phase"] for op in ops} == {"forward", "backward", "optimizer", "step"}
    names = [op["op"] for op in ops]
    assert any(n.startswith("replay.adam") for n in names), names  # replay's own kernels are ops too
    assert any(n.startswith("replay.ema") for n in names), names
    forward = [op for op in ops if op["phase"] == "forward"]
    assert {(op["module"], op["module_type"]) for op in forward} >= {("0", "Linear"), ("1", "BatchNorm1d"), ("4", "Linear")}
    assert all(op["source"] and op["source"].startswith(str(PROGRAMS / "tiny.py")) for op in forward)
    backward = [op for op in ops if op["phase"] == "backward"]
    assert {"aten.native_batch_norm_backward.default"} <= {op["op"] for op in backward}
    assert next(op for op in backward if op["op"] == "aten.native_batch_norm_backward.default")["module"] == "1"
    for op in ops:
        for dtype, shape, fp in op["inputs"] + op["outputs"]:
            assert isinstance(dtype, str) and all(type(n) is int for n in shape)
            assert fp is None or len(fp) == 16
    # in-place writes are outputs: the optimizer's kernel reports the parameters it wrote
    adam = next(op for op in ops if op["op"].startswith("replay.adam"))
    assert adam["outputs"], adam
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]) == {"end": True, "ops": len(ops), "matches_ledger": True, "diverged_before": None}


def test_tracing_is_deterministic_and_changes_no_bits(recorded_run, tmp_path, capsys):
    run = recorded_run(TINY, seed=3)
    for name in ("a", "b"):
        trace_step(run, 7, tmp_path / f"{name}.jsonl", progress=False)
    rc, out, _ = run_main(capsys, "trace-diff", tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert rc == 0 and "identical:" in out
    traced = RecordSession(TINY, tmp_path / "traced", seed=3, progress=False, trace_steps=[0, 5, 29]).run()
    assert rows(traced) == rows(run)  # a recording with traces equals one without, bit for bit
    assert sorted(p.name for p in (traced / "traces").iterdir()) == [
        "step-00000000.jsonl", "step-00000005.jsonl", "step-00000029.jsonl"]


# --------------------------------------------------------------- nondeterminism ----


def test_repeat_names_the_op_with_os_urandom_noise(tmp_path, capsys):
    run = RecordSession(NOISY, tmp_path / "run", progress=False).run()
    rc, out, err = run_main(capsys, "trace", run, "--step", 1, "--repeat", 2, "--no-progress")
    assert rc == 1, err
    listed = [line for line in out.splitlines() if line.startswith("  #")]
    assert len(listed) == 1 and "replay_test.noisy.default [forward] in 2 (Noisy)" in listed[0], out
    assert "noisy_op.py:" in listed[0]
    result = trace_step(run, 1, None, repeat=3, progress=False)
    assert [op["op"] for op in result.nondeterministic] == ["replay_test.noisy.default"]


def test_threads_names_the_op_that_depends_on_the_thread_count(tmp_path, capsys):
    run = RecordSession(THREADED, tmp_path / "run", progress=False).run()
    result = trace_step(run, 1, None, threads=[1, 2], progress=False)
    assert "replay_test.per_thread.default" in [op["op"] for op in result.nondeterministic]
    rc, out, _ = run_main(capsys, "trace", run, "--step", 1, "--repeat", 2, "--no-progress")
    assert rc == 0 and "every output equal across 2 repeats" in out


def test_a_clean_program_repeats_equal(recorded_run, capsys):
    rc, out, _ = run_main(capsys, "trace", recorded_run(TINY, seed=3), "--step", 3, "--repeat", 2, "--no-progress")
    assert rc == 0 and "every output equal across 2 repeats" in out


# ----------------------------------------------------------------- divergences ----


def test_verify_diffs_against_the_reference_trace_and_names_the_op(nudge_run, monkeypatch, capsys):
    rc, out, _ = run_main(capsys, "verify", nudge_run, "--no-progress")
    assert rc == 0 and out.startswith("OK")
    monkeypatch.setenv("REPLAY_TEST_NUDGE", "1")
    rc, out, err = run_main(capsys, "verify", nudge_run, "--no-progress")
    assert rc == 1, err
    assert "first divergence at step 0" in out
    assert "reference trace from the recording" in out
    assert f"origin: #6 aten.mul.Tensor [forward] in 2.scale (Scale) at {NUDGE_LINE}" in out, out
    assert "downstream:" in out


def test_trace_diff_names_the_op_across_environments(nudge_run, tmp_path, monkeypatch, capsys):
    """Step 3 restored from its checkpoint, traced without and with the variable: the same state
    before the step, so the first op whose inputs agree and outputs differ is the nudged one."""
    trace_step(nudge_run, 3, tmp_path / "recorded.jsonl", progress=False)
    monkeypatch.setenv("REPLAY_TEST_NUDGE", "1")
    trace_step(nudge_run, 3, tmp_path / "here.jsonl", progress=False)
    header, _ = read_trace(tmp_path / "here.jsonl")
    assert header["matches_ledger"] is False
    rc, out, _ = run_main(capsys, "trace-diff", tmp_path / "recorded.jsonl", tmp_path / "here.jsonl")
    assert rc == 1
    assert "origin: #" in out and "aten.mul.Tensor [forward] in 2.scale (Scale)" in out and NUDGE_LINE in out


def test_verify_without_a_reference_prints_the_trace_command(tmp_path, monkeypatch, capsys):
    run = RecordSession(NUDGE, tmp_path / "run", progress=False).run()
    monkeypatch.setenv("REPLAY_TEST_NUDGE", "1")
    rc, out, _ = run_main(capsys, "verify", run, "--no-progress")
    assert rc == 1
    assert f"replay trace {run} --step 0 --out trace-0.jsonl" in out and "replay trace-diff" in out


def test_a_damaged_reference_trace_is_named_not_used(nudge_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(nudge_run, run)
    path = run / "traces" / "step-00000000.jsonl"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    monkeypatch.setenv("REPLAY_TEST_NUDGE", "1")
    rc, out, _ = run_main(capsys, "verify", run, "--no-progress")
    assert rc == 1 and out.startswith("DAMAGED") and "step-00000000.jsonl" in out and "damaged" in out
    from replay.trace import explain_divergence  # used directly, it names the damage instead of diffing

    assert "cannot be used" in explain_divergence(run, 0)


def test_sequences_that_differ_are_aligned_past(recorded_run, tmp_path):
    run = recorded_run(TINY, seed=3)
    trace_step(run, 5, tmp_path / "a.jsonl", progress=False)
    _, a = read_trace(tmp_path / "a.jsonl")
    extra = dict(a[10], i=-1, op="aten.clone.default")
    b = a[:11] + [extra] + a[11:]
    diff = diff_traces(a, b)
    assert not diff.identical and diff.differing == 0 and diff.origin is None
    assert diff.structure == [f"only in B: ops #11..11 (aten.clone.default) in {a[10]['module']}"]
    assert "the op sequences differ in 1 place(s)" in diff.describe()
    changed = [dict(op) for op in a]
    k = next(i for i, op in enumerate(changed) if op["phase"] == "backward" and op["outputs"] and op["outputs"][0][2])
    changed[k] = dict(changed[k], outputs=[[*changed[k]["outputs"][0][:2], "0" * 16]] + changed[k]["outputs"][1:])
    diff = diff_traces(a, changed)
    assert diff.origin[0]["i"] == k


# ------------------------------------------------------------------- bad input ----


def test_trace_bad_input(recorded_run, tmp_path, capsys):
    run = recorded_run(TINY, seed=3)
    (tmp_path / "notes.txt").write_text("mine")
    cases = [
        (["--step", 30, "--out", tmp_path / "t.jsonl"], "cannot trace step 30"),
        (["--step", 1], "needs --out"),
        (["--step", 1, "--repeat", 1], "between 2 and 100"),
        (["--step", 1, "--threads", "2"], "at least two thread counts"),
        (["--step", 1, "--threads", "1,x"], "not an integer"),
        (["--step", 1, "--repeat", 2, "--threads", "1,2"], "not both"),
        (["--step", 1, "--out", tmp_path / "notes.txt"], "not a trace replay wrote"),
        (["--step", 1, "--out", run / "t.jsonl"], "inside the run"),
        (["--step", 1, "--out", tmp_path], "a folder"),
    ]
    for extra, message in cases:
        rc, _, err = run_main(capsys, "trace", run, *extra, "--no-progress")
        assert rc == 2 and message in err, (extra, err)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("content, message", [
    ("", "empty, not a trace"), ("{not json\n", "not JSON"), ('{"format": "other"}\n', "not a replay trace"),
    ('{"format": "replay.trace", "version": 9}\n', "trace version 9"),
    ('{"format": "replay.trace", "version": 1}\n', "incomplete trace"),
    ('{"format": "replay.trace", "version": 1}\n{"i": 0, "op": "x", "phase": "forward", "module": "", '
     '"source": null, "inputs": [[1, 2, 3]], "outputs": [], "external": []}\n',
     "line 2: inputs: not [dtype, shape, fingerprint]"),
])
def test_trace_diff_refuses_what_is_not_a_trace(tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    rc, _, err = run_main(capsys, "trace-diff", tmp_path / "bad.jsonl", tmp_path / "bad.jsonl")
    assert rc == 2 and message in err, err
    with pytest.raises(TraceError):
        read_trace(tmp_path / "bad.jsonl")


def test_record_trace_steps_outside_the_run_is_refused(tmp_path, capsys):
    rc, _, err = run_main(capsys, "record", TINY, "--steps", 3, "--trace-steps", "5", "--out", tmp_path / "run")
    assert rc == 2 and "outside the run's steps" in err
    assert not (tmp_path / "run").exists()


def test_verify_files_checks_the_reference_traces(nudge_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(nudge_run, run)
    rc, out, _ = run_main(capsys, "verify", run, "--files")
    assert rc == 0, out
    (run / "traces" / "step-00000003.jsonl").write_text("")
    rc, out, _ = run_main(capsys, "verify", run, "--files")
    assert rc == 1 and "step-00000003.jsonl" in out and "damaged" in out
    (run / "traces" / "step-00000003.jsonl").unlink()
    (run / "traces" / "step-00000003.jsonl").symlink_to(nudge_run / "traces" / "step-00000003.jsonl")
    rc, out, _ = run_main(capsys, "verify", run, "--files")
    assert rc == 1 and "symbolic link" in out


@pytest.mark.parametrize("example", ["contrastive", "digits_cnn"])
def test_trace_works_on_the_examples(example, tmp_path):
    from conftest import ROOT

    run = RecordSession(str(ROOT / "examples" / f"{example}.py") + ":program", tmp_path / "run", steps=4,
                        progress=False, trace_steps=[2]).run()
    result = trace_step(run, 2, tmp_path / "t.jsonl", progress=False)
    assert result.matches_ledger is True and result.ops > 20
    with RunDir.open(run) as r:
        from replay.trace import read_stored_trace

        _, stored = read_stored_trace(r, 2)
    _, here = read_trace(tmp_path / "t.jsonl")
    assert diff_traces(stored, here).identical


def test_repeat_names_noise_made_in_python(tmp_path, capsys):
    """Noise from os.urandom through numpy and torch.from_numpy is made by no op: the first op
    that reads it is named, as reading an input made outside torch's ops."""
    run = RecordSession(str(PROGRAMS / "python_noise.py") + ":program", tmp_path / "run", progress=False).run()
    rc, out, _ = run_main(capsys, "trace", run, "--step", 1, "--repeat", 2, "--no-progress")
    assert rc == 1
    listed = [line for line in out.splitlines() if line.startswith("  #")]
    assert listed and "in 2 (PythonNoise)" in listed[0] and "python_noise.py:" in listed[0], out
    assert "[an input made outside torch's ops differs]" in listed[0]
