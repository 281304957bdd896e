"""The validation experiments of docs/validation.md, reduced to test size: what an estimator
should find on a case whose answer is known."""

from pathlib import Path

import pytest

from replay.experiment import Arm, Experiment, ExperimentSpec

PROGRAMS = Path(__file__).resolve().parent.parent / "examples" / "validation" / "programs.py"


def test_momentum_state_lifetime_orders_beta_090_before_099(tmp_path):
    """A momentum reset removes the buffer; with the same lr / (1 - beta) its trace in the
    per-step updates decays like beta^h: half-life ln 2 / ln(1/beta) = 6.6 steps at 0.9 and 69 at
    0.99. The measured state-space half-lives must order that way with disjoint intervals, and
    lie near the theory."""
    spec = ExperimentSpec(
        name="momentum (test size)", program=f"{PROGRAMS}:momentum_090", seeds=[1, 2, 3, 4], fork_steps=[60],
        steps=200, horizons=[2, 4, 8, 16, 32, 64, 128], primary_horizon=16, probe={"source": f"{PROGRAMS}:probe"},
        arms=[Arm("reset_090", ["reset_momentum"]),
              Arm("reset_099", ["reset_momentum"], program=f"{PROGRAMS}:momentum_099"),
              Arm("bitflip", ["bitflip"], reference=True)],
        bootstrap_resamples=200)
    results = Experiment(spec, tmp_path / "exp").run(progress=False)
    state = {l["arm"]: l["state"] for l in results["lifetimes"]}
    fast, slow = state["reset_090"], state["reset_099"]
    assert fast["fit_ok"] and slow["fit_ok"]
    assert fast["interval"][1] < slow["interval"][0], (fast, slow)
    assert 3.0 < fast["half_life"] < 13.0, fast
    assert 35.0 < slow["half_life"] < 140.0, slow


def test_backflow_witness_needs_momentum_and_the_break_removes_it(tmp_path):
    """docs/validation.md's witness, reduced: on the digits MLP with dropout, other dropout masks
    for one step leave two runs that the same continuation brings closer without momentum (the
    witness is negative, and the causal break changes nothing: SGD without momentum has no
    state) and drives apart with momentum 0.9 (positive), and resetting the momentum buffers when
    the continuation begins removes that (the attenuation's interval lies above 0)."""
    spec = ExperimentSpec(
        name="witness (test size)", kind="witness", program=f"{PROGRAMS}:dropout_sgd_09", seeds=[1, 2, 3, 4],
        fork_steps=[100], steps=110, horizons=[0, 8], probe={"source": f"{PROGRAMS}:probe"},
        distances=["param_l2"], primary_distance="param_l2", bootstrap_resamples=200,
        witness={"instrument_steps": [1], "programs": [f"{PROGRAMS}:dropout_sgd_09", f"{PROGRAMS}:dropout_sgd_00"]})
    results = Experiment(spec, tmp_path / "exp").run(progress=False)
    rows = {r["momentum"]: r for r in results["witness"]["rows"]}
    without, with_momentum = rows[0.0], rows[0.9]
    assert without["interval"][1] < 0 and without["attenuation"]["per_seed"] == [0.0] * 4
    assert with_momentum["interval"][0] > 0 and with_momentum["attenuation"]["interval"][0] > 0
    assert with_momentum["break_witness"] < with_momentum["witness"]
