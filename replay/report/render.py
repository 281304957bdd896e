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
from pathlib import Path

from .. import __version__
from ..store.atomic import atomic_write_bytes
from . import plots
from .model import View, caveats, checklist_items, fmt, fmt_ci, fmt_p, is_finite, label, num, summary, verified_ok

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
footer { margin-top: 3em; font-size: 0.8em; color: var(--muted); border-top: 1px solid var(--line); padding-top: 0.6em; }
"""

E = html.escape  # every string from the results goes through this


def _td(text, cls: str = "", title: str = "", raw: bool = False) -> str:
    attrs = (f" class='{cls}'" if cls else "") + (f" title='{E(title, quote=True)}'" if title else "")
    return f"<td{attrs}>{text if raw else E(str(text))}</td>"


def _flag(value, tested: bool = True) -> tuple[str, str]:
    if not tested:
        return "—", "no"
    return ("yes", "yes") if value else ("no", "no")


# ------------------------------------------------------------------------ estimates table ----


HEADER = ["arm", "program", "fork step", "h (step)", "seeds", "mean", "95% BCa", "95% t", "noise floor",
          "ratio to floor", "excess over ref.", "q (BH)", "significant", "TOST equivalent", "half-life [95% CI]"]


def estimate_cells(v: View, e: dict) -> tuple[list[tuple[str, str]], str]:
    """[(text, css class)] of one row of the estimates table, and the row's class."""
    arm = str(e.get("arm"))
    kind = v.kind(arm)
    mean_text = fmt(e.get("mean"))
    life, note = v.lifetime_text(e)
    life_cls = ""
    if kind == "placebo":
        mean_text, life, status = v.placebo_cells(e)
        note, life_cls = "", status
    tested = kind == "arm" and is_finite(e.get("q_value"))
    q = fmt_p(e.get("q_value")) if kind == "arm" else "—"
    sig, sig_cls = _flag(e.get("significant"), tested)
    tost, tost_cls = _flag(e.get("tost_equivalent"), e.get("tost_equivalent") is not None)
    step = f"{e.get('horizon')} ({e['step']})" if e.get("step") is not None else str(e.get("horizon"))
    excess = e.get("excess_mean")
    cells = [
        (arm, "l"), (v.program(e), "l"), (str(e.get("fork_step")), ""), (step, ""),
        (str(e.get("n_seeds", len(e.get("per_seed") or []))), ""), (mean_text, ""),
        (fmt_ci(e.get("bca"), 3), "ci"), (fmt_ci(e.get("t"), 3), "ci"), (fmt(e.get("noise_floor")), ""),
        (fmt(e.get("ratio"), 3), ""), ("—" if excess is None else fmt(excess), ""), (q, ""),
        (sig, sig_cls), (tost, tost_cls), (life + (f" — {note}" if note else ""), "l life " + life_cls),
    ]
    return cells, kind if kind != "arm" else ""


def _estimates_html(v: View) -> str:
    rows = v.primary_rows()
    if not rows:
        return "<p class='bad'>No estimates at the primary distance and horizon.</p>"
    out = ["<div class='scroll'><table><thead><tr>"]
    out += [f"<th class='{'l' if i < 2 or i == len(HEADER) - 1 else ''}'>{E(h)}</th>" for i, h in enumerate(HEADER)]
    out.append("</tr></thead><tbody>")
    groups = list(dict.fromkeys((v.program(e), e.get("fork_step")) for e in rows))
    current = None
    for e in rows:
        group = (v.program(e), e.get("fork_step"))
        if len(groups) > 1 and group != current:
            out.append(f"<tr class='group'><td colspan='{len(HEADER)}'>{E(str(group[0]))} program · fork at step "
                       f"{E(str(group[1]))}</td></tr>")
        current = group
        cells, cls = estimate_cells(v, e)
        out.append(f"<tr class='{cls}'>" if cls else "<tr>")
        for i, (text, ccls) in enumerate(cells):
            if i == 0:
                out.append(f"<td class='l'>{E(text)}</td>")  # the arm cell: plain, for readers and tests
            elif i == len(cells) - 1:
                life, _, note = text.partition(" — ")
                body = E(life) + (f"<br><span class='small'>{E(note)}</span>" if note else "")
                out.append(_td(body, ccls.strip(), raw=True))
            else:
                out.append(_td(text, ccls))
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _legend(v: View) -> str:
    margin = fmt(v.exp.get("equivalence_margin"))
    return (f"{v.distance} at h = {v.horizon} steps after each arm's intervention window (the absolute step in "
            f"parentheses). Mean over seeds of the seed-paired effect (fork vs the same seed's factual run). "
            f"Noise floor: mean {v.distance} between different seeds' factual runs at the same step; ratio = mean / "
            f"floor. Excess: mean minus the bit-flip reference's, seed by seed. q: Benjamini–Hochberg across arms of the "
            f"test of the excess (of the effect where there is no reference); significant at q ≤ alpha; "
            f"— = not tested (the placebo and the reference). TOST equivalent: "
            f"the effect lies within ±{margin} (\"no memory\" claimed only then). Half-life: of the excess over the "
            f"reference, in steps, with its bootstrap interval over seeds.")


