"""The report's "Training memory" sections, from results.json's witness, additivity, divergence
and calibration entries (replay.experiment.memory): each a title, a sentence saying what it
measures and what to read in it, and tables of plain strings that both renderers lay out.

results.json is read as untrusted input: anything missing or malformed shows as "n/a" or a
sentence, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import fmt, fmt_ci, fmt_p, num


@dataclass
class Section:
    title: str
    text: str
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)  # (caption, header, rows)
    anchor: str = ""


def _rows(entry) -> list[dict]:
    rows = entry.get("rows") if isinstance(entry, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _s(x) -> str:
    return "n/a" if x is None else str(x)


def _yes(flag, yes: str, no: str) -> str:
    return yes if flag is True else no if flag is False else "n/a"


def witness_section(results: dict) -> Section | None:
    w = results.get("witness")
    if not isinstance(w, dict):
        return None
    rows = _rows(w)
    primary = _s(w.get("primary_distance"))
    text = (f"{_s(w.get('definition'))} A' redraws the '{_s(w.get('stream'))}' stream; the causal break is "
            f"'{_s(w.get('causal_break'))}'. A witness above 0 (its interval too) certifies memory carried past the "
            f"instruments; the break should attenuate it if that memory is optimizer state. {_s(w.get('theory'))}")
    header = ["program", "fork step", "k", "B steps", "momentum", "D1", "D2", "witness D2 − D1 [95% t]", "> 0",
              "with causal break [95% t]", "attenuation [95% t]", "amplification over k",
              "theory: coherent", "theory: incoherent"]
    table = []
    for r in rows:
        if r.get("distance") != primary:
            continue
        att = r.get("attenuation") if isinstance(r.get("attenuation"), dict) else {}
        table.append([_s(r.get("program")), fmt(r.get("fork_step")), fmt(r.get("k")), fmt(r.get("b_steps")),
                      fmt(r.get("momentum")), fmt(r.get("d1_mean")), fmt(r.get("d2_mean")),
                      f"{fmt(r.get('witness'))} {fmt_ci(r.get('interval'))}",
                      _yes(r.get("positive"), "yes", "no"),
                      f"{fmt(r.get('break_witness'))} {fmt_ci(r.get('break_interval'))}",
                      f"{fmt(att.get('mean'))} {fmt_ci(att.get('interval'))}",
                      fmt(r.get("amplification")), fmt(r.get("theory_ratio_coherent")),
                      fmt(r.get("theory_ratio_incoherent"))])
    tables = [(f"Witness at the primary distance ({_s(primary)}); amplification: the witness over the shortest "
               "instrument's at the same B, against the theory's ratio.", header, table)]
    others = [[_s(r.get("program")), fmt(r.get("fork_step")), fmt(r.get("k")), fmt(r.get("b_steps")),
               _s(r.get("distance")), f"{fmt(r.get('witness'))} {fmt_ci(r.get('interval'))}",
               f"{fmt(r.get('break_witness'))} {fmt_ci(r.get('break_interval'))}"]
              for r in rows if r.get("distance") != primary]
    if others:
        tables.append(("Every other distance", ["program", "fork step", "k", "B steps", "distance",
                                               "witness [95% t]", "with causal break [95% t]"], others))
    if not rows:
        text += " No witness rows in the results."
    return Section("Back-flow witness", text, tables, "witness")


def additivity_section(results: dict, horizon) -> Section | None:
    a = results.get("additivity")
    if not isinstance(a, dict):
        return None
    rows = _rows(a)
    if any(num(r.get("horizon")) == num(horizon) for r in rows):  # every horizon is in results.json
        rows = [r for r in rows if num(r.get("horizon")) == num(horizon)]
    primary = _s(a.get("primary_distance"))
    header = ["P", "Q", "program", "fork step", "h", "relative interaction [95% t]", "interaction size (RMS logit)",
              f"{_s(primary)}: P", f"{_s(primary)}: Q", f"{_s(primary)}: P+Q", f"{_s(primary)}: ratio to sum [95% t]"]
    table = []
    for r in rows:
        pair = r.get("pair") if isinstance(r.get("pair"), list) and len(r.get("pair")) == 2 else ["?", "?"]
        dist = r.get("distances") if isinstance(r.get("distances"), dict) else {}
        d = dist.get(primary) if isinstance(dist.get(primary), dict) else {}
        table.append([_s(pair[0]), _s(pair[1]), _s(r.get("program")), fmt(r.get("fork_step")), fmt(r.get("horizon")),
                      f"{fmt(r.get('relative'))} {fmt_ci(r.get('relative_interval'))}",
                      f"{fmt(r.get('size'))} {fmt_ci(r.get('size_interval'))}",
                      fmt(d.get("p_mean")), fmt(d.get("q_mean")), fmt(d.get("pq_mean")),
                      f"{fmt(d.get('ratio'))} {fmt_ci(d.get('ratio_interval'))}"])
    text = (f"{_s(a.get('definition'))} Read: a relative interaction near 0 means the two pieces of memory act "
            "independently (their effects add); near 0.5, one subsumes the other; a distance ratio below 1, "
            "that together they move the predictions less than the sum.")
    return Section("Additivity of perturbations", text,
                   [(f"Per pair of arms, at the primary horizon (h = {fmt(horizon)}) where it was evaluated", header, table)],
                   "additivity")


def divergence_section(results: dict) -> Section | None:
    dv = results.get("divergence")
    if not isinstance(dv, dict):
        return None
    header = ["program", "fork step", "distance", "exponent λ per step [95% t]", "doubling time (steps)",
              "growth window (delays)", "points", "R² (mean curve)", "note"]
    table = []
    for r in _rows(dv):
        window = r.get("window") if isinstance(r.get("window"), list) and len(r.get("window")) == 2 else [None, None]
        table.append([_s(r.get("program")), fmt(r.get("fork_step")), _s(r.get("distance")),
                      f"{fmt(r.get('exponent'))} {fmt_ci(r.get('interval'))}", fmt(r.get("doubling_time")),
                      f"{fmt(window[0])}–{fmt(window[1])}", fmt(r.get("points")), fmt(r.get("r2")),
                      _s(r.get("reason") or "")])
    comp = [[_s(c.get("program")), _s(c.get("distance")), fmt(c.get("early")), fmt(c.get("late")),
             f"{fmt(c.get('difference'))} {fmt_ci(c.get('interval'))}", fmt_p(c.get("p_value")),
             _s(c.get("direction")) + (f" ({c.get('reason')})" if c.get("reason") else "")]
            for c in dv.get("comparisons", []) if isinstance(c, dict)] if isinstance(dv.get("comparisons"), list) else []
    tables = [("Per fork step", header, table)]
    if comp:
        tables.append(("Early against late fork steps (per-seed difference of exponents)",
                       ["program", "distance", "early", "late", "λ early − λ late [95% t]", "p", "direction"], comp))
    text = (f"How fast the one-bit flip of the reference arm '{_s(dv.get('arm'))}' moves its child away from the "
            f"parent: the finite-time analogue of a Lyapunov exponent, the chaos baseline lifetimes are compared "
            f"with. {_s(dv.get('definition'))}")
    return Section("Divergence exponent of the chaos baseline", text, tables, "divergence")


def calibration_section(results: dict, horizon) -> Section | None:
    c = results.get("calibration")
    if not isinstance(c, dict):
        return None
    rows = [r for r in _rows(c) if horizon is None or num(r.get("horizon")) == num(horizon)]
    header = ["arm", "program", "fork step", "h", "ECE parent", "ECE child", "ECE child − parent [95% t]", "p"]
    table = [[_s(r.get("arm")), _s(r.get("program")), fmt(r.get("fork_step")), fmt(r.get("horizon")),
              fmt(r.get("ece_parent")), fmt(r.get("ece_child")),
              f"{fmt(r.get('difference'))} {fmt_ci(r.get('interval'))}", fmt_p(r.get("p_value"))] for r in rows]
    return Section("Calibration", _s(c.get("definition")),
                   [(f"At the primary horizon (h = {fmt(horizon)})", header, table)], "calibration")


def memory_sections(results: dict, horizon) -> list[Section]:
    """The sections that apply to these results, in the order the report shows them."""
    out = [witness_section(results), additivity_section(results, horizon), divergence_section(results),
           calibration_section(results, horizon)]
    return [s for s in out if s is not None]
