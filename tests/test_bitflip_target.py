"""The bit flip's default target (the chaos reference arm of experiments).

The old default, the lowest bit of element 0 of the first parameter, is on the digits MLP the
weight of pixel 0, which is 0 in every image: the flip never reached the outputs and the
reference measured exactly 0 for every seed and horizon. The default target is now chosen from
the state at the fork step T: the element of largest |dw * dF/dw| (F a random projection of the
eval-mode outputs on the batch of step T) whose flip changes those outputs bitwise. These tests
check that the reference is alive, that the choice is recorded and replayed, deterministic,
refused clearly when nothing qualifies, and that choosing it changes nothing but the one bit.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import flat_tensors
from replay import perturb
from replay.cli import main as cli
from replay.datasets import digits
from replay.fork import ForkSession, fork_many
from replay.perturb import BitFlip, Perturbation, PerturbationRefused, catalogue, from_spec
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MLP = str(ROOT / "examples" / "digits_mlp.py") + ":program"  # BatchNorm, dropout, AdamW, EMA teacher
T = 11  # not a checkpoint (the parents checkpoint every 8)
STEPS = 24
RECORD = ("param", "index", "bit", "selected_by", "score", "rank", "outputs_changed")


# ----------------------------------------------------------------------------- helpers ----


def words(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def manifest(run) -> dict:
    return json.loads((Path(run) / "manifest.json").read_text())


def chosen(run) -> dict:
    return manifest(run)["lineage"]["perturbations"][-1]


def ledger(run) -> list:
    with RunDir.open(run) as r:
        return [(row.step, row.batch_ids, row.digest, row.loss) for row in r.ledger.rows()]


def checkpoint_hashes(run) -> dict:
    with RunDir.open(run) as r:
        return r.ledger.checkpoints()


class Probe(Perturbation):
    """Composed after the primitive: the whole state and the gradients as the primitive left them."""

    name = "probe"  # not registered

    def apply(self, engine):
        self.state = copy.deepcopy(engine.state_dict())
        self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in engine.model.named_parameters()}


def state_at(session: ForkSession, spec):
    """(the state right after `spec` acted at the fork step, the perturbation, the engine)."""
    primitive = session.perturbations(spec)[0]
    probe = Probe(session.at)
    engine = session._child_engine([primitive, probe])
    engine.run_step()
    return probe, primitive, engine


def eval_outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return model(x)


def batch_input(run, step: int) -> torch.Tensor:
    with RunDir.open(run) as r:
        ids = r.ledger.step_row(step).batch_ids
    (x, _), _ = digits()
    return x[torch.as_tensor(ids)]


def flipped(model: torch.nn.Module, param: str, index: int, bit: int = 0) -> torch.nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        dict(model.named_parameters())[param].view(-1).view(torch.int32)[index] ^= 1 << bit
    return model


# --------------------------------------------------------------------------- fixtures ----


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("parents")
    out = {}
    for seed in (1, 2):
        out[seed] = root / f"mlp-{seed}"
        RecordSession(MLP, out[seed], seed=seed, steps=STEPS, checkpoint_every=8, progress=False).run()
    return out


@pytest.fixture(scope="module")
def session(parents):
    return ForkSession(parents[1], T, progress=False)


@pytest.fixture(scope="module")
def child(session, tmp_path_factory):
    return session.fork(tmp_path_factory.mktemp("children") / "bitflip", "bitflip", until=STEPS)


# ------------------------------------------------------------------- (1) alive ----


def test_the_default_reference_is_alive_on_the_digits_mlp(parents, session, child):
    (x, _), _ = digits()
    dead_pixels = set((x.abs().sum(0) == 0).nonzero().flatten().tolist())
    assert 0 in dead_pixels  # the old default, 0.weight[0], multiplies pixel 0: always 0
    target = chosen(child)
    assert target["bit"] == 0 and target["outputs_changed"] > 0 and target["score"] > 0
    if target["param"] == "0.weight":  # a first-layer weight: index = row * 64 + pixel
        assert target["index"] % 64 not in dead_pixels
    # The eval-mode outputs on the batch of step T differ between the parent's and the child's
    # model at T (the flip applied), in as many elements as recorded ...
    probe, _, _ = state_at(session, "bitflip")
    parent_model = session._child_engine(session.perturbations("placebo")).model
    xs = batch_input(parents[1], T)
    before = words(eval_outputs(parent_model, xs))
    child_model = copy.deepcopy(parent_model)
    child_model.load_state_dict(probe.state["model"])
    after = words(eval_outputs(child_model, xs))
    assert int((before != after).sum()) == target["outputs_changed"]
    # ... while the old default leaves them bit-identical: a dead reference.
    assert torch.equal(before, words(eval_outputs(flipped(parent_model, "0.weight", 0), xs)))
    # The training trajectory parts at T and stays apart.
    parent_rows, child_rows = dict((r[0], r) for r in ledger(parents[1])), ledger(child)
    assert [r[1] for r in child_rows] == [parent_rows[r[0]][1] for r in child_rows]  # same batches
    assert all(r[2] != parent_rows[r[0]][2] for r in child_rows)


# ------------------------------------------------------------ (2) recorded, replayed ----


def test_the_chosen_target_is_recorded_and_the_child_replays(child, monkeypatch, capsys):
    target = chosen(child)
    assert set(RECORD) <= set(target) and target["start"] == T and target["window"] == 1
    assert target["selected_by"].startswith("max |dw * dF/dw|") and "output change verified" in target["selected_by"]
    assert f"step {T}" in target["selected_by"] and target["rank"] >= 1
    with RunDir.open(child) as run:
        windows = [e["detail"] for e in run.ledger.events() if e["kind"] == "intervention_window"]
    assert windows == [{"start": T, "end": T + 1, "perturbations": [target]}]
    # A replay re-creates the flip from the manifest: explicit param and index, no new choice.
    again = from_spec(target)
    assert again.to_json() == target
    monkeypatch.setattr(BitFlip, "_choose_target", lambda self, engine: pytest.fail("a replay chose again"))
    assert ReplaySession(child).verify(progress=False).ok
    assert ReplaySession(child).verify(start=16, progress=False).ok  # from the checkpoint at 16, after the flip
    assert cli(["verify", str(child), "--no-progress"]) == 0
    assert f"steps {T}..{STEPS - 1} replay bit for bit" in capsys.readouterr().out


def test_the_catalogue_describes_the_default_target():
    (summary, params), = [(s, p) for name, s, p in catalogue() if name == "bitflip"]
    assert params == {"param": None, "index": None, "bit": 0}
    assert "dF/dw" in summary and "recorded in the lineage" in summary


# ---------------------------------------------------------------- (3) deterministic ----


def test_the_choice_is_deterministic(parents, child, tmp_path):
    again = ForkSession(parents[1], T, progress=False).fork(tmp_path / "again", "bitflip", until=STEPS)
    assert chosen(again) == chosen(child)
    assert ledger(again) == ledger(child) and checkpoint_hashes(again) == checkpoint_hashes(child)
    # In spawned worker processes too.
    made = fork_many(parents[1], T, [{"out": tmp_path / f"w{i}", "perturb": "bitflip", "until": STEPS}
                                     for i in range(2)], workers=2)
    for run in made:
        assert chosen(run) == chosen(child)
        assert ledger(run) == ledger(child) and checkpoint_hashes(run) == checkpoint_hashes(child)


# ----------------------------------------------------- (4) other seeds and fork steps ----


@pytest.mark.parametrize("seed,at", [(1, 3), (1, 19), (2, T), (2, 0)])
def test_other_seeds_and_steps_choose_a_valid_target(parents, tmp_path, seed, at):
    session = ForkSession(parents[seed], at, progress=False)
    run = session.fork(tmp_path / "child", "bitflip", steps=2)
    target = chosen(run)
    model = session._child_engine(session.perturbations("placebo")).model
    params = dict(model.named_parameters())
    assert target["param"] in params and 0 <= target["index"] < params[target["param"]].numel()
    xs = batch_input(parents[seed], at)
    before = words(eval_outputs(model, xs))
    after = words(eval_outputs(flipped(model, target["param"], target["index"]), xs))
    assert int((before != after).sum()) == target["outputs_changed"] > 0
    assert ReplaySession(run).verify(progress=False).ok


def test_a_given_parameter_is_searched_and_a_given_index_is_kept(session, tmp_path):
    within = session.fork(tmp_path / "within", "bitflip:param=0.weight", steps=1)
    target = chosen(within)
    (x, _), _ = digits()
    dead_pixels = set((x.abs().sum(0) == 0).nonzero().flatten().tolist())
    assert target["param"] == "0.weight" and target["index"] % 64 not in dead_pixels
    assert target["selected_by"].startswith("max |dw * dF/dw| over the elements of 0.weight")
    given = session.fork(tmp_path / "given", "bitflip:param=0.weight,index=0", steps=1)
    assert {k: v for k, v in chosen(given).items() if k in RECORD} == {"param": "0.weight", "index": 0, "bit": 0,
                                                                       "selected_by": "given"}
    first = session.fork(tmp_path / "first", "bitflip:index=5", steps=1)  # an index alone: the first parameter
    assert chosen(first)["param"] == "0.weight" and chosen(first)["index"] == 5


# -------------------------------------------------------------------- (5) refusals ----


PROGRAMS = '''
import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


class Absorbing(torch.nn.Module):
    """Outputs (y + 2**30) - 2**30: a change of y by a few ulps never survives the rounding."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        return (self.linear(x) + 2.0 ** 30) - 2.0 ** 30


