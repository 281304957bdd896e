"""Forks (issue 4): every perturbation primitive changes exactly what it declares at the fork
step, placebo forks equal their parents bit for bit on every example program, the data-order
primitives do what they say, the bit flip flips one bit, forks are deterministic (in this
process, again, and in worker processes), lineage is recorded and checked, children replay and
resume, and what cannot be done is refused.

Every comparison is exact: ledger digests and fingerprints, float bits, torch.equal on integer
views. The state right after a primitive acts at step T is observed with a probe: a
perturbation composed after the primitive (not a registered primitive), so the engine's own
hook order (check, apply, batch_ids, begin_step, end_step) runs unchanged and the probe sees the
engine as the primitive left it.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
import sqlite3
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from replay.cli import main as cli
from replay.fingerprinting import fingerprints as tensor_fingerprints
from replay.fork import ForkError, ForkSession, fork_many, lineage_digest
from replay.lineage import diff, parent_status, tree
from replay.order import make_policy
from replay.perturb import REGISTRY, Perturbation, PerturbationRefused, from_spec, parse_spec
from replay.rng import RngContract
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

from conftest import FORGETFUL, LEAKY, QUEUE, ROOT, SCALED, TINY, flat_tensors  # the test programs (see conftest.py)

T = 13  # the fork step: not a checkpoint (both parents checkpoint every 10), in the middle of epoch 0
UNTIL = 22  # children end here: past the checkpoint at 20, so replays restore inside windows
STEPS = 30  # both parents' length
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
DROPPED = list(range(0, 1500, 15))  # 100 of tiny's 1,500 examples


# ----------------------------------------------------------------------------- helpers ----


def fbits(x):
    return None if x is None else struct.pack("<d", x)


def exact_row(row):
    """Everything a ledger row holds, floats as their bits."""
    return (row.step, row.epoch, tuple(row.batch_ids), fbits(row.loss), fbits(row.lr),
            tuple(sorted((k, fbits(v)) for k, v in row.metrics.items())),
            json.dumps(row.fingerprints, sort_keys=True), row.digest)


def exact_record(record):
    """The same for an in-memory StepRecord."""
    return (record.step, record.epoch, tuple(record.ids), fbits(record.loss), fbits(record.lr),
            tuple(sorted((k, fbits(v)) for k, v in record.metrics.items())),
            json.dumps(record.fingerprints, sort_keys=True), record.digest)


def rows(run) -> dict:
    with RunDir.open(run) as r:
        return {row.step: row for row in r.ledger.rows()}


def ledger_bits(run) -> list:
    return [exact_row(row) for _, row in sorted(rows(run).items())]


def checkpoint_hashes(run) -> dict:
    with RunDir.open(run) as r:
        return r.ledger.checkpoints()


def batches(run) -> dict:
    return {step: row.batch_ids for step, row in rows(run).items()}


def manifest(run) -> dict:
    return json.loads((Path(run) / "manifest.json").read_text())


def events(run) -> list:
    with RunDir.open(run) as r:
        return r.ledger.events()


def differing(a: dict, b: dict) -> dict:
    """{component: names whose fingerprints differ} between two fingerprint dicts."""
    out = {}
    for comp in set(a) | set(b):
        x, y = a.get(comp, {}), b.get(comp, {})
        names = {n for n in set(x) | set(y) if x.get(n) != y.get(n)}
        if names:
            out[comp] = names
    return out


def int_view(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def fp_of(t: torch.Tensor) -> int:
    return tensor_fingerprints([t])[0]


class Probe(Perturbation):
    """Composed after a primitive, it records the engine as the primitive left it: the state
    right after apply() at its start step, the final batch ids, and what begin_step saw."""

    name = "probe"  # not registered: never written to a run

    def __init__(self, start: int):
        super().__init__(start)
        self.after = None
        self.state = None
        self.ids: dict[int, list[int]] = {}
        self.begin: dict[int, dict] = {}

    def apply(self, engine):
        self.after = engine.fingerprints(use_optimizer=False)
        self.state = copy.deepcopy(engine.state_dict())

    def batch_ids(self, engine, step, ids):
        self.ids[step] = list(ids)
        return ids

    def begin_step(self, engine, step):
        bn = [m for m in engine.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.begin[step] = {"lr": [g["lr"] for g in engine.optimizer.param_groups],
                            "ema_decay": None if engine.ema is None else engine.ema.decay,
                            "bn_momentum": [m.momentum for m in bn]}


def run_fork_step(session: ForkSession, spec, window: int = 1):
    """(probe, the child's record of step T, the child engine after it)."""
    primitives = session.perturbations(spec, window)
    probe = Probe(session.at)
    engine = session._child_engine(primitives + [probe])
    record = engine.run_step()
    assert probe.after is not None and record.step == session.at
    return probe, record, engine


# ------------------------------------------------------------------------------ cases ----


@dataclass
class Case:
    program: str
    spec: str
    window: int = 1
    # At T, right after apply(): {component: predicate on entry names} of exactly what changes.
    changes: dict[str, Callable[[str], bool]] = field(default_factory=dict)


def _suffix(s):
    return lambda n: n.endswith(s)


def _bn_stat(n):
    return n.split(".")[-1] in BN_STATS


def _param(n):
    return n.split(".")[-1] in ("weight", "bias")


def _everything(n):
    return True


CASES = {
    "placebo": Case(TINY, "placebo"),
    "reset_momentum": Case(QUEUE, "reset_momentum", changes={"optimizer": _suffix(".momentum_buffer")}),
    "reset_exp_avg": Case(TINY, "reset_exp_avg", changes={"optimizer": _suffix(".exp_avg")}),
    "reset_exp_avg_sq": Case(TINY, "reset_exp_avg_sq", changes={"optimizer": _suffix(".exp_avg_sq")}),
    "reset_step": Case(TINY, "reset_step", changes={"optimizer": _suffix(".step")}),
    "reset_optimizer": Case(TINY, "reset_optimizer", changes={"optimizer": lambda n: n != "_groups"}),
    "swap_optimizer": Case(QUEUE, "swap_optimizer:to=AdamW", changes={"optimizer": _everything}),
    "reset_ema": Case(TINY, "reset_ema", changes={"ema": _everything}),  # tiny's EMA lags one BN count
    "ema_decay": Case(TINY, "ema_decay:decay=0.5", 10),
    "reset_bn": Case(TINY, "reset_bn", changes={"model": _bn_stat}),
    "freeze_bn": Case(TINY, "freeze_bn", 10),
    "recompute_bn": Case(TINY, "recompute_bn:batches=4", changes={"model": _bn_stat}),
    "swap_windows": Case(TINY, "swap_windows:offset=6,w=3", 9),  # [13, 16) <-> [19, 22)
    "shuffle_window": Case(TINY, "shuffle_window", 6),
    "switch_policy": Case(TINY, "switch_policy:to=with_replacement"),
    "drop_examples": Case(TINY, "drop_examples:ids=" + "+".join(map(str, DROPPED))),
    "inject_example": Case(TINY, "inject_example:id=7", 2),
    "flush": Case(QUEUE, "flush:component=queue", changes={"component:queue": _everything}),
    # The default bit flip chooses its target from the state at T: the parameter it names changes.
    "bitflip": Case(TINY, "bitflip", changes={"model": lambda n, engine: n == engine.perturbations[0].values["param"]}),
    "weight_noise": Case(TINY, "weight_noise:std=0.01", changes={"model": _param}),
    "lr_scale": Case(TINY, "lr_scale:factor=0.5", 10),
    "reseed": Case(TINY, "reseed:stream=augment"),
    "redraw": Case(TINY, "redraw:stream=augment", 3),
    # SCALED at T: scale 1024 (grown after steps 8 and 12), growth tracker 0; init_scale 256
    "reset_scaler": Case(SCALED, "reset_scaler", changes={"scaler": lambda n: n == "scale"}),
    "scale_scaler": Case(SCALED, "scale_scaler:factor=0.5", changes={"scaler": lambda n: n == "scale"}),
}
STATE = ("model", "optimizer", "scheduler", "ema", "scaler")


def is_state(component: str) -> bool:
    return component in STATE or component.startswith("component:")


# --------------------------------------------------------------------------- fixtures ----


@pytest.fixture(scope="module")
def parents(recorded_run):
    """tiny, queue_sgd and the fp16 program, 30 steps, checkpoints every 10 (shared recordings:
    read-only)."""
    return {ref: recorded_run(ref, steps=STEPS, checkpoint_every=10) for ref in (TINY, QUEUE, SCALED)}


@pytest.fixture(scope="module")
def parent_rows(parents):
    return {ref: rows(path) for ref, path in parents.items()}


@pytest.fixture(scope="module")
def sessions(parents):
    return {ref: ForkSession(path, T, progress=False) for ref, path in parents.items()}


@pytest.fixture(scope="module")
def children(sessions, tmp_path_factory):
    """One child per primitive, forked at T and run to UNTIL, written to disk."""
    root = tmp_path_factory.mktemp("children")
    return {name: sessions[c.program].fork(root / name, c.spec, window=c.window, until=UNTIL)
            for name, c in CASES.items()}


# ------------------------------------------------------------- each primitive at T ----


def test_every_registered_primitive_has_a_case():
    assert set(CASES) == set(REGISTRY), "a new primitive needs a case in CASES (and its effect below)"
    for name, case in CASES.items():
        assert parse_spec(case.spec)["name"] == name


@pytest.mark.parametrize("name", sorted(CASES))
def test_primitive_changes_exactly_what_it_declares_at_the_fork_step(sessions, parent_rows, name):
    case = CASES[name]
    probe, record, engine = run_fork_step(sessions[case.program], case.spec, case.window)
    parent_at_t = parent_rows[case.program][T - 1].fingerprints  # the parent's state at T, as recorded
    after = probe.after
    assert set(after) == set(parent_at_t)
    for component in parent_at_t:
        names = set(parent_at_t[component]) | set(after[component])
        changed = {n for n in names if parent_at_t[component].get(n) != after[component].get(n)}
        predicate = case.changes.get(component)
        if predicate is not None and predicate.__code__.co_argcount == 2:  # a predicate of the chosen target
            predicate = (lambda p: lambda n: p(n, engine))(predicate)
        expected = {n for n in names if predicate is not None and predicate(n)}
        assert expected or predicate is None, f"{name}: the case names no entry of {component}"
        assert changed == expected, f"{name} changed {sorted(changed)} of {component}, expected {sorted(expected)}"
    # The declaration: every component it changes is in `touches`, and every state component in
    # `touches` does change; everything not declared is bit-identical to the parent (above).
    touches = set(engine.perturbations[0].touches)
    assert set(case.changes) <= touches
    assert {c for c in touches if is_state(c)} == set(case.changes)
    assert touches - set(case.changes) <= {"order"} | {f"rng:{s}" for s in engine.contract.streams}
    EFFECTS[name](StepT(parent_rows[case.program], probe, record, engine))


@dataclass
class StepT:
    parent: dict  # the parent's ledger rows by step
    probe: Probe
    record: object  # the child's StepRecord of step T
    engine: object  # the child engine after step T

    def same_batch(self):
        assert self.record.ids == self.parent[T].batch_ids

    def state_effect(self):
        """A state primitive: same batch at T, another state after it."""
        self.same_batch()
        assert self.record.digest != self.parent[T].digest


def _placebo(ctx):
    assert exact_record(ctx.record) == exact_row(ctx.parent[T])


def _swap_optimizer(ctx):
    before, after = ctx.parent[T - 1].fingerprints["optimizer"], ctx.probe.after["optimizer"]
    n = len([k for k in before if k.endswith(".momentum_buffer")])
    assert n > 0
    for i in range(n):  # carry=true: Adam's first moment starts as SGD's momentum, bit for bit
        assert after[f"{i}.exp_avg"] == before[f"{i}.momentum_buffer"]
        assert after[f"{i}.exp_avg_sq"] == fp_of(torch.zeros_like(ctx.probe.state["optimizer"]["state"][i]["exp_avg"]))
    assert type(ctx.engine.optimizer).__name__ == "AdamW"
    ctx.state_effect()


def _reset_ema(ctx):
    ema, model = ctx.probe.after["ema"], ctx.probe.after["model"]
    assert ema == model  # the EMA is the current weights, buffers included
    ctx.state_effect()


def _reset_bn(ctx):
    state = ctx.probe.state["model"]
    assert torch.equal(state["1.running_mean"], torch.zeros(32))
    assert torch.equal(state["1.running_var"], torch.ones(32))
    assert int(state["1.num_batches_tracked"]) == 0
    ctx.state_effect()


def _recompute_bn(ctx):
    assert int(ctx.probe.state["model"]["1.num_batches_tracked"]) == 4  # batches=4
    ctx.state_effect()


def _flush(ctx):
    queue = ctx.probe.state["components"]["queue"]
    assert torch.equal(queue["items"], torch.zeros(8, 64)) and queue["pointer"] == 0
    ctx.state_effect()


def _ema_decay(ctx):
    assert ctx.probe.begin[T]["ema_decay"] == 0.5 and ctx.engine.ema.decay == 0.9  # undone after the step
    ctx.same_batch()
    ema_names = set(ctx.parent[T].fingerprints["ema"]) - {"1.num_batches_tracked"}
    assert differing(ctx.parent[T].fingerprints, ctx.record.fingerprints) == {"ema": ema_names}


def _freeze_bn(ctx):
    assert ctx.probe.begin[T]["bn_momentum"] == [0.0]
    assert [m.momentum for m in ctx.engine.model.modules() if isinstance(m, torch.nn.BatchNorm1d)] == [0.1]
    ctx.same_batch()
    mine, before, parent = ctx.record.fingerprints, ctx.parent[T - 1].fingerprints, ctx.parent[T].fingerprints
    for name, fp in mine["model"].items():  # running statistics frozen, weights trained as the parent's
        assert fp == (before if _bn_stat(name) else parent)["model"][name], name
    assert mine["optimizer"] == parent["optimizer"]
    assert set(differing(parent, mine)["model"]) == {f"1.{s}" for s in BN_STATS}


def _lr_scale(ctx):
    lr = ctx.parent[T].lr
    assert ctx.probe.begin[T]["lr"] == [lr * 0.5] and fbits(ctx.record.lr) == fbits(lr * 0.5)
    assert [g["lr"] for g in ctx.engine.optimizer.param_groups] == [ctx.parent[T + 1].lr]  # undone
    ctx.same_batch()
    parts = differing(ctx.parent[T].fingerprints, ctx.record.fingerprints)
    assert set(parts) == {"model", "ema"}  # AdamW's moments and the scheduler do not see the lr


def _swap_windows(ctx):
    assert ctx.record.ids == ctx.parent[T + 6].batch_ids


def _shuffle_window(ctx):
    assert ctx.record.ids in [ctx.parent[t].batch_ids for t in range(T, T + 6)]


def _switch_policy(ctx):
    policy = make_policy("with_replacement", 1500, 32, ctx.engine.contract)
    assert ctx.record.ids == policy.batch_ids(T) != ctx.parent[T].batch_ids


def _drop_examples(ctx):
    expected = [i for i in ctx.parent[T].batch_ids if i not in set(DROPPED)]
    assert ctx.record.ids == expected != ctx.parent[T].batch_ids


def _inject_example(ctx):
    assert ctx.record.ids == [7] + ctx.parent[T].batch_ids[1:]


def _scaler(scale):
    def check(ctx):
        scaler = ctx.probe.state["scaler"]
        assert (scaler["scale"], scaler["_growth_tracker"]) == (scale, 0)
        assert ctx.parent[T].metrics["loss_scale"] == 1024.0 and ctx.record.metrics["loss_scale"] == scale
        ctx.state_effect()
    return check


def _reseed(ctx):
    ctx.same_batch()  # the batches are the parent's, the augmentation noise is not
    assert ctx.record.digest != ctx.parent[T].digest


EFFECTS = {
    "placebo": _placebo,
    "reset_momentum": StepT.state_effect,
    "reset_exp_avg": StepT.state_effect,
    "reset_exp_avg_sq": StepT.state_effect,
    "reset_step": StepT.state_effect,
    "reset_optimizer": StepT.state_effect,
    "swap_optimizer": _swap_optimizer,
    "reset_ema": _reset_ema,
    "ema_decay": _ema_decay,
    "reset_bn": _reset_bn,
    "freeze_bn": _freeze_bn,
    "recompute_bn": _recompute_bn,
    "swap_windows": _swap_windows,
    "shuffle_window": _shuffle_window,
    "switch_policy": _switch_policy,
    "drop_examples": _drop_examples,
    "inject_example": _inject_example,
    "flush": _flush,
    "bitflip": StepT.state_effect,
    "weight_noise": StepT.state_effect,
    "lr_scale": _lr_scale,
    "reseed": _reseed,
    "redraw": _reseed,  # over its window the same: the parent's batches, other augmentation noise
    "reset_scaler": _scaler(256.0),
    "scale_scaler": _scaler(512.0),
}
assert set(EFFECTS) == set(CASES)


def test_resets_compose_to_a_fresh_optimizer(sessions):
    """Adam: resetting the first moment, the second moment and the step count one by one is
    the same as clearing the optimizer; SGD: dropping the momentum is the same as clearing it."""
    for program, parts in ((TINY, ["reset_exp_avg", "reset_exp_avg_sq", "reset_step"]), (QUEUE, ["reset_momentum"])):
        session = sessions[program]
        composed = [exact_record(run_fork_step(session, parts)[1])]
        fresh = [exact_record(run_fork_step(session, "reset_optimizer")[1])]
        assert composed == fresh
        assert composed != [exact_record(run_fork_step(session, parts[:1] if len(parts) > 1 else "placebo")[1])]


def test_swap_optimizer_without_carry_starts_empty(sessions):
    probe, _, engine = run_fork_step(sessions[QUEUE], "swap_optimizer:to=Adam,carry=false,lr=0.01")
    assert [k for k in probe.after["optimizer"] if k != "_groups"] == []
    assert type(engine.optimizer).__name__ == "Adam" and engine.optimizer.param_groups[0]["lr"] == 0.01


# ------------------------------------------------------------------------ bit flip ----


@pytest.mark.parametrize("spec,param,index,bit", [("bitflip", None, None, 0),  # the target chosen at T
                                                  ("bitflip:param=4.weight", "4.weight", None, 0),
                                                  ("bitflip:param=4.weight,index=17,bit=31", "4.weight", 17, 31),
                                                  ("bitflip:param=0.weight,index=5,bit=0", "0.weight", 5, 0)])
def test_bitflip_changes_exactly_one_bit_of_one_weight(parents, spec, param, index, bit):
    at = 10  # a checkpoint: the parent's state at T is read from its file
    with RunDir.open(parents[TINY]) as run:
        parent_state = flat_tensors(run.load_checkpoint(at))
    probe, _, engine = run_fork_step(ForkSession(parents[TINY], at, progress=False), spec)
    chosen = engine.perturbations[0].values  # the target: given, or chosen from the state at T
    assert chosen["param"] == (param or chosen["param"]) and chosen["index"] == (chosen["index"] if index is None else index)
    if index is None:
        assert chosen["selected_by"].startswith("max |dw * dF/dw|") and chosen["outputs_changed"] > 0
    else:
        assert chosen["selected_by"] == "given"
    param, index = chosen["param"], chosen["index"]
    child_state = flat_tensors(probe.state)
    assert set(child_state) == set(parent_state)
    changed = {}
    for name, tensor in parent_state.items():
        a, b = int_view(tensor), int_view(child_state[name])
        assert a.dtype == b.dtype and a.shape == b.shape
        where = (a != b).nonzero().flatten().tolist()
        if where:
            changed[name] = where
    assert changed == {f"/model/{param}": [index]}
    flipped = int(int_view(parent_state[f"/model/{param}"])[index]) ^ int(int_view(child_state[f"/model/{param}"])[index])
    assert flipped & 0xFFFFFFFF == 1 << bit


# ------------------------------------------------------------------- forks on disk ----


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_primitive_forks_replays_and_marks_its_window(sessions, parent_rows, children, name):
    case, child = CASES[name], children[name]
    spec = from_spec(case.spec, start=T, window=case.window).to_json()
    if name == "bitflip":  # the target it chose at T, as a fresh engine at T chooses it again
        spec = run_fork_step(sessions[case.program], case.spec, case.window)[2].perturbations[0].to_json()
        assert spec["param"] is not None and spec["index"] is not None and "selected_by" in spec
    m = manifest(child)
    assert m["lineage"]["perturbations"] == [spec] and m["lineage"]["window"] == [T, T + case.window]
    windows = [e["detail"] for e in events(child) if e["kind"] == "intervention_window"]
    assert windows == [{"start": T, "end": T + case.window, "perturbations": [spec]}]
    child_rows = rows(child)
    assert sorted(child_rows) == list(range(T, UNTIL))
    assert sorted(checkpoint_hashes(child)) == [T, 20, UNTIL]
    # The checkpoint at T holds the parent's state before the perturbation acts.
    with RunDir.open(child) as run:
        restored = flat_tensors(run.load_checkpoint(T))
    state = flat_tensors(sessions[case.program].state)
    assert set(restored) == set(state) and all(torch.equal(int_view(restored[k]), int_view(state[k])) for k in state)
    # The child replays bit for bit, from its first checkpoint (the perturbation acts again) and
    # from the one at 20 (inside every window).
    assert ReplaySession(child).verify(progress=False).ok
    assert ReplaySession(child).verify(start=20, progress=False).ok
    # A placebo grandchild inside the window (and after every one-shot change) equals the child.
    assert ForkSession(child, 17, progress=False).placebo_check().ok
    same = [exact_row(child_rows[t]) == exact_row(parent_rows[case.program][t]) for t in range(T, UNTIL)]
    assert all(same) if name == "placebo" else not all(same)
    if name not in ("placebo", "drop_examples"):  # the change persists: the child's last step still differs
        assert child_rows[UNTIL - 1].digest != parent_rows[case.program][UNTIL - 1].digest


def test_cli_verify_and_check_on_a_child(children, capsys):
    assert cli(["verify", str(children["lr_scale"]), "--no-progress"]) == 0
    assert f"steps {T}..{UNTIL - 1} replay bit for bit" in capsys.readouterr().out
    assert cli(["check", str(children["swap_optimizer"]), "--at", "17"]) == 0
    assert f"placebo fork at step 17: identical to the parent through step {UNTIL - 1}" in capsys.readouterr().out


@pytest.mark.parametrize("name,cut", [("swap_optimizer", T), ("lr_scale", 20), ("shuffle_window", 20)])
def test_a_stopped_child_resumes_bit_identical(children, tmp_path, name, cut):
    """Truncated back to its checkpoint at `cut` (the fork step itself: the perturbation acts
    again; 20: inside the window), the child resumes to the same bits."""
    expected, hashes = ledger_bits(children[name]), checkpoint_hashes(children[name])
    child = tmp_path / name
    shutil.copytree(children[name], child)
    with RunDir.open(child, writable=True) as run:
        run.truncate_after(cut - 1, keep_checkpoint=cut)
        run.update_manifest({"status": "incomplete"})
    assert sorted(checkpoint_hashes(child)) == [c for c in (T, 20) if c <= cut]
    RecordSession.resume(child, progress=False)
    assert ledger_bits(child) == expected
    assert checkpoint_hashes(child) == hashes  # bitwise the same checkpoints


# ------------------------------------------------------------------- data order ----


def test_swap_windows_swaps_and_keeps_the_multiset_of_examples(parent_rows, children):
    parent, child = {t: r.batch_ids for t, r in parent_rows[TINY].items()}, batches(children["swap_windows"])
    assert [child[t] for t in range(13, 16)] == [parent[t] for t in range(19, 22)]
    assert [child[t] for t in range(19, 22)] == [parent[t] for t in range(13, 16)]
    assert [child[t] for t in range(16, 19)] == [parent[t] for t in range(16, 19)]
    seen = lambda b: Counter(i for t in range(T, UNTIL) for i in b[t])
    assert seen(child) == seen(parent)
    assert any(child[t] != parent[t] for t in range(T, UNTIL))


def test_shuffle_window_permutes_whole_batches_within_the_window_only(parent_rows, children, sessions, tmp_path):
    parent, child = {t: r.batch_ids for t, r in parent_rows[TINY].items()}, batches(children["shuffle_window"])
    window = range(T, T + 6)
    assert sorted(tuple(child[t]) for t in window) == sorted(tuple(parent[t]) for t in window)
    assert [child[t] for t in window] != [parent[t] for t in window]
    assert all(child[t] == parent[t] for t in range(T + 6, UNTIL))
    salted = batches(sessions[TINY].fork(tmp_path / "salt2", "shuffle_window:salt=2", window=6, steps=6))
    assert sorted(tuple(salted[t]) for t in window) == sorted(tuple(parent[t]) for t in window)
    assert [salted[t] for t in window] != [child[t] for t in window]  # the salt draws another order


def test_dropped_examples_never_appear_again(parent_rows, children):
    parent, child = {t: r.batch_ids for t, r in parent_rows[TINY].items()}, batches(children["drop_examples"])
    dropped = set(DROPPED)
    assert any(dropped & set(parent[t]) for t in range(T + 1, UNTIL))  # they would have been seen
    for t in range(T, UNTIL):
        assert not dropped & set(child[t])
        assert child[t] == [i for i in parent[t] if i not in dropped]


def test_inject_example_puts_the_id_in_for_the_window(parent_rows, children, sessions, tmp_path):
    parent, child = {t: r.batch_ids for t, r in parent_rows[TINY].items()}, batches(children["inject_example"])
    assert [child[t] for t in (T, T + 1)] == [[7] + parent[t][1:] for t in (T, T + 1)]
    assert all(child[t] == parent[t] for t in range(T + 2, UNTIL))
    added = batches(sessions[TINY].fork(tmp_path / "dup", "inject_example:id=7,duplicate=true", window=2, steps=3))
    assert added == {T: parent[T] + [7], T + 1: parent[T + 1] + [7], T + 2: parent[T + 2]}


def test_switch_policy_changes_the_order_from_the_fork_step_and_back(parents, parent_rows, children, tmp_path):
    parent, child = {t: r.batch_ids for t, r in parent_rows[TINY].items()}, batches(children["switch_policy"])
    contract = RngContract.from_json(manifest(children["switch_policy"])["rng_effective"])
    replacement = make_policy("with_replacement", 1500, 32, contract)
    assert all(child[t] == replacement.batch_ids(t) for t in range(T, UNTIL))
    assert all(child[t] != parent[t] for t in range(T, UNTIL))
    p = from_spec("switch_policy:to=with_replacement", start=T)
    assert p.batch_ids(None, T - 1, parent[T - 1]) == parent[T - 1]  # before T: the parent's batch
    # ... and back: a grandchild switching to reshuffling again draws the parent's batches.
    grandchild = ForkSession(children["switch_policy"], 17, progress=False).fork(
        tmp_path / "back", "switch_policy:to=reshuffle", until=UNTIL)
    back = batches(grandchild)
    assert all(back[t] == parent[t] for t in range(17, UNTIL))
    assert rows(grandchild)[17].digest != parent_rows[TINY][17].digest  # the state still carries 13..16


def test_reseed_changes_only_that_stream_from_the_fork_step(parents, parent_rows, children):
    parent = RngContract.from_json(manifest(parents[TINY])["rng"])
    child = RngContract.from_json(manifest(children["reseed"])["rng_effective"])
    assert manifest(children["reseed"])["rng"] == manifest(parents[TINY])["rng"]
    assert "augment" in parent.streams and len(parent.streams) > 1
    for stream in parent.streams:
        for t in range(0, STEPS):
            same = parent.seed(stream, t) == child.seed(stream, t)
            assert same == (stream != "augment" or t < T), (stream, t)
            a, b = parent.generator(stream, t), child.generator(stream, t)
            assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b)) == same
    assert batches(children["reseed"]) == {t: parent_rows[TINY][t].batch_ids for t in range(T, UNTIL)}
    assert rows(children["reseed"])[T].digest != parent_rows[TINY][T].digest


