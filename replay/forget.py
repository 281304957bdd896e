"""Exact forgetting: remove examples from a recorded run by replaying its tail without them.

The ledger holds the batch ids of every step, so the first step T at which any of a set of
examples was trained on is known, and nothing before T depends on them. `forget` forks the run
at T with `drop_examples` (those ids leave every batch from T on; batches shrink) and replays to
the run's end.

Semantics (tested bit for bit): the child equals a recording of the same program with the ids
dropped from every batch from step 0 (`replay record --drop-examples`), because before T the two
runs train on the same batches. What is removed is the examples' presence in batches; a program
that reads other examples than its batch (a memory bank filled from the dataset, say) is outside
what the ledger can prove.

The certificate (CERTIFICATE, JSON, in the child) states the parent (id, path, lineage digest),
the ids, the step each was first seen, the fork step, the steps replayed against the whole run,
the proof of absence (no id in any batch: before the fork from the parent's ledger, by
construction, after it from the child's; each side as a SHA-256 over the steps' batch hashes,
recomputed from the ids), the final state (digest and model fingerprints of the last step) and
the command that re-checks it. `check_certificate` (`replay verify DIR --certificate`) recomputes
every part from the runs' ledgers, checks the child's starting state against the parent's and
replays the child bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .lineage import parent_of, parent_status
from .order import batch_hash
from .store import RunDir, RunError
from .store.atomic import atomic_write_json

__all__ = [
    "CERTIFICATE", "CertificateCheck", "ForgetError", "ForgetPlan", "check_certificate", "forget",
    "parse_ids", "plan_forget", "read_ids_file", "write_certificate",
]

CERTIFICATE = "forget-certificate.json"
CERTIFICATE_FORMAT = "replay.forget-certificate"
CERTIFICATE_VERSION = 1
FORGET_EVENT = "forget"
MAX_IDS = 10**6


class ForgetError(RunError):
    """A forget that cannot be made or certified as asked (bad ids, a run that is not complete,
    ids first seen before a fork's own first step, a changed parent)."""


# ------------------------------------------------------------------------------- ids ----


def parse_ids(text: str) -> list[int]:
    """Example ids from text: integers separated by commas or whitespace, `a-b` for a closed
    range, `#` to the end of a line a comment. Sorted, without repeats; ValueError on anything
    else or on none at all."""
    if not isinstance(text, str):
        raise TypeError(f"ids must be given as text, got {type(text).__name__}")
    ids: set[int] = set()
    for line in text.splitlines():
        for token in line.split("#", 1)[0].replace(",", " ").split():
            lo, sep, hi = token.partition("-")
            try:
                a = int(lo, 10)
                b = int(hi, 10) if sep else a
            except ValueError:
                raise ValueError(f"example ids: {token!r} is not an id (an integer >= 0) or a range a-b") from None
            if b < a:
                raise ValueError(f"example ids: the range {token!r} is empty")
            if b - a + 1 + len(ids) > MAX_IDS:
                raise ValueError(f"example ids: more than {MAX_IDS} ids")
            ids.update(range(a, b + 1))
    if not ids:
        raise ValueError("example ids: none given")
    return sorted(ids)


def read_ids_file(path: str | os.PathLike) -> list[int]:
    """The ids in a file: a JSON list of integers, or the text `parse_ids` reads."""
    with open(path, "rb") as f:
        data = f.read(64 << 20)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file of example ids") from None
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path}: not a JSON list of example ids ({error})") from None
        if not isinstance(values, list) or not all(type(v) is int for v in values):
            raise ValueError(f"{path}: a JSON ids file must hold a list of integers")
        if any(v < 0 for v in values):
            raise ValueError(f"{path}: example ids are integers >= 0")
        if not values:
            raise ValueError(f"{path}: no example ids")
        return sorted(set(values))
    try:
        return parse_ids(text)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _checked_ids(ids, dataset_size: int, run) -> list[int]:
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"ids must be a list of example ids, got {type(ids).__name__}")
    ids = list(ids)
    bad = [i for i in ids if type(i) is not int or i < 0]
    if bad:
        raise ValueError(f"example ids are integers >= 0, got {bad[:5]!r}")
    if not ids:
        raise ValueError("no example ids to forget")
    outside = sorted({i for i in ids if i >= dataset_size})
    if outside:
        shown = ", ".join(map(str, outside[:8])) + (", ..." if len(outside) > 8 else "")
        raise ValueError(f"example ids {shown} are outside the dataset of {run} ({dataset_size} examples: 0..{dataset_size - 1})")
    return sorted(set(ids))


