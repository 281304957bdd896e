"""Render an experiment's results as a self-contained HTML page and a Markdown twin.

The HTML page needs nothing from the network: the CSS is inline and the plots are inline SVG.
The Markdown twin (same name, .md) references the same plots as PNG files in a folder next to
it (<stem>_plots/). Every string that comes from the results is escaped (html.escape for the
page; table pipes and HTML specials for the Markdown), so names and paths cannot inject markup.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..store.atomic import atomic_write_bytes
from . import plots
from .memory import memory_sections
from .model import (View, caveats, checklist_items, fmt, fmt_ci, fmt_p, is_finite, label, lifetime_summary, num,
                    VERDICT_CSS, arm_rows, state_summary, summary, verdict_legend, verdict_summary,
                    verified_ok)

CSS = """
:root { --fg: #1f2328; --muted: #57606a; --line: #d0d7de; --head: #f6f8fa; --ok: #1a7f37; --bad: #cf222e;
        --warn: #9a6700; }
* { box-sizing: border-box; }
body { font-family: -apple-system, 'Segoe UI', 'Liberation Sans', Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1240px; padding: 24px 28px 48px; color: var(--fg); line-height: 1.5; font-size: 15px;
       background: #fff; }
h1 { font-size: 1.75em; margin: 0 0 0.1em; }
.sub { color: var(--muted); margin: 0 0 1em; font-size: 0.9em; }
h2 { font-size: 1.3em; border-bottom: 1px solid var(--line); padding-bottom: 0.25em; margin: 2em 0 0.6em; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
p { margin: 0.5em 0; }
.summary { max-width: 75em; }
.badges { display: flex; flex-wrap: wrap; gap: 8px; margin: 0.8em 0; }
.badge { display: inline-block; border-radius: 999px; padding: 2px 12px; font-size: 0.85em; font-weight: 600;
         border: 1px solid var(--line); background: var(--head); }
.badge.ok { color: var(--ok); border-color: #8fd3a0; background: #eaf7ee; }
.badge.bad { color: var(--bad); border-color: #f2a7ab; background: #fdecee; }
.badge.warn { color: var(--warn); border-color: #e7cf8a; background: #fff8e5; }
.badge.v-mem { color: #8a1538; border-color: #f0b3c4; background: #fbe3ea; }
.badge.v-none { color: var(--ok); border-color: #8fd3a0; background: #eaf7ee; }
.badge.v-inc { color: var(--warn); border-color: #e7cf8a; background: #fff8e5; }
.notes { border-left: 4px solid #d4a72c; background: #fffbea; padding: 8px 14px; margin: 1em 0; font-size: 0.9em; }
.notes.clean { border-left-color: #4ac26b; background: #f0faf3; }
.notes.info { border-left-color: #8c959f; background: #f6f8fa; }
.notes ul { margin: 0.2em 0; padding-left: 1.2em; }
.notes li.bad { color: var(--bad); font-weight: 600; }
.notes li.info { color: var(--muted); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0 1em; }
th, td { border: 1px solid var(--line); padding: 4px 6px; text-align: right; vertical-align: top; }
thead th { background: var(--head); font-weight: 600; vertical-align: bottom; }
th.l, td.l { text-align: left; }
td.ci { white-space: normal; min-width: 6.5em; }
td { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.l { white-space: normal; }
td.life { min-width: 12em; white-space: normal; }
td details { margin: 0; }
table.runs td { vertical-align: middle; white-space: nowrap; word-break: normal; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
tr.placebo td { background: #eaf7ee !important; }
tr.reference td { color: var(--muted); font-style: italic; }
tr.group td { background: #eef2f6 !important; font-weight: 600; text-align: left; font-style: normal; color: var(--fg); }
.yes { color: var(--ok); font-weight: 600; } .no { color: var(--muted); }
.ok { color: var(--ok); font-weight: 600; } .bad { color: var(--bad); font-weight: 700; } .warn { color: var(--warn); }
.small { font-size: 0.85em; color: var(--muted); }
.legend { font-size: 0.85em; color: var(--muted); max-width: 75em; }
figure { margin: 0.8em 0 1.6em; }
figure svg { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: var(--muted); margin-top: 0.2em; max-width: 75em; }
details { margin: 0.4em 0; }
summary { cursor: pointer; color: #0b57d0; }
code, .mono, pre { font-family: 'DejaVu Sans Mono', 'Liberation Mono', Menlo, Consolas, monospace; font-size: 0.92em; }
.mono { word-break: break-all; }
pre { background: var(--head); border: 1px solid var(--line); padding: 8px 10px; white-space: pre-wrap;
      word-break: break-all; margin: 0.4em 0; }
table.kv { font-size: 0.85em; width: 100%; }
table.kv th { width: 16em; min-width: 12em; text-align: left; background: var(--head); font-weight: 600; }
table.kv td { text-align: left; white-space: normal; overflow-wrap: anywhere; }
table.hashes { margin: 0.3em 0; font-size: 1em; }
table.hashes td { border: none; padding: 0 6px 0 0; text-align: left; background: none !important; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.pill { display: inline-block; border-radius: 4px; padding: 0 6px; font-weight: 600; font-style: normal;
        border: 1px solid transparent; white-space: nowrap; }
.pill.v-mem { color: #8a1538; background: #fbe3ea; border-color: #f0b3c4; }
.pill.v-none { color: var(--ok); background: #eaf7ee; border-color: #8fd3a0; }
.pill.v-inc { color: var(--warn); background: #fff8e5; border-color: #e7cf8a; }
.pill.ok { color: var(--ok); background: #eaf7ee; border-color: #8fd3a0; }
.pill.bad { color: var(--bad); background: #fdecee; border-color: #f2a7ab; }
.pill.warn { color: var(--warn); background: #fff8e5; border-color: #e7cf8a; }
.pill.ref { color: var(--muted); background: var(--head); border-color: var(--line); font-weight: 400; }
.pill.plain { font-weight: 400; padding: 0; }
.tag { display: inline-block; border: 1px solid #e7cf8a; background: #fff8e5; color: var(--warn); border-radius: 4px;
       padding: 0 4px; font-size: 0.9em; font-weight: 600; font-style: normal; }
.flag { display: block; color: var(--bad); font-weight: 700; white-space: normal; font-style: normal; }
td.verdict { min-width: 10em; white-space: normal; }
tr.dead td { background: #fdecee !important; }
.verdicts { font-weight: 600; }
.howto { border-left: 4px solid #8c959f; background: #f6f8fa; padding: 8px 14px; margin: 1em 0; font-size: 0.88em;
         max-width: 75em; }
.howto ul { margin: 0.3em 0; padding-left: 1.2em; }
.howto li { margin: 0.15em 0; }
footer { margin-top: 3em; font-size: 0.8em; color: var(--muted); border-top: 1px solid var(--line); padding-top: 0.6em; }
"""

E = html.escape  # every string from the results goes through this


def _td(text, cls: str = "", title: str = "", raw: bool = False) -> str:
    attrs = (f" class='{cls}'" if cls else "") + (f" title='{E(title, quote=True)}'" if title else "")
    return f"<td{attrs}>{text if raw else E(str(text))}</td>"


# ------------------------------------------------------------------------ estimates table ----


@dataclass
class Cell:
    """One cell of the estimates table, rendered alike in HTML and Markdown: the text, a css
    class, a second line (small), a tag ('extrapolated'), a loud flag (a dead arm), a tooltip (HTML)."""

    text: str
    cls: str = ""
    sub: str = ""
    tag: str = ""
    flag: str = ""
    title: str = ""
    pill: str = ""  # css class of a verdict pill around the text

    def md(self) -> str:
        text = self.text + (f", {self.tag}" if self.tag else "") + (f" — {self.sub}" if self.sub else "")
        return text + (f" ⚠ {self.flag}" if self.flag else "")

    def html(self) -> str:
        body = f"<span class='pill {self.pill}'>{E(self.text)}</span>" if self.pill else E(self.text)
        if self.tag:
            body += f" <span class='tag'>{E(self.tag)}</span>"
        if self.flag:
            body += f" <span class='flag'>⚠ {E(self.flag)}</span>"
        if self.sub:
            body += f"<br><span class='small'>{E(self.sub)}</span>"
        return _td(body, self.cls, title=self.title, raw=True)


def header(v: View) -> list[str]:
    """The estimates table's header: the default interval is named by its method."""
    iv = v.interval_name()
    return ["program", "arm", "fork step", "h (step)", "seeds", "effect (mean)", iv, "noise floor", "ratio to floor",
            f"excess over {v.reference or 'the reference'} [{iv}]", "q (BH)", "verdict",
            "lifetime: model, plateau, half-life (95% CI)"]


def _excess_text(e: dict) -> str:
    if e.get("excess_mean") is None:
        return "—"
    ci = e.get("excess_interval")
    return fmt(e.get("excess_mean")) + (f" {fmt_ci(ci, 3)}" if isinstance(ci, (list, tuple)) else "")


def estimate_cells(v: View, e: dict) -> tuple[list[Cell], str]:
    """The cells of one row of the estimates table, and the row's class."""
    arm = str(e.get("arm"))
    kind = v.kind(arm)
    mean_text = fmt(e.get("mean"))
    if kind == "placebo":
        mean_text = v.placebo_cells(e)[0]
        life, note, extrapolated = "nothing to fit (placebo)", "", False
    else:
        life, note, extrapolated = v.lifetime_text(e)
    if extrapolated and life.endswith(", extrapolated"):
        life = life[: -len(", extrapolated")]
    verdict, verdict_cls, reason = v.verdict_cell(e)
    flag = v.dead_flag(e)
    step = f"{e.get('horizon')} ({e['step']})" if e.get("step") is not None else str(e.get("horizon"))
    key = v.program(e)
    cells = [
        Cell(key, "l", title=v.program_ref(key)), Cell(arm, "l"), Cell(str(e.get("fork_step"))), Cell(step),
        Cell(str(e.get("n_seeds", len(e.get("per_seed") or [])))), Cell(mean_text),
        Cell(fmt_ci(v.interval(e), 3), "ci"), Cell(fmt(e.get("noise_floor"))), Cell(fmt(e.get("ratio"), 3)),
        Cell(_excess_text(e), "ci"), Cell(fmt_p(e.get("q_value")) if kind == "arm" else "—"),
        Cell(verdict, "l verdict", flag=flag, title=reason, pill=verdict_cls or "plain"),
        Cell(life, "l life", sub=note, tag="extrapolated" if extrapolated else ""),
    ]
    cls = " ".join(c for c in (kind if kind != "arm" else "", "dead" if flag else "") if c)
    return cells, cls


def _estimates_html(v: View) -> str:
    rows = v.primary_rows()
    if not rows:
        return "<p class='bad'>No estimates at the primary distance and horizon.</p>"
    head = header(v)
    out = ["<div class='scroll'><table class='estimates'><thead><tr>"]
    out += [f"<th class='{'l' if i < 2 or i >= len(head) - 2 else ''}'>{E(h)}</th>" for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    groups = list(dict.fromkeys((v.program(e), e.get("fork_step")) for e in rows))
    current = None
    for e in rows:
        group = (v.program(e), e.get("fork_step"))
        if len(groups) > 1 and group != current:
            ref = v.program_ref(group[0])
            out.append(f"<tr class='group'><td colspan='{len(head)}'>{E(str(group[0]))} program"
                       + (f" <code>{E(ref)}</code>" if ref else "") + f" · fork at step {E(str(group[1]))}</td></tr>")
        current = group
        cells, cls = estimate_cells(v, e)
        out.append(f"<tr class='{cls}'>" if cls else "<tr>")
        for i, cell in enumerate(cells):
            if i == 1:
                out.append(f"<td class='l'>{E(cell.text)}</td>")  # the arm cell: plain, for readers and tests
            else:
                out.append(cell.html())
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _legend(v: View) -> str:
    iv = v.interval_name()
    return (f"{v.distance} at h = {v.horizon} steps after each arm's intervention window (the absolute step in "
            f"parentheses), one row per program (the main program and its variants), fork step and arm; the reference "
            f"arm has a row in every program and fork step, since each has its own chaos baseline. Effect: the mean "
            f"over seeds of the seed-paired effect (fork vs the same seed's factual run) with its {iv}. Noise floor: "
            f"mean {v.distance} between different seeds' factual runs of that program at the same step; ratio = effect "
            f"/ floor. Excess: the effect minus the reference's, seed by seed, with its {iv}. q: Benjamini–Hochberg "
            f"across arms of the paired test of the excess; — = not tested (the placebo and the reference). Verdict: "
            f"see \"How to read a verdict\" (hover a verdict for its reason). Lifetime: the model of the excess curve "
            f"(persistent part: the plateau, and its ratio to the noise floor; transient part: the half-life in steps, "
            f"with its bootstrap interval over seeds); 'extrapolated': the half-life lies beyond the delays measured.")


def _bca_legend(v: View) -> str:
    n = len(v.seeds) or max((num(e.get("n_seeds")) for e in v.estimates), default=math.nan)
    return (f"BCa: the bias-corrected and accelerated bootstrap interval, shown only where labelled, for comparison. "
            f"With few seeds (here {fmt(n) if isinstance(n, int) or is_finite(n) else '?'}) it undercovers: it is "
            f"narrower than its nominal 95% warrants, so the {v.interval_name()} is the default everywhere else.")


def _all_distances(v: View) -> tuple[list[str], list[list[str]]]:
    distances = list(v.exp.get("distances") or sorted({e.get("distance") for e in v.estimates}))
    index = {(e.get("arm"), v.program(e), e.get("fork_step"), e.get("distance")): e
             for e in v.estimates if e.get("horizon") == v.horizon}
    head = ["program", "arm", "fork step"] + distances
    rows = []
    for e in v.primary_rows():
        row = [v.program(e), str(e.get("arm")), str(e.get("fork_step"))]
        for d in distances:
            x = index.get((e.get("arm"), v.program(e), e.get("fork_step"), d))
            row.append("—" if x is None else f"{fmt(x.get('mean'))} {fmt_ci(v.interval(x))}")
        rows.append(row)
    return head, rows


def _all_horizons(v: View) -> tuple[list[str], list[list[str]]]:
    iv = v.interval_name()
    head = ["program", "arm", "fork step", "h (step)", "effect (mean)", iv, "95% BCa (secondary)", "noise floor",
            "ratio", f"excess [{iv}]", "p", "q (BH)", "TOST margin", "TOST p", "verdict"]
    rows = []
    seen = []
    for e in v.primary_rows():
        key = (e.get("arm"), v.program(e), e.get("fork_step"))
        if key in seen:
            continue
        seen.append(key)
        for x in v.series(*key, v.distance):
            verdict = v.verdict_cell(x)[0]
            flag = v.dead_flag(x)
            rows.append([v.program(x), str(x.get("arm")), str(x.get("fork_step")),
                         f"{x.get('horizon')} ({x['step']})" if x.get("step") is not None else str(x.get("horizon")),
                         fmt(x.get("mean")), fmt_ci(v.interval(x)), fmt_ci(x.get("bca")), fmt(x.get("noise_floor")),
                         fmt(x.get("ratio"), 3), _excess_text(x), fmt_p(x.get("p_value")), fmt_p(x.get("q_value")),
                         "—" if x.get("tost_margin") is None else fmt(x.get("tost_margin"), 3),
                         fmt_p(x.get("tost_p")) if "tost_p" in x else "—",
                         verdict + (f" ⚠ {flag}" if flag else "")])
    return head, rows


def _plain_table_html(header, rows, left: int = 2, cls: str = "") -> str:
    attrs = f" class='{cls}'" if cls else ""
    out = [f"<div class='scroll'><table{attrs}><thead><tr>"]
    out += [f"<th class='{'l' if i < left else ''}'>{E(h)}</th>" for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(_td(c, "l" if i < left else ("ci" if c.startswith("[") or "[" in c else ""))
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


# -------------------------------------------------------------------------------- plots ----


def _band(v: View, entries: list, hs: list) -> plots.Series:
    """Mean and default interval of estimates (by horizon) over the delays hs."""
    by_h = {e.get("horizon"): e for e in entries}
    ivs = [v.interval(by_h[h]) if h in by_h else [None, None] for h in hs]
    return plots.Series(hs, [(by_h.get(h) or {}).get("mean") for h in hs], [x[0] for x in ivs], [x[1] for x in ivs])


def _aligned(values, hs) -> list | None:
    return list(values) if isinstance(values, (list, tuple)) and len(values) == len(hs) and len(hs) else None


def _decay_inputs(v: View, l: dict) -> dict:
    program, T, arm = v.program(l), l.get("fork_step"), l.get("arm")
    d = l.get("distance") or v.distance
    est = v.series(arm, program, T, d)
    hs = l.get("horizons") or [e.get("horizon") for e in est]
    by_h = {e.get("horizon"): e for e in est}
    if l.get("raw_mean") is not None:
        raw = plots.Series(hs, l.get("raw_mean"), l.get("raw_lo") or [], l.get("raw_hi") or [])
    else:
        raw = _band(v, est, hs)
    excess = None
    if l.get("excess_mean") is not None:
        excess = plots.Series(hs, l.get("excess_mean"), l.get("excess_lo") or [], l.get("excess_hi") or [])
    floor = None
    if est:
        f = [v.floor_at(by_h[h]) if h in by_h else (math.nan, math.nan, math.nan) for h in hs]
        floor = plots.Series(hs, [x[0] for x in f], [x[1] for x in f], [x[2] for x in f])
    reference = None
    if v.reference and arm != v.reference:
        ref = v.series(v.reference, program, T, d)
        if ref:
            reference = _band(v, ref, hs)
    fitted = _aligned(l.get("fitted"), hs)
    plateau = None
    if is_finite(l.get("plateau")) and ("model" in l):
        lo, hi = (list(l.get("plateau_interval") or []) + [None, None])[:2]
        plateau = (num(l.get("plateau")), num(lo), num(hi))
    state = l.get("state") if isinstance(l.get("state"), dict) else None
    hl = num(l.get("half_life"))
    if l.get("fit_ok"):
        note = ""
    elif math.isinf(hl):
        note = "no decay over the delays measured: half-life ∞"
    else:
        note = "no fit: " + (l.get("reason") or "unknown reason")
    if v.is_placebo(arm):
        note = "placebo: exactly 0, nothing to fit" if (v.placebo or {}).get("exact_zero") else note
    return {"raw": raw, "excess": excess, "floor": floor, "reference": reference, "distance": d,
            "fit": l, "excess_note": note, "note_color": "#2e7d32" if v.is_placebo(arm) else "#a40000",
            "fitted": plots.Series(hs, fitted) if fitted else None, "model": str(l.get("model") or ""),
            "plateau": plateau, "state": state}


def _raw_only_inputs(v: View, e: dict) -> dict:
    """Decay inputs from the estimates alone (no lifetime in the results)."""
    est = v.series(e.get("arm"), v.program(e), e.get("fork_step"), v.distance)
    hs = [x.get("horizon") for x in est]
    raw = _band(v, est, hs)
    f = [v.floor_at(x) for x in est]
    floor = plots.Series(hs, [x[0] for x in f], [x[1] for x in f], [x[2] for x in f])
    reference = None
    if v.reference and e.get("arm") != v.reference:
        ref = v.series(v.reference, v.program(e), e.get("fork_step"), v.distance)
        if ref:
            reference = _band(v, ref, [x.get("horizon") for x in ref])
    excess = None
    if any(x.get("excess_mean") is not None for x in est):
        ivs = [x.get("excess_interval") or [None, None] for x in est]
        excess = plots.Series(hs, [x.get("excess_mean") for x in est], [i[0] for i in ivs], [i[1] for i in ivs])
    why = "no lifetime in the results" + ("" if v.reference else " (no reference arm)")
    return {"raw": raw, "excess": excess, "floor": floor, "reference": reference, "distance": v.distance,
            "fit": None, "excess_note": why}


def _decay_caption(v: View, d: dict, name: str) -> str:
    l = d["fit"]
    if v.is_placebo(name):
        return "Placebo: the fork changes nothing, so its effect is exactly 0 at every delay."
    if l is None:
        return "No lifetime: " + d["excess_note"] + "."
    text, note, extrapolated = lifetime_summary(l)
    if "model" in l:
        caption = f"Function space: {text}"
        if l.get("formula"):
            caption += f"; formula: {l['formula']}"
        caption += "."
    elif l.get("fit_ok"):
        caption = (f"Half-life {fmt(num(l.get('half_life')), 3)} steps, 95% interval {fmt_ci(l.get('interval'), 3)}; "
                   f"fitted amplitude {fmt(l.get('amplitude'), 3)} at h = {min(l.get('horizons') or [0])}.")
    else:
        caption = f"Half-life {text}."
    if note:
        caption += f" Note: {note}."
    if extrapolated:
        caption += " The half-life is extrapolated beyond the delays measured."
    state = d.get("state")
    if state:
        caption += (f" State space ({state.get('measure') or 'update difference in excess of the reference'}): "
                    f"{state_summary(state)[len('state space: '):]}.")
        if state.get("note"):
            caption += f" Note: {state['note']}."
    elif "state" in l:
        caption += " No state-space lifetime in the results for this arm."
    series = v.series(l.get("arm"), v.program(l), l.get("fork_step"), l.get("distance") or v.distance)
    flags = {v.dead_flag(e) for e in series} - {""}
    if flags:
        caption += f" ⚠ {sorted(flags)[0]}"
    return caption


def _strip_rows(v: View) -> list[plots.StripRow]:
    rows = []
    for e in v.primary_rows():
        mean, lo, hi = v.floor_at(e)
        rows.append(plots.StripRow(label=label(v, e), per_seed=e.get("per_seed") or [], mean=num(e.get("mean")),
                                   ci=v.interval(e), floor=mean, floor_lo=lo, floor_hi=hi,
                                   kind=v.kind(str(e.get("arm")))))
    return rows


def _plots(v: View, png_dir: Path) -> tuple[list[dict], dict]:
    """Draw every figure once; returns the decay figures and the strip figure, each as
    {title, caption, svg, png} (png: file name inside png_dir)."""
    decays = []
    sources = [(l, _decay_inputs(v, l)) for l in v.sorted_lifetimes()]
    if not sources:
        sources = [(e, _raw_only_inputs(v, e)) for e in v.primary_rows() if not v.is_reference(e)]
    for i, (item, d) in enumerate(sources):
        name = str(item.get("arm"))
        title = f"{name}: {v.program(item)} program, fork at step {item.get('fork_step')}"
        fig = plots.decay_figure(title=title, distance=d["distance"], raw=d["raw"], excess=d["excess"],
                                 floor=d["floor"], reference=d["reference"], fit=d["fit"],
                                 excess_note=d["excess_note"], note_color=d.get("note_color", "#a40000"),
                                 fitted=d.get("fitted"), model=d.get("model", ""), plateau=d.get("plateau"),
                                 state=d.get("state"))
        png = f"decay_{i:02d}_{_safe(name)}.png"
        svg = plots.render(fig, png_dir / png, salt=f"replay-decay-{i}")
        decays.append({"title": title, "caption": _decay_caption(v, d, name), "svg": svg, "png": png,
                       "arm": name, "group": (v.program(item), item.get("fork_step")), "state": bool(d.get("state"))})
    fig = plots.seeds_figure(_strip_rows(v), v.seeds, v.distance, v.horizon)
    strip = {"svg": plots.render(fig, png_dir / "seeds.png", salt="replay-seeds"), "png": "seeds.png"}
    return decays, strip


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "arm"


# ---------------------------------------------------------------------------- checklist ----


def _kv_html(pairs, mono_keys=()) -> str:
    rows = []
    for k, val in pairs:
        text = val if isinstance(val, str) else json.dumps(val, sort_keys=True)
        cls = " class='mono'" if k in mono_keys or (isinstance(val, str) and _looks_hex(val)) else ""
        rows.append(f"<tr><th>{E(str(k))}</th><td{cls}>{E(text)}</td></tr>")
    return "<table class='kv'><tbody>" + "".join(rows) + "</tbody></table>"


def _looks_hex(s: str) -> bool:
    return len(s) >= 16 and all(c in "0123456789abcdef" for c in s.lower())


def _dict_html(obj, empty: str) -> str:
    if not obj:
        return f"<p class='warn'>{E(empty)}</p>"
    if not isinstance(obj, dict):
        return f"<pre>{E(json.dumps(obj, indent=1, sort_keys=True))}</pre>"
    return _kv_html(sorted(obj.items()))


def run_groups(runs: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Runs grouped by (program, source sha256), in order of first appearance, with what the group
    shares (order policy, verification status) when every run in it agrees."""
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((str(r.get("program")), str(r.get("program_sha256"))), []).append(r)
    out = []
    for (program, sha), members in groups.items():
        policies = {json.dumps(r.get("order_policy"), sort_keys=True) for r in members}
        statuses = {str(r.get("verified")) for r in members}
        out.append(({"program": program, "sha256": sha,
                     "order_policy": policies.pop() if len(policies) == 1 else None,
                     "verified": statuses.pop() if len(statuses) == 1 else None}, members))
    return out


def _order_hashes_html(hashes: dict) -> str:
    if not hashes:
        return "<span class='warn'>none recorded</span>"
    items = sorted(hashes.items(), key=lambda kv: (len(kv[0]), kv[0]))
    table = "<table class='hashes'>" + "".join(
        f"<tr><td>epoch {E(str(k))}</td><td class='mono'>{E(str(h))}</td></tr>" for k, h in items) + "</table>"
    if len(items) <= 1:
        return table
    first, last = items[0][0], items[-1][0]
    return f"<details><summary>{len(items)} epochs ({E(str(first))}–{E(str(last))})</summary>{table}</details>"


def _runs_html(v: View) -> str:
    runs = v.checklist.get("runs") or []
    if not runs:
        return "<p class='warn'>No runs recorded in the checklist.</p>"
    out = []
    n_ok = sum(verified_ok(r.get("verified")) for r in runs)
    out.append(f"<p>{len(runs)} runs, {n_ok} verified complete. Each run directory can be re-checked with "
               f"<code>replay verify</code> and <code>replay check</code>.</p>")
    for shared, members in run_groups(runs):
        out.append(f"<h3>Program <code>{E(shared['program'])}</code></h3>")
        meta = [("source sha256", shared["sha256"])]
        if shared["order_policy"] is not None:
            meta.append(("order policy (every run below)", shared["order_policy"]))
        if shared["verified"] is not None:
            meta.append(("verification (every run below)", shared["verified"]))
        out.append(_kv_html(meta))
        header = ["path", "kind", "seed", "arm", "fork step"]
        if shared["order_policy"] is None:
            header.append("order policy")
        header += ["per-epoch order hashes", "fingerprint at the fork step", "fingerprint at the end", "verified"]
        out.append("<div class='scroll'><table class='runs'><thead><tr>" +
                   "".join(f"<th class='l'>{E(h)}</th>" for h in header) + "</tr></thead><tbody>")
        for r in members:
            ok = verified_ok(r.get("verified"))
            status = str(r.get("verified") or "not recorded")
            cells = [_td(r.get("path", "?"), "l mono"), _td(r.get("kind", "?"), "l"), _td(r.get("seed", "?")),
                     _td(r.get("arm") or "—", "l"), _td("—" if r.get("fork_step") is None else r.get("fork_step"))]
            if shared["order_policy"] is None:
                cells.append(_td(json.dumps(r.get("order_policy"), sort_keys=True), "l small"))
            cells += [_td(_order_hashes_html(r.get("order_hashes") or {}), "l", raw=True),
                      _td(r.get("fingerprint_fork") or "not recorded", "l mono"),
                      _td(r.get("fingerprint_end") or "not recorded", "l mono")]
            shown = ("✓ " if ok else "✗ ") + (status.split(";")[0] if shared["verified"] is not None else status)
            cells.append(_td(shown, "l " + ("yes" if ok else "bad"), title=status))
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table></div>")
    return "".join(out)


# --------------------------------------------------------------------------------- HTML ----


def _badges(v: View) -> str:
    out = []
    p = v.placebo
    if p is None:
        out.append(("warn", "placebo: not checked"))
    elif p.get("exact_zero") and p.get("arm"):
        out.append(("ok", f"placebo: exactly 0 ({p.get('checked', '?')} values)"))
    elif p.get("exact_zero"):
        out.append(("warn", "no placebo arm"))
    else:
        out.append(("bad", "placebo: NOT ZERO"))
    runs = v.checklist.get("runs") or []
    if runs:
        n_ok = sum(verified_ok(r.get("verified")) for r in runs)
        out.append(("ok" if n_ok == len(runs) else "bad", f"runs verified: {n_ok}/{len(runs)}"))
    else:
        out.append(("warn", "runs: none recorded"))
    out.append(("ok" if len(v.seeds) >= 2 else "warn", f"seeds: {len(v.seeds)}"))
    out.append(("", f"primary: {v.distance} at h = {v.horizon}"))
    if v.reference:
        dead_ref = any(n[0] == "bad" and "chaos baseline is dead" in n[1] for n in caveats(v))
        out.append(("bad" if dead_ref else "", f"reference: {v.reference}" + (" (DEAD)" if dead_ref else "")))
    rows = arm_rows(v)
    for verdict, css in (("memory beyond chaos", "v-mem"), ("no memory beyond chaos", "v-none"),
                         ("inconclusive", "v-inc")):
        n = sum(1 for e in rows if e.get("verdict") == verdict)
        if n:
            out.append((css, f"{verdict}: {n}"))
    dead = sum(1 for e in rows if v.dead_flag(e))
    if dead:
        out.append(("bad", f"dead arms: {dead}"))
    return "<div class='badges'>" + "".join(f"<span class='badge {c}'>{E(t)}</span>" for c, t in out) + "</div>"


def _notes_html(notes) -> str:
    if not notes:
        return ("<div class='notes clean'>Nothing is missing: every row has its intervals, every arm its lifetime, "
                "and the checklist is complete.</div>")
    items = "".join(f"<li class='{lvl}'>{E(text)}</li>" for lvl, text in notes)
    if all(lvl == "info" for lvl, _ in notes):
        return f"<div class='notes info'><strong>Notes</strong><ul>{items}</ul></div>"
    return f"<div class='notes'><strong>Missing or degenerate pieces</strong><ul>{items}</ul></div>"


def _placebo_line(v: View) -> str:
    p = v.placebo
    if p is None:
        return "<p class='warn'>Placebo check: not in the results.</p>"
    if p.get("exact_zero"):
        return f"<p class='ok'>Placebo check passed: {E(str(p.get('detail', '')))}</p>"
    return f"<p class='bad'>Placebo check FAILED: {E(str(p.get('detail', '')))}</p>"


DECAY_LEGEND = (
    "Left: the raw effect (blue: mean over seeds, band: its 95% interval) against the delay h after the intervention "
    "window, with the seed-to-seed noise floor (orange band) and the one-bit flip reference (grey): in a chaotic run "
    "even the reference grows toward the floor. Middle: the excess over the reference, seed by seed, with the fitted "
    "model of the excess curve (green line) and its plateau (dashed green line, band: its interval): the plateau is "
    "the persistent part, the half-life the transient part. Right, where the results have it: the state-space "
    "lifetime, the per-step update difference of the fork from its parent in excess of the reference fork's, with "
    "its fitted decay and half-life. No curve need be monotone.")


def _howto_html(v: View) -> str:
    items = []
    for name, text in verdict_legend(v):
        css = VERDICT_CSS.get(name, "")
        if name in ("rule", "equivalence margin"):
            head = f"<strong>{E(name)}:</strong>"
        elif name == "flag":
            head = "<span class='flag' style='display:inline'>⚠ flag</span>"
        else:
            head = f"<span class='pill {css or 'ref'}'>{E(name)}</span>"
        items.append(f"<li>{head} {E(text)}</li>")
    return f"<div class='howto'><strong>How to read a verdict</strong><ul>{''.join(items)}</ul></div>"


def reference_table(v: View) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the references table, without the 'other' column when nothing is in it."""
    rows = reference_rows(v)
    if any(r[8] for r in rows):
        return REFERENCE_HEADER, rows
    return REFERENCE_HEADER[:8] + REFERENCE_HEADER[9:], [r[:8] + r[9:] for r in rows]


def reference_rows(v: View) -> list[list[str]]:
    """One row per (program, fork step, seed) of the references: the bit-flip target of each seed."""
    rows = []
    for ref in v.references:
        status = "DEAD: exactly 0 at every horizon" if ref.get("zero_everywhere") else "live"
        targets = [t for t in ref.get("targets") or [] if isinstance(t, dict)] or [{}]
        for t in targets:
            other = {k: val for k, val in t.items() if k not in ("seed", "param", "index", "bit", "selected_by", "name")}
            rows.append([str(ref.get("program") or "main"), str(ref.get("fork_step")), str(ref.get("arm") or v.reference),
                         str(t.get("seed", "—")), str(t.get("param", "—")), str(t.get("index", "—")),
                         str(t.get("bit", "—")), str(t.get("selected_by") or "not recorded"),
                         json.dumps(other, sort_keys=True) if other else "", status])
    return rows


REFERENCE_HEADER = ["program", "fork step", "arm", "seed", "parameter", "element", "bit", "selected by", "other",
                    "baseline"]


def _references_text(v: View) -> tuple[str, str]:
    """(level, sentence) above the references table."""
    if v.reference is None:
        return "warn", "No reference arm: no chaos baseline, so no excess, no verdicts and no lifetimes."
    if not v.references:
        return "warn", f"No bit-flip targets recorded in the results for the reference arm '{v.reference}'."
    return "", (f"What the reference arm '{v.reference}' flipped in each seed's fork, per program and fork step (as "
                f"each fork's lineage records it). A dead baseline (exactly 0 at every horizon) makes every excess a "
                f"raw effect.")


def _references_html(v: View) -> str:
    level, text = _references_text(v)
    out = f"<p class='{level}'>{E(text)}</p>" if level else f"<p class='legend'>{E(text)}</p>"
    head, rows = reference_table(v)
    if not rows:
        return out
    body = []
    for row in rows:
        cells = "".join(_td(c, "l" if head[i] in ("program", "arm", "parameter", "selected by", "other") else "")
                        for i, c in enumerate(row[:-1]))
        cells += _td(row[-1], "l " + ("bad" if row[-1].startswith("DEAD") else "yes"))
        body.append(f"<tr>{cells}</tr>")
    return (out + "<div class='scroll'><table class='references'><thead><tr>"
            + "".join(f"<th class='l'>{E(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table></div>")


def _memory_html(v: View) -> str:
    sections = memory_sections(v.r, v.horizon)
    if not sections:
        return ""
    out = ["<h2 id='memory'>Training memory</h2>"]
    for sec in sections:
        out.append(f"<h3 id='{E(sec.anchor)}'>{E(sec.title)}</h3><p class='legend'>{E(sec.text)}</p>")
        for caption, head, rows in sec.tables:
            out.append(f"<p class='legend'>{E(caption)}</p>")
            out.append(_plain_table_html(head, rows) if rows else "<p class='warn'>No rows in the results.</p>")
    return "\n".join(out)


def _memory_md(v: View) -> str:
    sections = memory_sections(v.r, v.horizon)
    if not sections:
        return ""
    out = ["## Training memory"]
    for sec in sections:
        out += [f"### {md_cell(sec.title)}", md_cell(sec.text)]
        for caption, head, rows in sec.tables:
            out += [f"_{md_cell(caption)}_", _md_table(head, rows) if rows else "_No rows in the results._"]
    return "\n\n".join(out)


def render_html(v: View, decays: list[dict], strip: dict, notes) -> str:
    exp = v.exp
    name = str(exp.get("name") or "replay experiment")
    if decays:
        decay_html = "".join(f"<figure class='decay{' state' if d['state'] else ''}'>{d['svg']}<figcaption>"
                             f"{E(d['caption'])}</figcaption></figure>" for d in decays)
    else:
        decay_html = "<p class='warn'>No decay curves: the results hold no lifetimes and no per-horizon estimates.</p>"
    h_header, h_rows = _all_horizons(v)
    d_header, d_rows = _all_distances(v)
    checklist = v.checklist
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{E(name)} · replay report</title>
<style>{CSS}</style></head>
<body>
<h1>{E(name)}</h1>
<p class="sub">replay audit report · program <code>{E(str(exp.get('program', '?')))}</code></p>
<p class="summary">{E(summary(v))}</p>
{_badges(v)}
{_placebo_line(v)}
{_notes_html(notes)}

<h2 id="estimates">Estimates</h2>
<p class="verdicts">{E(verdict_summary(v))}</p>
{_howto_html(v)}
<p class="legend">{E(_legend(v))}</p>
{_estimates_html(v)}
<p class="legend">{E(_bca_legend(v))}</p>
<details><summary>Every distance at h = {E(str(v.horizon))} (mean [{E(v.interval_name())}])</summary>
{_plain_table_html(d_header, d_rows)}</details>
<details><summary>Every horizon, {E(str(v.distance))} (with the BCa interval, secondary)</summary>
{_plain_table_html(h_header, h_rows)}</details>

{_memory_html(v)}
<h2 id="decay">Decay curves</h2>
<p class="legend">{E(DECAY_LEGEND)}</p>
{decay_html}

<h2 id="seeds">Per-seed effects against the noise floor</h2>
<figure class='seeds'>{strip['svg']}<figcaption>Each dot is one seed's effect ({E(str(v.distance))} at h =
{E(str(v.horizon))}; one colour per seed across arms, so the pairing shows); black: the mean with its
{E(v.interval_name())}; orange: the seed noise floor at the same step with its interval.</figcaption></figure>

<h2 id="references">Reference arm: bit-flip targets</h2>
{_references_html(v)}

<h2 id="checklist">Reporting checklist</h2>
<h3>Per estimate</h3>
{_kv_html(checklist_items(v))}
<h3>Runs</h3>
{_runs_html(v)}
<h3>RNG contract</h3>
{_dict_html(checklist.get('rng_contract'), 'No RNG contract recorded.')}
<div class="cols"><div><h3>Environment</h3>
{_dict_html(checklist.get('environment'), 'No environment fingerprint recorded.')}</div>
<div><h3>Determinism flags</h3>
{_dict_html(checklist.get('determinism_flags'), 'No determinism flags recorded.')}</div></div>
<h3>Checkpoint schedule</h3>
{_dict_html(checklist.get('checkpoint_schedule'), 'No checkpoint schedule recorded.')}
<footer>Written by replay {E(__version__)} from the experiment's results.json. The page is self-contained (inline
CSS and SVG, no scripts, no network). A Markdown twin with PNG plots lies next to it.</footer>
</body></html>
"""


# ----------------------------------------------------------------------------- Markdown ----


def md_cell(text) -> str:
    """A string for Markdown: HTML specials escaped (no raw markup), pipes escaped, one line."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_kv(pairs) -> str:
    return "\n".join(f"- **{md_cell(k)}**: {md_cell(val if isinstance(val, str) else json.dumps(val, sort_keys=True))}"
                     for k, val in pairs)


def _md_dict(obj, empty: str) -> str:
    if not obj:
        return f"_{empty}_"
    if not isinstance(obj, dict):
        return "```json\n" + json.dumps(obj, indent=1, sort_keys=True) + "\n```"
    return _md_kv(sorted(obj.items()))


def _md_runs(v: View) -> str:
    runs = v.checklist.get("runs") or []
    if not runs:
        return "_No runs recorded in the checklist._"
    parts = []
    n_ok = sum(verified_ok(r.get("verified")) for r in runs)
    parts.append(f"{len(runs)} runs, {n_ok} verified complete.")
    for shared, members in run_groups(runs):
        parts.append(f"#### Program `{md_cell(shared['program'])}`")
        meta = [("source sha256", shared["sha256"])]
        if shared["order_policy"] is not None:
            meta.append(("order policy (every run below)", shared["order_policy"]))
        if shared["verified"] is not None:
            meta.append(("verification (every run below)", shared["verified"]))
        parts.append(_md_kv(meta))
        header = ["path", "kind", "seed", "arm", "fork step"]
        if shared["order_policy"] is None:
            header.append("order policy")
        header += ["order hashes", "fingerprint at fork", "fingerprint at end", "verified"]
        rows, hash_lines = [], []
        factual = {}
        for r in members:
            hashes = {str(k): str(h) for k, h in (r.get("order_hashes") or {}).items()}
            epochs = sorted(hashes, key=lambda k: (len(k), k))
            same_as = None
            if r.get("kind") == "factual":
                factual[r.get("seed")] = (r.get("path"), hashes)
            elif r.get("seed") in factual:
                fpath, fh = factual[r.get("seed")]
                if all(fh.get(k) == h for k, h in hashes.items()):
                    same_as = fpath
            span = f"epochs {epochs[0]}–{epochs[-1]}" if len(epochs) > 1 else (f"epoch {epochs[0]}" if epochs else "none")
            if not hashes:
                cell = "none recorded"
            elif same_as:
                cell = f"{span}: = {same_as}"
            else:
                cell = f"{span}: listed below"
                hash_lines.append(f"- `{md_cell(r.get('path'))}`: " + ", ".join(f"{k}: `{hashes[k]}`" for k in epochs))
            row = [r.get("path", "?"), r.get("kind", "?"), r.get("seed", "?"), r.get("arm") or "—",
                   "—" if r.get("fork_step") is None else r.get("fork_step")]
            if shared["order_policy"] is None:
                row.append(json.dumps(r.get("order_policy"), sort_keys=True))
            status = str(r.get("verified") or "not recorded")
            row += [cell, r.get("fingerprint_fork") or "not recorded", r.get("fingerprint_end") or "not recorded",
                    ("✓ " if verified_ok(status) else "✗ ") + (status.split(";")[0] if shared["verified"] is not None else status)]
            rows.append([str(c) for c in row])
        parts.append(_md_table(header, rows))
        if hash_lines:
            parts.append("Per-epoch order hashes of the factual runs, and of every fork whose hashes differ from "
                         "its factual run's (\"= path\" above: equal to that run's on the epochs listed):\n\n"
                         + "\n".join(hash_lines))
    return "\n\n".join(parts)


def _md_estimate_cell(cell: Cell) -> str:
    """A cell's Markdown text; the memory verdicts styled (bold: memory, italic: inconclusive)."""
    text = cell.md()
    if cell.pill == "v-mem":
        text = f"**{cell.text}**" + text[len(cell.text):]
    elif cell.pill == "v-inc":
        text = f"_{cell.text}_" + text[len(cell.text):]
    return text


def render_markdown(v: View, decays: list[dict], plots_dir: str, notes) -> str:
    exp = v.exp
    name = str(exp.get("name") or "replay experiment")
    rows = v.primary_rows()
    table_rows = [[_md_estimate_cell(c) for c in estimate_cells(v, e)[0]] for e in rows]
    p = v.placebo
    if p is None:
        placebo = "Placebo check: not in the results."
    elif p.get("exact_zero"):
        placebo = f"Placebo check passed: {p.get('detail', '')}"
    else:
        placebo = f"**Placebo check FAILED:** {p.get('detail', '')}"
    notes_md = ("\n".join(f"- {'**' + md_cell(t) + '**' if lvl == 'bad' else md_cell(t)}" for lvl, t in notes)
                if notes else "Nothing is missing: every row has its intervals, every arm its lifetime, and the checklist is complete.")
    decay_md = "\n\n".join(f"**{md_cell(d['title'])}.** {md_cell(d['caption'])}\n\n![{md_cell(d['title'])}]({plots_dir}/{d['png']})"
                           for d in decays) or "_No decay curves: the results hold no lifetimes and no per-horizon estimates._"
    d_header, d_rows = _all_distances(v)
    h_header, h_rows = _all_horizons(v)
    checklist = v.checklist
    parts = [
        f"# {md_cell(name)}",
        f"_replay audit report · program `{md_cell(exp.get('program', '?'))}`_",
        md_cell(summary(v)),
        md_cell(placebo) if not placebo.startswith("**") else placebo,
        (("### Notes" if all(lvl == "info" for lvl, _ in notes) else "### Missing or degenerate pieces")
         + "\n\n" + notes_md) if notes else notes_md,
        "## Estimates",
        f"**{md_cell(verdict_summary(v))}**",
        "**How to read a verdict.**\n\n" + "\n".join(f"- **{md_cell(k)}**: {md_cell(t)}" for k, t in verdict_legend(v)),
        md_cell(_legend(v)),
        _md_table(header(v), table_rows) if table_rows else "**No estimates at the primary distance and horizon.**",
        md_cell(_bca_legend(v)),
        f"### Every distance at h = {md_cell(v.horizon)} (mean [{md_cell(v.interval_name())}])",
        _md_table(d_header, d_rows),
        f"### Every horizon, {md_cell(v.distance)} (with the BCa interval, secondary)",
        _md_table(h_header, h_rows),
        _memory_md(v),
        "## Decay curves",
        md_cell(DECAY_LEGEND),
        decay_md,
        "## Per-seed effects against the noise floor",
        f"![per-seed effects]({plots_dir}/seeds.png)",
        "## Reference arm: bit-flip targets",
        (lambda lt: f"**{md_cell(lt[1])}**" if lt[0] else md_cell(lt[1]))(_references_text(v)),
        _md_table(*reference_table(v)) if reference_rows(v) else "",
        "## Reporting checklist",
        "### Per estimate",
        _md_kv(checklist_items(v)),
        "### Runs",
        _md_runs(v),
        "### RNG contract",
        _md_dict(checklist.get("rng_contract"), "No RNG contract recorded."),
        "### Environment",
        _md_dict(checklist.get("environment"), "No environment fingerprint recorded."),
        "### Determinism flags",
        _md_dict(checklist.get("determinism_flags"), "No determinism flags recorded."),
        "### Checkpoint schedule",
        _md_dict(checklist.get("checkpoint_schedule"), "No checkpoint schedule recorded."),
        f"_Written by replay {md_cell(__version__)} from the experiment's results.json; the HTML page next to this file "
        "is the same report with inline SVG plots._",
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


# -------------------------------------------------------------------------------- entry ----


def write_report(results: dict, out_html) -> tuple[Path, Path]:
    """Write the report of `results` (the dict of an experiment's results.json) to `out_html`,
    and its Markdown twin next to it (same name, .md) with the plots as PNG files in
    <stem>_plots/. Returns (html_path, md_path). Missing optional pieces (lifetimes, placebo check,
    noise floor, checklist, intervals) are reported in the page, never an error."""
    v = View(results)
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_md = out_html.with_suffix(".md")
    png_dir = out_html.with_name(out_html.stem + "_plots")
    png_dir.mkdir(exist_ok=True)
    for stale in png_dir.glob("*.png"):  # plots of an earlier report (e.g. arms since renamed)
        stale.unlink()
    notes = caveats(v)
    decays, strip = _plots(v, png_dir)
    atomic_write_bytes(out_html, render_html(v, decays, strip, notes).encode("utf-8"))
    atomic_write_bytes(out_md, render_markdown(v, decays, png_dir.name, notes).encode("utf-8"))
    return out_html, out_md
