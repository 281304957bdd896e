"""Where a command may write: the one check every `--out` goes through.

Two rules (issue 9, item 5):

1. No command writes inside an existing run except that run's own writer (`record`/`resume` of
   that run). An output path is refused when it, or any folder above it, is a run directory (it
   holds the store's ``manifest.json``) or lies in an experiment's ``runs/`` folder (the runs an
   experiment owns and reuses). Symlinks are resolved first, so a link cannot smuggle a path in.
2. No command overwrites a file it did not create unless told to (``--force``).

The refusal is an ``OutputRefused`` (a ValueError): bad input, one line, exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from .store.run import MANIFEST

__all__ = ["OutputRefused", "check_experiment_out", "check_file_out", "check_run_out", "check_trace_out", "is_experiment_dir",
           "is_run_dir", "owning_run"]

# What an experiment folder holds; a folder with only these (say `evals/` alone, from a run stopped
# before its spec.json was written) is an experiment's folder too.
_EXPERIMENT_ENTRIES = {"evals", "runs", "spec.json", "results.json", "report.html", "report.md", "report_plots"}
REPORT_MARK = b"replay audit report"  # in every HTML and Markdown page that `write_report` writes
_SNIFF = 1 << 16


class OutputRefused(ValueError):
    """An output path that would write into a run, or overwrite a file this command did not create."""


def is_run_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def is_experiment_dir(path: Path) -> bool:
    return (path / "spec.json").is_file() and ((path / "runs").is_dir() or (path / "evals").is_dir())


def _candidates(path: str | os.PathLike) -> list[Path]:
    """The path as written (made absolute) and with every symlink in it resolved."""
    literal = Path(os.path.abspath(os.fspath(path)))
    real = Path(os.path.realpath(literal))
    return [literal] if real == literal else [literal, real]


def owning_run(path: str | os.PathLike) -> Path | None:
    """The run directory or experiment `runs/` folder that `path` is, or lies in; else None."""
    for candidate in _candidates(path):
        for folder in (candidate, *candidate.parents):
            if is_run_dir(folder):
                return folder
            if folder.name == "runs" and is_experiment_dir(folder.parent):
                return folder
    return None


def _refuse_inside_run(path: str | os.PathLike, what: str) -> None:
    owner = owning_run(path)
    if owner is None:
        return
    kind = "the run" if is_run_dir(owner) else "the experiment runs folder"
    raise OutputRefused(f"--out {os.fspath(path)}: {what} would write inside {kind} {owner}; "
                        "only a run's own recording writes there; choose a folder outside it")


def check_run_out(path: str | os.PathLike) -> Path:
    """The output of `record` and `fork`: a new run directory, outside every run, not an existing
    folder with content (the store refuses that too, with RunExistsError)."""
    _refuse_inside_run(path, "a new run")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputRefused(f"--out {p}: exists and is not a folder; a run is a folder")
    return p


def check_experiment_out(path: str | os.PathLike) -> Path:
    """The output of `experiment` and `demo`: a new folder, an empty one, or an experiment folder
    (the same experiment continues there; a different spec is refused by the runner)."""
    _refuse_inside_run(path, "an experiment")
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise OutputRefused(f"--out {p}: exists and is not a folder")
        if not is_experiment_dir(p) and not {e.name for e in p.iterdir()} <= _EXPERIMENT_ENTRIES:
            raise OutputRefused(f"--out {p}: a folder with content that is not an experiment; "
                                "choose a new or empty folder")
    return p


def _made_by_report(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return REPORT_MARK in f.read(_SNIFF)
    except OSError:
        return False


def check_file_out(path: str | os.PathLike, *, force: bool = False) -> Path:
    """The output of `report`: an HTML page, its Markdown twin (same name, .md) and a folder of
    plots (<stem>_plots/, whose PNG files are replaced). Refused inside a run; refused over a file
    (or plots folder) that `report` did not write, unless `force`."""
    html = Path(path)
    md = html.with_suffix(".md")
    plots = html.with_name(html.stem + "_plots")
    for p in (html, md, plots):
        _refuse_inside_run(p, "the report")
    if html.suffix.lower() == ".md":
        raise OutputRefused(f"--out {html}: give the HTML page's name; its Markdown twin is written next to it")
    if force:
        return html
    for p in (html, md):
        if p.is_dir():
            raise OutputRefused(f"--out {html}: {p} is a folder")
        if p.exists() and not _made_by_report(p):
            raise OutputRefused(f"--out {html}: {p} exists and was not written by `replay report`; "
                                "pass --force to overwrite it")
    if plots.exists() and not (plots.is_dir() and html.exists() and _made_by_report(html)):
        raise OutputRefused(f"--out {html}: {plots} exists and does not belong to a report there; "
                            "pass --force to replace its PNG files")
    return html


TRACE_MARK = b'"format":"replay.trace"'  # in the first line of every trace replay.trace writes


def check_trace_out(path: str | os.PathLike, *, force: bool = False) -> Path:
    """The output of `trace`: one JSON-lines file. Refused inside a run, over a folder, and over
    a file that is not a trace replay wrote, unless `force`."""
    target = Path(path)
    _refuse_inside_run(target, "the trace")
    if target.is_dir():
        raise OutputRefused(f"--out {target}: a folder; give a file name")
    if target.exists() and not force:
        try:
            with open(target, "rb") as f:
                first = f.readline(_SNIFF)
        except OSError:
            first = b""
        if TRACE_MARK not in first:
            raise OutputRefused(f"--out {target}: exists and is not a trace replay wrote; pass --force to overwrite it")
    return target
