"""Memory characterization (issue 14): the back-flow witness, additivity of perturbations,
divergence exponents and calibration, as estimands (synthetic inputs with a known answer) and as
experiment kinds on programs whose memory is known in closed form (tests/programs/memory_synthetic.py)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from replay import estimands as est
from replay.cli import main as cli
from replay.engine import Engine
from replay.experiment import Experiment, ExperimentSpec
from replay.experiment.spec import Arm
from replay.fork import ForkSession
from replay.perturb import PerturbationRefused, from_spec
from replay.program import load_program
from replay.report import write_report
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

HERE = Path(__file__).parent
SYN = f"{HERE / 'programs' / 'memory_synthetic.py'}"
TINY = f"{HERE / 'programs' / 'tiny.py'}:program"
PROBE = {"source": f"{SYN}:probe"}


# ------------------------------------------------------------------------------ estimands ----


def test_ece_known_values():
    p = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    y = np.array([0, 1, 0, 1, 0, 0, 1, 1])
    # bin of 0.9: accuracy 0.5, |0.5 - 0.9| * 4/8; bin of 0.6: accuracy 0.5, |0.5 - 0.6| * 4/8
    assert est.expected_calibration_error(p, y) == pytest.approx(0.25, abs=1e-15)
    calibrated = np.array([[0.75, 0.25]] * 4)
    assert est.expected_calibration_error(calibrated, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-15)
    certain_wrong = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert est.expected_calibration_error(certain_wrong, np.array([1, 0])) == 1.0
    with pytest.raises(ValueError):
        est.expected_calibration_error(p, y, n_bins=0)


def test_backflow_witness_known_values():
    w = est.backflow_witness([1.0, 2.0, 3.0], [1.5, 2.5, 3.6])
    assert w["per_seed"] == pytest.approx([0.5, 0.5, 0.6])
    assert w["mean"] == pytest.approx(1.6 / 3)
    assert w["positive"] and w["interval"][0] > 0
    assert w["amplification"] == pytest.approx(7.6 / 6)
    flat = est.backflow_witness([1.0, 2.0], [1.0, 2.0])
    assert flat["mean"] == 0.0 and not flat["positive"]
    with pytest.raises(ValueError):
        est.backflow_witness([1.0, 2.0], [1.0])


def test_additivity_known_values():
    rng = np.random.default_rng(0)
    dp, dq = rng.normal(size=(5, 30, 3)), rng.normal(size=(5, 30, 3))
    assert est.additivity(dp, dq, dp + dq)["relative"]["mean"] == pytest.approx(0.0, abs=1e-14)
    assert est.additivity(dp, dp, dp)["relative"]["mean"] == 0.5  # Q repeats P
    assert est.additivity(dp, dp, np.zeros_like(dp))["relative"]["mean"] == 1.0  # together: nothing
    size = est.additivity(dp, dq, dp + dq + 2.0)["size"]
    assert size["mean"] == pytest.approx(2.0)  # an RMS logit
    zero = est.additivity(np.zeros((3, 4)), np.zeros((3, 4)), np.ones((3, 4)))["relative"]
    assert all(math.isnan(v) for v in zero["per_seed"])
    with pytest.raises(ValueError):
        est.additivity(dp, dq, dp[:, :2])
    d = est.distance_additivity([1.0, 2.0], [1.0, 2.0], [1.0, 2.0])
    assert d["excess"]["per_seed"] == [-1.0, -2.0] and d["ratio"]["per_seed"] == [0.5, 0.5]


def test_divergence_exponent_known_slope_and_window():
    t = np.arange(0, 30, dtype=float)
    d = np.exp(0.1 * t)[None, :] * np.array([[1.0], [2.0], [0.5], [3.0]])
    d[:, 20:] = d[:, 19:20] * np.linspace(1.0, 0.5, 10)  # saturates, then falls
    r = est.divergence_exponent(t, d)
    assert r["fit_ok"] and r["window"] == [0.0, 19.0] and r["points"] == 20
    assert r["exponent"] == pytest.approx(0.1, rel=1e-12)
    assert r["doubling_time"] == pytest.approx(math.log(2) / 0.1, rel=1e-12)
    assert r["r2"] == pytest.approx(1.0)
    # the first step is zero for one seed: the window starts where every seed has a distance
    d2 = d.copy()
    d2[1, 0] = 0.0
    assert est.divergence_exponent(t, d2)["window"][0] == 1.0
    flat = est.divergence_exponent(t, np.ones((3, t.size)))
    assert not flat["fit_ok"] and "a slope needs 3" in flat["reason"]
    dead = est.divergence_exponent(t, np.zeros((3, t.size)))
    assert not dead["fit_ok"] and "exactly 0" in dead["reason"]
    with pytest.raises(ValueError):
        est.divergence_exponent(t[::-1], d)


# ------------------------------------------------------------------------ perturbations ----


def _engine(ref, perturbations=(), seed=3):
    program, _ = load_program(ref)
    return Engine(program, Engine.contract_for(program, seed), perturbations=perturbations)


def test_redraw_changes_the_window_only():
    plain = _engine(f"{SYN}:drift_mu09")
    redrawn = _engine(f"{SYN}:drift_mu09", [from_spec({"name": "redraw"}, start=10, window=3)])
    for step in range(8, 16):
        plain.seed_step(step)
        a = torch.rand(8)
        redrawn.seed_step(step)
        b = torch.rand(8)
        same = torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert same == (not 10 <= step < 13), step
    augment = from_spec({"name": "redraw", "stream": "augment", "salt": 7}, start=2, window=1)
    engine = _engine(TINY, [augment])
    g1 = engine.seed_step(2)["augment"].initial_seed()
    g0 = plain.contract.generators(2)["augment"].initial_seed()
    assert g1 != g0
    for stream in ("order", "init"):
        with pytest.raises(ValueError, match="not drawn per step"):
            from_spec({"name": "redraw", "stream": stream})
    with pytest.raises(PerturbationRefused, match="no stream"):
        _engine(TINY, [from_spec({"name": "redraw", "stream": "nope"})])


def test_starts_after_and_redraw_children_replay(tmp_path):
    parent = tmp_path / "p"
    RecordSession(f"{SYN}:drift_mu09", parent, seed=2, progress=False).run()
    session = ForkSession(parent, 8, progress=False)
    late = session.fork(tmp_path / "late", [{"name": "lr_scale", "factor": 0.0, "starts_after": 3}])
    redraw = session.fork(tmp_path / "redraw", [{"name": "redraw"}], window=2)
    with RunDir.open(parent) as p, RunDir.open(late) as c, RunDir.open(redraw) as r:
        rows = {x.step: x.digest for x in p.ledger.rows()}
        assert [x.step for x in c.ledger.rows() if x.digest == rows[x.step]] == [8, 9, 10]
        differs = [x.step for x in r.ledger.rows() if x.digest != rows[x.step]]
        assert differs[0] == 8 and differs == list(range(8, 24))  # the weights stay apart after the window
    for child in (late, redraw):
        assert ReplaySession(child).verify(progress=False).ok
    with pytest.raises(ValueError, match="start or starts_after"):
        from_spec({"name": "reset_optimizer", "start": 3, "starts_after": 2})
    with pytest.raises(ValueError, match="starts_after"):
        from_spec({"name": "reset_optimizer", "starts_after": -1})
    # swap_windows keeps its own `offset` parameter
    assert from_spec({"name": "swap_windows", "a": 3, "offset": 4}).values["b"] == 7


# ---------------------------------------------------------------------------------- specs ----


def _spec(**kw):
    base = dict(program=f"{SYN}:drift_mu09", seeds=[1, 2, 3], fork_steps=[6], steps=16, horizons=[0, 3, 6],
                probe=PROBE, bootstrap_resamples=200)
    base.update(kw)
    return ExperimentSpec(**base)


def test_spec_kinds_generate_their_arms_and_round_trip():
    w = _spec(kind="witness", witness={"instrument_steps": [2, 1], "programs": [f"{SYN}:drift_mu09", f"{SYN}:drift_mu0"]})
    names = [a.name for a in w.arms]
    assert names[0] == "placebo" and "placebo@memory_synthetic-drift_mu0" in names
    for k in (1, 2):
        assert {f"redraw_k{k}", f"break_k{k}", f"redraw_k{k}+break", f"redraw_k{k}@memory_synthetic-drift_mu0"} <= set(names)
    brk = next(a for a in w.arms if a.name == "redraw_k2+break")
    assert brk.window == 2 and brk.perturb[1] == {"name": "reset_optimizer", "starts_after": 2}
    again = ExperimentSpec(**json.loads(json.dumps(w.to_json())))
    assert again.to_json() == w.to_json()
    a = _spec(kind="additivity", arms=[Arm("p", ["reset_momentum"]), Arm("q", [{"name": "weight_noise", "std": 0.1}]),
                                        Arm("r", ["lr_scale:factor=0"], window=2), Arm("b", ["bitflip"], reference=True)])
    assert a.pairs == [["p", "q"]] and [x.name for x in a.arms][-1] == "p+q"  # r has another window
    assert ExperimentSpec(**a.to_json()).to_json() == a.to_json()
    d = _spec(kind="divergence")
    assert [x.name for x in d.arms] == ["placebo", "bitflip"] and d.reference.name == "bitflip"
    assert "ece" in _spec(kind="calibration", arms=[Arm("p", ["reset_momentum"])]).distances


@pytest.mark.parametrize("kw, message", [
    (dict(kind="nope"), "unknown experiment kind"),
    (dict(kind="witness", horizons=[3, 6]), "horizon 0"),
    (dict(kind="witness", horizons=[0]), "horizon 0"),
    (dict(kind="witness", witness={"k": [1]}), "unknown key"),
    (dict(kind="witness", witness={"instrument_steps": []}), "at least one"),
    (dict(kind="witness", witness={"instrument_steps": [0]}), "instrument_steps"),
    (dict(kind="witness", witness={"stream": "order"}), "not drawn per step"),
    (dict(kind="witness", witness={"causal_break": "nope"}), "unknown perturbation"),
    (dict(kind="witness", witness={"causal_break": {"name": "reset_optimizer", "start": 2}}), "no start"),
    (dict(witness={"instrument_steps": [1]}), "belongs to kind"),
    (dict(kind="divergence", horizons=[0, 4]), "at least 3 horizons"),
    (dict(kind="calibration", arms=[Arm("p", ["reset_momentum"])], distances=["tv"]), "keep 'ece'"),
    (dict(kind="additivity", arms=[Arm("p", ["reset_momentum"])]), "needs two arms"),
    (dict(arms=[Arm("p", ["reset_momentum"])], pairs=[["p", "x"]]), "not an arm"),
    (dict(arms=[Arm("p", ["reset_momentum"])], pairs=[["p", "p"]]), "with itself"),
    (dict(arms=[Arm("p", ["reset_momentum"]), Arm("q", ["reset_momentum"], window=2)], pairs=[["p", "q"]]),
     "same program and window"),
    (dict(arms=[Arm("p", ["reset_momentum"]), Arm("b", ["bitflip"], reference=True)], pairs=[["p", "b"]]),
     "reference"),
    (dict(arms=[Arm("p", ["reset_momentum"]), Arm("q", ["placebo"])], pairs="p,q"), "list of"),
])
def test_spec_refusals(kw, message):
    with pytest.raises(ValueError, match=message):
        _spec(**kw)


# ------------------------------------------------------------------ experiments, known answers ----


@pytest.fixture(scope="module")
def witness_experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("witness")
    spec_path = out / "witness.toml"
    # relative program references: resolved against the spec's folder, in [witness] too
    (out / "memory_synthetic.py").write_text(Path(SYN).read_text())
    spec_path.write_text("""
