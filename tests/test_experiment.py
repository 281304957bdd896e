"""Experiments end to end: the quick demo runs and reports; the placebo arm is exactly zero;
a resumed experiment equals an uninterrupted one; a placebo that is not zero fails loudly."""

import json
import shutil
from pathlib import Path

import pytest

from replay.cli import main as cli
from replay.experiment import Arm, Experiment, ExperimentError, ExperimentSpec

HERE = Path(__file__).resolve().parent
TINY = str(HERE / "programs" / "tiny.py") + ":program"


def small_spec(**changes) -> ExperimentSpec:
    values = dict(
        name="tiny experiment", program=TINY, seeds=[1, 2, 3], fork_steps=[10], steps=24,
        arms=[Arm("placebo", ["placebo"]), Arm("m_reset", ["reset_exp_avg"]), Arm("bn_reset", ["reset_bn"]),
              Arm("bitflip", ["bitflip"], reference=True)],
        horizons=[0, 3, 6, 12], primary_horizon=3, probe={"source": "replay.demo:probe", "layer": "2"},
        bootstrap_resamples=200,
    )
    values.update(changes)
    return ExperimentSpec(**values)


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "placebo" in printed and "exactly 0 (checked)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["placebo"]["exact_zero"] is True
    arms = {e["arm"] for e in results["estimates"]}
    assert {"placebo", "adam_m_reset", "adam_v_reset", "momentum_reset", "bn_reset", "ema_reset",
            "order_swap", "bitflip"} <= arms
    primary = [e for e in results["estimates"] if e["distance"] == "tv" and e["horizon"] == results["experiment"]["primary_horizon"]]
    for e in primary:
        if e["arm"] == "placebo":
            assert e["mean"] == 0.0 and e["per_seed"] == [0.0] * len(e["per_seed"])
        else:
            assert len(e["bca"]) == 2 and len(e["t"]) == 2
    lifetimes = {(l["arm"], l["program"]) for l in results["lifetimes"]}
    for arm in ("adam_m_reset", "adam_v_reset", "bn_reset", "ema_reset", "order_swap"):
        assert (arm, "main") in lifetimes
    assert any(arm == "momentum_reset" for arm, _ in lifetimes)
    assert (out / "report.html").exists() and (out / "report.md").exists()


def test_placebo_is_exactly_zero_for_every_distance(tmp_path):
    results = Experiment(small_spec(), tmp_path / "exp").run(progress=False)
    placebo = [e for e in results["estimates"] if e["arm"] == "placebo"]
    assert placebo and all(v == 0.0 for e in placebo for v in e["per_seed"])
    assert results["placebo"]["exact_zero"] and results["placebo"]["checked"] == len(placebo) * 3
    others = [e for e in results["estimates"] if e["arm"] == "m_reset" and e["distance"] == "tv" and e["horizon"] == 12]
    assert others and all(v > 0.0 for v in others[0]["per_seed"])


def test_resumed_experiment_equals_uninterrupted(tmp_path):
    full = Experiment(small_spec(), tmp_path / "full").run(progress=False)
    partial_dir = tmp_path / "partial"
    Experiment(small_spec(), partial_dir).run(progress=False)
    # Lose a factual run, a child and an evaluation file, as a crash would.
    shutil.rmtree(partial_dir / "runs" / "main" / "seed-2")
    shutil.rmtree(partial_dir / "runs" / "main" / "seed-3.forks" / "T10" / "m_reset")
    next((partial_dir / "evals").glob("main__seed-1.forks__T10__bn_reset.safetensors")).unlink()
    resumed = Experiment(small_spec(), partial_dir).run(progress=False)
    strip = lambda r: json.dumps({k: r[k] for k in ("estimates", "lifetimes", "noise_floor", "placebo")}, sort_keys=True)
    assert strip(resumed) == strip(full)


def test_a_changed_spec_is_refused(tmp_path):
    Experiment(small_spec(), tmp_path / "exp").run(progress=False)
    with pytest.raises(ExperimentError, match="different spec"):
        Experiment(small_spec(seeds=[1, 2]), tmp_path / "exp").run(progress=False)


def test_nonzero_placebo_fails_loudly(tmp_path):
    spec = small_spec(arms=[Arm("placebo", ["placebo"]), Arm("bitflip", ["bitflip"], reference=True)])
    exp = Experiment(spec, tmp_path / "exp")
    exp.run(progress=False)
    # Swap a placebo child's evaluations for the bit-flip child's: the check must catch it.
    evals = tmp_path / "exp" / "evals"
    for suffix in (".safetensors", ".json"):
        shutil.copy(evals / f"main__seed-1.forks__T10__bitflip{suffix}", evals / f"main__seed-1.forks__T10__placebo{suffix}")
    with pytest.raises(ExperimentError, match="placebo"):
        exp.estimate()


def test_spec_from_toml_and_bad_specs(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text(f'''
name = "toml"
program = "{TINY}"
seeds = [1, 2]
fork_steps = [10]
steps = 20
horizons = [0, 4]
probe = {{ source = "replay.demo:probe" }}
arms = [ {{ name = "placebo", perturb = ["placebo"] }}, {{ name = "lr", perturb = ["lr_scale:factor=2"], window = 3 }} ]
''')
    spec = ExperimentSpec.from_toml(toml)
    assert [a.name for a in spec.arms] == ["placebo", "lr"] and spec.arms[1].window == 3
    with pytest.raises(ValueError, match="two distinct seeds"):
        small_spec(seeds=[1])
    with pytest.raises(ValueError, match="unknown perturbation"):
        small_spec(arms=[Arm("x", ["no_such_thing"])])
    with pytest.raises(ValueError, match="distances"):
        small_spec(distances=["tv", "euclid"])
