"""Print the Markdown tables of docs/validation.md from the validation experiments' results.

    python examples/validation/tables.py validation      # the folder holding chaos/, momentum/, ...

Each experiment is run first with `replay experiment examples/validation/NAME.toml --out
validation/NAME`; this script only reads their results.json and formats what is there.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    path = folder / name / "results.json"
    if not path.is_file():
        print(f"<!-- {path} is missing: run `replay experiment examples/validation/{name}.toml --out {folder / name}` -->\n")
        return None
    return json.loads(path.read_text(), parse_constant=float)


def f(x, digits: int = 3) -> str:
    """`digits` significant digits (small effects stay readable), '-' for NaN, ∞ for inf."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}g}"


def ci(pair, digits: int = 3) -> str:
    return f"({f(pair[0], digits)}, {f(pair[1], digits)})" if pair else "-"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def placebo_table(results: dict[str, dict]) -> str:
    rows = []
    for name, r in results.items():
        placebo = [e for e in r["estimates"] if e["placebo"]]
        values = [v for e in placebo for v in e["per_seed"]]
        rows.append([name, str(len(values)), str(sum(v == 0.0 for v in values)),
                     str(r["placebo"].get("ledgers_compared", "-")), "yes" if r["placebo"]["exact_zero"] else "NO"])
    return table(["experiment", "placebo values (seeds × steps × distances)", "exactly 0.0", "ledgers equal to the parent's",
                  "exact zero"], rows)


def chaos_table(r: dict) -> str:
    d = r["experiment"]["primary_distance"]
    rows = []
    for e in sorted((e for e in r["estimates"] if e["reference"] and e["distance"] == d), key=lambda e: e["horizon"]):
        floor = r["noise_floor"][d]["by_fork_step"][f"{e['program']}@{e['fork_step']}"]
        i = floor["steps"].index(e["step"])
        rows.append([str(e["horizon"]), str(e["step"]), f"{f(floor['mean'][i])} {ci([floor['lo'][i], floor['hi'][i]])}",
                     f"{f(e['mean'])} {ci(e['interval'])}", f(e["ratio"], 2)])
    return table(["delay h", "step", f"seed floor ({d}, 95% bootstrap)", "one-bit flip effect (95% t)", "flip / floor"], rows)


def momentum_table(r: dict) -> str:
    rows = []
    for l in r["lifetimes"]:
        s = l.get("state") or {}
        rows.append([l["arm"], l["program"], f(s.get("half_life"), 3) + " " + ci(s.get("interval"), 3)
                     + (" (extrapolated)" if s.get("extrapolated") else ""),
                     l["model"], f"{f(l['plateau'])} {ci(l['plateau_interval'])}", f(l["plateau_ratio"], 2),
                     f(l["half_life"], 3) + " " + ci(l["interval"], 3) + (" (extrapolated)" if l["extrapolated"] else "")])
    return table(["arm", "program", "state-space half-life, steps (95% CI)", "function-space model",
                  "plateau (95% CI)", "plateau / floor", "transient half-life (95% CI)"], rows)


def momentum_curve(r: dict) -> str:
    rows = []
    lifetimes = {l["arm"]: l for l in r["lifetimes"]}
    arms = sorted(lifetimes)
    hs = sorted({h for l in lifetimes.values() for h in (l.get("state") or {}).get("horizons", [])})
    for h in hs:
        row = [str(h)]
        for a in arms:
            s = lifetimes[a].get("state") or {}
            if h in s.get("horizons", []):
                i = s["horizons"].index(h)
                row.append(f"{s['excess_mean'][i]:.3g}")
            else:
                row.append("-")
        rows.append(row)
    return table(["delay h"] + [f"{a}: excess update difference" for a in arms], rows)


def verdict_table(r: dict) -> str:
    d, h = r["experiment"]["primary_distance"], r["experiment"]["primary_horizon"]
    rows = []
    for e in r["estimates"]:
        if e["distance"] != d or e["horizon"] != h:
            continue
        rows.append([e["program"], e["arm"], f(e["mean"]), ci(e["interval"]), f(e["noise_floor"]),
                     "" if e["excess_mean"] is None else f"{f(e['excess_mean'])} {ci(e['excess_interval'])}",
                     f(e["q_value"], 3), e["verdict"] or ""])
    return table(["program", "arm", f"{d} effect", "95% t", "floor", "excess over flip (95% t)", "q", "verdict"], rows)


def butterfly_table(r: dict) -> str:
    d = r["experiment"]["primary_distance"]
    rows = []
    for e in sorted((e for e in r["estimates"] if e["reference"] and e["distance"] == d),
                    key=lambda e: (e["horizon"], e["fork_step"])):
        rows.append([str(e["horizon"]), str(e["fork_step"]), f"{f(e['mean'])} {ci(e['interval'])}",
                     f(e["noise_floor"]), f(e["ratio"], 2)])
    return table(["delay h", "fork step", f"one-bit flip effect ({d}, 95% t)", "seed floor", "flip / floor"], rows)


