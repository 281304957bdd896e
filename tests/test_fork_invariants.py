"""Forks: each primitive changes exactly what it declares, placebos equal their parents bit for
bit, order primitives do what they say, forks are deterministic, lineage is tracked."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from replay.cli import main as cli
from replay.fork import ForkError, ForkSession, fork_many
from replay.lineage import diff, parent_status, tree
from replay.perturb import REGISTRY, PerturbationRefused, from_spec
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TINY = str(HERE / "programs" / "tiny.py") + ":program"          # AdamW, BatchNorm, EMA, scheduler
QUEUE = str(HERE / "programs" / "queue_sgd.py") + ":program"    # SGD momentum, a queue component
LEAKY = str(HERE / "programs" / "leaky.py") + ":program"
T = 13

# A case per primitive: (program, spec, window, state components it may change at T).
CASES = {
    "placebo": (TINY, "placebo", 1, set()),
    "reset_momentum": (QUEUE, "reset_momentum", 1, {"optimizer"}),
    "reset_exp_avg": (TINY, "reset_exp_avg", 1, {"optimizer"}),
    "reset_exp_avg_sq": (TINY, "reset_exp_avg_sq", 1, {"optimizer"}),
    "reset_step": (TINY, "reset_step", 1, {"optimizer"}),
    "reset_optimizer": (TINY, "reset_optimizer", 1, {"optimizer"}),
    "swap_optimizer": (QUEUE, "swap_optimizer:to=AdamW", 1, {"optimizer"}),
    "reset_ema": (TINY, "reset_ema", 1, {"ema"}),
    "ema_decay": (TINY, "ema_decay:decay=0.5", 3, set()),
    "reset_bn": (TINY, "reset_bn", 1, {"model"}),
    "freeze_bn": (TINY, "freeze_bn", 3, set()),
    "recompute_bn": (TINY, "recompute_bn:batches=4", 1, {"model"}),
    "swap_windows": (TINY, "swap_windows:offset=5,w=3", 8, set()),
    "shuffle_window": (TINY, "shuffle_window", 6, set()),
    "switch_policy": (TINY, "switch_policy:to=with_replacement", 1, set()),
    "drop_examples": (TINY, "drop_examples:ids=1+2+3", 1, set()),
    "inject_example": (TINY, "inject_example:id=5", 2, set()),
    "flush": (QUEUE, "flush:component=queue", 1, {"component:queue"}),
    "bitflip": (TINY, "bitflip", 1, {"model"}),
    "weight_noise": (TINY, "weight_noise:std=0.01", 1, {"model"}),
    "lr_scale": (TINY, "lr_scale:factor=0.5", 3, set()),
    "reseed": (TINY, "reseed:stream=augment", 1, set()),
}


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("parents")
    out = {}
    for name, ref in (("tiny", TINY), ("queue", QUEUE)):
        out[ref] = root / name
        RecordSession(ref, out[ref], progress=False).run()
    return out


def _state_at_fork(parent, spec, window):
    """The child's state right after its perturbation acted at T, and the parent's state at T."""
    session = ForkSession(parent, T, progress=False)
    engine = session._child_engine(session.perturbations(spec, window))
    before = engine.fingerprints(use_optimizer=False)
    for p in engine.perturbations:
        if p.start == T:
            p.check(engine)
            p.apply(engine)
    return before, engine.fingerprints(use_optimizer=False), engine


def test_every_primitive_has_a_case():
    assert set(CASES) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(CASES))
def test_primitive_changes_exactly_what_it_declares(parents, name):
    ref, spec, window, declared = CASES[name]
    before, after, _ = _state_at_fork(parents[ref], spec, window)
    changed = {c for c in set(before) | set(after) if before.get(c) != after.get(c)}
    assert changed == declared, f"{name} changed {changed}, declared {declared}"
    touches = set(from_spec(spec, start=T, window=window).touches)
    state_touches = {t for t in touches if t in ("model", "optimizer", "ema") or t.startswith("component:")}
    assert state_touches == declared


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_primitive_forks_and_replays(parents, tmp_path, name):
    ref, spec, window, _ = CASES[name]
    child = ForkSession(parents[ref], T, progress=False).fork(tmp_path / "child", spec, window=window)
    assert ReplaySession(child).verify(progress=False).ok
    with RunDir.open(parents[ref]) as p, RunDir.open(child) as c:
        parent_rows = {r.step: r for r in p.ledger.rows(T, None)}
        rows = c.ledger.rows()
        events = c.ledger.events()
    same = [r.digest == parent_rows[r.step].digest for r in rows]
    if name == "placebo":
        assert all(same) and [r.step for r in rows] == list(range(T, 30))
    elif name != "drop_examples":  # dropped ids may not be in the next batches
        assert not same[-1]
    assert any(e["kind"] == "intervention_window" and e["detail"]["end"] >= T + window - (window > 1) for e in events)


@pytest.mark.parametrize("example", ["digits_mlp.py", "digits_cnn.py", "contrastive.py"])
def test_placebo_forks_equal_the_parent_for_every_example(tmp_path, example):
    ref = str(ROOT / "examples" / example) + ":program"
    parent = tmp_path / "parent"
    RecordSession(ref, parent, steps=20, checkpoint_every=8, progress=False).run()
    for at in (3, 11):
        assert ForkSession(parent, at, progress=False).placebo_check().ok
    assert cli(["check", str(parent), "--at", "5", "14"]) == 0


def test_check_catches_state_outside_the_checkpoints(tmp_path, capsys):
    parent = tmp_path / "leaky"
    RecordSession(LEAKY, parent, progress=False).run()
    assert cli(["check", str(parent), "--at", "5"]) == 1
    out = capsys.readouterr().out
    assert "DIVERGES" in out and "step 5" in out and "model" in out


def _batches(run):
    with RunDir.open(run) as r:
        return {row.step: row.batch_ids for row in r.ledger.rows()}


def test_order_primitives(parents, tmp_path):
    parent = parents[TINY]
    base = _batches(parent)
    s = ForkSession(parent, T, progress=False)
    swapped = _batches(s.fork(tmp_path / "swap", "swap_windows:offset=5,w=3", window=8))
    assert [swapped[t] for t in range(T, T + 3)] == [base[t] for t in range(T + 5, T + 8)]
    assert [swapped[t] for t in range(T + 5, T + 8)] == [base[t] for t in range(T, T + 3)]
    count = lambda b: Counter(i for t in range(T, 30) for i in b[t])
    assert count(swapped) == count(base) and swapped != {t: base[t] for t in swapped}
    shuffled = _batches(s.fork(tmp_path / "shuffle", "shuffle_window", window=6))
    window = [tuple(shuffled[t]) for t in range(T, T + 6)]
    assert sorted(window) == sorted(tuple(base[t]) for t in range(T, T + 6)) and window != [tuple(base[t]) for t in range(T, T + 6)]
    assert all(shuffled[t] == base[t] for t in range(T + 6, 30))
    dropped = _batches(s.fork(tmp_path / "drop", "drop_examples:ids=" + "+".join(map(str, base[T + 2][:4]))))
    assert not set(base[T + 2][:4]) & {i for t in range(T, 30) for i in dropped[t]}
    injected = _batches(s.fork(tmp_path / "inject", "inject_example:id=7,duplicate=true", window=2))
    assert injected[T] == base[T] + [7] and injected[T + 2] == base[T + 2]
    switched = _batches(s.fork(tmp_path / "switch", "switch_policy:to=with_replacement"))
    assert switched[T] != base[T]
    reseeded = _batches(s.fork(tmp_path / "reseed", "reseed:stream=augment"))
    assert reseeded == {t: base[t] for t in reseeded}  # batches untouched; only augmentation draws change


def test_bitflip_changes_exactly_one_bit(parents):
    _, _, parent_engine = _state_at_fork(parents[TINY], "placebo", 1)
    _, _, child = _state_at_fork(parents[TINY], "bitflip:param=0.weight,index=5,bit=0", 1)
    a = parent_engine.model.state_dict()["0.weight"].view(-1).view(torch.int32)
    b = child.model.state_dict()["0.weight"].view(-1).view(torch.int32)
    differs = (a != b).nonzero().flatten().tolist()
    assert differs == [5] and (a[5] ^ b[5]).item() == 1
    for name, t in parent_engine.model.state_dict().items():
        if name != "0.weight":
            assert torch.equal(t, child.model.state_dict()[name])


def test_forks_are_deterministic_and_fork_many_agrees(parents, tmp_path):
    parent = parents[TINY]
    one = ForkSession(parent, T, progress=False).fork(tmp_path / "a", "reset_exp_avg_sq")
    two = ForkSession(parent, T, progress=False).fork(tmp_path / "b", "reset_exp_avg_sq")
    children = [{"out": tmp_path / f"m{i}", "perturb": spec} for i, spec in enumerate(["reset_exp_avg_sq", "bitflip"])]
    many = fork_many(parent, T, children, workers=2)
    digests = lambda run: [(r.step, r.digest) for r in RunDir.open(run).ledger.rows()]
    assert digests(one) == digests(two) == digests(many[0])
    assert digests(many[1]) != digests(many[0])


def test_lineage_tree_diff_and_changed_parent(tmp_path):
    parent = tmp_path / "runs" / "parent"
    RecordSession(TINY, parent, progress=False).run()
    child = ForkSession(parent, 10, progress=False).fork(tmp_path / "runs" / "child", "reset_exp_avg")
    grandchild = ForkSession(child, 20, progress=False).fork(tmp_path / "runs" / "grandchild", "placebo")
    manifest = json.loads((child / "manifest.json").read_text())
    lineage = manifest["lineage"]
    assert lineage["fork_step"] == 10 and lineage["perturbations"][0]["name"] == "reset_exp_avg"
    assert lineage["parent_id"] == json.loads((parent / "manifest.json").read_text())["run_id"]
    text = tree(tmp_path / "runs")
    assert text.index("parent") < text.index("child") < text.index("grandchild")
    assert diff(child, grandchild).describe().startswith("identical")
    d = diff(parent, child)
    assert d.first_step == 10 and d.components["optimizer"][0] == 10
    assert parent_status(child) == "ok"
    shutil.rmtree(parent)
    RecordSession(TINY, parent, seed=99, progress=False).run()  # a different run in the parent's place
    assert parent_status(child) == "changed" and "PARENT CHANGED" in tree(tmp_path / "runs")


def test_refusals(parents, tmp_path):
    for ref, spec in ((TINY, "reset_momentum"), (QUEUE, "reset_exp_avg"), (QUEUE, "reset_bn"),
                      (QUEUE, "flush:component=nope"), (QUEUE, "reset_ema"), (TINY, "flush:component=queue")):
        with pytest.raises(PerturbationRefused):
            ForkSession(parents[ref], T, progress=False).fork(tmp_path / spec.replace(":", "_").replace("=", "_"), spec)
    with pytest.raises(ValueError, match="unknown perturbation"):
        from_spec("no_such")
    with pytest.raises(ValueError, match="unknown parameter"):
        from_spec("bitflip:colour=red")
    with pytest.raises(ValueError, match="required"):
        from_spec("lr_scale")
    with pytest.raises(ForkError):
        ForkSession(parents[TINY], 99, progress=False)