# --------------------------------------------------------------------------- history ----


@dataclass
class Segment:
    """Steps [start, end) of a run's history, recorded in the run at `path`."""

    path: Path
    run_id: str
    start: int
    end: int


def history(run_dir: str | os.PathLike, end: int | None = None) -> list[Segment]:
    """The runs whose ledgers together hold steps [0, end) of `run_dir`'s trajectory (default:
    every recorded step): the run itself from its first step, and for a fork its parent up to the
    fork step, and so on to the root. ForgetError if an ancestor is gone or changed since."""
    path = Path(run_dir)
    segments: list[Segment] = []
    while True:
        with RunDir.open(path) as run:
            manifest = run.manifest
            first = manifest.get("first_step", 0)
            last = run.ledger.last_step()
            stop = (first if last is None else last + 1) if end is None else end
            if stop > first:
                segments.append(Segment(path, manifest["run_id"], first, stop))
        lineage = manifest.get("lineage")
        if not lineage or first == 0:
            break
        parent = parent_of(path, manifest)
        status = parent_status(path)
        if status == "missing":
            raise ForgetError(f"{path} is a fork of {parent}, which is gone: its steps before {first} cannot be read")
        if status == "changed":
            raise ForgetError(f"{path} is a fork of {parent}, which changed since the fork")
        path, end = parent, first
    return segments[::-1]


def _scan(segments: list[Segment], ids: set[int]) -> tuple[dict[int, int], str, int]:
    """The first step at which each of `ids` appears in the segments' batches, a SHA-256 over
    "step:batch hash" lines of every step (the hash recomputed from the ids and checked against
    the ledger's), and the number of steps read. ForgetError on a missing step or a batch hash
    that disagrees with its ids."""
    first_seen: dict[int, int] = {}
    digest = hashlib.sha256()
    count = 0
    for segment in segments:
        with RunDir.open(segment.path) as run:
            batches = run.ledger.batches(segment.start, segment.end - 1)
        expected = segment.start
        for step, batch, recorded_hash in batches:
            if step != expected:
                raise ForgetError(f"{segment.path}: the ledger lacks step {expected}")
            computed = batch_hash(batch)
            if computed != recorded_hash:
                raise ForgetError(f"{segment.path}: the batch hash of step {step} does not match its batch ids")
            for i in ids.intersection(batch):
                first_seen.setdefault(i, step)
            digest.update(f"{step}:{computed}\n".encode())
            expected += 1
            count += 1
        if expected != segment.end:
            raise ForgetError(f"{segment.path}: the ledger lacks step {expected}")
    return first_seen, digest.hexdigest(), count


# ------------------------------------------------------------------------------ plan ----


@dataclass
class ForgetPlan:
    """Where a forget of `ids` from `run` forks and how much of the run it replays."""

    run: Path
    ids: list[int]
    first_seen: dict[int, int | None]
    total: int  # steps in the run's trajectory (0..total-1)
    run_first: int  # the run's own first step (0 unless it is a fork)

    @property
    def fork_step(self) -> int | None:
        seen = [s for s in self.first_seen.values() if s is not None]
        return min(seen) if seen else None

    def share(self, step: int | None) -> float:
        """The share of the run replayed by a fork at `step` (0 if never seen)."""
        return 0.0 if step is None else (self.total - step) / self.total

    def describe(self, limit: int = 50) -> str:
        lines = [f"{self.run}: {self.total} steps; forgetting {len(self.ids)} example(s)",
                 f"{'id':>10}  {'fork step (first seen)':>22}  {'replayed':>8}"]
        for i in self.ids[:limit]:
            step = self.first_seen[i]
            seen = "never" if step is None else f"step {step}"
            replayed = "-" if step is None else f"{100 * self.share(step):.1f}%"
            lines.append(f"{i:>10}  {seen:>22}  {replayed:>8}")
        if len(self.ids) > limit:
            lines.append(f"{'...':>10}  ({len(self.ids) - limit} more ids)")
        t = self.fork_step
        if t is None:
            lines.append("the set: never seen in any batch; nothing to forget")
        else:
            lines.append(f"the set: fork at step {t}, replay steps {t}..{self.total - 1} "
                         f"({self.total - t} of {self.total} steps, {100 * self.share(t):.1f}% of the run)")
        return "\n".join(lines)


