"""Experiments end to end: the quick demo runs and reports; the placebo arm is exactly zero;
a resumed experiment equals an uninterrupted one; a placebo that is not zero fails loudly; a dead
reference fails; verdicts agree with their intervals; the README's example runs as written."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from replay.cli import main as cli
from replay.experiment import Arm, Experiment, ExperimentError, ExperimentSpec
from replay.experiment.audit import placebo_check
from replay.experiment.spec import SIGNED

ROOT = Path(__file__).resolve().parent.parent

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
    results = json.loads((out / "results.json").read_text(), parse_constant=float)
    assert len(results["experiment"]["seeds"]) >= 5
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
    # The reference is alive: the one-bit flip moves the probe outputs for every seed somewhere.
    for ref in results["references"]:
        assert ref["zero_everywhere"] is False and len(ref["targets"]) == 5
    ref_rows = [e for e in results["estimates"] if e["reference"] and e["distance"] == "tv"]
    assert any(v > 0 for e in ref_rows for v in e["per_seed"])
    # One row per (program, arm, fork step) in the printed table: the reference once per program.
    estimates_table = printed.split("lifetimes (")[0]
    table = [line.split()[:3] for line in estimates_table.splitlines() if line.startswith(("main ", "demo-sgd_program "))]
    keys = [tuple(t) for t in table if len(t) == 3 and t[2].isdigit()]
    assert len(keys) == len(set(keys)) and ("main", "bitflip", "30") in keys
    assert any(k[0] != "main" and k[1] == "bitflip" for k in keys)
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


# ------------------------------------------------------------------ verdicts, references ----


DEMO_ADAMW = "replay.demo:adamw_program"


def demo_spec(**changes) -> ExperimentSpec:
    """The demo's AdamW program (no augmentation: pixel 0 of every digit is 0), short."""
    values = dict(name="short demo", program=DEMO_ADAMW, seeds=[1, 2, 3, 4, 5], fork_steps=[12], steps=30,
                  arms=[Arm("placebo", ["placebo"]), Arm("v_reset", ["reset_exp_avg_sq"]),
                        Arm("same", ["lr_scale:factor=1"]), Arm("bitflip", ["bitflip"], reference=True)],
                  horizons=[0, 4, 8, 16], primary_horizon=8, probe={"source": "replay.demo:probe"},
                  bootstrap_resamples=200)
    values.update(changes)
    return ExperimentSpec(**values)


def test_verdicts_are_one_per_row_and_agree_with_their_intervals(tmp_path, capsys):
    results = Experiment(demo_spec(), tmp_path / "exp").run(progress=False)
    allowed = {"memory beyond chaos", "no memory beyond chaos", "inconclusive", "placebo", "reference"}
    for e in results["estimates"]:
        if e["distance"] in SIGNED and not (e["placebo"] or e["reference"]):
            assert e["verdict"] is None
            continue
        assert e["verdict"] in allowed, e
        if e["verdict"] == "memory beyond chaos":
            assert e["excess_interval"][0] > 0 and e["q_value"] <= 0.05 and e["excess_mean"] > 0
        if e["verdict"] == "no memory beyond chaos":
            assert e["excess_mean"] < e["tost_margin"]
            assert e["tost_margin"] == pytest.approx(0.1 * e["noise_floor"])
        if e["verdict"] in ("memory beyond chaos", "no memory beyond chaos", "inconclusive"):
            # The test is arm against reference, paired per seed, at the same step.
            ref = next(r for r in results["estimates"] if r["reference"] and r["step"] == e["step"]
                       and r["distance"] == e["distance"] and r["program"] == e["program"])
            assert e["excess_per_seed"] == pytest.approx([a - b for a, b in zip(e["per_seed"], ref["per_seed"])])
    # lr_scale by 1 changes nothing: exactly 0 everywhere, flagged, and no memory beyond chaos
    # cannot be claimed from a t test of a distance against 0 (the old bug): it is tested against the reference.
    same = [e for e in results["estimates"] if e["arm"] == "same"]
    assert same and all(e["zero_everywhere"] for e in same)
    assert all(e["verdict"] != "memory beyond chaos" for e in same)
    v_reset = [e for e in results["estimates"] if e["arm"] == "v_reset"]
    assert not any(e["zero_everywhere"] for e in v_reset)
    # Lifetimes: a model is chosen and stated; the state-space lifetime is computed.
    for l in results["lifetimes"]:
        assert l["model"] and l["formula"] and "state" in l
        assert l["state"] is not None and len(l["state"]["horizons"]) >= 2
    assert results["experiment"]["verdict_rule"]
    printed = capsys.readouterr().out
    cli(["report", str(tmp_path / "exp")])