# --------------------------------------------------------------- placebo, coverage ----


def _example_programs():
    found = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        if "replay.Program(" in path.read_text():
            found.append(path.name)
    return found


def test_every_example_is_a_program_or_a_script():
    assert set(_example_programs()) | {"quickstart.py"} == {p.name for p in (ROOT / "examples").glob("*.py")}
    assert len(_example_programs()) >= 3


@pytest.mark.parametrize("example", _example_programs())
def test_placebo_forks_at_random_steps_equal_the_parent_for_every_example(tmp_path, example, capsys):
    parent = tmp_path / "parent"
    steps = 20
    RecordSession(str(ROOT / "examples" / example) + ":program", parent, seed=3, steps=steps,
                  checkpoint_every=8, progress=False).run()
    rng = random.Random(example)
    at = sorted(rng.sample(range(1, steps - 1), 2))
    child = ForkSession(parent, at[0], progress=False).fork(tmp_path / "placebo", "placebo")
    assert ledger_bits(child) == ledger_bits(parent)[at[0]:], f"placebo at {at[0]}"
    assert checkpoint_hashes(child)[steps] == checkpoint_hashes(parent)[steps]  # the last checkpoint, bitwise
    assert cli(["check", str(parent), "--at", *map(str, at)]) == 0
    out = capsys.readouterr().out
    for t in at:
        assert f"placebo fork at step {t}: identical to the parent through step {steps - 1}" in out