def plan_forget(run_dir: str | os.PathLike, ids) -> ForgetPlan:
    """The first step at which each id appears in `run_dir`'s batches (None: never), for a
    complete run. ValueError for ids outside the dataset; ForgetError for an incomplete run."""
    path = Path(run_dir)
    with RunDir.open(path) as run:
        manifest = run.manifest
        last = run.ledger.last_step()
        if not run.is_complete or last is None or last + 1 != manifest["steps"]:
            recorded = "no steps" if last is None else f"steps {manifest.get('first_step', 0)}..{last}"
            raise ForgetError(f"{path} is not a complete recording ({recorded} of {manifest['steps']}); "
                              f"finish it first (`replay resume {path}`)")
        ids = _checked_ids(ids, manifest["dataset_size"], path)
    segments = history(path)
    seen, _, _ = _scan(segments, set(ids))
    return ForgetPlan(path, ids, {i: seen.get(i) for i in ids}, manifest["steps"], manifest.get("first_step", 0))


# ---------------------------------------------------------------------------- forget ----


def forget(run_dir: str | os.PathLike, ids, out: str | os.PathLike, *, progress: bool = True) -> Path:
    """Fork `run_dir` at the first step any of `ids` was trained on, drop them from every batch
    from there on, replay to the run's end into `out`, and write the certificate there."""
    from .fork import ForkSession

    plan = plan_forget(run_dir, ids)
    t = plan.fork_step
    if t is None:
        raise ForgetError(f"none of the {len(plan.ids)} ids appears in any batch of {run_dir} "
                          f"(steps 0..{plan.total - 1}): the run never trained on them; nothing to forget")
    if t < plan.run_first:
        with RunDir.open(run_dir) as run:
            inherited = run.manifest["lineage"]["perturbations"]
            parent = parent_of(Path(run_dir), run.manifest)
        earlier = sorted({i for p in inherited if p.get("name") == "drop_examples" for i in p.get("ids", [])})
        hint = "" if not earlier else f" together with the ids it already dropped ({len(earlier)})"
        raise ForgetError(f"{run_dir} is a fork from step {plan.run_first}, but the ids are first seen at step {t}, "
                          f"in its parent's part of the trajectory; forget them from the parent {parent}{hint}")
    detail = {"ids": plan.ids, "first_seen": {str(i): s for i, s in plan.first_seen.items()}, "fork_step": t,
              "steps_total": plan.total}
    session = ForkSession(run_dir, t, progress=progress)
    child = session.fork(out, {"name": "drop_examples", "ids": plan.ids}, until=plan.total,
                         events=[(FORGET_EVENT, detail)])
    write_certificate(child)
    return child


def _forget_request(run: RunDir) -> dict | None:
    requests = [e["detail"] for e in run.ledger.events() if e["kind"] == FORGET_EVENT]
    return requests[-1] if requests else None


def is_forget(run_dir: str | os.PathLike) -> bool:
    """Whether a run was made by `forget` (its ledger holds the request)."""
    with RunDir.open(run_dir) as run:
        return _forget_request(run) is not None


