"""The audit report (replay.report) from synthetic results (schema version 2): the HTML page parses,
is self-contained, holds the estimates table (a program column, every arm, the default interval
named, the excess over the reference, the verdicts styled, the lifetime model with 'extrapolated'
marked; the placebo row exactly 0 and checked; dead arms and a dead reference flagged), the
verdict legend and summary, the plots (the state-space panel only where the results have it),
the bit-flip targets and the reporting checklist's artifacts; the Markdown twin says the same
with PNG plots; missing pieces are said, not hidden; and the page renders in a real headless
Chromium (DOM and screenshot).

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

from conftest import CHROMIUM_FLAGS, TINY  # noqa: E402

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
    """The rows of the estimates table (the first table whose header has a verdict and a lifetime
    column), without the rows that only name a group (program and fork step)."""
    for table in page.tables:
        if table and "verdict" in table[0][1] and any(c.startswith("lifetime") for c in table[0][1]):
            return [row for row in table if "group" not in row[0]]
    raise AssertionError("no estimates table in the page")


def table_with(page: Page, column: str) -> list[tuple[str, list[str]]]:
    """The first table whose header has `column`."""
    for table in page.tables:
        if table and column in table[0][1]:
            return table
    raise AssertionError(f"no table with a {column!r} column")


def columns(rows) -> dict[str, int]:
    return {name: i for i, name in enumerate(rows[0][1])}


LIFE = "lifetime: model, plateau, half-life (95% CI)"


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


@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    """One fork step with a dead arm (ema_reset: exactly 0 everywhere) and a dead reference."""
    out = tmp_path_factory.mktemp("dead")
    results = fx.make_results(fork_steps=(60,), arms=("placebo", "bn_reset", "ema_reset", "bitflip"),
                              dead_arms=("ema_reset",), dead_reference=True)
    html_path, md_path = render(results, out)
    return results, html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


def primary(results: dict) -> list[dict]:
    h = results["experiment"]["primary_horizon"]
    return [e for e in results["estimates"] if e["distance"] == "tv" and e["horizon"] == h]


# ---------------------------------------------------------------------------- the page ----


def test_load_results_reads_nan_and_infinity(tmp_path):
    path = fx.write(tmp_path)
    text = path.read_text()
    assert "NaN" in text and "Infinity" in text  # the fixture exercises both
    results = load_results(tmp_path)
    assert results["version"] == 2
    halves = [l["half_life"] for l in results["lifetimes"]]
    assert any(math.isinf(h) for h in halves) and any(math.isnan(h) for h in halves)
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text(json.dumps({"estimates": []}))
    with pytest.raises(ValueError, match="experiment"):
        load_results(tmp_path / "bad")


def test_fixture_is_the_new_schema():
    """The synthetic results carry every field of results version 2, with all three verdicts."""
    results = fx.make_results()
    exp = results["experiment"]
    for key in ("equivalence_margin", "interval_method", "verdict_rule", "multiple_testing", "reference_arm",
                "programs", "bootstrap_resamples", "alpha", "duration_s"):
        assert key in exp, key
    assert exp["programs"] == {"main": fx.MAIN_PROGRAM, fx.VARIANT_KEY: fx.VARIANT_PROGRAM}
    e = next(e for e in primary(results) if e["arm"] == "bn_reset")
    for key in ("interval", "interval_method", "bca", "t", "excess_per_seed", "excess_interval", "q_value",
                "tost_margin", "tost_p", "tost_equivalent", "verdict", "verdict_reason", "zero_everywhere", "placebo"):
        assert key in e, key
    assert e["interval"] == e["t"] and e["interval_method"] == "t"
    assert e["tost_margin"] == pytest.approx(fx.MARGIN * e["noise_floor"])
    assert {e["verdict"] for e in primary(results)} >= set(fx_verdicts())
    assert {e["verdict"] for e in results["estimates"] if e["distance"] in fx.SIGNED and not e["reference"]
            and not e["placebo"]} == {None}
    assert {(r["program"], r["fork_step"]) for r in results["references"]} == {
        (k, T) for k in exp["programs"] for T in exp["fork_steps"]}
    life = results["lifetimes"]
    assert {l["model"] for l in life} == {"decay", "flat", "rise"}
    assert any(l["extrapolated"] for l in life) and any(l["state"] is None for l in life)
    assert all(len(l["fitted"]) == len(l["horizons"]) for l in life)


def fx_verdicts():
    return ("memory beyond chaos", "no memory beyond chaos", "inconclusive")


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


def test_estimates_table_has_a_program_column_every_arm_and_verdicts(full):
    results, _, _, text = full
    page = Page(text)
    rows = estimates_table(page)
    header, body = rows[0][1], rows[1:]
    assert header[:2] == ["program", "arm"]
    for column in ("effect (mean)", "95% t interval", "noise floor", "ratio to floor",
                   "excess over bitflip [95% t interval]", "q (BH)", "verdict", LIFE):
        assert column in header, column
    assert not any("BCa" in c for c in header)  # BCa only where labelled as secondary
    col = columns(rows)
    # One row per (program, fork step, arm) at the primary distance and horizon.
    expected = {(e["arm"], e["program"], e["fork_step"]) for e in primary(results)}
    seen = [(cells[col["arm"]], cells[col["program"]], int(cells[col["fork step"]])) for _, cells in body]
    assert set(seen) == expected and len(seen) == len(expected)
    assert {a["name"] for a in results["experiment"]["arms"]} == {arm for arm, _, _ in seen}
    assert {p for _, p, _ in seen} == {"main", fx.VARIANT_KEY}
    # The reference has one row per program and fork step, told apart by the program column.
    refs = [(cls, cells) for cls, cells in body if cells[col["arm"]] == "bitflip"]
    assert len(refs) == 4 and len({(c[col["program"]], c[col["fork step"]]) for _, c in refs}) == 4
    assert all("reference" in cls and c[col["verdict"]] == "reference" and c[col[LIFE]] == "chaos baseline"
               for cls, c in refs)
    placebo = [(cls, cells) for cls, cells in body if cells[col["arm"]] == "placebo"]
    assert len(placebo) == 2  # the main program's, at both fork steps (the variant has no placebo arm)
    for cls, cells in placebo:
        assert "placebo" in cls and "dead" not in cls
        assert cells[col["effect (mean)"]] == "0 (exactly)"
        assert cells[col["verdict"]] == "exactly 0 (checked)"
    assert "Placebo check passed" in text
    # Every real arm: its interval, its excess with interval, its q, its verdict as in the results.
    by_key = {(e["arm"], e["program"], e["fork_step"]): e for e in primary(results)}
    for cls, cells in body:
        e = by_key[(cells[col["arm"]], cells[col["program"]], int(cells[col["fork step"]]))]
        if e["placebo"] or e["reference"]:
            continue
        assert re.fullmatch(r"\[[^\]]+, [^\]]+\]", cells[col["95% t interval"]]), cells
        assert "n/a" not in cells[col["95% t interval"]]
        assert re.fullmatch(r"\S+ \[[^\]]+, [^\]]+\]", cells[col["excess over bitflip [95% t interval]"]])
        assert cells[col["q (BH)"]] not in ("—", "n/a")
        assert cells[col["verdict"]] == e["verdict"]
        assert "dead" not in cls
        life = cells[col[LIFE]]
        assert re.match(r"(decay|flat|rise): plateau \S+ \(ratio \S+ of floor\), (half-life|no transient)", life), life
        if cells[col["arm"]] == "order_swap":
            assert "half-life ∞" in life and "does not decay" in life
        if cells[col["arm"]] == "ema_reset":
            assert life.startswith("flat:") and "no transient" in life
    # Verdicts are styled (a pill per verdict kind).
    assert "<span class='pill v-mem'>memory beyond chaos</span>" in text
    assert "<span class='pill v-none'>no memory beyond chaos</span>" in text
    assert "<span class='pill v-inc'>inconclusive</span>" in text
    # Hovering a verdict gives its reason.
    reason = next(e["verdict_reason"] for e in primary(results) if e["verdict"] == "inconclusive")
    assert html_escaped(reason) in text


def test_extrapolated_half_life_is_marked(full):
    results, _, md_path, text = full
    rows = estimates_table(Page(text))
    col = columns(rows)
    for _, cells in rows[1:]:
        marked = "extrapolated" in cells[col[LIFE]]
        assert marked == (cells[col["arm"]] == "momentum_reset"), cells
    assert "<span class='tag'>extrapolated</span>" in text
    assert "Half-life extrapolated beyond the delays measured" in text
    assert "momentum_reset (sgd-program, T=60)" in text
    assert text.count("The half-life is extrapolated beyond the delays measured.") == 2
    md = md_path.read_text()
    assert "(117, ∞), extrapolated" in md or re.search(r"half-life \S+ \(\S+, ∞\), extrapolated", md)


def test_verdict_summary_and_how_to_read(full):
    results, _, md_path, text = full
    md = md_path.read_text()
    arms = [e for e in primary(results) if not e["placebo"] and not e["reference"]]
    counts = {v: sum(e["verdict"] == v for e in arms) for v in fx_verdicts()}
    line = (f"Verdicts at tv, h = 20, over {len(arms)} arm estimates (every program and fork step): "
            f"{counts['memory beyond chaos']} memory beyond chaos, {counts['no memory beyond chaos']} no memory "
            f"beyond chaos, {counts['inconclusive']} inconclusive.")
    assert all(counts.values()) and line in text and line in md
    assert "How to read a verdict" in text and "How to read a verdict" in md
    rule = results["experiment"]["verdict_rule"]
    assert html_escaped(rule) in text and html_escaped(rule).replace("&#x27;", "'").replace("&quot;", '"') in md
    assert "0.1 × the seed noise floor at each horizon" in text and "0.1 × the seed noise floor" in md
    assert f"memory beyond chaos: {counts['memory beyond chaos']}" in text  # the badge


def test_bca_only_labelled_with_its_caveat(full):
    _, _, md_path, text = full
    page = Page(text)
    horizons = table_with(page, "95% BCa (secondary)")
    assert "95% t interval" in horizons[0][1] and "TOST margin" in horizons[0][1]
    md = md_path.read_text()
    for doc in (text, md):
        assert "With few seeds (here 5) it undercovers" in doc
        assert "95% BCa (secondary)" in doc
    # The every-distance table shows the default interval.
    assert "Every distance at h = 20 (mean [95% t interval])" in text


def test_strings_are_escaped(full):
    _, _, md_path, text = full
    assert "synthetic: training memory on digits &lt;test &amp; &quot;escape&quot;&gt;" in text
    assert "<test" not in text
    assert "<test" not in md_path.read_text()


def test_plots_are_inline_with_state_space_where_given(full):
    results, _, md_path, text = full
    page = Page(text)
    lifetimes = results["lifetimes"]
    with_state = sum(l["state"] is not None for l in lifetimes)
    assert 0 < with_state < len(lifetimes)
    assert page.svgs == len(lifetimes) + 1  # one decay figure per lifetime, plus the per-seed strip plot
    assert text.count("<figure class='decay state'>") == with_state
    assert text.count("<figure class='decay'>") == len(lifetimes) - with_state
    assert text.count("State space (L2 norm of (child") == with_state
    assert text.count("No state-space lifetime in the results for this arm.") == len(lifetimes) - with_state
    assert md_path.read_text().count("State space (") == with_state
    assert "xmlns:xlink" in text  # matplotlib's SVG, inline
    # Figures are deterministic: no date in the SVG metadata.
    assert "<dc:date>" not in text
    # The fitted model and the plateau are in the captions.
    assert "formula: plateau + amplitude * 2^(-h / half_life)" in text


def test_decay_figure_panels():
    """Two panels without a state-space lifetime, three with one; the fitted model and the plateau drawn."""
    from replay.report import plots

    hs = [0, 5, 10, 20]
    raw = plots.Series(hs, [0.3, 0.2, 0.1, 0.05], [0.25, 0.15, 0.08, 0.03], [0.35, 0.25, 0.12, 0.07])
    excess = plots.Series(hs, [0.28, 0.17, 0.08, 0.02], [0.2, 0.1, 0.05, 0.0], [0.3, 0.2, 0.1, 0.04])
    kw = dict(title="t", distance="tv", raw=raw, excess=excess, floor=None, reference=None,
              fit={"fit_ok": True, "half_life": 6.0}, fitted=plots.Series(hs, [0.29, 0.16, 0.08, 0.02]),
              model="decay", plateau=(0.01, 0.0, 0.02))
    fig = plots.decay_figure(**kw)
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "fitted model (decay)" in labels and "plateau 0.01" in labels
    plots.plt.close(fig)
    state = {"horizons": hs, "excess_mean": [1.0, 0.5, 0.25, 0.06], "excess_lo": [0.8, 0.4, 0.2, 0.0],
             "excess_hi": [1.2, 0.6, 0.3, 0.1], "half_life": 5.0, "interval": [4.0, float("inf")], "amplitude": 1.0,
             "fit_ok": True, "extrapolated": False}
    fig = plots.decay_figure(**kw, state=state)
    assert len(fig.axes) == 3
    texts = [t.get_text() for t in fig.axes[2].texts]
    assert "half-life 5 (4, ∞)" in texts
    plots.plt.close(fig)


def test_state_space_absent_without_state(tmp_path):
    results = fx.make_results(fork_steps=(60,), horizons=(0, 10, 20, 40), arms=("bn_reset", "bitflip"))
    assert results["lifetimes"][0]["state"] is not None
    results["lifetimes"][0]["state"] = None
    html_path, md_path = render(results, tmp_path)
    text = html_path.read_text()
    assert "<figure class='decay state'>" not in text and text.count("<figure class='decay'>") == 1
    assert "State space (" not in text and "State space (" not in md_path.read_text()


def test_dead_arm_is_flagged_and_dead_reference_is_bad(dead):
    results, text, md = dead
    page = Page(text)
    rows = estimates_table(page)
    col = columns(rows)
    by_arm = {cells[col["arm"]]: (cls, cells) for cls, cells in rows[1:]}
    cls, cells = by_arm["ema_reset"]
    assert "dead" in cls and "exactly 0 at every horizon: dead arm?" in cells[col["verdict"]]
    cls, cells = by_arm["bitflip"]
    assert "exactly 0 at every horizon: dead reference" in cells[col["verdict"]]
    for arm in ("bn_reset", "placebo"):
        assert "dead" not in by_arm[arm][0] and "exactly 0 at every horizon" not in by_arm[arm][1][col["verdict"]]
    # Caveats: the dead arm flagged, the dead reference a bad-level caveat.
    assert re.search(r"<li class='warn'>Exactly 0 at every horizon: dead arm\? ema_reset", text)
    assert re.search(r"<li class='bad'>The reference arm &#x27;bitflip&#x27; measures exactly 0 at every horizon "
                     r"\(main at step 60\): the chaos baseline is dead[^<]*lifetimes are lifetimes of raw effects", text)
    assert "reference: bitflip (DEAD)" in text and "dead arms: 1" in text
    assert "1 flagged: exactly 0 at every horizon: dead arm?" in text
    # The references table says the baseline is dead, seed by seed.
    refs = table_with(page, "selected by")
    assert len(refs) == 1 + 5 and all(r[1][-1] == "DEAD: exactly 0 at every horizon" for r in refs[1:])
    # The Markdown twin says the same.
    assert "dead arm? ema_reset" in md and "| main | ema_reset | 60 |" in md
    assert "**The reference arm 'bitflip' measures exactly 0 at every horizon" in md
    row = next(l for l in md.splitlines() if l.startswith("| main | ema_reset | 60 | 20"))
    assert "⚠ exactly 0 at every horizon: dead arm?" in row


def test_dead_arm_with_a_live_reference_is_not_bad(tmp_path):
    results = fx.make_results(fork_steps=(60,), horizons=(0, 10, 20), arms=("ema_reset", "bitflip"),
                              dead_arms=("ema_reset",))
    html_path, _ = render(results, tmp_path)
    text = html_path.read_text()
    assert "dead arm? ema_reset" in text and "<li class='bad'>" not in text and "(DEAD)" not in text


def test_references_list_each_seeds_bitflip_target(full):
    results, _, md_path, text = full
    page = Page(text)
    refs = table_with(page, "selected by")
    col = columns(refs)
    assert "other" not in col  # no extra target fields in the fixture: no empty column
    got = {(c[col["program"]], int(c[col["fork step"]]), int(c[col["seed"]])): (c[col["parameter"]], int(c[col["element"]]),
                                                                               int(c[col["bit"]])) for _, c in refs[1:]}
    want = {(r["program"], r["fork_step"], t["seed"]): (t["param"], t["index"], t["bit"])
            for r in results["references"] for t in r["targets"]}
    assert got == want and len(want) == 2 * 2 * 5
    assert all(c[-1] == "live" for _, c in refs[1:])
    md = md_path.read_text()
    assert "## Reference arm: bit-flip targets" in md
    assert f"| {fx.VARIANT_KEY} | 100 | bitflip | 3 | 0.weight | {fx.bitflip_index(fx.VARIANT_KEY, 100, 3)} | 0 |" in md


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
                   "reshuffle", "results schema version", f"{fx.VARIANT_KEY}: {fx.VARIANT_PROGRAM}",
                   "bootstrap resamples", "verdict rule"):
        assert html_escaped(needle) in text, needle


def html_escaped(s: str) -> str:
    import html

    return html.escape(s)


def test_markdown_twin(full):
    results, html_path, md_path, _ = full
    assert md_path == html_path.with_suffix(".md") and md_path.exists()
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# synthetic: training memory on digits")
    assert "| program | arm | fork step |" in md
    assert "| main | placebo | 60 |" in md and "exactly 0 (checked)" in md
    assert f"| {fx.VARIANT_KEY} | bitflip | 60 |" in md and "| main | bitflip | 60 |" in md
    assert "| **memory beyond chaos** |" in md and "| _inconclusive_ |" in md and "| no memory beyond chaos |" in md
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
    start = next(i for i, l in enumerate(lines) if l.startswith("| program | arm | fork step | h (step) | seeds"))
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
                   "No checkpoint schedule recorded", "No reference arm: no chaos baseline"):
        assert needle in text, needle
        assert needle in md, needle
    rows = estimates_table(page)
    col = columns(rows)
    assert {cells[col["arm"]] for _, cells in rows[1:]} == {"adam_m_reset", "bn_reset"}
    for _, cells in rows[1:]:
        assert cells[col["95% t interval"]] == "n/a" and cells[col["verdict"]] == "no reference arm"
        assert cells[col["excess over the reference [95% t interval]"]] == "—"
        assert cells[col[LIFE]].startswith("n/a")
    # Raw decay curves are still drawn from the estimates, one per arm, plus the strip plot.
    assert page.svgs == 3
    assert "Verdicts at tv, h = 10, over 2 arm estimates (every program and fork step): 0 memory beyond chaos, 0 no " \
           "memory beyond chaos, 0 inconclusive, 2 no reference arm." in text


def test_nearly_empty_and_non_finite_results_render(tmp_path, recwarn):
    """Only an experiment section; or NaN/inf everywhere, an interval of None, a run that failed
    verification, results of the first schema (no verdicts, no default interval): a page that says
    so, never an exception."""
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
    rows = estimates_table(page)
    col = columns(rows)
    # Results that predate the default interval, with no t interval: the BCa one is shown, and named so.
    assert "95% BCa interval" in col and "95% t interval" not in col
    (_, cells), = rows[1:]
    assert cells[col["effect (mean)"]] == "n/a" and cells[col["95% BCa interval"]] == "n/a"
    assert cells[col["verdict"]] == "n/a" and cells[col[LIFE]].startswith("∞")
    assert "1 of 1 runs are not verified complete" in text and "failed: digest mismatch at step 7" in text
    assert "runs verified: 0/1" in text
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_failed_placebo_is_loud(tmp_path):
    results = fx.make_results(fork_steps=(60,), horizons=(0, 10, 20), arms=("placebo", "bn_reset", "bitflip"))
    results["placebo"].update(exact_zero=False, detail="3 nonzero distances")
    for e in results["estimates"]:
        if e["arm"] == "placebo":
            e["mean"], e["per_seed"] = 1e-7, [0, 0, 5e-7, 0, 0]
    html_path, md_path = render(results, tmp_path)
    text = html_path.read_text()
    assert "Placebo check FAILED" in text
    rows = estimates_table(Page(text))
    col = columns(rows)
    placebo = [cells for _, cells in rows[1:] if cells[col["arm"]] == "placebo"]
    assert placebo and all(c[col["verdict"]] == "NOT ZERO: capture or replay is broken" for c in placebo)
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
        e["per_seed"], e["bca"], e["interval"] = np.asarray(e["per_seed"]), tuple(e["bca"]), tuple(e["interval"])
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


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done


def test_renders_in_headless_chromium(chromium, request, tmp_path):
    """The synthetic full report and the report of a real (small) experiment, in a real browser:
    DOM and screenshot. `chromium` skips (or fails under REPLAY_REQUIRE_BROWSER=1) first."""
    binary = chromium
    real = request.getfixturevalue("real_experiment")
    real_html, _ = write_report(load_results(real), tmp_path / "real" / "report.html")
    dom = run_chromium(binary, tmp_path / "profile-real", "--dump-dom", real_html.as_uri()).stdout
    assert "<table>" in dom and "m_reset" in dom and dom.count("<svg") >= 2
    import matplotlib.image

    shot = tmp_path / "real.png"
    run_chromium(binary, tmp_path / "profile-real-shot", f"--screenshot={shot}", "--window-size=1280,1800",
                 real_html.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert matplotlib.image.imread(str(shot)).std() > 0.05  # not a blank page

    results, html_path, _, _ = request.getfixturevalue("full")
    url = html_path.as_uri()

    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url).stdout
    page = Page(dom)
    table = estimates_table(page)
    col = columns(table)
    rows = table[1:]
    assert {cells[col["arm"]] for _, cells in rows} == {a["name"] for a in results["experiment"]["arms"]}
    assert any(cells[col["verdict"]] == "exactly 0 (checked)" for _, cells in rows)
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


# ------------------------------------------------------------- a real experiment ----


@pytest.fixture(scope="module")
def real_experiment(tmp_path_factory):
    """A small real experiment (tiny, 3 seeds, one fork step, a placebo, a momentum reset and a
    bit-flip reference), run once: the report of real results, not synthetic ones."""
    from replay.experiment import Arm, Experiment, ExperimentSpec

    spec = ExperimentSpec(
        name="report test", program=TINY, seeds=[1, 2, 3], fork_steps=[8],
        steps=20, arms=[Arm("placebo", ["placebo"]), Arm("m_reset", ["reset_exp_avg"]),
                        Arm("bitflip", ["bitflip"], reference=True)],
        horizons=[0, 4, 8, 11], primary_horizon=4, probe={"source": "replay.demo:probe", "layer": "2"},
        bootstrap_resamples=200)
    out = tmp_path_factory.mktemp("exp")
    Experiment(spec, out).run(progress=False)
    return out


def test_html_and_markdown_of_a_real_experiment(real_experiment, tmp_path):
    html_path, md_path = write_report(load_results(real_experiment), tmp_path / "report.html")
    page = html_path.read_text()
    data = json.loads((real_experiment / "results.json").read_text())
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
