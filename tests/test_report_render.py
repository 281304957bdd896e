"""The audit report renders from real experiment results, in a real headless browser."""

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from replay.experiment import Arm, Experiment, ExperimentSpec
from replay.report import load_results, write_report

HERE = Path(__file__).resolve().parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    spec = ExperimentSpec(
        name="report test", program=str(HERE / "programs" / "tiny.py") + ":program", seeds=[1, 2, 3], fork_steps=[8],
        steps=20, arms=[Arm("placebo", ["placebo"]), Arm("m_reset", ["reset_exp_avg"]),
                        Arm("bitflip", ["bitflip"], reference=True)],
        horizons=[0, 4, 8, 11], primary_horizon=4, probe={"source": "replay.demo:probe", "layer": "2"},
        bootstrap_resamples=200)
    out = tmp_path_factory.mktemp("exp")
    Experiment(spec, out).run(progress=False)
    return out


def test_html_and_markdown(results, tmp_path):
    html_path, md_path = write_report(load_results(results), tmp_path / "report.html")
    page = html_path.read_text()
    data = json.loads((results / "results.json").read_text())
    for arm in ("placebo", "m_reset", "bitflip"):
        assert f"<td class='l'>{arm}</td>" in page
    assert "exactly 0 (checked)" in page and "Placebo check passed" in page
    # One lifetime figure (m_reset: function space and state space) and the per-seed strip plot.
    assert page.count("<svg") >= 2 and "class='decay state'" in page
    a_run = data["checklist"]["runs"][0]
    assert next(iter(a_run["order_hashes"].values())) in page
    assert data["experiment"]["probe"]["sha256"] in page and a_run["fingerprint_end"] in page
    md = md_path.read_text()
    assert "| placebo |" in md and "exactly 0 (checked)" in md and "report_plots/seeds.png" in md
    assert (tmp_path / "report_plots" / "seeds.png").stat().st_size > 5000


def test_renders_in_headless_chromium(results, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("REPLAY_REQUIRE_BROWSER") == "1":
            pytest.fail("REPLAY_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    html_path, _ = write_report(load_results(results), tmp_path / "report.html")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<table>" in dom and "m_reset" in dom and dom.count("<svg") >= 2
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,1800", html_path.as_uri()],
                   capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # Not a blank page: the decoded pixels take many distinct values.
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.std() > 0.05