def witness_table(r: dict, distance: str) -> str:
    w = r["witness"]
    rows = []
    for x in sorted((x for x in w["rows"] if x["distance"] == distance),
                    key=lambda x: (x["momentum"] if x["momentum"] is not None else -1, x["k"], x["b_steps"])):
        rows.append([f(x["momentum"], 2), str(x["k"]), str(x["b_steps"]), f(x["d1_mean"]), f(x["d2_mean"]),
                     f"{f(x['witness'])} {ci(x['interval'])}", f"{f(x['break_witness'])} {ci(x['break_interval'])}",
                     f"{f(x['attenuation']['mean'])} {ci(x['attenuation']['interval'])}",
                     f(x["amplification"]), f(x["theory_ratio_coherent"]), f(x["theory_ratio_incoherent"])])
    return table(["μ", "k", "b", "D1", "D2", f"witness D2 − D1 ({distance}, 95% t)", "with causal break (95% t)",
                  "attenuation W − W_break (95% t)", "W(k) / W(1)", "(1−μ^k)/(1−μ)", "incoherent"], rows)


def additivity_table(r: dict) -> str:
    h, d = r["experiment"]["primary_horizon"], r["experiment"]["primary_distance"]
    rows = []
    for x in r["additivity"]["rows"]:
        if x["horizon"] != h:
            continue
        dd = x["distances"][d]
        rows.append([" + ".join(x["pair"]), str(x["step"]), f"{f(x['relative'])} {ci(x['relative_interval'])}",
                     f"{f(x['size'])} {ci(x['size_interval'])}", f(dd["p_mean"]), f(dd["q_mean"]), f(dd["pq_mean"]),
                     f"{f(dd['ratio'])} {ci(dd['ratio_interval'])}"])
    return table(["pair", "step", "relative interaction (95% t)", "interaction size, RMS logit (95% t)",
                  f"{d}: P", f"{d}: Q", f"{d}: P+Q", f"{d}(P+Q) / ({d}(P) + {d}(Q)) (95% t)"], rows)


def additivity_curve(r: dict) -> str:
    rows = []
    for x in sorted(r["additivity"]["rows"], key=lambda x: (x["pair"], x["horizon"])):
        rows.append([" + ".join(x["pair"]), str(x["horizon"]), f"{f(x['relative'])} {ci(x['relative_interval'])}"])
    return table(["pair", "delay h", "relative interaction (95% t)"], rows)


def divergence_table(r: dict) -> str:
    dv = r["divergence"]
    rows = []
    for x in sorted(dv["rows"], key=lambda x: (x["distance"], x["fork_step"])):
        rows.append([x["distance"], str(x["fork_step"]), f"{f(x['exponent'])} {ci(x['interval'])}",
                     f(x["doubling_time"]), f"{f(x['window'][0])}–{f(x['window'][1])}", str(x["points"]),
                     f(x["r2"]), x["reason"] or ""])
    out = table(["distance", "fork step", "λ per step (95% t)", "doubling time, steps", "growth window (delays)",
                 "points", "R²", "note"], rows)
    comp = [[c["distance"], f"{c['early']} vs {c['late']}", f"{f(c['difference'])} {ci(c['interval'])}",
             c["direction"]] for c in dv["comparisons"]]
    return out + "\n" + table(["distance", "fork steps", "λ early − λ late (95% t)", "direction"], comp)


def divergence_curve(r: dict) -> str:
    dv = r["divergence"]
    rows_by = {(x["distance"], x["fork_step"]): x for x in dv["rows"]}
    keys = sorted(rows_by)
    hs = rows_by[keys[0]]["horizons"]
    rows = [[str(h)] + [f(rows_by[k]["mean_distance"][i]) for k in keys] for i, h in enumerate(hs)]
    return table(["delay h"] + [f"{d} (fork {T})" for d, T in keys], rows)


def calibration_table(r: dict) -> str:
    h = r["experiment"]["primary_horizon"]
    rows = [[x["arm"], str(x["step"]), f(x["ece_parent"]), f(x["ece_child"]),
             f"{f(x['difference'])} {ci(x['interval'])}"]
            for x in r["calibration"]["rows"] if x["horizon"] == h]
    floor = r["noise_floor"].get("ece", {})
    return table(["arm", "step", "ECE parent", "ECE child", "ECE child − parent (95% t)"], rows) + (
        f"\nseed floor of |ECE difference| at h = {h}: "
        + ", ".join(f(m) for hh, m in zip(floor.get("horizons", []), floor.get("mean", [])) if hh == h) + "\n")


def main(argv: list[str]) -> int:
    folder = Path(argv[1] if len(argv) > 1 else "validation")
    names = ("chaos", "momentum", "momentum_large", "butterfly", "witness", "additivity", "divergence")
    found = {name: load(folder, name) for name in names}
    found = {k: v for k, v in found.items() if v is not None}
    print("### Placebo\n")
    print(placebo_table(found))
    if "chaos" in found:
        print("### Seed floor and the one-bit flip over horizons\n")
        print(chaos_table(found["chaos"]))
    for name in ("momentum", "momentum_large"):
        if name in found:
            print(f"### {found[name]['experiment']['name']}\n")
            print(momentum_table(found[name]))
            print(momentum_curve(found[name]))
            print(verdict_table(found[name]))
    if "butterfly" in found:
        print("### The butterfly effect: early vs late forks\n")
        print(butterfly_table(found["butterfly"]))
    if "witness" in found:
        print("### Back-flow witness\n")
        for d in ("tv", "param_l2"):
            print(witness_table(found["witness"], d))
    if "additivity" in found:
        print("### Additivity\n")
        print(additivity_table(found["additivity"]))
        print(additivity_curve(found["additivity"]))
        print("### Calibration\n")
        print(calibration_table(found["additivity"]))
    if "divergence" in found:
        print("### Divergence exponents\n")
        print(divergence_table(found["divergence"]))
        print(divergence_curve(found["divergence"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