def _all_distances(v: View) -> tuple[list[str], list[list[str]]]:
    distances = list(v.exp.get("distances") or sorted({e.get("distance") for e in v.estimates}))
    index = {(e.get("arm"), v.program(e), e.get("fork_step"), e.get("distance")): e
             for e in v.estimates if e.get("horizon") == v.horizon}
    header = ["arm", "program", "fork step"] + distances
    rows = []
    for e in v.primary_rows():
        row = [str(e.get("arm")), v.program(e), str(e.get("fork_step"))]
        for d in distances:
            x = index.get((e.get("arm"), v.program(e), e.get("fork_step"), d))
            row.append("—" if x is None else f"{fmt(x.get('mean'))} {fmt_ci(x.get('bca'))}")
        rows.append(row)
    return header, rows


def _all_horizons(v: View) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "program", "fork step", "h (step)", "mean", "95% BCa", "95% t", "noise floor", "ratio",
              "excess", "p", "TOST equivalent"]
    rows = []
    seen = []
    for e in v.primary_rows():
        key = (e.get("arm"), v.program(e), e.get("fork_step"))
        if key in seen:
            continue
        seen.append(key)
        for x in v.series(*key, v.distance):
            rows.append([str(x.get("arm")), v.program(x), str(x.get("fork_step")),
                         f"{x.get('horizon')} ({x['step']})" if x.get("step") is not None else str(x.get("horizon")),
                         fmt(x.get("mean")), fmt_ci(x.get("bca")), fmt_ci(x.get("t")), fmt(x.get("noise_floor")),
                         fmt(x.get("ratio"), 3), "—" if x.get("excess_mean") is None else fmt(x.get("excess_mean")),
                         fmt_p(x.get("p_value")), _flag(x.get("tost_equivalent"))[0]])
    return header, rows


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


def _decay_inputs(v: View, l: dict) -> dict:
    program, T, arm = v.program(l), l.get("fork_step"), l.get("arm")
    d = l.get("distance") or v.distance
    est = v.series(arm, program, T, d)
    hs = l.get("horizons") or [e.get("horizon") for e in est]
    by_h = {e.get("horizon"): e for e in est}
    if l.get("raw_mean") is not None:
        raw = plots.Series(hs, l.get("raw_mean"), l.get("raw_lo") or [], l.get("raw_hi") or [])
    else:
        raw = plots.Series(hs, [(by_h.get(h) or {}).get("mean") for h in hs],
                           [((by_h.get(h) or {}).get("bca") or [None, None])[0] for h in hs],
                           [((by_h.get(h) or {}).get("bca") or [None, None])[1] for h in hs])
    excess = None
    if l.get("excess_mean") is not None:
        excess = plots.Series(hs, l.get("excess_mean"), l.get("excess_lo") or [], l.get("excess_hi") or [])
    floor = None
    if est:
        f = [v.floor_at(by_h[h]) if h in by_h else (math.nan, math.nan, math.nan) for h in hs]
        floor = plots.Series(hs, [x[0] for x in f], [x[1] for x in f], [x[2] for x in f])
    reference = None
    if v.reference and arm != v.reference:
        ref = {e.get("horizon"): e for e in v.series(v.reference, program, T, d)}
        if ref:
            reference = plots.Series(hs, [(ref.get(h) or {}).get("mean") for h in hs],
                                     [((ref.get(h) or {}).get("bca") or [None, None])[0] for h in hs],
                                     [((ref.get(h) or {}).get("bca") or [None, None])[1] for h in hs])
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
            "fit": l, "excess_note": note, "note_color": "#2e7d32" if v.is_placebo(arm) else "#a40000"}


def _raw_only_inputs(v: View, e: dict) -> dict:
    """Decay inputs from the estimates alone (no lifetime in the results)."""
    est = v.series(e.get("arm"), v.program(e), e.get("fork_step"), v.distance)
    hs = [x.get("horizon") for x in est]
    raw = plots.Series(hs, [x.get("mean") for x in est], [(x.get("bca") or [None])[0] for x in est],
                       [(x.get("bca") or [None, None])[1] for x in est])
    f = [v.floor_at(x) for x in est]
    floor = plots.Series(hs, [x[0] for x in f], [x[1] for x in f], [x[2] for x in f])
    reference = None
    if v.reference and e.get("arm") != v.reference:
        ref = v.series(v.reference, v.program(e), e.get("fork_step"), v.distance)
        if ref:
            reference = plots.Series([x.get("horizon") for x in ref], [x.get("mean") for x in ref],
                                     [(x.get("bca") or [None])[0] for x in ref],
                                     [(x.get("bca") or [None, None])[1] for x in ref])
    excess = None
    if any(x.get("excess_mean") is not None for x in est):
        excess = plots.Series(hs, [x.get("excess_mean") for x in est])
    why = "no lifetime in the results" + ("" if v.reference else " (no reference arm)")
    return {"raw": raw, "excess": excess, "floor": floor, "reference": reference, "distance": v.distance,
            "fit": None, "excess_note": why}


