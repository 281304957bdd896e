"""The validation layer (replay.store.schema) on hostile input: every malformed manifest,
checkpoint state, lineage or experiment spec is refused with one line naming the file and the
key path, never a traceback from json / KeyError / TypeError / RecursionError / MemoryError; the
manifest's SHA-256 is recorded in the ledger and checked on every read."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
import torch

from conftest import minimal_manifest as M  # a minimal valid manifest
from replay.experiment.spec import ExperimentSpec
from replay.store import CorruptRunError, RunDir, RunError, sha256_bytes
from replay.store.schema import (
    CHECKPOINT_FORMAT,
    MANIFEST_VERSION,
    NewerFormatError,
    SchemaError,
    check_manifest,
    load_json,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def set_meta(run_path, key: str, value: str | None) -> None:
    conn = sqlite3.connect(os.path.join(run_path, "ledger.sqlite"), isolation_level=None)
    if value is None:
        conn.execute("DELETE FROM meta WHERE key = ?", (key,))
    else:
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
    conn.close()


def write_as_writer(run_path, data: bytes) -> None:
    """A manifest written with its digest recorded, as a (hostile) writer would: the schema,
    not the digest, must refuse what is wrong with it."""
    with open(os.path.join(run_path, "manifest.json"), "wb") as f:
        f.write(data)
    set_meta(run_path, "manifest_sha256", sha256_bytes(data))


@pytest.fixture
def run_path(tmp_path):
    path = tmp_path / "run"
    RunDir.create(path, M()).close()
    return path


def refused(fn, *, match: str | None = None, cls=RunError) -> str:
    """``fn()`` raises ``cls`` (a RunError) with a one-line message; returns it."""
    with pytest.raises(cls) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and message, message
    assert not isinstance(info.value, (KeyError, TypeError, RecursionError, MemoryError))
    if match is not None:
        assert match in message, message
    return message


def full(manifest: dict) -> dict:
    return {"status": "complete", "store_version": 1, **manifest}


# ------------------------------------------------------------------------ manifests ----

REQUIRED = ["format", "version", "store_version", "status", "run_id", "first_step", "steps", "seed",
            "program", "batch_size", "dataset_size", "environment", "rng", "order", "checkpoints",
            "optimizer"]


@pytest.mark.parametrize("key", REQUIRED)
def test_a_missing_key_is_named(run_path, key):
    manifest = full(M())
    del manifest[key]
    write_as_writer(run_path, json.dumps(manifest).encode())
    message = refused(lambda: RunDir.open(run_path), match=f"key '{key}': missing", cls=SchemaError)
    assert str(run_path / "manifest.json") in message


BAD_VALUES = [
    ("steps", "30", "steps"),
    ("steps", 1e308, "steps"),
    ("steps", 10**30, "steps"),
    ("steps", 10**12, "steps"),
    ("steps", -1, "steps"),
    ("steps", True, "steps"),
    ("steps", None, "steps"),
    ("seed", "x", "seed"),
    ("seed", 2**64, "seed"),
    ("first_step", 11, "first_step"),
    ("first_step", 3, "first_step"),  # a root run starts at 0
    ("run_id", "../../etc", "run_id"),
    ("status", "done", "status"),
    ("format", "replay.other", "format"),
    ("program", "mod:prog", "program"),
    ("program", {"reference": "mod:prog"}, "program.sha256"),
    ("program", {"reference": "mod:prog", "sha256": "zz"}, "program.sha256"),
    ("program", {"reference": 5, "sha256": "0" * 64}, "program.reference"),
    ("program", {"reference": "x" * 5000, "sha256": "0" * 64}, "program.reference"),
    ("batch_size", 0, "batch_size"),
    ("environment", [], "environment"),
    ("rng", {"version": 1, "run_seed": 3}, "rng.streams"),
    ("rng", {"version": 1, "run_seed": "3", "streams": ["init"]}, "rng.run_seed"),
    ("rng", {"version": 1, "run_seed": 3, "streams": [1]}, "rng.streams[0]"),
    ("order", {"dataset_size": 16}, "order.name"),
    ("checkpoints", {"every": 0, "log_spaced": False, "counts": [0]}, "checkpoints.every"),
    ("checkpoints", {"every": 1, "log_spaced": False, "counts": [0, "30"]}, "checkpoints.counts[1]"),
    ("checkpoints", {"every": 1, "log_spaced": False, "counts": [0, 99]}, "checkpoints.counts[1]"),
    ("checkpoints", {"every": 1, "log_spaced": False, "counts": [5, 5]}, "checkpoints.counts[1]"),
    ("checkpoints", {"every": 5, "log_spaced": "no", "counts": [0]}, "checkpoints.log_spaced"),
    ("checkpoints", {"every": 5, "log_spaced": False, "counts": list(range(200_000))}, "checkpoints.counts"),
    ("optimizer", {"replay_kernel": True}, "optimizer.class"),
]


@pytest.mark.parametrize("key,value,where", BAD_VALUES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_VALUES)])
def test_a_wrong_type_or_range_is_named(run_path, key, value, where):
    write_as_writer(run_path, json.dumps(full({**M(), key: value})).encode())
    refused(lambda: RunDir.open(run_path), match=f"key '{where}'", cls=SchemaError)


def test_a_huge_step_count_is_refused_before_anything_is_allocated(run_path):
    # steps 10**9 with a checkpoint every step would be a billion-element schedule: refused
    for log_spaced in (False, True):
        manifest = full(M(steps=10**9, checkpoints={"every": 1, "log_spaced": log_spaced, "counts": [0]}))
        write_as_writer(run_path, json.dumps(manifest).encode())
        refused(lambda: RunDir.open(run_path), match="checkpoints.every", cls=SchemaError)


LINEAGE = {"parent_id": "cd" * 16, "parent_path": "../p", "parent_digest": "e" * 64, "fork_step": 5,
           "window": [5, 6], "perturbations": [{"name": "placebo", "start": 5, "window": 1}], "depth": 1}
FORK_CHECKPOINTS = {"every": 5, "log_spaced": False, "counts": [5, 10]}
BAD_LINEAGE = [
    ({"fork_step": 4}, "lineage.fork_step"),
    ({"window": [6, 5]}, "lineage.window"),
    ({"window": [5]}, "lineage.window"),
    ({"depth": 0}, "lineage.depth"),
    ({"depth": "1"}, "lineage.depth"),
    ({"perturbations": [{"start": 5}]}, "lineage.perturbations[0].name"),
    ({"perturbations": {"name": "placebo"}}, "lineage.perturbations"),
    ({"parent_path": None}, "lineage.parent_path"),
]


def test_a_valid_fork_manifest_opens(run_path):
    write_as_writer(run_path, json.dumps(full(M(first_step=5, lineage=LINEAGE, checkpoints=FORK_CHECKPOINTS))).encode())
    with RunDir.open(run_path) as run:
        assert run.manifest["lineage"]["depth"] == 1


@pytest.mark.parametrize("change,where", BAD_LINEAGE)
def test_a_malformed_lineage_is_named(run_path, change, where):
    write_as_writer(run_path, json.dumps(full(M(first_step=5, lineage={**LINEAGE, **change}, checkpoints=FORK_CHECKPOINTS))).encode())
    refused(lambda: RunDir.open(run_path), match=f"key '{where}'", cls=SchemaError)


HOSTILE_TEXT = [
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested"),
    (b"[" * 1_000_000 + b"]" * 1_000_000, "nested"),
    (b" " * (65 << 20) + b"{}", "bytes"),
    (b'{"steps": NaN}', "not valid JSON"),
    (b'{"steps": Infinity}', "not valid JSON"),
    (b'{"steps": 1e400}', "non-finite"),
    (b'{"steps": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    (b'{"steps": 1, "steps": 2}', "duplicate key"),
    (b'{"steps": "\xff"}', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b'"manifest"', "must be a JSON object"),
]


@pytest.mark.parametrize("data,match", HOSTILE_TEXT, ids=range(len(HOSTILE_TEXT)))
def test_hostile_json_is_one_line(run_path, data, match):
    write_as_writer(run_path, data)
    message = refused(lambda: RunDir.open(run_path), cls=SchemaError)
    assert match in message and len(message) < 1000, message


def test_load_json_limits_without_a_run():
    assert load_json(b'{"a": [1, 2.5, "x", null, true]}', "f.json") == {"a": [1, 2.5, "x", None, True]}
    with pytest.raises(SchemaError, match=r"f\.json: nested 33 levels deep"):
        load_json(b"[" * 33 + b"]" * 33, "f.json")
    load_json(b"[" * 32 + b"]" * 32, "f.json")
    # brackets inside strings do not count, escaped quotes included
    load_json(json.dumps({"s": "[[[[" * 100 + '\\"' + "{{" * 100}).encode(), "f.json")


@pytest.mark.parametrize("key,found", [("version", MANIFEST_VERSION + 1), ("store_version", 2)])
def test_a_newer_manifest_is_refused_clearly(run_path, key, found):
    write_as_writer(run_path, json.dumps(full({**M(), key: found})).encode())
    message = refused(lambda: RunDir.open(run_path), cls=NewerFormatError)
    assert f"written by a newer replay (format {found}); this is format 1: upgrade" in message


def test_a_newer_manifest_is_refused_before_its_other_keys_are_judged(tmp_path):
    # a newer replay may have renamed every other key: the version is what to report
    with pytest.raises(NewerFormatError, match="format 7"):
        check_manifest({"version": 7, "store_version": 1, "whatever": []}, "m.json", 1)


def test_a_newer_ledger_is_refused_clearly(run_path):
    set_meta(run_path, "version", "2")
    refused(lambda: RunDir.open(run_path), match="written by a newer replay (format 2); this is format 1", cls=NewerFormatError)


def test_a_writer_never_writes_an_invalid_manifest(tmp_path):
    with pytest.raises(SchemaError, match="key 'steps'"):
        RunDir.create(tmp_path / "r", M(steps="10"))
    assert not (tmp_path / "r").exists()
    with RunDir.create(tmp_path / "ok", M()) as run:
        before = (tmp_path / "ok" / "manifest.json").read_bytes()
        with pytest.raises(SchemaError, match="key 'seed'"):
            run.update_manifest({"seed": -1})
        assert (tmp_path / "ok" / "manifest.json").read_bytes() == before
        assert run.manifest["seed"] == 3


# ------------------------------------------------------------------- manifest digest ----


def test_the_manifest_digest_is_recorded_and_kept_up_to_date(tmp_path):
    with RunDir.create(tmp_path / "r", M()) as run:
        data = (tmp_path / "r" / "manifest.json").read_bytes()
        assert run.ledger.manifest_digests() == (sha256_bytes(data), None)
        assert run.manifest_digest_recorded
        run.update_manifest({"note": "x"})
        run.mark_complete()
        data = (tmp_path / "r" / "manifest.json").read_bytes()
        assert run.ledger.manifest_digests() == (sha256_bytes(data), None)
    with RunDir.open(tmp_path / "r") as run:
        assert run.is_complete and run.manifest["note"] == "x"


@pytest.mark.parametrize("old,new", [(b'"torch"', b'"torcx"'), (b'"steps": 10', b'"steps": 11'),
                                     (b'"mod:prog"', b'"os:getpid"'), (b"\n}", b"\n }")])
def test_an_edited_manifest_is_refused(run_path, old, new):
    path = run_path / "manifest.json"
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    message = refused(lambda: RunDir.open(run_path), match="SHA-256 mismatch", cls=CorruptRunError)
    assert str(path) in message
    path.write_bytes(data)
    RunDir.open(run_path).close()


def test_a_flipped_byte_in_a_required_key_is_refused_by_the_schema(run_path):
    path = run_path / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"seed"', b'"seee"'))
    refused(lambda: RunDir.open(run_path), match="key 'seed': missing", cls=SchemaError)


def test_a_flipped_bit_anywhere_in_the_manifest_is_refused(run_path):
    path = run_path / "manifest.json"
    data = path.read_bytes()
    for i in range(0, len(data), max(1, len(data) // 40)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(RunError):
            RunDir.open(run_path)
    path.write_bytes(data)


def test_a_manifest_replaced_while_open_is_refused_on_the_next_read(run_path):
    with RunDir.open(run_path) as run:
        assert run.manifest["seed"] == 3
        path = run_path / "manifest.json"
        path.write_bytes(path.read_bytes().replace(b'"seed": 3', b'"seed": 4'))
        with pytest.raises(CorruptRunError, match="SHA-256 mismatch"):
            run.manifest


def test_a_crash_between_the_ledger_and_the_manifest_leaves_a_readable_run(run_path):
    """update_manifest records the new digest as pending, writes the file, then makes it
    current: after a crash at either point the file on disk matches a recorded digest."""
    path = run_path / "manifest.json"
    old = path.read_bytes()
    new = json.dumps(full(M(seed=9)), indent=2, sort_keys=True).encode() + b"\n"
    set_meta(run_path, "manifest_sha256_next", sha256_bytes(new))
    RunDir.open(run_path).close()  # crashed before the file was replaced
    path.write_bytes(new)
    with RunDir.open(run_path) as run:  # crashed after
        assert run.manifest["seed"] == 9
    with RunDir.open(run_path, writable=True) as run:
        run.update_manifest({"seed": 10})
        assert run.ledger.manifest_digests()[1] is None
    path.write_bytes(old)
    with pytest.raises(CorruptRunError, match="SHA-256 mismatch"):
        RunDir.open(run_path)


def test_a_run_without_a_recorded_digest_is_read_and_flagged(run_path):
    """Runs written before the digest was recorded: read (and validated), flagged through
    manifest_digest_recorded; their writer records the digest at its next update."""
    set_meta(run_path, "manifest_sha256", None)
    with RunDir.open(run_path) as run:
        assert not run.manifest_digest_recorded
        assert run.manifest["seed"] == 3
    write_as_writer(run_path, b"{}")
    set_meta(run_path, "manifest_sha256", None)
    with pytest.raises(SchemaError):  # still validated
        RunDir.open(run_path)


def test_an_old_run_gets_its_digest_at_the_next_update(run_path):
    set_meta(run_path, "manifest_sha256", None)
    with RunDir.open(run_path, writable=True) as run:
        run.mark_complete()
        assert run.manifest_digest_recorded
    path = run_path / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"seed": 3', b'"seed": 4'))
    with pytest.raises(CorruptRunError, match="SHA-256 mismatch"):
        RunDir.open(run_path)


# ------------------------------------------------------------------ checkpoint state ----


def engine_state(completed: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "completed_steps": completed,
            "model": {"w": torch.arange(4.0)}, "optimizer": {"state": {}}, "scheduler": None,
            "ema": None, "components": {}}


def rewrite_state(run_path, step: int, transform) -> None:
    """Rewrite a checkpoint's state.json and its recorded hash consistently (a hostile writer):
    the validation, not the hash, must refuse it."""
    folder = run_path / "checkpoints" / f"step-{step:08d}"
    data = transform((folder / "state.json").read_bytes())
    (folder / "state.json").write_bytes(data)
    conn = sqlite3.connect(os.path.join(run_path, "ledger.sqlite"), isolation_level=None)
    files = json.loads(conn.execute("SELECT files FROM checkpoints WHERE step = ?", (step,)).fetchone()[0])
    files["state.json"] = sha256_bytes(data)
    conn.execute("UPDATE checkpoints SET files = ? WHERE step = ?", (json.dumps(files), step))
    conn.close()


@pytest.fixture
def ckpt_run(run_path):
    with RunDir.open(run_path, writable=True) as run:
        run.save_checkpoint(0, engine_state(0))
        run.save_checkpoint(5, engine_state(5))
        from replay.store import StepRow

        for s in range(5):
            run.ledger.append_step(StepRow(s, 0, [s], "h", None, None, {}, {"m": {"w": s}}, s))
    return run_path


def test_a_valid_checkpoint_loads(ckpt_run):
    with RunDir.open(ckpt_run) as run:
        state = run.load_checkpoint(5)
        assert state["completed_steps"] == 5 and torch.equal(state["model"]["w"], torch.arange(4.0))


@pytest.mark.parametrize("value", ["10**30", '"5"', "1e308", "5.0", "true", "null", "-1", "4", "6"])
def test_completed_steps_must_be_its_step(ckpt_run, value):
    rewrite_state(ckpt_run, 5, lambda d: d.replace(b'"completed_steps": 5', f'"completed_steps": {value}'.encode()))
    with RunDir.open(ckpt_run) as run:
        message = refused(lambda: run.load_checkpoint(5), match="completed_steps", cls=SchemaError)
        assert "step-00000005/state.json" in message


BAD_STATES = [
    (lambda d: d.replace(b'"format": 1', b'"format": 2'), "written by a newer replay (format 2); this is format 1"),
    (lambda d: d.replace(b'"format": 1', b'"format": "1"'), "key 'format'"),
    (lambda d: d.replace(b'"format": 1,', b""), "key 'format': missing"),
    (lambda d: d.replace(b'"components": {}', b'"components": []'), "key 'components'"),
    (lambda d: d.replace(b'"completed_steps"', b'"completed_stepz"'), "key 'completed_steps': missing"),
    (lambda d: d.replace(b'"scheduler": null', b'"scheduler": ' + b"[" * 10_000 + b"]" * 10_000), "nested"),
    (lambda d: d.replace(b'"ema": null', b'"ema": null, "ema": 1'), "duplicate key"),
    (lambda d: d.replace(b'"ema": null', b'"ema": 1e999'), "non-finite"),
    (lambda d: d[:-5], "not valid JSON"),
]


@pytest.mark.parametrize("transform,match", BAD_STATES, ids=range(len(BAD_STATES)))
def test_a_malformed_checkpoint_state_is_one_line(ckpt_run, transform, match):
    rewrite_state(ckpt_run, 5, transform)
    with RunDir.open(ckpt_run) as run:
        refused(lambda: run.load_checkpoint(5), match=match)


def test_a_checkpoint_must_follow_its_ledger_rows(ckpt_run):
    conn = sqlite3.connect(os.path.join(ckpt_run, "ledger.sqlite"), isolation_level=None)
    conn.execute("DELETE FROM steps WHERE step = 4")
    conn.close()
    with RunDir.open(ckpt_run) as run:
        refused(lambda: run.load_checkpoint(5), match="no ledger row of step 4")
        run.load_checkpoint(0)  # the first step needs no row before it


def test_a_tampered_checkpoint_is_refused_by_verify_and_fork(tmp_path):
    """End to end: a consistent hash but completed_steps 30 (or "30", 1e308): verify and fork
    refuse in one line instead of replaying nothing."""
    from replay.fork import ForkSession
    from replay.session import RecordSession, ReplaySession

    out = tmp_path / "r"
    RecordSession(os.path.join(REPO, "tests", "programs", "tiny.py") + ":program", out, steps=12,
                  checkpoint_every=10, progress=False).run()
    for value in (b"10" + b"0" * 30, b'"30"', b"1e308"):
        original = (out / "checkpoints" / "step-00000010" / "state.json").read_bytes()
        rewrite_state(out, 10, lambda d: d.replace(b'"completed_steps": 10', b'"completed_steps": ' + value))
        report = ReplaySession(out).verify(start=10, progress=False)
        assert not report.ok and len(report.damaged) == 1
        assert "completed_steps" in report.damaged[0] and "\n" not in report.damaged[0]
        refused(lambda: ForkSession(out, 10, progress=False).fork(tmp_path / "child", "placebo", steps=1),
                match="completed_steps")
        assert not (tmp_path / "child").exists()
        rewrite_state(out, 10, lambda d: original)
    assert ReplaySession(out).verify(start=10, progress=False).ok


# ------------------------------------------------------------------ experiment specs ----


def spec(**changes) -> dict:
    return {"program": "tests/programs/tiny.py:program", "seeds": [0, 1], "fork_steps": [5],
            "arms": [{"name": "placebo", "perturb": "placebo"}], "horizons": [0, 2],
            "probe": {"source": "x:y"}, **changes}


BAD_SPECS = [
    ({"seeds": list(range(10_001))}, "seeds"),
    ({"seeds": [0, -1]}, "seeds[1]"),
    ({"seeds": [0, "1"]}, "seeds[1]"),
    ({"seeds": 1_000_000_000}, "seeds"),
    ({"fork_steps": [10**12]}, "fork_steps[0]"),
    ({"horizons": [0, 10**10]}, "horizons[1]"),
    ({"horizons": list(range(10_001))}, "horizons"),
    ({"steps": 10**12}, "steps"),
    ({"name": "x" * 300}, "name"),
    ({"program": "p" * 5000}, "program"),
    ({"arms": [{"name": "a", "perturb": "placebo"}] * 1001}, "arms"),
    ({"arms": [{"name": "a", "perturb": "placebo", "window": 10**12}]}, "arms[0].window"),
    ({"probe": {"source": "x:y", "deep": json.loads("[" * 100 + "]" * 100)}}, "nested"),
    ({"probe": {"source": "x" * 100_000}}, "characters"),
]


@pytest.mark.parametrize("changes,match", BAD_SPECS, ids=range(len(BAD_SPECS)))
def test_spec_limits(changes, match):
    with pytest.raises(ValueError) as info:
        ExperimentSpec(**spec(**changes))
    assert isinstance(info.value, SchemaError)
    message = str(info.value)
    assert "\n" not in message and match in message and message.startswith("experiment spec: ")


def test_a_valid_spec_passes():
    assert ExperimentSpec(**spec()).seeds == [0, 1]


def test_a_toml_spec_names_its_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('program = "p.py:program"\nseeds = [0, -1]\nfork_steps = [5]\nhorizons = [0]\n'
                    '[probe]\nsource = "x:y"\n[[arms]]\nname = "placebo"\nperturb = "placebo"\n')
    with pytest.raises(SchemaError, match=rf"{path}: key 'seeds\[1\]'"):
        ExperimentSpec.from_toml(path)
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError):  # nested too deeply, never a RecursionError
        ExperimentSpec.from_toml(path)
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(SchemaError, match="1 MiB"):
        ExperimentSpec.from_toml(path)


# ------------------------------------------------------------------------ ledger columns ----

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("column", ["batch_ids", "metrics", "fingerprints"])
def test_a_deeply_nested_ledger_column_is_one_line(ckpt_run, column):
    conn = sqlite3.connect(os.path.join(ckpt_run, "ledger.sqlite"), isolation_level=None)
    conn.execute(f"UPDATE steps SET {column} = ? WHERE step = 3", (DEEP,))
    conn.close()
    with RunDir.open(ckpt_run) as run:
        message = refused(lambda: run.ledger.rows(), match="row of step 3", cls=CorruptRunError)
        assert "nested deeper" in message
        assert run.ledger.step_row(2).step == 2


def test_deeply_nested_checkpoint_records_and_events_are_one_line(ckpt_run):
    conn = sqlite3.connect(os.path.join(ckpt_run, "ledger.sqlite"), isolation_level=None)
    conn.execute("UPDATE checkpoints SET files = ? WHERE step = 5", (DEEP,))
    conn.execute("INSERT INTO events(time, kind, detail) VALUES (0, 'x', ?)", (DEEP,))
    conn.close()
    with RunDir.open(ckpt_run) as run:
        refused(lambda: run.ledger.checkpoints(), match="checkpoint record of step 5", cls=CorruptRunError)
        refused(lambda: run.load_checkpoint(5), match="checkpoint record of step 5", cls=CorruptRunError)
        refused(lambda: run.ledger.events(), match="nested deeper", cls=CorruptRunError)