kind = "witness"
name = "synthetic witness"
program = "memory_synthetic.py:drift_mu09"
seeds = [1, 2, 3]
fork_steps = [6]
steps = 16
horizons = [0, 3, 6]
probe = { source = "memory_synthetic.py:probe" }
distances = ["tv", "param_l2", "ece"]
primary_distance = "param_l2"
bootstrap_resamples = 200
[witness]
instrument_steps = [1, 2]
programs = ["memory_synthetic.py:drift_mu09", "memory_synthetic.py:drift_mu0"]
""")
    assert cli(["experiment", str(spec_path), "--out", str(out / "exp"), "--no-progress"]) == 0
    return out / "exp"


def test_witness_matches_momentum_theory(witness_experiment):
    results = json.loads((witness_experiment / "results.json").read_text())
    assert results["placebo"]["exact_zero"]
    rows = [r for r in results["witness"]["rows"] if r["distance"] == "param_l2"]
    assert {(r["program"], r["k"], r["b_steps"]) for r in rows} == {
        (p, k, b) for p in ("main", "memory_synthetic-drift_mu0") for k in (1, 2) for b in (3, 6)}
    for r in rows:
        mu = r["momentum"]
        assert r["break_d1_equal"]
        # no gradient feedback: the break leaves nothing to flow back (rounding only)
        assert abs(r["break_witness"]) < 1e-5 * r["d1_mean"]
        if r["program"] == "main":
            assert mu == 0.9 and r["positive"]
            if r["k"] == 1:  # W / D1 = mu (1 - mu^b) / (1 - mu) exactly, up to float32 rounding
                expected = mu * (1 - mu ** r["b_steps"]) / (1 - mu)
                assert r["witness"] / r["d1_mean"] == pytest.approx(expected, rel=1e-4)
            assert r["attenuation"]["interval"][0] > 0
            assert r["theory_ratio_coherent"] == pytest.approx((1 - mu ** r["k"]) / (1 - mu) / 1.0)
        else:  # momentum 0: memoryless, W = 0 up to rounding
            assert mu == 0.0 and abs(r["witness"]) < 1e-5 * r["d1_mean"]


def test_witness_in_report(witness_experiment):
    results = json.loads((witness_experiment / "results.json").read_text())
    html_path, md_path = write_report(results, witness_experiment / "report.html")
    md = md_path.read_text()
    assert "## Training memory" in md and "### Back-flow witness" in md and "### Calibration" in md
    assert "witness D2 − D1" in md and "memory_synthetic-drift_mu0" in md
    assert "Back-flow witness" in html_path.read_text()


@pytest.fixture(scope="module")
def additivity_experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("additivity") / "exp"
    spec = _spec(kind="additivity", fork_steps=[6], horizons=[0, 2, 4, 8], steps=18,
                 distances=["tv", "param_l2", "ece"],
                 arms=[Arm("placebo", ["placebo"]),
                       Arm("noise1", [{"name": "weight_noise", "std": 0.05, "salt": 1}]),
                       Arm("noise2", [{"name": "weight_noise", "std": 0.05, "salt": 2}]),
                       Arm("freeze1", ["lr_scale:factor=0"], window=2),
                       Arm("freeze2", ["lr_scale:factor=0"], window=2),
                       Arm("bitflip", [{"name": "bitflip", "bit": 20}], reference=True)])
    assert spec.pairs == [["noise1", "noise2"], ["freeze1", "freeze2"]]
    Experiment(spec, out).run(progress=False)
    return out


def test_additivity_known_answers(additivity_experiment):
    results = json.loads((additivity_experiment / "results.json").read_text())
    rows = results["additivity"]["rows"]
    assert {(tuple(r["pair"]), r["horizon"]) for r in rows} == {
        (p, h) for p in (("noise1", "noise2"), ("freeze1", "freeze2")) for h in (0, 2, 4, 8)}
    for r in rows:
        if r["pair"] == ["noise1", "noise2"]:  # weight displacements persist and add (linear logits)
            assert 0 <= r["relative"] < 1e-4
        else:  # freezing twice is freezing once: Q repeats P, exactly
            assert r["relative_per_seed"] == [0.5, 0.5, 0.5]
            assert r["distances"]["param_l2"]["ratio"] == 0.5


def test_calibration_estimand(additivity_experiment):
    results = json.loads((additivity_experiment / "results.json").read_text())
    rows = results["calibration"]["rows"]
    placebo = [r for r in rows if r["arm"] == "placebo"]
    assert placebo and all(r["difference"] == 0.0 and r["ece_child"] == r["ece_parent"] for r in placebo)
    for r in rows:
        assert 0 <= r["ece_parent"] <= 1 and 0 <= r["ece_child"] <= 1
        assert r["difference"] == pytest.approx(r["ece_child"] - r["ece_parent"], abs=1e-12)
    ece = [e for e in results["estimates"] if e["distance"] == "ece" and e["arm"] == "noise1"]
    match = [r for r in rows if r["arm"] == "noise1"]
    assert sorted(e["mean"] for e in ece) == pytest.approx(sorted(r["difference"] for r in match), abs=1e-12)
    # the drift's flip neither grows nor shrinks: no divergence exponent, and the report says why
    dv = results["divergence"]["rows"]
    assert dv and all(not r["fit_ok"] and r["reason"] for r in dv)


@pytest.fixture(scope="module")
def divergence_experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("divergence") / "exp"
    spec = _spec(kind="divergence", program=f"{SYN}:expanding", fork_steps=[5, 25], steps=40,
                 horizons=[0, 1, 2, 4, 8, 12], distances=["tv", "param_l2"],
                 arms=[Arm("bitflip", [{"name": "bitflip", "bit": 20}], reference=True),
                       Arm("frozen_flip", [{"name": "bitflip", "bit": 20}], program=f"{SYN}:frozen")])
    Experiment(spec, out).run(progress=False)
    return out


def test_divergence_exponent_known_rate(divergence_experiment):
    results = json.loads((divergence_experiment / "results.json").read_text())
    dv = results["divergence"]
    rows = {(r["program"], r["fork_step"], r["distance"]): r for r in dv["rows"]}
    for T in (5, 25):
        r = rows[("main", T, "param_l2")]
        assert r["fit_ok"] and r["window"] == [0.0, 12.0]
        assert r["exponent"] == pytest.approx(math.log(1 + 0.01 * 5.0), rel=1e-4)
        # the frozen program's flip stays where it was: nothing grows
        frozen = rows[("memory_synthetic-frozen", T, "param_l2")]
        assert not frozen["fit_ok"] and "grows over 1" in frozen["reason"]
    comparison = next(c for c in dv["comparisons"] if c["program"] == "main" and c["distance"] == "param_l2")
    assert abs(comparison["difference"]) < 1e-5
    md = write_report(results, divergence_experiment / "report.html")[1].read_text()
    assert "### Divergence exponent of the chaos baseline" in md and "Early against late" in md


def test_witness_printed_and_refused_when_too_short(witness_experiment, tmp_path, capsys):
    from replay.cli import print_memory

    print_memory(json.loads((witness_experiment / "results.json").read_text()))
    out = capsys.readouterr().out
    assert "Back-flow witness:" in out and "Calibration:" in out and "witness D2 − D1" in out
    spec = _spec(kind="witness", steps=10, witness={"instrument_steps": [4]})  # 6 + 4 + 6 > 10
    with pytest.raises(ValueError, match="the witness needs 16 steps"):
        Experiment(spec, tmp_path / "short").run(progress=False)


def test_report_survives_malformed_memory_sections(witness_experiment):
    """results.json is untrusted: wrong types in the memory sections show as n/a, never a crash."""
    from replay.report.model import View
    from replay.report.render import _memory_html, _memory_md

    results = json.loads((witness_experiment / "results.json").read_text())
    bad_rows = [{"distance": [1], "interval": "x", "attenuation": 3, "pair": "pq", "window": {}, "k": "k",
                 "distances": {"tv": 5}, "witness": {}}, "not a row", 7]
    for name in ("witness", "additivity", "divergence", "calibration"):
        for section in ({"rows": bad_rows, "primary_distance": ["tv"], "comparisons": [{"difference": "x"}, 1]},
                        {"rows": "x"}, [], "x", None):
            view = View({**results, name: section})
            html, md = _memory_html(view), _memory_md(view)
            if isinstance(section, dict):
                assert "Training memory" in html and "## Training memory" in md