class Silent(torch.nn.Module):
    """Outputs 0 * y: no element has a first-order effect."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x) * 0.0 + self.linear.bias.detach()


def _dict_step(ctx):
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ctx.model(ctx.batch["x"]), ctx.batch["y"])
    loss.backward()
    ctx.optimizer.step()
    return {"loss": loss}


def _program(model, **kw):
    return replay.Program(model=model, dataset=(x_train, y_train), loss=F.cross_entropy,
                          optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05),
                          batch_size=32, steps=8, checkpoint_every=4, **kw)


absorbing = _program(Absorbing)
silent = _program(Silent)
dict_batches = _program(lambda: torch.nn.Linear(64, 10), step=_dict_step,
                        collate=lambda examples: {"x": torch.stack([e[0] for e in examples]),
                                                  "y": torch.stack([e[1] for e in examples])})
'''


@pytest.fixture(scope="module")
def odd_parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    (root / "odd.py").write_text(PROGRAMS)
    out = {}
    for name in ("absorbing", "silent", "dict_batches"):
        out[name] = root / name
        RecordSession(f"{root / 'odd.py'}:{name}", out[name], progress=False).run()
    return out


@pytest.mark.parametrize("name,message", [
    ("absorbing", r"none of the 64 elements of largest \|dw \* dF/dw\| \(of \d+ with a non-zero one: "
                  r"linear\.\w+\[\d+\], .*\) changes the model's eval-mode outputs on the batch of step 5 when "
                  r"bit 0 flips; pass bit= a higher bit, or param= and index= explicitly"),
    ("silent", r"no element of linear.weight, linear.bias has a non-zero first-order effect \|dw \* dF/dw\| on "
               r"the model's eval-mode outputs on the batch of step 5 when bit 0 flips; pass bit= a higher bit"),
    ("dict_batches", r"cannot tell the model's input in a batch of type dict .* pass param= and index="),
])
def test_a_target_that_cannot_be_shown_to_act_is_refused(odd_parents, tmp_path, name, message):
    session = ForkSession(odd_parents[name], 5, progress=False)
    out = tmp_path / "child"
    with pytest.raises(PerturbationRefused, match=message):
        session.fork(out, "bitflip", steps=2)
    assert not out.exists()
    # The explicit target is the way out.
    assert ReplaySession(session.fork(tmp_path / "given", "bitflip:param=linear.weight,index=3" if name != "dict_batches"
                                      else "bitflip:param=weight,index=3", steps=2)).verify(progress=False).ok


def test_a_higher_bit_gets_through_the_absorbing_outputs(odd_parents, tmp_path):
    run = ForkSession(odd_parents["absorbing"], 5, progress=False).fork(tmp_path / "child", "bitflip:bit=30", steps=2)
    assert chosen(run)["bit"] == 30 and chosen(run)["outputs_changed"] > 0


def test_no_candidate_left_is_refused(session, tmp_path, monkeypatch):
    monkeypatch.setattr(perturb, "BITFLIP_CANDIDATES", 0)
    out = tmp_path / "child"
    with pytest.raises(PerturbationRefused, match="pass bit= a higher bit, or param= and index= explicitly"):
        session.fork(out, "bitflip", steps=2)
    assert not out.exists()


def test_a_flip_set_to_act_after_the_fork_step_cannot_choose_at_the_fork_step(session, tmp_path):
    out = tmp_path / "child"
    with pytest.raises(PerturbationRefused, match=f"chosen from the state at the step the flip acts \\({T + 2}\\)"):
        session.fork(out, from_spec("bitflip", start=T + 2), steps=4)
    assert not out.exists()


# ------------------------------------------------- (6) nothing else is touched ----


def test_choosing_changes_nothing_but_the_one_bit(session):
    placebo, _, _ = state_at(session, "placebo")
    probe, primitive, _ = state_at(session, "bitflip")
    target = primitive.values
    a, b = flat_tensors(placebo.state), flat_tensors(probe.state)
    assert set(a) == set(b)
    changed = {}
    for name in a:
        where = (words(a[name]) != words(b[name])).nonzero().flatten().tolist()
        if where:
            changed[name] = where
    assert changed == {f"/model/{target['param']}": [target["index"]]}
    name = f"/model/{target['param']}"
    assert int(words(a[name])[target["index"]] ^ words(b[name])[target["index"]]) == 1
    assert placebo.grads.keys() == probe.grads.keys()


def test_choosing_leaves_gradients_optimizer_state_modes_and_generators_alone(session):
    # The flip acts at T + 1, after the child has stepped once: the gradients of step T exist.
    engine = session._child_engine([from_spec("bitflip", start=T + 1)])
    engine.run_step()
    flip = engine.perturbations[0]
    grads = {n: p.grad for n, p in engine.model.named_parameters()}
    assert all(g is not None for g in grads.values())
    copies = {n: g.clone() for n, g in grads.items()}
    state = flat_tensors(copy.deepcopy(engine.state_dict()))
    modes = [m.training for m in engine.model.modules()] + [m.training for m in engine.ema.module.modules()]
    rng = torch.get_rng_state()
    flip.check(engine)  # the choice
    assert flip.values["index"] is not None and flip.values["outputs_changed"] > 0
    assert {n: p.grad for n, p in engine.model.named_parameters()} == grads  # the very same tensors ...
    assert all(torch.equal(words(copies[n]), words(g)) for n, g in grads.items())  # ... and bits
    after = flat_tensors(engine.state_dict())
    assert set(after) == set(state) and all(torch.equal(words(state[k]), words(after[k])) for k in state)
    assert [m.training for m in engine.model.modules()] + [m.training for m in engine.ema.module.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    # Checked again when the step begins: the choice stands (made once per engine).
    record = engine.run_step()
    assert record.step == T + 1 and flip.values["rank"] >= 1


def test_a_flip_to_infinity_is_chosen_first_and_recorded_without_a_non_finite_score(odd_parents):
    from replay.engine import Engine
    from replay.program import load_program
    from replay.rng import RngContract

    program = load_program(manifest(odd_parents["absorbing"])["program"]["reference"])[0]
    flip = from_spec("bitflip:param=linear.weight,bit=30", start=0)
    engine = Engine(program, RngContract(0), None, [flip])
    with torch.no_grad():
        engine.model.linear.weight.fill_(0.01)[3, 5] = 1.0  # exponent 127: bit 30 makes it inf
    flip.check(engine)
    spec = flip.to_json()
    assert (spec["param"], spec["index"], spec["score"]) == ("linear.weight", 3 * 64 + 5, None)
    assert json.loads(json.dumps(spec, allow_nan=False)) == spec
    flip.apply(engine)
    assert engine.model.linear.weight[3, 5].item() == float("inf")