def certificate(run_dir: str | os.PathLike) -> dict:
    """The certificate of a complete forget child, computed from its ledger and its parents'."""
    path = Path(run_dir)
    with RunDir.open(path) as run:
        manifest = run.manifest
        request = _forget_request(run)
        if request is None:
            raise ForgetError(f"{path} was not made by `replay forget` (its ledger holds no forget request)")
        last = run.ledger.last_step()
        if not run.is_complete or last is None:
            raise ForgetError(f"{path}: the forget is not complete; `replay resume {path}` finishes it "
                              "and writes the certificate")
        final = run.ledger.step_row(last)
    lineage = manifest["lineage"]
    t = lineage["fork_step"]
    drop = lineage["perturbations"][-1]
    ids = sorted(drop.get("ids", [])) if drop.get("name") == "drop_examples" else None
    if ids is None or drop.get("start") != t or ids != request.get("ids"):
        raise ForgetError(f"{path}: its last perturbation is not drop_examples of the requested ids at step {t}")
    segments = history(path)  # the parents' steps [0, T), then this run's [T, end)
    before = [s for s in segments if s.start < t]
    after = [s for s in segments if s.start >= t]
    wanted = set(ids)
    seen_before, digest_before, n_before = _scan(before, wanted)
    seen_after, digest_after, n_after = _scan(after, wanted)
    parent = parent_of(path, manifest)
    with RunDir.open(parent) as run:
        parent_steps = run.manifest["steps"]
        parent_last = run.ledger.last_step()
    # Each id's first step in the parent: [0, T) was read above; the parent's own rows from T on
    # (a parent holds every step from its own first step, which is <= T) complete it.
    parent_end = t if parent_last is None else max(t, parent_last + 1)
    seen_later, _, _ = _scan([Segment(parent, lineage["parent_id"], t, parent_end)], wanted - set(seen_before))
    first_seen = {**seen_later, **seen_before}
    from .engine import digest_of

    model = final.fingerprints.get("model", {})
    return {
        "format": CERTIFICATE_FORMAT,
        "version": CERTIFICATE_VERSION,
        "run_id": manifest["run_id"],
        "parent_id": lineage["parent_id"],
        "parent_path": lineage["parent_path"],
        "parent_digest": lineage["parent_digest"],
        "parent_steps": parent_steps,
        "ids": ids,
        "first_seen": {str(i): first_seen.get(i) for i in ids},
        "fork_step": t,
        "steps_replayed": manifest["steps"] - t,
        "steps_total": manifest["steps"],
        "share_replayed": (manifest["steps"] - t) / manifest["steps"],
        "proof": {
            "statement": "no id in `ids` appears in any batch of steps 0..steps_total-1 of this run's trajectory: "
                         "before the fork step by the parent's ledger (the fork step is the first step any of them "
                         "was seen), from it by this run's ledger",
            "before_fork": {"steps": [0, t], "steps_read": n_before, "ids_found": len(seen_before),
                            "runs": [{"run_id": s.run_id, "steps": [s.start, s.end]} for s in before],
                            "batch_hashes_sha256": digest_before},
            "after_fork": {"steps": [t, manifest["steps"]], "steps_read": n_after, "ids_found": len(seen_after),
                           "batch_hashes_sha256": digest_after},
        },
        "final_step": final.step,
        "final_model_fingerprint": f"{digest_of({'model': model}):016x}",
        "final_state_digest": f"{final.digest:016x}",
        "final_model_tensors": {k: f"{v:016x}" for k, v in sorted(model.items())},
        "command": f"replay verify {path} --certificate",
    }


def write_certificate(run_dir: str | os.PathLike) -> Path:
    """Compute the certificate of a complete forget child and write it (atomically) into it."""
    cert = certificate(run_dir)
    if any(side["ids_found"] for side in (cert["proof"]["before_fork"], cert["proof"]["after_fork"])):
        raise ForgetError(f"{run_dir}: an id to forget appears in a batch of the trajectory; no certificate written")
    target = Path(run_dir) / CERTIFICATE
    atomic_write_json(target, cert)
    return target


# ----------------------------------------------------------------------------- check ----