@pytest.mark.parametrize("program", [TINY, QUEUE, SCALED])
def test_placebo_forks_at_random_steps_equal_the_parent_for_the_test_programs(parents, parent_rows, program, capsys):
    rng = random.Random(program)
    for at in rng.sample(range(1, STEPS - 1), 2):
        report = ForkSession(parents[program], at, progress=False).placebo_check()
        assert report.ok and report.end == STEPS, f"placebo at {at}: {report.divergence}"
    assert cli(["check", str(parents[program])]) == 0  # default fork steps: 1/4, 1/2, 3/4 of the run
    assert capsys.readouterr().out.count("identical to the parent") == 3


def test_check_names_the_step_and_component_of_state_outside_the_checkpoint(tmp_path, capsys):
    leaky = tmp_path / "leaky"
    RecordSession(LEAKY, leaky, progress=False).run()
    assert cli(["check", str(leaky), "--at", "5"]) == 1
    out = capsys.readouterr().out
    assert "placebo fork at step 5: DIVERGES" in out and "first divergence at step 5" in out
    assert "model: bias, weight" in out and "loss recorded" in out
    forgetful = tmp_path / "forgetful"
    RecordSession(FORGETFUL, forgetful, progress=False).run()
    assert cli(["check", str(forgetful), "--at", "13"]) == 1
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert "placebo fork at step 13: DIVERGES, state the program does not capture:" in lines
    assert "first divergence at step 13" in lines and "component:queue: items" in lines
    assert not any(line.startswith(("model:", "optimizer:", "loss")) for line in lines)  # only the queue


