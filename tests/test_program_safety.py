"""A run directory is input, not code. A manifest names a program; verify, resume and fork
execute it only once the file it names hashes as recorded and defines the named attribute, and
resolving the reference executes nothing (not even a package's __init__). inspect, tree, diff,
verify --files and report never execute program code."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from replay.cli import main as cli
from replay.fork import ForkSession
from replay.program import (
    ProgramReferenceError,
    SourceChanged,
    load_program,
    resolve_reference,
)
from replay.session import RecordSession, ReplayRefused, ReplaySession
from replay.store import RunDir

HERE = Path(__file__).resolve().parent
TINY_SOURCE = (HERE / "programs" / "tiny.py").read_text()


def marked_program(folder: Path, name: str, marker: Path, body: str = TINY_SOURCE) -> Path:
    """A program file that creates `marker` when it is executed."""
    path = folder / name
    path.write_text(f"open({str(marker)!r}, 'a').close()\n" + body)
    return path


@pytest.fixture
def marked_run(tmp_path):
    marker = tmp_path / "executed"
    program = marked_program(tmp_path, "marked.py", marker)
    out = tmp_path / "run"
    RecordSession(f"{program}:program", out, steps=12, progress=False).run()
    assert marker.exists()
    marker.unlink()
    return out, program, marker


def set_program(run: Path, **changes) -> None:
    """Point the manifest at other code, as a hostile user would: through the run's own writer,
    so that the manifest stays consistent with everything the store checks."""
    with RunDir.open(run, writable=True) as r:
        r.update_manifest({"program": {**r.manifest["program"], **changes}})


def all_commands(run: Path):
    """Every command that executes a run's program."""
    yield lambda: ReplaySession(run).verify(progress=False)
    yield lambda: ForkSession(run, 5, progress=False)
    with RunDir.open(run, writable=True) as r:
        r.update_manifest({"status": "incomplete"})
    yield lambda: RecordSession.resume(run, progress=False, say=lambda m: None)


# --------------------------------------------------------------- hostile manifests -----


def test_a_path_reference_to_another_file_is_not_executed(marked_run, tmp_path):
    run, _, _ = marked_run
    evil_marker = tmp_path / "evil-executed"
    evil = marked_program(tmp_path, "evil.py", evil_marker)
    set_program(run, reference=f"{evil}:program")
    for command in all_commands(run):
        with pytest.raises(ReplayRefused, match="changed"):
            command()
    assert not evil_marker.exists()


def test_a_module_reference_executes_not_even_its_package(marked_run, tmp_path, monkeypatch):
    run, _, _ = marked_run
    package = tmp_path / "site" / "evilpkg"
    package.mkdir(parents=True)
    init_marker, module_marker = tmp_path / "init-executed", tmp_path / "module-executed"
    (package / "__init__.py").write_text(f"open({str(init_marker)!r}, 'a').close()\n")
    marked_program(package, "train.py", module_marker)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    set_program(run, reference="evilpkg.train:program")
    assert resolve_reference("evilpkg.train:program").path == str(package / "train.py")
    for command in all_commands(run):
        with pytest.raises(ReplayRefused, match="changed"):
            command()
    assert not init_marker.exists() and not module_marker.exists()
    assert "evilpkg" not in sys.modules


@pytest.mark.parametrize("as_module", [False, True])
def test_a_program_carried_inside_the_run_is_never_executed(marked_run, tmp_path, monkeypatch, as_module):
    run, _, _ = marked_run
    marker = tmp_path / "carried-executed"
    carried = marked_program(run, "carried.py", marker)  # the hash in the manifest matches it
    if as_module:
        monkeypatch.syspath_prepend(str(run))  # e.g. `python -m replay.cli verify .` from inside the run
        reference = "carried:program"
    else:
        reference = f"{carried}:program"
    set_program(run, reference=reference, sha256=resolve_reference(reference).sha256)
    for command in all_commands(run):
        with pytest.raises(ReplayRefused, match="inside the run directory"):
            command()
    assert not marker.exists()


def test_os_getpid_is_never_called(marked_run, monkeypatch):
    run, _, _ = marked_run
    calls, real_getpid = [], os.getpid

    def getpid():  # the run store calls os.getpid (its lock holds the pid): count the program loader only
        if sys._getframe(1).f_code.co_name == "load_program":
            calls.append(1)
        return real_getpid()

    monkeypatch.setattr(os, "getpid", getpid)
    assert load_program.__code__.co_name == "load_program"
    set_program(run, reference="os:getpid")
    for command in all_commands(run):
        with pytest.raises(ReplayRefused):
            command()
    # even with the hash of os.py itself, os.py does not define getpid: refused, not called
    set_program(run, reference="os:getpid", sha256=resolve_reference("os:getpid").sha256)
    for command in all_commands(run):
        with pytest.raises(ProgramReferenceError, match="does not define 'getpid'"):
            command()
    assert calls == []