def _decay_caption(v: View, d: dict, name: str) -> str:
    l = d["fit"]
    if v.is_placebo(name):
        return "Placebo: the fork changes nothing, so its effect is exactly 0 at every delay."
    if l is None:
        return "No lifetime: " + d["excess_note"] + "."
    hl = num(l.get("half_life"))
    if l.get("fit_ok"):
        text = (f"Half-life {fmt(hl, 3)} steps, 95% interval {fmt_ci(l.get('interval'), 3)}; "
                f"fitted amplitude {fmt(l.get('amplitude'), 3)} at h = {min(l.get('horizons') or [0])}.")
    else:
        text = f"Half-life {fmt(hl, 3)} (interval {fmt_ci(l.get('interval'), 3)}): {l.get('reason') or 'no fit'}."
    if l.get("reason") and l.get("fit_ok"):
        text += f" Note: {l['reason']}."
    return text


def _strip_rows(v: View) -> list[plots.StripRow]:
    rows = []
    for e in v.primary_rows():
        mean, lo, hi = v.floor_at(e)
        rows.append(plots.StripRow(label=label(v, e), per_seed=e.get("per_seed") or [], mean=num(e.get("mean")),
                                   ci=e.get("bca") or [], floor=mean, floor_lo=lo, floor_hi=hi,
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
                                 excess_note=d["excess_note"], note_color=d.get("note_color", "#a40000"))
        png = f"decay_{i:02d}_{_safe(name)}.png"
        svg = plots.render(fig, png_dir / png, salt=f"replay-decay-{i}")
        decays.append({"title": title, "caption": _decay_caption(v, d, name), "svg": svg, "png": png,
                       "arm": name, "group": (v.program(item), item.get("fork_step"))})
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
        out.append(("", f"reference: {v.reference}"))
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


def render_html(v: View, decays: list[dict], strip: dict, notes) -> str:
    exp = v.exp
    name = str(exp.get("name") or "replay experiment")
    if decays:
        decay_html = "".join(f"<figure>{d['svg']}<figcaption>{E(d['caption'])}</figcaption></figure>" for d in decays)
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
<p class="legend">{E(_legend(v))}</p>
{_estimates_html(v)}
<details><summary>Every distance at h = {E(str(v.horizon))} (mean [95% BCa])</summary>
{_plain_table_html(d_header, d_rows)}</details>
<details><summary>Every horizon, {E(str(v.distance))}</summary>
{_plain_table_html(h_header, h_rows)}</details>

<h2 id="decay">Decay curves</h2>
<p class="legend">Left: the raw effect (blue: mean over seeds, band: 95% BCa interval) against the delay h after the
intervention window, with the seed-to-seed noise floor (orange band) and the one-bit flip reference (grey): in a
chaotic run even the reference grows toward the floor. Right: the excess over the reference, seed by seed, with the
fitted exponential decay (green) whose half-life is the lifetime. Neither curve need be monotone.</p>
{decay_html}

<h2 id="seeds">Per-seed effects against the noise floor</h2>
<figure>{strip['svg']}<figcaption>Each dot is one seed's effect ({E(str(v.distance))} at h = {E(str(v.horizon))}; one
colour per seed across arms, so the pairing shows); black: the mean with its 95% BCa interval; orange: the seed noise
floor at the same step with its interval.</figcaption></figure>

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


def render_markdown(v: View, decays: list[dict], plots_dir: str, notes) -> str:
    exp = v.exp
    name = str(exp.get("name") or "replay experiment")
    rows = v.primary_rows()
    table_rows = [[c[0] for c in estimate_cells(v, e)[0]] for e in rows]
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
        md_cell(_legend(v)),
        _md_table(HEADER, table_rows) if table_rows else "**No estimates at the primary distance and horizon.**",
        f"### Every distance at h = {md_cell(v.horizon)} (mean [95% BCa])",
        _md_table(d_header, d_rows),
        f"### Every horizon, {md_cell(v.distance)}",
        _md_table(h_header, h_rows),
        "## Decay curves",
        "Left: raw effect with its 95% band, the seed noise floor (orange) and the bit-flip reference (grey). "
        "Right: excess over the reference with the fitted exponential decay (green).",
        decay_md,
        "## Per-seed effects against the noise floor",
        f"![per-seed effects]({plots_dir}/seeds.png)",
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
    return "\n\n".join(parts) + "\n"


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