# -------------------------------------------------------------------- determinism ----


DETERMINISM = [("placebo", 1), ("reset_exp_avg_sq", 1), ("weight_noise", 1), ("shuffle_window", 6)]


def test_forks_are_deterministic_across_sessions_and_worker_processes(parents, children, tmp_path):
    expected = {name: (ledger_bits(children[name]), checkpoint_hashes(children[name])) for name, _ in DETERMINISM}
    assert len({bits[0][-1][-1] for bits in expected.values()}) == len(DETERMINISM)  # the children differ
    again = ForkSession(parents[TINY], T, progress=False)  # a fresh session: the same fork twice
    for name, window in DETERMINISM:
        child = again.fork(tmp_path / f"again-{name}", CASES[name].spec, window=window, until=UNTIL)
        assert (ledger_bits(child), checkpoint_hashes(child)) == expected[name], name
    for workers in (1, 2):
        specs = [{"out": tmp_path / f"w{workers}-{name}", "perturb": CASES[name].spec, "window": window,
                  "until": UNTIL} for name, window in DETERMINISM]
        made = fork_many(parents[TINY], T, specs, workers=workers)
        assert made == [s["out"] for s in specs]
        for (name, _), child in zip(DETERMINISM, made):
            assert (ledger_bits(child), checkpoint_hashes(child)) == expected[name], (workers, name)