def test_an_attribute_the_file_only_imports_is_refused_before_execution(marked_run, tmp_path):
    run, _, _ = marked_run
    marker = tmp_path / "importer-executed"
    importer = marked_program(tmp_path, "importer.py", marker, body="from os import getpid as program\n")
    set_program(run, reference=f"{importer}:program", sha256=resolve_reference(f"{importer}:program").sha256)
    for command in all_commands(run):
        with pytest.raises(ProgramReferenceError, match="does not define 'program'"):
            command()
    assert not marker.exists()


@pytest.mark.parametrize("reference", ["sys:exit", "no_such_module_xyz:program", "os.path.nothere:x", "os:",
                                       "os:not-a-name", "json:loads", "replay._C:program"])
def test_unresolvable_references_are_refused_without_running_anything(marked_run, reference):
    run, _, marker = marked_run
    set_program(run, reference=reference)
    with pytest.raises((ProgramReferenceError, ReplayRefused)):
        ReplaySession(run).verify(progress=False)
    assert cli(["verify", str(run), "--no-progress"]) == 2
    assert not marker.exists()


def test_defined_names_count_defs_classes_and_assignments(tmp_path):
    path = tmp_path / "names.py"
    path.write_text("import os\nfrom os import sep\na = 1\nb: int = 2\nc, (d, *e) = 1, (2, 3)\n"
                    "def f(): pass\nclass C: pass\nif True:\n    g = 1\ntry:\n    h = 1\nexcept Exception:\n    i = 1\n"
                    "def outer():\n    hidden = 1\n")
    from replay.program import check_defines

    for name in "abcdefgChi":
        check_defines(resolve_reference(f"{path}:{name}"))
    for name in ("os", "sep", "hidden", "missing"):
        with pytest.raises(ProgramReferenceError):
            check_defines(resolve_reference(f"{path}:{name}"))


def test_load_program_checks_the_hash_before_executing(tmp_path):
    marker = tmp_path / "executed"
    program = marked_program(tmp_path, "p.py", marker)
    with pytest.raises(SourceChanged):
        load_program(f"{program}:program", expected_sha256="0" * 64)
    assert not marker.exists()
    load_program(f"{program}:program", expected_sha256=resolve_reference(f"{program}:program").sha256)
    assert marker.exists()


def test_a_fork_refuses_a_program_edited_after_the_session_opened(marked_run):
    run, program, marker = marked_run
    session = ForkSession(run, 6, progress=False)
    marker.unlink()
    program.write_text(program.read_text() + "\n# edited\n")
    with pytest.raises(SourceChanged):
        session.fork(run.parent / "child", "placebo")
    assert not marker.exists()


# ----------------------------------------------------- commands that never execute -----


def test_read_only_commands_execute_no_program(marked_run, tmp_path, capsys):
    run, _, marker = marked_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert cli(["inspect", str(run)]) == 0
    assert cli(["inspect", str(run), "--json"]) == 0
    assert cli(["tree", str(tmp_path)]) == 0
    assert cli(["diff", str(run), str(other)]) == 0
    assert cli(["verify", str(run), "--files"]) == 0
    assert not marker.exists()
    # a changed program: refused before anything runs, by every command that would run it
    _, program, _ = marked_run
    program.write_text(program.read_text() + "\n# edited\n")
    assert cli(["verify", str(run), "--no-progress"]) == 2
    assert cli(["fork", str(run), "--at", "4", "--perturb", "placebo", "--out", str(tmp_path / "c"),
                "--no-progress"]) == 2
    assert not marker.exists()


def test_report_executes_no_program(tmp_path):
    sys.path.insert(0, str(HERE / "fixtures"))
    try:
        import make_results
    finally:
        sys.path.remove(str(HERE / "fixtures"))
    marker = tmp_path / "executed"
    program = marked_program(tmp_path, "p.py", marker)
    results = make_results.make_results()
    results["experiment"]["program"] = f"{program}:program"
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "results.json").write_text(json.dumps(results))
    assert cli(["report", str(exp), "--out", str(tmp_path / "report.html")]) == 0
    assert not marker.exists()
