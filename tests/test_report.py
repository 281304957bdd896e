"""The audit report (replay.report) from synthetic results: the HTML page parses, is self-contained,
holds the estimates table (every arm; the placebo row exactly 0 and checked), the plots and the
reporting checklist's artifacts; the Markdown twin says the same with PNG plots; missing pieces
are said, not hidden; and the page renders in a real headless Chromium (DOM and screenshot).

The results come from tests/fixtures/make_results.py, so nothing is trained here. The browser
test skips when Chromium is missing, unless REPLAY_REQUIRE_BROWSER=1 (CI), where it fails."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from replay.report import load_results, write_report
from replay.report.model import View

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import make_results as fx  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# ------------------------------------------------------------------------------ helpers ----


class Page(HTMLParser):
    """A strict-enough parse: every non-void element closes in order; collects the tables (rows of
    cell texts, with the row's class), the svg/img elements, and every src/href attribute."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tables: list[list[tuple[str, list[str]]]] = []
        self.table_depth = 0
        self.row: list[str] | None = None
        self.row_class = ""
        self.cell: list[str] | None = None
        self.svgs = 0
        self.imgs = 0
        self.links: list[str] = []
        self.tags: dict[str, int] = {}
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        attrs = dict(attrs)
        for key in ("src", "href", "xlink:href", "data"):
            if attrs.get(key):
                self.links.append(attrs[key])
        if tag == "svg":
            self.svgs += 1
        if tag == "img":
            self.imgs += 1
        if tag == "table":
            self.tables.append([])
            self.table_depth += 1
        if tag == "tr":
            self.row, self.row_class = [], attrs.get("class") or ""
        if tag in ("td", "th") and self.row is not None:
            self.cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for key in ("src", "href", "xlink:href"):
            value = dict(attrs).get(key)
            if value:
                self.links.append(value)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None
        if tag == "tr" and self.row is not None and self.tables:
            self.tables[-1].append((self.row_class, self.row))
            self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def estimates_table(page: Page) -> list[tuple[str, list[str]]]:
    """The rows of the estimates table (the first table whose header has 'half-life'), without the
    rows that only name a group (program and fork step)."""
    for table in page.tables:
        if table and any("half-life" in c for c in table[0][1]):
            return [row for row in table if "group" not in row[0]]
    raise AssertionError("no estimates table in the page")


def render(results: dict, out: Path) -> tuple[Path, Path]:
    fx.write(out, results)
    return write_report(load_results(out), out / "report.html")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The full synthetic experiment, rendered once: (results, html path, md path, html text)."""
    out = tmp_path_factory.mktemp("report")
    results = fx.make_results()
    html_path, md_path = render(results, out)
    return results, html_path, md_path, html_path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- the page ----


def test_load_results_reads_nan_and_infinity(tmp_path):
    path = fx.write(tmp_path)
    text = path.read_text()
    assert "NaN" in text and "Infinity" in text  # the fixture exercises both
    results = load_results(tmp_path)
    halves = [l["half_life"] for l in results["lifetimes"]]
    assert any(math.isinf(h) for h in halves) and any(math.isnan(h) for h in halves)
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text(json.dumps({"estimates": []}))
    with pytest.raises(ValueError, match="experiment"):
        load_results(tmp_path / "bad")


def test_html_parses_and_is_self_contained(full):
    _, html_path, _, text = full
    assert text.startswith("<!DOCTYPE html>")
    page = Page(text)
    assert not page.errors, page.errors[:5]
    # No network: no scripts, no external style sheets, no fetched resources; only in-page anchors.
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(link.startswith("#") or link.startswith("data:") for link in page.links), \
        [l for l in page.links if not l.startswith(("#", "data:"))][:5]
    assert "@import" not in text and "url(http" not in text
    assert "<style>" in text


def test_estimates_table_has_every_arm_and_the_placebo_is_exactly_zero(full):
    results, _, _, text = full
    page = Page(text)
    rows = estimates_table(page)
    header, body = rows[0][1], rows[1:]
    for column in ("95% BCa", "95% t", "noise floor", "ratio to floor", "q (BH)", "significant", "TOST equivalent",
                   "half-life [95% CI]"):
        assert column in header
    col = {name: header.index(name) for name in header}
    # One row per (program, fork step, arm) at the primary distance and horizon.
    expected = {(e["arm"], e["program"], e["fork_step"]) for e in results["estimates"]
                if e["distance"] == "tv" and e["horizon"] == results["experiment"]["primary_horizon"]}
    seen = {(cells[col["arm"]], cells[col["program"]], int(cells[col["fork step"]])) for _, cells in body}
    assert seen == expected
    assert {a["name"] for a in results["experiment"]["arms"]} == {arm for arm, _, _ in seen}
    placebo = [(cls, cells) for cls, cells in body if cells[0] == "placebo"]
    assert len(placebo) == 2  # the main program's, at both fork steps (the variant has no placebo arm)
    for cls, cells in placebo:
        assert "placebo" in cls
        assert cells[col["mean"]] == "0 (exactly)"
        assert cells[col["half-life [95% CI]"]] == "exactly 0 (checked)"
    assert "Placebo check passed" in text
    # Every real arm carries intervals and a lifetime (a number, ∞ with its reason, never blank).
    for cls, cells in body:
        if cells[0] in ("placebo", "bitflip"):
            continue
        assert re.fullmatch(r"\[[^\]]+, [^\]]+\]", cells[col["95% BCa"]]) and "n/a" not in cells[col["95% BCa"]]
        assert "n/a" not in cells[col["95% t"]]
        life = cells[col["half-life [95% CI]"]]
        assert re.match(r"(\d|∞)", life), life
        if cells[0] == "ema_reset":
            assert life.startswith("∞") and "does not decay" in life
    refs = [cells for cls, cells in body if cells[0] == "bitflip"]
    assert refs and all(c[col["half-life [95% CI]"]] == "reference (chaos baseline)" for c in refs)


def test_strings_are_escaped(full):
    _, _, md_path, text = full
    assert "synthetic: training memory on digits &lt;test &amp; &quot;escape&quot;&gt;" in text
    assert "<test" not in text
    assert "<test" not in md_path.read_text()


def test_plots_are_inline(full):
    results, _, _, text = full
    page = Page(text)
    n_lifetimes = len(results["lifetimes"])
    assert page.svgs == n_lifetimes + 1  # one decay figure per lifetime, plus the per-seed strip plot
    assert text.count("<figure>") == n_lifetimes + 1
    assert "xmlns:xlink" in text  # matplotlib's SVG, inline
    # Figures are deterministic: no date in the SVG metadata.
    assert "<dc:date>" not in text


def test_checklist_lists_every_artifact(full):
    results, _, _, text = full
    checklist = results["checklist"]
    runs = checklist["runs"]
    for needle in (fx.PROGRAM_SHA256, fx.VARIANT_SHA256, fx.PROBE_SHA256, fx.order_hash(1, 0), fx.order_hash(5, 8)):
        assert needle in text, needle
    for run in runs:
        assert run["path"] in text and run["fingerprint_fork"] in text and run["fingerprint_end"] in text
        for h in run["order_hashes"].values():
            assert h in text
    # The order-swap fork's own epoch hash (differs from its parent's) is listed too.
    assert fx.order_hash(3, 1000 + 60) in text
    assert f"{len(runs)} runs, {len(runs)} verified complete" in text
    # Collapsible per-epoch order hashes.
    assert text.count("<details>") >= len(runs)
    experiment = results["experiment"]
    for needle in (experiment["interval_method"], experiment["multiple_testing"], experiment["probe"]["definition"],
                   "equivalence test (TOST) margin", "horizons (h: steps after the window)", "0, 5, 10, 20, 40, 70",
                   "5: 1, 2, 3, 4, 5", "RNG contract", "replay-rng-v1", "Environment", "2.13.0+cpu",
                   "Determinism flags", "deterministic_algorithms", "Checkpoint schedule", "[0, 50, 100, 150, 200]",
                   "reshuffle"):
        assert html_escaped(needle) in text, needle


def html_escaped(s: str) -> str:
    import html

    return html.escape(s)


def test_markdown_twin(full):
    results, html_path, md_path, _ = full
    assert md_path == html_path.with_suffix(".md") and md_path.exists()
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# synthetic: training memory on digits")
    assert "| arm | program | fork step |" in md
    assert "| placebo | main | 60 |" in md and "exactly 0 (checked)" in md
    for arm in {a["name"] for a in results["experiment"]["arms"]}:
        assert f"| {arm} |" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == len(results["lifetimes"]) + 1
    for rel in images:
        png = md_path.parent / rel
        assert rel.startswith("report_plots/") and png.exists(), rel
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    for needle in (fx.PROGRAM_SHA256, fx.PROBE_SHA256, fx.order_hash(2, 0), "Benjamini-Hochberg",
                   results["checklist"]["runs"][0]["fingerprint_end"], "replay-rng-v1", "### Checkpoint schedule"):
        assert needle in md, needle
    # Table rows keep their column count (no unescaped pipe inside a cell).
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| arm | program | fork step | h (step) | seeds"))
    table = lines[start:lines.index("", start)]
    assert len(table) == 2 + len(estimates_table(Page(full[3]))) - 1
    cells = [len(re.split(r"(?<!\\)\|", row)) for row in table]
    assert set(cells) == {len(header_cells := table[0].split("|"))}, (cells, len(header_cells))


def test_missing_pieces_are_said_not_hidden(tmp_path):
    """One seed, no lifetimes, no placebo, no reference, NaN intervals, no floor, no checklist."""
    html_path, md_path = render(fx.degenerate_results(), tmp_path)
    text, md = html_path.read_text(), md_path.read_text()
    page = Page(text)
    assert not page.errors
    for needle in ("Only one seed", "No lifetimes in the results", "No placebo check in the results",
                   "No reference (one-bit flip) arm", "Intervals are undefined (NaN)", "No noise-floor curve",
                   "No reporting checklist", "No runs recorded", "No RNG contract recorded",
                   "No environment fingerprint recorded", "No determinism flags recorded",
                   "No checkpoint schedule recorded"):
        assert needle in text, needle
        assert needle in md, needle
    rows = estimates_table(page)[1:]
    assert {cells[0] for _, cells in rows} == {"adam_m_reset", "bn_reset"}
    assert all("n/a" in cells[6] for _, cells in rows)  # the BCa column
    # Raw decay curves are still drawn from the estimates, one per arm, plus the strip plot.
    assert page.svgs == 3


def test_nearly_empty_and_non_finite_results_render(tmp_path, recwarn):
    """Only an experiment section; or NaN/inf everywhere, an interval of None, a run that failed
    verification: a page that says so, never an exception."""
    html_path, md_path = write_report({"experiment": {}}, tmp_path / "empty" / "report.html")
    text = html_path.read_text()
    assert "The results hold no estimates" in text and Page(text).svgs == 1 and md_path.exists()
    nan, inf = float("nan"), float("inf")
    results = {
        "experiment": {"name": "non-finite", "seeds": [1, 2], "primary_distance": "tv", "primary_horizon": 0,
                       "arms": [{"name": "a", "perturb": ["reset_bn"]}]},
        "estimates": [{"arm": "a", "fork_step": 5, "horizon": 0, "distance": "tv", "mean": nan, "bca": [nan, nan],
                       "t": None, "per_seed": [nan, 1.0], "noise_floor": inf, "ratio": nan, "q_value": nan}],
        "lifetimes": [{"arm": "a", "fork_step": 5, "distance": "tv", "half_life": inf, "interval": [nan, inf],
                       "fit_ok": False, "reason": "no decay"}],
        "noise_floor": {"tv": {"horizons": [0], "mean": [nan], "lo": [None], "hi": [1.0]}},
        "placebo": None,
        "checklist": {"runs": [{"path": "runs/x", "verified": "failed: digest mismatch at step 7"}]},
    }
    html_path, md_path = write_report(results, tmp_path / "nan" / "report.html")
    text = html_path.read_text()
    page = Page(text)
    assert not page.errors and page.svgs == 2
    (_, cells), = estimates_table(page)[1:]
    assert cells[5] == "n/a" and cells[6] == "n/a" and cells[7] == "n/a" and cells[-1].startswith("∞")
    assert "1 of 1 runs are not verified complete" in text and "failed: digest mismatch at step 7" in text
    assert "runs verified: 0/1" in text
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_failed_placebo_is_loud(tmp_path):
    results = fx.make_results(fork_steps=(60,), arms=("placebo", "bn_reset", "bitflip"))
    results["placebo"].update(exact_zero=False, detail="3 nonzero distances")
    for e in results["estimates"]:
        if e["arm"] == "placebo":
            e["mean"], e["per_seed"] = 1e-7, [0, 0, 5e-7, 0, 0]
    html_path, md_path = render(results, tmp_path)
    text = html_path.read_text()
    assert "Placebo check FAILED" in text and "NOT ZERO" in text and "exactly 0 (checked)" not in text
    assert "placebo: NOT ZERO" in text
    assert "**Placebo check FAILED:**" in md_path.read_text()


def test_numpy_values_and_floor_keyed_by_fork_step(tmp_path):
    """Results straight from the pipeline (numpy scalars, tuples) render; noise floors keyed 'T'
    (not 'program@T') are found for every fork step."""
    results = fx.make_results(floor_keys="T")
    view = View(results)
    assert view.floor_entry("tv", "main", 100)["fork_step"] == 100
    assert view.floor_entry("tv", "main", 60)["fork_step"] == 60
    e = next(e for e in results["estimates"] if e["arm"] == "bn_reset" and e["fork_step"] == 100 and e["horizon"] == 20
             and e["distance"] == "tv")
    mean, lo, hi = view.floor_at(e)
    assert lo < mean < hi
    results = fx.make_results(fork_steps=(100,), floor_keys="T", arms=("placebo", "adam_m_reset", "bitflip"))
    for e in results["estimates"][:50]:
        e["mean"], e["significant"] = np.float64(e["mean"]), np.bool_(e["significant"])
        e["per_seed"], e["bca"] = np.asarray(e["per_seed"]), tuple(e["bca"])
    html_path, _ = write_report(results, tmp_path / "sub" / "page.html")
    assert (tmp_path / "sub" / "page.md").exists() and (tmp_path / "sub" / "page_plots" / "seeds.png").exists()
    assert not Page(html_path.read_text()).errors


def test_rendering_is_deterministic(tmp_path):
    results = fx.degenerate_results()
    a, _ = write_report(results, tmp_path / "a" / "report.html")
    b, _ = write_report(results, tmp_path / "b" / "report.html")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "report.md").read_bytes() == (tmp_path / "b" / "report.md").read_bytes()


# ------------------------------------------------------------------------------ browser ----


def chromium() -> str:
    """/usr/bin/chromium (Debian's package), or chromium on PATH; REPLAY_CHROMIUM names another binary."""
    path = os.environ.get("REPLAY_CHROMIUM") or "/usr/bin/chromium"
    if not os.path.exists(path):
        path = None if os.environ.get("REPLAY_CHROMIUM") else shutil.which("chromium")
    if path is None:
        reason = "Chromium is not installed (apt-get install -y chromium fonts-liberation)"
        if os.environ.get("REPLAY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"REPLAY_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return path


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done


def test_renders_in_headless_chromium(request, tmp_path):
    binary = chromium()  # skip (or fail under REPLAY_REQUIRE_BROWSER=1) before rendering anything
    results, html_path, _, _ = request.getfixturevalue("full")
    url = html_path.as_uri()

    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url).stdout
    page = Page(dom)
    rows = estimates_table(page)[1:]
    assert {cells[0] for _, cells in rows} == {a["name"] for a in results["experiment"]["arms"]}
    assert any(cells[-1] == "exactly 0 (checked)" for _, cells in rows)
    assert page.svgs == len(results["lifetimes"]) + 1
    assert dom.count("<path") > 100  # the plots' marks and text survived parsing

    shot = tmp_path / "shot.png"
    run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000",
                 "--hide-scrollbars", url)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.05  # not one colour
    ink = (pixels.min(axis=2) < 0.6).mean()  # dark-ish pixels: text, lines, plot marks
    assert 0.005 < ink < 0.5, ink
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 50  # text antialiasing, table shading, the first plots
    if os.environ.get("REPLAY_REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["REPLAY_REPORT_SCREENSHOT"])