def test_cli_fork_equals_the_python_fork(parents, sessions, tmp_path, capsys):
    assert cli(["fork", "--list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert listed == set(REGISTRY)
    out = tmp_path / "cli"
    assert cli(["fork", str(parents[TINY]), "--at", str(T), "--perturb", "reset_exp_avg", "--perturb",
                "lr_scale:factor=0.5", "--window", "3", "--until", "18", "--out", str(out), "--no-progress"]) == 0
    python = sessions[TINY].fork(tmp_path / "python", ["reset_exp_avg", "lr_scale:factor=0.5"], window=3, until=18)
    assert ledger_bits(out) == ledger_bits(python)
    assert manifest(out)["lineage"]["perturbations"] == manifest(python)["lineage"]["perturbations"]
    assert [p["name"] for p in manifest(out)["lineage"]["perturbations"]] == ["reset_exp_avg", "lr_scale"]


# ------------------------------------------------------------------------ lineage ----


def _component_first_steps(a, b) -> tuple:
    ra, rb = rows(a), rows(b)
    common = sorted(set(ra) & set(rb))
    first = next((t for t in common if ra[t].digest != rb[t].digest), None)
    batches_part = next((t for t in common if ra[t].batch_ids != rb[t].batch_ids), None)
    components = {}
    for t in common:
        for comp in differing(ra[t].fingerprints, rb[t].fingerprints):
            components.setdefault(comp, t)
    return first, batches_part, components


def _parse_diff(text: str) -> dict:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\S+)\s+from step (\d+):", text, re.M)}


def _tree_lines(text: str) -> list[tuple[int, str, str]]:
    """(depth, run folder, rest) per line of `replay tree`."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^((?:│   |    )*)(?:[├└]── )?(\S+)  (.*)$", line)
        assert m, line
        depth = len(m.group(1)) // 4 + (1 if re.match(r"^(?:│   |    )*[├└]── ", line) else 0)
        out.append((depth, m.group(2), m.group(3)))
    return out


@pytest.fixture
def family(parents, tmp_path):
    """runs/parent (a copy of tiny's parent), runs/child (reset_exp_avg at T), runs/grandchild
    (placebo of the child at 17) and runs/placebo (placebo of the parent at T)."""
    runs = tmp_path / "runs"
    parent = runs / "parent"
    shutil.copytree(parents[TINY], parent)
    child = ForkSession(parent, T, progress=False).fork(runs / "child", "reset_exp_avg", until=24)
    grandchild = ForkSession(child, 17, progress=False).fork(runs / "grandchild", "placebo")
    placebo = ForkSession(parent, T, progress=False).fork(runs / "placebo", "placebo", until=24)
    return runs, parent, child, grandchild, placebo


def test_lineage_is_recorded_in_the_child(family):
    runs, parent, child, grandchild, _ = family
    lineage = manifest(child)["lineage"]
    with RunDir.open(parent) as run:
        digest = lineage_digest(run, T)
    assert lineage == {"parent_id": manifest(parent)["run_id"], "parent_path": "parent", "parent_digest": digest,
                       "fork_step": T, "window": [T, T + 1],
                       "perturbations": [from_spec("reset_exp_avg", start=T).to_json()], "depth": 1}
    assert (child.parent / lineage["parent_path"]).resolve() == parent.resolve()
    for key in ("program", "seed", "rng", "order", "batch_size", "dataset_size"):
        assert manifest(child)[key] == manifest(parent)[key], key
    inner = manifest(grandchild)["lineage"]
    assert inner["parent_id"] == manifest(child)["run_id"] and inner["depth"] == 2 and inner["fork_step"] == 17
    assert inner["perturbations"] == lineage["perturbations"] + [from_spec("placebo", start=17).to_json()]
    assert manifest(grandchild)["steps"] == 24  # a child's default end is its parent's


def test_tree_shows_parent_child_grandchild(family, capsys):
    runs = family[0]
    assert cli(["tree", str(runs)]) == 0
    lines = _tree_lines(capsys.readouterr().out)
    assert [(d, name) for d, name, _ in lines] == [(0, "parent"), (1, "child"), (2, "grandchild"), (1, "placebo")]
    described = {name: rest for _, name, rest in lines}
    assert described["child"].startswith(f"fork @{T}: reset_exp_avg, steps {T}..24")
    assert described["grandchild"].startswith("fork @17: placebo, steps 17..24")
    assert "CHANGED" not in "".join(described.values()) and "missing" not in "".join(described.values())


def test_diff_prints_the_first_step_and_each_component(family, children, parents, capsys):
    runs, parent, child, grandchild, placebo = family
    assert cli(["diff", str(parent), str(placebo)]) == 0
    assert capsys.readouterr().out.strip() == f"identical over steps {T}..23"
    assert cli(["diff", str(child), str(grandchild)]) == 0
    assert capsys.readouterr().out.strip() == "identical over steps 17..23"
    for a, b in ((parent, child), (parents[TINY], children["shuffle_window"]), (parents[QUEUE], children["flush"])):
        first, batches_part, components = _component_first_steps(a, b)
        assert first is not None
        assert cli(["diff", str(a), str(b)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"first difference at step {first} ")
        assert ("batches part at step" in out) == (batches_part is not None)
        if batches_part is not None:
            assert f"batches part at step {batches_part}" in out
        assert _parse_diff(out) == components
    d = diff(parent, child)
    assert d.first_step == T and d.components["optimizer"][0] == T and "scheduler" not in d.components


def test_tree_shows_a_run_whose_parent_is_elsewhere_once(children):
    lines = tree(children["placebo"]).splitlines()
    assert len(lines) == 1 and lines[0].split()[:4] == [".", "fork", f"@{T}:", "placebo,"]


def _set_digest(run, step, digest: str):
    connection = sqlite3.connect(Path(run) / "ledger.sqlite")
    with connection:
        (old,) = connection.execute("SELECT digest FROM steps WHERE step = ?", (step,)).fetchone()
        connection.execute("UPDATE steps SET digest = ? WHERE step = ?", (digest, step))
    connection.close()
    return old


def test_a_parent_changed_after_the_fork_is_detected(family, capsys):
    runs, parent, child, grandchild, _ = family
    assert parent_status(child) == parent_status(grandchild) == "ok" and parent_status(parent) == "root"
    # A row after the fork step is not something the child depends on; one before it is.
    old = _set_digest(parent, T + 2, "0123456789abcdef")
    assert parent_status(child) == "ok"
    _set_digest(parent, T + 2, old)
    old = _set_digest(parent, T - 3, "0123456789abcdef")
    assert parent_status(child) == "changed" and parent_status(grandchild) == "ok"
    assert cli(["tree", str(runs)]) == 0
    flagged = {name for _, name, rest in _tree_lines(capsys.readouterr().out) if "[PARENT CHANGED since fork]" in rest}
    assert flagged == {"child", "placebo"}
    _set_digest(parent, T - 3, old)
    assert parent_status(child) == "ok"
    # Another run id in the parent's manifest.
    m = manifest(parent)
    with RunDir.open(parent, writable=True) as run:  # through the writer: the store records the manifest's digest
        run.update_manifest({"run_id": "f" * 32})
    assert parent_status(child) == "changed"
    with RunDir.open(parent, writable=True) as run:
        run.update_manifest({"run_id": m["run_id"]})
    assert parent_status(child) == "ok"
    # The parent's folder recorded again (the same program and seed: another run).
    shutil.rmtree(parent)
    RecordSession(TINY, parent, steps=STEPS, checkpoint_every=10, progress=False).run()
    assert parent_status(child) == "changed"
    shutil.rmtree(parent)
    assert parent_status(child) == "missing"


# ------------------------------------------------------------------------ refusals ----


REFUSALS = [
    (TINY, "reset_momentum", r"AdamW\) holds no 'momentum_buffer' state"),
    (QUEUE, "reset_exp_avg", r"SGD\) holds no 'exp_avg' state"),
    (QUEUE, "reset_exp_avg_sq", r"SGD\) holds no 'exp_avg_sq' state"),
    (QUEUE, "reset_step", r"SGD\) holds no 'step' state"),
    (QUEUE, "reset_bn", "no BatchNorm layers"),
    (QUEUE, "freeze_bn", "no BatchNorm layers"),
    (QUEUE, "recompute_bn", "no BatchNorm layers"),
    (QUEUE, "reset_ema", r"no EMA / teacher \(Program.ema_decay is unset\)"),
    (QUEUE, "ema_decay:decay=0.5", r"no EMA / teacher"),
    (QUEUE, "flush:component=bank", r"no component 'bank' \(it has \['queue'\]\)"),
    (TINY, "flush:component=queue", r"no component 'queue' \(it has none\)"),
    (TINY, "swap_optimizer:to=SGD", "LR scheduler"),
    (TINY, "reseed:stream=noise", "no stream 'noise'"),
    (TINY, "drop_examples:ids=1500", r"ids \[1500\] are outside the dataset \(size 1500\)"),
    (TINY, "inject_example:id=1500", "outside the dataset"),
    (TINY, "bitflip:param=9.weight", "no parameter named '9.weight'"),
    (TINY, "bitflip:index=2048", "index 2048 is outside 0.weight"),
]


@pytest.mark.parametrize("program,spec,message", REFUSALS, ids=[s for _, s, _ in REFUSALS])
def test_a_primitive_needing_state_the_program_lacks_is_refused(sessions, tmp_path, program, spec, message):
    with pytest.raises(PerturbationRefused, match=message):
        sessions[program].fork(tmp_path / "child", spec, steps=2)


def test_refused_before_the_optimizer_has_state(parents, tmp_path):
    with pytest.raises(PerturbationRefused, match="no state yet"):
        ForkSession(parents[TINY], 0, progress=False).fork(tmp_path / "child", "reset_exp_avg", steps=1)


def test_refusal_on_the_command_line(parents, tmp_path, capsys):
    assert cli(["fork", str(parents[QUEUE]), "--at", str(T), "--perturb", "reset_bn", "--steps", "1",
                "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "no BatchNorm layers" in capsys.readouterr().err


def test_a_refused_fork_leaves_no_child_directory(sessions, tmp_path):
    out = tmp_path / "child"
    with pytest.raises(PerturbationRefused):
        sessions[TINY].fork(out, "reset_momentum", steps=2)
    assert not out.exists()


def test_the_marked_window_covers_every_step_swap_windows_changes(sessions, tmp_path):
    try:
        swap = from_spec("swap_windows:offset=6,w=3", start=T)
    except ValueError:
        return  # refusing the inconsistent window is a fix too
    child = sessions[TINY].fork(tmp_path / "swap", swap, steps=1)
    marked = [e["detail"]["end"] for e in events(child) if e["kind"] == "intervention_window"]
    assert manifest(child)["lineage"]["window"][1] >= T + 6 + 3 and marked[0] >= T + 6 + 3


@pytest.mark.parametrize("spec,message", [
    ("no_such_primitive", "unknown perturbation 'no_such_primitive'"),
    ("bitflip:colour=red", r"unknown parameter\(s\) \['colour'\]"),
    ("lr_scale", "parameter 'factor' is required"),
    ("flush", "parameter 'component' is required"),
    ("lr_scale:factor", "expected key=value"),
    ("swap_windows:offset=1,w=3", "must not overlap"),
    ("swap_windows:w=3", "exactly one of b"),
    ("ema_decay:decay=1.5", r"decay must be in \[0, 1\]"),
    ("swap_optimizer:to=RMSprop", "must be SGD, Adam or AdamW"),
    ({"name": "placebo", "window": 0}, "window must be a positive"),
    # parameters out of range or of the wrong type are refused when the spec is read (issue 9)
    ("weight_noise:std=-1", r"std must lie in \[0, inf\)"),
    ("weight_noise:std=nan", "std must be a finite number"),
    ("weight_noise:std=0.01,salt=-1", "salt must lie in"),
    ("lr_scale:factor=-2", "factor must lie in"),
    ("lr_scale:factor=inf", "factor must be a finite number"),
    ("bitflip:bit=32", r"bit must lie in \[0, 31\]"),
    ("bitflip:index=-1", "index must lie in"),
    ("swap_optimizer:to=SGD,momentum=1.5", r"momentum must lie in \[0, 1\)"),
    ("swap_optimizer:to=SGD,lr=0", r"lr must lie in \(0, inf\)"),
    ("swap_optimizer:to=SGD,carry=yes", "carry must be true or false"),
    ("inject_example:id=-3", "id must lie in"),
    ("inject_example:id=2,duplicate=3", "duplicate must be true or false"),
    ("recompute_bn:batches=0", "batches must lie in"),
    ("reseed:stream=augment,salt=x", "salt must be an integer"),
    ("swap_windows:offset=3,w=0", "w must lie in"),
    ("swap_windows:offset=x", "offset must be an integer"),
])
def test_bad_specs_are_value_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        from_spec(spec, start=T)


def test_bad_fork_steps_and_ranges_are_fork_errors(parents, sessions, tmp_path, capsys):
    for at in (STEPS + 1, 99, -1):
        with pytest.raises(ForkError, match=f"cannot fork .* at step {at}: it recorded steps 0..{STEPS - 1}"):
            ForkSession(parents[TINY], at, progress=False)
    session = sessions[TINY]
    with pytest.raises(ForkError, match="at least one step after"):
        session.fork(tmp_path / "a", "placebo", until=T)
    with pytest.raises(ForkError, match="before the fork step"):
        session.fork(tmp_path / "b", from_spec("reset_exp_avg", start=T - 1))
    with pytest.raises(ForkError, match="at least one perturbation"):
        session.fork(tmp_path / "c", [])
    with pytest.raises(ValueError, match="steps or until"):
        session.fork(tmp_path / "d", "placebo", steps=2, until=20)
    assert not any((tmp_path / n).exists() for n in "abcd")
    assert cli(["fork", str(parents[TINY]), "--at", "99", "--perturb", "placebo", "--out", str(tmp_path / "e"),
                "--no-progress"]) == 2
    assert "it recorded steps 0..29" in capsys.readouterr().err
