"""Runs form a tree through their lineage: `tree` shows it, `diff` says where two runs part.

A child's manifest names its parent (id and relative path) and a digest of what it depends on
in the parent; `parent_status` recomputes that digest to detect a parent changed after the fork.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from .store import RunDir

MAX_DEPTH = 6  # how deep `tree` looks for run directories below the folder it is given


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories at or below `root` (folders with a manifest.json)."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if "manifest.json" in files:
            found.append(Path(folder))
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "checkpoints" and depth < MAX_DEPTH]
    return sorted(found)


def lineage_digest(run: RunDir, fork_step: int) -> str:
    """SHA-256 over what a child of `run` at `fork_step` depends on: the parent's program, seed,
    contract and order, and its ledger digests and checkpoint hashes up to the fork step."""
    import hashlib
    import json

    m = run.manifest
    h = hashlib.sha256()
    h.update(json.dumps({k: m.get(k) for k in ("program", "seed", "rng", "order", "lineage")}, sort_keys=True).encode())
    if "dropped_examples" in m:  # only when present, so digests of runs without it are unchanged
        h.update(json.dumps({"dropped_examples": m["dropped_examples"]}).encode())
    for row in run.ledger.rows(m.get("first_step", 0), fork_step - 1) if fork_step > m.get("first_step", 0) else []:
        h.update(f"{row.step}:{row.digest:016x}:{row.batch_hash}\n".encode())
    for step, files in sorted(run.ledger.checkpoints().items()):
        if step <= fork_step:
            h.update(f"{step}:{json.dumps(files, sort_keys=True)}\n".encode())
    return h.hexdigest()


def parent_of(child: str | os.PathLike, manifest: dict) -> Path:
    """Where a fork's parent lies: its lineage's parent_path, relative to the folder holding
    the child."""
    return (Path(child).resolve().parent / manifest["lineage"]["parent_path"]).resolve()


def parent_status(child: str | os.PathLike) -> str:
    """'root', 'ok', 'missing' (parent not found) or 'changed' (parent differs from the fork)."""
    child = Path(child)
    with RunDir.open(child) as run:
        manifest = run.manifest
    lineage = manifest.get("lineage")
    if not lineage:
        return "root"
    parent = parent_of(child, manifest)
    if not (parent / "manifest.json").exists():
        return "missing"
    with RunDir.open(parent) as run:
        if run.manifest.get("run_id") != lineage["parent_id"]:
            return "changed"
        return "ok" if lineage_digest(run, lineage["fork_step"]) == lineage["parent_digest"] else "changed"


def _describe(manifest: dict) -> str:
    lineage = manifest.get("lineage")
    steps = f"steps {manifest.get('first_step', 0)}..{manifest['steps']}"
    if not lineage:
        return f"{manifest['program']['reference']} seed {manifest['seed']}, {steps}"
    perturbations = ", ".join(p["name"] + ("" if p.get("window", 1) == 1 else f"[{p['window']}]")
                              for p in lineage["perturbations"][-1:] or [])
    return f"fork @{lineage['fork_step']}: {perturbations}, {steps}"


def _reason(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"the manifest lacks {error.args[0]!r}" if error.args else "the manifest lacks a key"
    if isinstance(error, (TypeError, AttributeError)):
        return f"the manifest has a value of the wrong type ({error})"
    return " ".join(str(error).split()) or type(error).__name__


def tree(root: str | os.PathLike) -> str:
    """The lineage tree of every run below `root`, as text. A run that cannot be read is flagged
    in its place and the others are still shown; a `root` that is not a folder is refused."""
    if not Path(root).is_dir():
        raise FileNotFoundError(errno.ENOENT if not Path(root).exists() else errno.ENOTDIR,
                                "no such folder" if not Path(root).exists() else "not a folder", str(root))
    runs = {}
    for path in find_runs(root):
        try:
            with RunDir.open(path) as run:
                manifest = run.manifest
            _describe(manifest)  # a manifest without the keys the tree shows is unreadable here
            runs[path] = manifest
        except Exception as error:  # a damaged run is flagged, never the end of the listing
            runs[path] = {"_error": _reason(error)}
    by_id = {m.get("run_id"): p for p, m in runs.items() if "run_id" in m}
    children: dict[Path | None, list[Path]] = {}
    for path, manifest in runs.items():
        parent_id = manifest.get("lineage", {}).get("parent_id")
        children.setdefault(by_id.get(parent_id) if parent_id else None, []).append(path)
    lines: list[str] = []

    def show(path: Path, prefix: str, last: bool, top: bool) -> None:
        manifest = runs[path]
        connector = "" if top else ("└── " if last else "├── ")
        if "_error" in manifest:
            lines.append(f"{prefix}{connector}{os.path.relpath(path, root)}  (UNREADABLE: {manifest['_error']})")
            return
        try:
            status = parent_status(path) if manifest.get("lineage") else "root"
        except Exception as error:  # the parent (or the lineage record) is damaged
            status = "unreadable"
            flag_error = _reason(error)
        flag = f"  [parent unreadable: {flag_error}]" if status == "unreadable" else {"ok": "", "root": "", "missing": "  [parent missing]", "changed": "  [PARENT CHANGED since fork]"}[status]
        if manifest.get("lineage") and manifest["lineage"].get("parent_id") not in by_id and status == "ok":
            flag = "  [parent outside this folder]"
        incomplete = "" if manifest.get("status") == "complete" else "  (incomplete)"
        lines.append(f"{prefix}{connector}{os.path.relpath(path, root)}  {_describe(manifest)}{incomplete}{flag}")
        kids = children.get(path, [])
        for i, kid in enumerate(kids):
            show(kid, prefix + ("" if top else ("    " if last else "│   ")), i == len(kids) - 1, False)

    for top in children.get(None, []):  # roots, and runs whose parent is outside `root`
        show(top, "", True, True)
    return "\n".join(lines) if lines else f"no runs below {root}"


@dataclass
class RunDiff:
    """Where two runs' ledgers part: the first step whose digest differs, and per component the
    first step where its fingerprints differ (and which tensors differ there)."""

    common: tuple[int, int] | None
    first_step: int | None = None
    components: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    batches: int | None = None

    def describe(self) -> str:
        if self.common is None:
            return "the runs have no step in common"
        if self.first_step is None:
            return f"identical over steps {self.common[0]}..{self.common[1]}"
        lines = [f"first difference at step {self.first_step} (common steps {self.common[0]}..{self.common[1]})"]
        if self.batches is not None:
            lines.append(f"  batches part at step {self.batches}")
        for component, (step, names) in sorted(self.components.items(), key=lambda kv: (kv[1][0], kv[0])):
            shown = ", ".join(names[:6]) + (f", ... ({len(names)})" if len(names) > 6 else "")
            lines.append(f"  {component:<20} from step {step}: {shown}")
        return "\n".join(lines)


def diff(a: str | os.PathLike, b: str | os.PathLike) -> RunDiff:
    from .driver import compare_fingerprints

    with RunDir.open(a) as ra, RunDir.open(b) as rb:
        rows_a = {r.step: r for r in ra.ledger.rows()}
        rows_b = {r.step: r for r in rb.ledger.rows()}
    steps = sorted(set(rows_a) & set(rows_b))
    if not steps:
        return RunDiff(common=None)
    result = RunDiff(common=(steps[0], steps[-1]))
    for t in steps:
        x, y = rows_a[t], rows_b[t]
        if x.digest != y.digest and result.first_step is None:
            result.first_step = t
        if x.batch_ids != y.batch_ids and result.batches is None:
            result.batches = t
        for component, names in compare_fingerprints(x.fingerprints, y.fingerprints).items():
            result.components.setdefault(component, (t, names))
    return result