@dataclass
class CertificateCheck:
    """What re-checking a certificate found: one (what, ok, detail) per check."""

    path: Path
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def add(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((what, ok, detail))
        return ok

    def describe(self) -> str:
        head = "CERTIFICATE OK" if self.ok else "CERTIFICATE FAILS"
        lines = [f"{head}: {self.path / CERTIFICATE}"]
        lines += [f"  [{'ok' if ok else 'FAIL'}] {what}" + (f": {detail}" if detail else "") for what, ok, detail in self.checks]
        return "\n".join(lines)


def _read_certificate(path: Path) -> dict:
    from .store.schema import load_json

    target = path / CERTIFICATE
    if target.is_symlink() or not target.is_file():
        raise ForgetError(f"{path}: no forget certificate ({CERTIFICATE}); `replay forget` writes one")
    with open(target, "rb") as f:
        data = f.read((16 << 20) + 1)
    cert = load_json(data, target, "record")
    if not isinstance(cert, dict) or cert.get("format") != CERTIFICATE_FORMAT:
        raise ForgetError(f"{target}: not a replay forget certificate")
    if cert.get("version") != CERTIFICATE_VERSION:
        raise ForgetError(f"{target}: certificate version {cert.get('version')!r}; this replay reads version "
                          f"{CERTIFICATE_VERSION}")
    return cert


def check_certificate(run_dir: str | os.PathLike, *, progress: bool = True, **allow) -> CertificateCheck:
    """Re-check a forget certificate: recompute it from the ledgers (parent identity, first
    appearances, absence before and after the fork, the final state), check that the child
    started from the parent's recorded state at the fork step, and replay the child bit for bit."""
    from .session import ReplaySession

    path = Path(run_dir)
    report = CertificateCheck(path)
    stated = _read_certificate(path)
    try:
        recomputed = certificate(path)
    except RunError as error:
        report.add("the certificate can be recomputed from the ledgers", False, str(error).splitlines()[0])
        return report
    for keys, what in ((("run_id",), "it names this run"),
                       (("parent_id", "parent_path", "parent_digest", "parent_steps"),
                        "the parent (id, path, lineage digest) exists unchanged"),
                       (("ids",), "the ids are those the run dropped"),
                       (("first_seen",), "each id's first step, recomputed from the parent's ledger"),
                       (("fork_step",), "the fork step"),
                       (("steps_replayed", "steps_total", "share_replayed"), "the steps replayed of the whole run"),
                       (("proof",), "no id in any batch: the batch hashes before and after the fork"),
                       (("final_step", "final_model_fingerprint", "final_state_digest", "final_model_tensors"),
                        "the final model fingerprint and state digest")):
        differing = [k for k in keys if stated.get(k) != recomputed[k]]
        report.add(what, not differing, f"the certificate's {', '.join(differing)} differ from what the ledgers say"
                   if differing else "")
    seen = [s for s in recomputed["first_seen"].values() if s is not None]
    report.add("the fork step is the first step any id was seen", bool(seen) and min(seen) == recomputed["fork_step"],
               f"step {recomputed['fork_step']}")
    report.add("the child starts from the parent's recorded state", *_starts_from_parent(path, **allow))
    verify = ReplaySession(path, **allow).verify(progress=progress)
    report.add("the child replays bit for bit", verify.ok, verify.describe().splitlines()[0])
    return report


def _starts_from_parent(path: Path, **allow) -> tuple[bool, str]:
    """Whether the child's checkpoint at its fork step holds the state its parent's ledger
    recorded after step T - 1 (or, at step 0, the program's initial state)."""
    from .driver import compare_fingerprints, engine_for_run, load_run_program, restore

    with RunDir.open(path) as run:
        manifest = run.manifest
        t = manifest["lineage"]["fork_step"]
        if t not in run.checkpoint_steps():
            return False, f"no checkpoint at the fork step {t}"
        program, _ = load_run_program(run, allow.get("allow_source_change", False),
                                      allow.get("allow_environment_change", False), "verify")
        child = engine_for_run(run, program)
        restore(run, child, t)
        started = child.fingerprints(use_optimizer=False)
    parent = parent_of(path, manifest)
    with RunDir.open(parent) as run:
        if t > 0:
            row = run.ledger.step_row(t - 1)
            if row is None:
                return False, f"the parent's ledger lacks step {t - 1}"
            expected = row.fingerprints
        else:
            expected = engine_for_run(run, program).fingerprints(use_optimizer=False)
    differing = compare_fingerprints(expected, started)
    if differing:
        return False, "differs in " + "; ".join(f"{c}: {', '.join(n[:4])}" for c, n in differing.items())
    return True, f"state at step {t}"
