"""Render an experiment's results as an HTML page and a Markdown twin."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..store.atomic import atomic_write_bytes
from . import plots

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f4f7; } td.l, th.l { text-align: left; }
tr.placebo td { background: #eef7ee; } tr.reference td { color: #666; font-style: italic; }
.ok { color: #2e7d32; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
.note { color: #555; font-size: 0.9em; } code { background: #f4f4f4; padding: 0 3px; }
details { margin: 0.3em 0; } summary { cursor: pointer; }
.plot svg { max-width: 100%; height: auto; }
"""


def load_results(experiment_dir) -> dict:
    path = Path(experiment_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the experiment first (replay experiment / replay demo)")
    return json.loads(path.read_text())


def _f(x, digits=4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    return str(x)


def _interval(pair, digits=4) -> str:
    return f"[{_f(pair[0], digits)}, {_f(pair[1], digits)}]" if pair else "–"


def _table_rows(results: dict) -> tuple[list[str], list[list[str]], list[str]]:
    exp = results["experiment"]
    d, h = exp["primary_distance"], exp["primary_horizon"]
    lifetimes = {(l["arm"], l.get("program"), l["fork_step"]): l for l in results.get("lifetimes", [])}
    placebo_ok = results.get("placebo", {}).get("exact_zero", False)
    header = ["arm", "program", "fork step", f"{d} (mean)", "95% BCa", "95% t", "noise floor", "ratio",
              "q (BH)", "significant", "TOST equivalent", "half-life (95% CI)"]
    rows, classes = [], []
    for e in results["estimates"]:
        if e["distance"] != d or e["horizon"] != h:
            continue
        lt = lifetimes.get((e["arm"], e.get("program"), e["fork_step"]))
        if e["arm"] == "placebo":
            life = "exactly 0 (checked)" if placebo_ok and e["mean"] == 0.0 else "NOT ZERO"
            cls = "placebo"
        elif e.get("reference"):
            life, cls = "reference (chaos baseline)", "reference"
        elif lt is None:
            life, cls = "–", ""
        else:
            life = f"{_f(lt['half_life'], 1)} {_interval(lt['interval'], 1)}" + ("" if lt.get("fit_ok") else f" ({lt.get('reason', '')})")
            cls = ""
        mean = "0 (exactly)" if e["arm"] == "placebo" and e["mean"] == 0.0 else _f(e["mean"])
        rows.append([e["arm"], e.get("program", "main"), str(e["fork_step"]), mean, _interval(e["bca"]), _interval(e["t"]),
                     _f(e["noise_floor"]), _f(e["ratio"], 2), _f(e["q_value"], 3), _f(e["significant"]),
                     _f(e["tost_equivalent"]), life])
        classes.append(cls)
    return header, rows, classes


def _html_table(header, rows, classes=None) -> str:
    out = ["<table><thead><tr>"] + [f"<th class='l'>{html.escape(h)}</th>" if i < 2 else f"<th>{html.escape(h)}</th>"
                                     for i, h in enumerate(header)] + ["</tr></thead><tbody>"]
    for k, row in enumerate(rows):
        cls = f" class='{classes[k]}'" if classes and classes[k] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td class='l'>{html.escape(c)}</td>" if i < 2 else f"<td>{html.escape(c)}</td>"
                                          for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _floor_for(results: dict, lifetime: dict) -> dict | None:
    entry = results.get("noise_floor", {}).get(lifetime["distance"], {})
    by = entry.get("by_fork_step", {})
    key = f"{lifetime.get('program', 'main')}@{lifetime['fork_step']}"
    return by.get(key) or (entry if "mean" in entry else None)


def _checklist_items(results: dict) -> list[tuple[str, str]]:
    exp = results["experiment"]
    probe = exp.get("probe", {})
    return [
        ("program", f"{exp.get('program')} (sha256 {exp.get('program_sha256', '?')})"),
        ("seeds", ", ".join(map(str, exp.get("seeds", [])))),
        ("fork steps", ", ".join(map(str, exp.get("fork_steps", [])))),
        ("arms", "; ".join(f"{a['name']}: {json.dumps(a['perturb'])}, window {a.get('window', 1)}"
                           + (" (reference)" if a.get("reference") else "") for a in exp.get("arms", []))),
        ("horizons (steps after the window)", ", ".join(map(str, exp.get("horizons", [])))),
        ("probe", f"{probe.get('definition')} — {probe.get('size')} examples, sha256 {probe.get('sha256')}"),
        ("distances", f"{', '.join(exp.get('distances', []))} (primary: {exp.get('primary_distance')}; natural log; "
                      "cka = 1 − linear CKA; accuracy/loss diffs are fork − factual)"),
        ("interval method", exp.get("interval_method", "")),
        ("multiple testing", exp.get("multiple_testing", "")),
        ("equivalence margin (TOST)", _f(exp.get("equivalence_margin"))),
        ("placebo check", results.get("placebo", {}).get("detail", "")),
    ]


def write_report(results: dict, out_html) -> tuple[Path, Path]:
    """Write the HTML report to `out_html` and its Markdown twin (.md, plots as PNG next to it)."""
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_md = out_html.with_name(out_html.stem + ".md")
    png_dir = out_html.with_name(out_html.stem + "_plots")
    png_dir.mkdir(exist_ok=True)
    exp = results["experiment"]
    placebo = results.get("placebo", {})
    header, rows, classes = _table_rows(results)
    n_seeds = len(exp.get("seeds", []))
    summary = (f"Seed-paired effects of {len(exp.get('arms', []))} arms forked at step(s) "
               f"{', '.join(map(str, exp.get('fork_steps', [])))} of {exp.get('program')}, measured on a probe set of "
               f"{exp.get('probe', {}).get('size')} examples with {exp.get('primary_distance')} (primary) over "
               f"{n_seeds} seeds, at {exp.get('primary_horizon')} steps after each intervention window, against the "
               f"seed-to-seed noise floor. Lifetimes are the half-lives of the excess over a one-bit weight flip.")
    placebo_line = (f"<p class='ok'>Placebo check passed: {html.escape(placebo.get('detail', ''))}</p>" if placebo.get("exact_zero")
                    else f"<p class='bad'>Placebo check FAILED: {html.escape(placebo.get('detail', 'missing'))}</p>")

    # Plots.
    lifetimes = results.get("lifetimes", [])
    html_plots, md_plots = [], []
    for i, lt in enumerate(lifetimes):
        fig = plots.decay_figure(lt, _floor_for(results, lt))
        png = png_dir / f"decay_{i}_{lt['arm']}.png"
        plots.to_png(plots.decay_figure(lt, _floor_for(results, lt)), png)
        html_plots.append(f"<div class='plot'>{plots.to_svg(fig)}</div>")
        md_plots.append(f"![{lt['arm']} decay]({png_dir.name}/{png.name})")
    seeds_svg = plots.to_svg(plots.seeds_figure(results["estimates"], exp["primary_distance"], exp["primary_horizon"]))
    plots.to_png(plots.seeds_figure(results["estimates"], exp["primary_distance"], exp["primary_horizon"]), png_dir / "seeds.png")

    # Checklist.
    items = _checklist_items(results)
    checklist = results.get("checklist", {})
    run_header = ["kind", "seed", "arm", "fork step", "path", "program sha256", "fingerprint at fork", "fingerprint at end", "verified"]
    run_rows = [[r["kind"], str(r["seed"]), str(r.get("arm") or "–"), str(r.get("fork_step") or "–"), r["path"],
                 r["program_sha256"][:16], r["fingerprint_fork"], r["fingerprint_end"], r["verified"]]
                for r in checklist.get("runs", [])]
    order_blocks = "".join(
        f"<details><summary>{html.escape(r['path'])}: order policy {html.escape(json.dumps(r['order_policy'])[:80])}, "
        f"{len(r['order_hashes'])} epoch order hashes</summary><pre>"
        + html.escape("\n".join(f"epoch {k}: {v}" for k, v in r["order_hashes"].items())) + "</pre></details>"
        for r in checklist.get("runs", []) if r["kind"] == "factual")

    def pre(obj) -> str:
        return "<pre>" + html.escape(json.dumps(obj, indent=1, sort_keys=True)) + "</pre>"

    no_lifetimes = "" if lifetimes else "<p class='note'>No lifetimes: the experiment has no reference (bit-flip) arm.</p>"
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>{html.escape(exp.get('name', 'replay experiment'))}</title><style>{CSS}</style></head><body>
<h1>{html.escape(exp.get('name', 'replay experiment'))}</h1>
<p>{html.escape(summary)}</p>
{placebo_line}
<h2>Estimates</h2>
<p class="note">{html.escape(exp.get('primary_distance', ''))} at {exp.get('primary_horizon')} steps after each
intervention window; ratio = effect / seed noise floor; q = Benjamini–Hochberg across arms (test of the excess over the
bit-flip reference); TOST margin {html.escape(_f(exp.get('equivalence_margin')))}.</p>
{_html_table(header, rows, classes)}
<h2>Decay curves</h2>{no_lifetimes}
{''.join(html_plots)}
<h2>Per-seed effects against the noise floor</h2>
<div class="plot">{seeds_svg}</div>
<h2>Reporting checklist</h2>
<table><tbody>{''.join(f"<tr><th class='l'>{html.escape(k)}</th><td class='l'>{html.escape(v)}</td></tr>" for k, v in items)}</tbody></table>
<h3>Runs</h3>{_html_table(run_header, run_rows)}
<h3>Order hashes</h3>{order_blocks or "<p class='note'>none recorded</p>"}
<h3>RNG contract</h3>{pre(checklist.get('rng_contract', {}))}
<h3>Determinism flags</h3>{pre(checklist.get('determinism_flags', {}))}
<h3>Environment</h3>{pre(checklist.get('environment', {}))}
<h3>Checkpoint schedule</h3>{pre(checklist.get('checkpoint_schedule', {}))}
<p class="note">Written by replay from results.json; every run directory named above can be checked with
<code>replay verify</code> and <code>replay check</code>.</p>
</body></html>
"""
    md = "\n\n".join([
        f"# {exp.get('name', 'replay experiment')}", summary,
        ("Placebo check passed: " if placebo.get("exact_zero") else "**Placebo check FAILED:** ") + placebo.get("detail", ""),
        "## Estimates", _md_table(header, rows),
        "## Decay curves", "\n\n".join(md_plots) or "No lifetimes: the experiment has no reference (bit-flip) arm.",
        "## Per-seed effects against the noise floor", f"![per-seed effects]({png_dir.name}/seeds.png)",
        "## Reporting checklist", "\n".join(f"- **{k}**: {v}" for k, v in items),
        "### Runs", _md_table(run_header, run_rows),
        "### RNG contract", "```json\n" + json.dumps(checklist.get("rng_contract", {}), indent=1, sort_keys=True) + "\n```",
        "### Environment and determinism flags",
        "```json\n" + json.dumps({"environment": checklist.get("environment", {}), "flags": checklist.get("determinism_flags", {})},
                                 indent=1, sort_keys=True) + "\n```",
    ]) + "\n"
    atomic_write_bytes(out_html, page.encode())
    atomic_write_bytes(out_md, md.encode())
    return out_html, out_md