def test_a_dead_reference_fails_the_experiment(tmp_path):
    # Element 0 of the first layer weighs pixel 0, which is 0 in every digit: flipping it never
    # changes an output, so this "reference" measures exactly 0 everywhere.
    spec = demo_spec(arms=[Arm("placebo", ["placebo"]),
                           Arm("dead", ["bitflip:param=0.weight,index=0"], reference=True)],
                     horizons=[0, 4], primary_horizon=4)
    with pytest.raises(ExperimentError, match="reference arm 'dead' measures exactly 0"):
        Experiment(spec, tmp_path / "exp").run(progress=False)
    results = json.loads((tmp_path / "exp" / "results.json").read_text(), parse_constant=float)
    assert results["references"][0]["zero_everywhere"] is True
    assert results["references"][0]["targets"][0]["index"] == 0


def test_the_default_reference_is_alive_on_digits(tmp_path):
    spec = demo_spec(arms=[Arm("bitflip", ["bitflip"], reference=True)], horizons=[0, 4], primary_horizon=4)
    results = Experiment(spec, tmp_path / "exp").run(progress=False)
    rows = [e for e in results["estimates"] if e["distance"] == "tv"]
    assert all(v > 0 for e in rows for v in e["per_seed"])
    targets = results["references"][0]["targets"]
    assert len(targets) == 5 and all(t["param"] and isinstance(t["index"], int) for t in targets)


def test_probe_without_a_layer_has_no_cka_and_runs(tmp_path):
    spec = small_spec(probe={"source": "replay.demo:probe"})
    assert "cka" not in spec.distances
    results = Experiment(spec, tmp_path / "exp").run(progress=False)
    assert results["placebo"]["exact_zero"]
    assert not any(e["distance"] == "cka" for e in results["estimates"])
    with pytest.raises(ValueError, match="cka.*probe.layer"):
        small_spec(probe={"source": "replay.demo:probe"}, distances=["tv", "cka"])


def test_nan_is_never_a_placebo_failure(tmp_path):
    exp = Experiment(small_spec(), tmp_path / "exp")
    exp.run(progress=False)
    report = placebo_check(exp, [0.0, math.nan, 0.0])
    assert report["exact_zero"] and report["not_computed"] == 1 and "NaN" in report["detail"]
    assert not placebo_check(exp, [0.0, 1e-9])["exact_zero"]


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if b.startswith(marker)]
    assert len(found) == 1, f"README has no single block starting with {marker!r}"
    return found[0]


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_program.py").write_text(_readme_block("# my_program.py"))
    (tmp_path / "experiment.toml").write_text(_readme_block("# experiment.toml"))
    monkeypatch.chdir(tmp_path)
    assert cli(["experiment", "experiment.toml", "--out", "exp", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exactly 0 (checked)" in printed and "adam_m_reset" in printed
    results = json.loads((tmp_path / "exp" / "results.json").read_text(), parse_constant=float)
    assert results["placebo"]["exact_zero"] and not results["references"][0]["zero_everywhere"]
    assert cli(["report", "exp"]) == 0
    assert (tmp_path / "exp" / "report.html").exists()
