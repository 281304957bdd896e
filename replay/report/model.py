"""The report's view of a results dict: normalization, look-ups, formatting and the list of what
is missing or degenerate. Shared by the HTML page and its Markdown twin, so both say the same.

Nothing here assumes an optional piece is present: lifetimes, the placebo check, the noise floor,
the checklist and every interval may be missing or NaN, and the functions say so instead of
failing."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

PLACEBO = "placebo"


# ------------------------------------------------------------------------------ loading ----


def load_results(experiment_dir) -> dict:
    """The results dict of an experiment directory (its results.json; NaN/Infinity allowed)."""
    path = Path(experiment_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the experiment first (replay experiment / replay demo)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(results, dict) or not isinstance(results.get("experiment"), dict):
        raise ValueError(f"{path} has no 'experiment' section: not the results of a replay experiment")
    return results


def plain(obj):
    """JSON-like plain Python (numpy scalars and arrays, tuples, paths become numbers, lists, str)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):  # numpy scalar or array, torch tensor
        return plain(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)


# ---------------------------------------------------------------------------- formatting ----


def num(x) -> float:
    """A float (NaN for anything missing or not a number)."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def is_finite(x) -> bool:
    return math.isfinite(num(x))


def fmt(x, sig: int = 4) -> str:
    """A number for a table: 4 significant digits, scientific below 1e-3, 'n/a' for NaN/missing."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, str):
        return x
    v = num(x)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == 0:
        return "0"
    if isinstance(x, int):
        return str(x)
    if abs(v) < 1e-3 or abs(v) >= 1e6:
        return f"{v:.{sig - 1}e}"
    return f"{v:.{sig}g}"


def fmt_p(x) -> str:
    v = num(x)
    if math.isnan(v):
        return "n/a"
    if v < 1e-4:
        return "<1e-4"
    return f"{v:.3g}"


def fmt_ci(pair, sig: int = 4) -> str:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return "n/a"
    if math.isnan(num(pair[0])) and math.isnan(num(pair[1])):
        return "n/a"
    return f"[{fmt(pair[0], sig)}, {fmt(pair[1], sig)}]"


def short(digest, n: int = 12) -> str:
    s = str(digest or "")
    return s[:n] + "…" if len(s) > n + 1 else s


# ------------------------------------------------------------------------------ look-ups ----


class View:
    """Look-ups over a (normalized) results dict."""

    def __init__(self, results: dict):
        if not isinstance(results, dict) or not isinstance(results.get("experiment"), dict):
            raise ValueError("results need an 'experiment' section (see replay.report.write_report)")
        self.r = plain(results)
        self.exp = self.r["experiment"]
        self.estimates = [e for e in self.r.get("estimates") or [] if isinstance(e, dict)]
        self.lifetimes = [l for l in self.r.get("lifetimes") or [] if isinstance(l, dict)]
        self.placebo = self.r.get("placebo") if isinstance(self.r.get("placebo"), dict) else None
        self.checklist = self.r.get("checklist") if isinstance(self.r.get("checklist"), dict) else {}
        self.arms = {a.get("name"): a for a in self.exp.get("arms") or [] if isinstance(a, dict)}
        self.arm_order = {name: i for i, name in enumerate(self.arms)}
        self.distance = self.exp.get("primary_distance") or (self.exp.get("distances") or ["tv"])[0]
        self.horizon = self.exp.get("primary_horizon")
        if self.horizon is None:
            hs = self.exp.get("horizons") or sorted({e.get("horizon") for e in self.estimates if e.get("horizon") is not None})
            self.horizon = hs[len(hs) // 2] if hs else None
        self.seeds = list(self.exp.get("seeds") or [])
        self.references = [x for x in self.r.get("references") or [] if isinstance(x, dict)]
        self.reference = self.exp.get("reference_arm") or next((n for n, a in self.arms.items() if a.get("reference")),
                                                              None)
        if self.reference is None:
            self.reference = next((e["arm"] for e in self.estimates if e.get("reference")), None)

    # -- classification
    def is_placebo(self, arm: str) -> bool:
        if self.placebo and self.placebo.get("arm") == arm:
            return True
        spec = self.arms.get(arm)
        if spec and isinstance(spec.get("placebo"), bool):
            return spec["placebo"]
        if spec and spec.get("perturb"):
            return all((p.get("name") if isinstance(p, dict) else p) == PLACEBO for p in spec["perturb"])
        return arm == PLACEBO

    def is_reference(self, e_or_arm) -> bool:
        if isinstance(e_or_arm, dict):
            return bool(e_or_arm.get("reference")) or e_or_arm.get("arm") == self.reference
        return e_or_arm == self.reference

    def kind(self, arm: str) -> str:
        return "placebo" if self.is_placebo(arm) else "reference" if self.is_reference(arm) else "arm"

    @staticmethod
    def program(d: dict) -> str:
        return d.get("program") or "main"

    def programs(self) -> list[str]:
        """Program keys: the main program first, then the variants (as experiment.programs lists them)."""
        declared = self.exp.get("programs")
        keys = list(declared) if isinstance(declared, dict) else []
        for e in self.estimates:
            if self.program(e) not in keys:
                keys.append(self.program(e))
        return sorted(keys, key=lambda k: (k != "main", keys.index(k)))

    def fork_steps(self) -> list:
        steps = list(self.exp.get("fork_steps") or [])
        for e in self.estimates:
            if e.get("fork_step") not in steps:
                steps.append(e.get("fork_step"))
        return steps

    def _sort_key(self, d: dict):
        programs = self.programs()
        steps = self.fork_steps()
        arm = d.get("arm")
        return (programs.index(self.program(d)) if self.program(d) in programs else len(programs),
                steps.index(d.get("fork_step")) if d.get("fork_step") in steps else len(steps),
                {"placebo": 0, "arm": 1, "reference": 2}[self.kind(arm)],
                self.arm_order.get(arm, len(self.arm_order)), str(arm))

    def primary_rows(self) -> list[dict]:
        """The estimates at the primary distance and horizon, in table order (per program and
        fork step: placebo first, then the arms in spec order, the reference last)."""
        rows = [e for e in self.estimates if e.get("distance") == self.distance and e.get("horizon") == self.horizon]
        return sorted(rows, key=self._sort_key)

    def lifetime(self, e: dict) -> dict | None:
        for l in self.lifetimes:
            if (l.get("arm") == e.get("arm") and l.get("fork_step") == e.get("fork_step")
                    and ("program" not in l or "program" not in e or l["program"] == e["program"])):
                return l
        return None

    def sorted_lifetimes(self) -> list[dict]:
        return sorted(self.lifetimes, key=self._sort_key)

    def series(self, arm: str, program: str, fork_step, distance: str) -> list[dict]:
        return sorted((e for e in self.estimates if e.get("arm") == arm and self.program(e) == program
                       and e.get("fork_step") == fork_step and e.get("distance") == distance),
                      key=lambda e: num(e.get("horizon")))

    def floor_entry(self, distance: str, program: str, fork_step) -> dict | None:
        """The noise-floor curve of a distance for (program, fork step): by_fork_step keyed
        'program@T' or 'T', else the top-level entry when it is that fork step's."""
        entry = (self.r.get("noise_floor") or {}).get(distance)
        if not isinstance(entry, dict):
            return None
        by = entry.get("by_fork_step") or {}
        for key in (f"{program}@{fork_step}", str(fork_step) if program == "main" else None):
            if key is not None and isinstance(by.get(key), dict):
                return by[key]
        if program != "main":
            return None
        if "mean" in entry and entry.get("fork_step", fork_step) == fork_step:
            return entry
        return None

    def floor_at(self, e: dict) -> tuple[float, float, float]:
        """(mean, lo, hi) of the noise floor at an estimate's step: the estimate's own floor value,
        with the band from the floor curve where it was measured at the same step."""
        entry = self.floor_entry(e.get("distance"), self.program(e), e.get("fork_step"))
        mean = num(e.get("noise_floor"))
        lo = hi = math.nan
        if entry:
            idx = self._floor_index(entry, e)
            if idx is not None:
                if math.isnan(mean):
                    mean = num(_get(entry.get("mean"), idx))
                lo, hi = num(_get(entry.get("lo"), idx)), num(_get(entry.get("hi"), idx))
        return mean, lo, hi

    @staticmethod
    def _floor_index(entry: dict, e: dict):
        steps = entry.get("steps")
        if steps and e.get("step") is not None:
            return steps.index(e["step"]) if e["step"] in steps else None
        hs = entry.get("horizons") or []
        return hs.index(e["horizon"]) if e.get("horizon") in hs else None

    def program_ref(self, key: str) -> str:
        """The program reference ('module:function' or path) of a program key, '' when unknown."""
        declared = self.exp.get("programs")
        if isinstance(declared, dict) and declared.get(key):
            return str(declared[key])
        return str(self.exp.get("program") or "") if key == "main" else ""

    def window(self, arm: str) -> int:
        w = (self.arms.get(arm) or {}).get("window", 1)
        return w if isinstance(w, int) else 1

    # -- placebo
    def placebo_cells(self, e: dict) -> tuple[str, str, str]:
        """(mean cell, lifetime cell, css status) of a placebo row."""
        vals = [num(v) for v in e.get("per_seed") or []]
        zero = num(e.get("mean")) == 0.0 and all(v == 0.0 for v in vals)
        if self.placebo is None:
            return (fmt(e.get("mean")) + (" (exactly)" if zero else ""), "not checked (no placebo check in results)",
                    "warn")
        if self.placebo.get("exact_zero") and zero:
            return "0 (exactly)", "exactly 0 (checked)", "ok"
        return fmt(e.get("mean")), "NOT ZERO: capture or replay is broken", "bad"

    # -- the default interval
    @staticmethod
    def interval(e: dict) -> list:
        """The default interval of an estimate: 'interval' (results version 2), else the t interval,
        else the BCa interval (older results)."""
        for key in ("interval", "t", "bca"):
            pair = e.get(key)
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                return list(pair)
        return [math.nan, math.nan]

    def interval_name(self) -> str:
        """The default interval's name for table headers, e.g. '95% t interval'."""
        m = re.search(r"(\d+(?:\.\d+)?)\s*%", str(self.exp.get("interval_method") or ""))
        level = f"{m.group(1)}%" if m else "95%"
        if any(isinstance(e.get("interval"), (list, tuple)) for e in self.estimates):
            methods = sorted({METHOD_NAMES.get(str(e.get("interval_method") or "t").lower(),
                                               str(e.get("interval_method") or "t"))
                              for e in self.estimates if isinstance(e.get("interval"), (list, tuple))})
        elif any(isinstance(e.get("t"), (list, tuple)) for e in self.estimates) or not self.estimates:
            methods = ["t"]
        else:
            methods = ["BCa"]
        if len(methods) == 1:
            return f"{level} {methods[0]} interval"
        return f"{level} interval ({' or '.join(methods)}, per row)"

    # -- verdicts and flags
    def verdict_cell(self, e: dict) -> tuple[str, str, str]:
        """(text, css class, reason) of an estimate's verdict."""
        kind = self.kind(str(e.get("arm")))
        if kind == "placebo":
            _, text, css = self.placebo_cells(e)
            return text, css, str(e.get("verdict_reason") or "the placebo changes nothing: it must measure exactly 0")
        if kind == "reference":
            return "reference", "ref", str(e.get("verdict_reason") or "the chaos baseline: a one-bit flip")
        if "verdict" not in e:
            return "n/a", "", "no verdict in the results"
        verdict = e.get("verdict")
        if verdict is None:
            return "—", "", str(e.get("verdict_reason") or "no verdict (signed metric)")
        return str(verdict), VERDICT_CSS.get(str(verdict), "warn"), str(e.get("verdict_reason") or "")

    def dead_flag(self, e: dict) -> str:
        """The flag of an estimate whose arm measures exactly 0 at every horizon ('' when not;
        never for the placebo, which must)."""
        if self.is_placebo(str(e.get("arm"))):
            return ""
        if self.is_reference(e):
            return DEAD_REFERENCE if e.get("zero_everywhere") or self.reference_dead(e) else ""
        return DEAD_ARM if e.get("zero_everywhere") else ""

    def reference_dead(self, d: dict) -> bool:
        """Whether the reference of d's program and fork step is recorded as exactly 0 everywhere."""
        return any(x.get("zero_everywhere") and (x.get("program") or "main") == self.program(d)
                   and x.get("fork_step") == d.get("fork_step") for x in self.references)

    def lifetime_text(self, e: dict) -> tuple[str, str, bool]:
        """(lifetime cell, note, extrapolated) of an estimate's arm."""
        if self.is_reference(e):
            return "chaos baseline", "", False
        l = self.lifetime(e)
        if l is None:
            why = ("no reference arm, so no excess to fit" if self.reference is None else "no lifetime in the results")
            return "n/a", why, False
        return lifetime_summary(l)


METHOD_NAMES = {"t": "t", "student": "t", "paired t": "t", "bca": "BCa", "percentile": "percentile bootstrap"}
VERDICTS = ("memory beyond chaos", "no memory beyond chaos", "inconclusive")
VERDICT_CSS = {"memory beyond chaos": "v-mem", "no memory beyond chaos": "v-none", "inconclusive": "v-inc",
               "no reference arm": "warn", "placebo": "ok", "reference": "ref"}
DEAD_ARM = "exactly 0 at every horizon: dead arm?"
DEAD_REFERENCE = "exactly 0 at every horizon: dead reference (no chaos baseline)"


def half_life_text(hl, interval, model: str = "") -> str:
    """'half-life H (lo, hi)', '∞', or what a NaN half-life means."""
    hl = num(hl)
    if math.isnan(hl):
        return "no transient (half-life n/a)" if model == "flat" else "half-life n/a"
    lo, hi = (list(interval) + [None, None])[:2] if isinstance(interval, (list, tuple)) else (None, None)
    ci = f" ({fmt(lo, 3)}, {fmt(hi, 3)})" if (is_finite(lo) or is_finite(hi) or math.isinf(num(hi))) else ""
    return f"half-life {fmt(hl, 3)}{ci}"


def lifetime_summary(l: dict) -> tuple[str, str, bool]:
    """(text, note, extrapolated) of a lifetime: 'model: plateau P (ratio R of floor), half-life
    H (lo, hi)', ', extrapolated' when the half-life lies beyond the delays measured. Older
    results (no model) give the half-life with its interval."""
    extrapolated = bool(l.get("extrapolated"))
    if ("model" in l or "plateau" in l) and not l.get("model") and not is_finite(l.get("plateau")):
        text = "no fit"
    elif "model" in l or "plateau" in l:
        model = str(l.get("model") or "model")
        text = (f"{model}: plateau {fmt(l.get('plateau'), 3)} (ratio {fmt(l.get('plateau_ratio'), 2)} of floor), "
                + half_life_text(l.get("half_life"), l.get("interval"), model))
    else:
        hl = num(l.get("half_life"))
        text = f"{fmt(hl, 3)} {fmt_ci(l.get('interval'), 3)}" if not math.isnan(hl) else "n/a"
    if extrapolated:
        text += ", extrapolated"
    notes = []
    if not l.get("fit_ok"):
        notes.append(str(l.get("reason") or "fit failed"))
    else:
        for key in ("reason", "note"):
            if l.get(key) and str(l[key]) not in notes:
                notes.append(str(l[key]))
    return text, "; ".join(notes), extrapolated


def state_summary(state) -> str:
    """The state-space lifetime in words ('' when absent)."""
    if not isinstance(state, dict):
        return ""
    text = "state space: " + half_life_text(state.get("half_life"), state.get("interval"))
    if state.get("extrapolated"):
        text += ", extrapolated"
    if not state.get("fit_ok"):
        text += f" ({state.get('reason') or 'no fit'})"
    return text


def _get(values, i):
    try:
        return values[i]
    except (TypeError, IndexError):
        return None


# ------------------------------------------------------------------------------ caveats ----


def caveats(v: View) -> list[tuple[str, str]]:
    """(level, text) for every missing or degenerate piece: 'bad', 'warn' or 'info'."""
    out: list[tuple[str, str]] = []
    exp = v.exp
    if v.placebo is None:
        out.append(("warn", "No placebo check in the results: capture and replay were not checked by a placebo arm."))
    elif not v.placebo.get("exact_zero"):
        out.append(("bad", "The placebo check FAILED: " + str(v.placebo.get("detail") or "no detail") +
                    ". Every estimate below is suspect: some training state is not captured or not replayed."))
    elif not v.placebo.get("arm"):
        out.append(("warn", "This experiment has no placebo arm: " + str(v.placebo.get("detail") or "")))
    if not v.estimates:
        out.append(("bad", "The results hold no estimates."))
    rows = v.primary_rows()
    if v.estimates and not rows:
        out.append(("bad", f"No estimates at the primary distance {v.distance} and horizon {v.horizon}."))
    few = sorted({e.get("n_seeds", len(e.get("per_seed") or [])) for e in v.estimates
                  if num(e.get("n_seeds", len(e.get("per_seed") or []))) < 2})
    if few or len(v.seeds) == 1:
        out.append(("warn", "Only one seed: intervals, tests and the noise floor (which compares seeds) are undefined "
                            "and shown as n/a."))
    nan_ci = [e for e in rows if not v.is_placebo(e.get("arm")) and
              (not is_finite(_get(v.interval(e), 0)) or not is_finite(_get(v.interval(e), 1)))]
    if nan_ci:
        out.append(("warn", "Intervals are undefined (NaN) for: " + ", ".join(sorted({label(v, e) for e in nan_ci})) + "."))
    if v.reference is None:
        out.append(("warn", "No reference (one-bit flip) arm: the chaos baseline is missing, so there is no excess effect, "
                            "no verdict and no lifetime; the decay curves show raw effects only."))
    # A dead reference: exactly 0 at every horizon (recorded per program and fork step, or on its rows).
    dead_refs = {(v.program(x), x.get("fork_step")) for x in v.references if x.get("zero_everywhere")}
    dead_refs |= {(v.program(e), e.get("fork_step")) for e in v.estimates
                  if e.get("distance") == v.distance and v.is_reference(e) and e.get("zero_everywhere")}
    if dead_refs:
        where = ", ".join(f"{p} at step {T}" for p, T in sorted(dead_refs, key=lambda k: (str(k[0]), str(k[1]))))
        out.append(("bad", f"The reference arm '{v.reference}' measures exactly 0 at every horizon ({where}): the chaos "
                           f"baseline is dead, so every excess equals the raw effect, the verdicts test against 0 and "
                           f"the lifetimes are lifetimes of raw effects, not of memory beyond chaos. Flip a weight "
                           f"that influences the output."))
    dead = sorted({label(v, e) for e in v.estimates if e.get("distance") == v.distance and e.get("zero_everywhere")
                   and not v.is_placebo(str(e.get("arm"))) and not v.is_reference(e)})
    if dead:
        out.append(("warn", f"{DEAD_ARM[0].upper() + DEAD_ARM[1:]} {', '.join(dead)}: the arm measures exactly 0 "
                            f"({v.distance}) at every horizon and seed, so its perturbation changed nothing the probe "
                            f"sees (does the program have the state it resets?). Its verdict says nothing about memory."))
    if not v.lifetimes:
        out.append(("warn", "No lifetimes in the results: no half-lives, and no excess curves to fit."))
    else:
        for l in v.sorted_lifetimes():
            if not l.get("fit_ok") and not v.is_placebo(l.get("arm")):
                out.append(("info", f"Lifetime of {label(v, l)}: {l.get('reason') or 'fit failed'}."))
        extra = [label(v, l) for l in v.sorted_lifetimes() if l.get("extrapolated")]
        extra_state = [label(v, l) for l in v.sorted_lifetimes()
                       if isinstance(l.get("state"), dict) and l["state"].get("extrapolated")]
        longest = max((num(h) for l in v.lifetimes for h in l.get("horizons") or []), default=math.nan)
        span = f" (the longest delay measured is h = {fmt(longest)})" if is_finite(longest) else ""
        if extra:
            out.append(("warn", f"Half-life extrapolated beyond the delays measured{span}, function space: "
                        + ", ".join(extra) + ". Only its order of magnitude is supported; measure longer delays."))
        if extra_state:
            out.append(("warn", f"Half-life extrapolated beyond the delays measured{span}, state space: "
                        + ", ".join(extra_state) + "."))
    if any("verdict" in e for e in v.estimates) and not exp.get("verdict_rule"):
        out.append(("warn", "The experiment does not state its verdict rule."))
    if not (v.r.get("noise_floor") or {}).get(v.distance):
        out.append(("warn", f"No noise-floor curve for {v.distance} in the results: decay plots show no floor band."))
    nan_floor = [e for e in rows if not is_finite(e.get("noise_floor"))]
    if nan_floor and v.estimates:
        out.append(("warn", "The noise floor is undefined at the primary horizon for: "
                    + ", ".join(sorted({label(v, e) for e in nan_floor})) + " (ratios are n/a)."))
    runs = v.checklist.get("runs") or []
    if not v.checklist:
        out.append(("warn", "No reporting checklist in the results: no run artifacts to check."))
    else:
        if not runs:
            out.append(("warn", "The checklist lists no runs."))
        for key in ("rng_contract", "environment", "determinism_flags", "checkpoint_schedule"):
            if not v.checklist.get(key):
                out.append(("warn", f"The checklist has no {key.replace('_', ' ')}."))
        bad_runs = [r for r in runs if not verified_ok(r.get("verified"))]
        if bad_runs:
            out.append(("bad", f"{len(bad_runs)} of {len(runs)} runs are not verified complete: "
                        + ", ".join(str(r.get("path")) for r in bad_runs[:5]) + ("…" if len(bad_runs) > 5 else "")))
    for name in ("probe", "interval_method", "multiple_testing"):
        if not exp.get(name):
            out.append(("warn", f"The experiment does not state its {name.replace('_', ' ')}."))
    return out


def verified_ok(status) -> bool:
    s = str(status or "").strip().lower()
    return s.startswith(("complete", "ok", "verified", "pass"))


def label(v: View, d: dict) -> str:
    """An arm's name, with its program and fork step where the experiment has several."""
    extra = []
    if len(v.programs()) > 1 or v.program(d) != "main":
        extra.append(v.program(d))
    if len(v.fork_steps()) > 1:
        extra.append(f"T={d.get('fork_step')}")
    return str(d.get("arm")) + (f" ({', '.join(extra)})" if extra else "")



def summary(v: View) -> str:
    """The one-paragraph summary: what was measured, seeds, probe, primary distance."""
    exp = v.exp
    probe = exp.get("probe") or {}
    arms = [n for n in v.arms if not v.is_placebo(n) and not v.is_reference(n)]
    seeds = ", ".join(map(str, v.seeds)) or "none listed"
    steps = ", ".join(map(str, exp.get("fork_steps") or [])) or "?"
    text = (f"How much each of {len(arms)} perturbation arm{'s' if len(arms) != 1 else ''} "
            f"({', '.join(arms) or 'none'}) changes what {exp.get('program') or 'the program'} predicts, "
            f"measured as the seed-paired function-space effect: each seed's fork at step{'s' if len(exp.get('fork_steps') or []) != 1 else ''} "
            f"{steps} against the same seed's factual run, on a probe set of {probe.get('size', '?')} examples "
            f"({probe.get('definition', 'definition not given')}, sha256 {short(probe.get('sha256'), 16) or '?'}), "
            f"with {len(v.seeds)} seed{'s' if len(v.seeds) != 1 else ''} ({seeds}). "
            f"The primary distance is {v.distance} at h = {v.horizon} steps after each intervention window, compared with "
            f"the seed-to-seed noise floor (the ratio is the share of ordinary run-to-run variation one perturbation causes).")
    if v.reference:
        text += (f" Each arm is compared with the one-bit weight flip '{v.reference}' (the chaos baseline), seed by "
                 f"seed: the excess over it decides the verdict (memory beyond chaos, no memory beyond chaos, or "
                 f"inconclusive). Lifetimes model the excess curve as a persistent part (a plateau, compared with the "
                 f"noise floor) plus a transient part (its half-life); where the runs record their updates, the "
                 f"state-space lifetime is the half-life of the excess per-step update difference.")
    if v.placebo is not None and v.placebo.get("arm"):
        text += f" The placebo arm '{v.placebo['arm']}' changes nothing and must measure exactly 0."
    if num(exp.get("steps")) > 0 or num(exp.get("duration_s")) > 0:
        text += (f" Runs of {fmt(exp.get('steps'))} steps; the experiment took "
                 f"{fmt(exp.get('duration_s'), 3)} s." if is_finite(exp.get("duration_s")) else
                 f" Runs of {fmt(exp.get('steps'))} steps.")
    return text


def checklist_items(v: View) -> list[tuple[str, str]]:
    """The per-estimate part of the reporting checklist, as (name, value) pairs."""
    exp = v.exp
    probe = exp.get("probe") or {}
    arms = []
    for name, a in v.arms.items():
        perturb = json.dumps(a.get("perturb"), sort_keys=True)
        bits = [f"{name}: {perturb}, window {a.get('window', 1)}"]
        if a.get("program"):
            bits.append(f"program {a['program']}")
        if a.get("reference"):
            bits.append("reference (chaos baseline)")
        arms.append(", ".join(bits))
    placebo = v.placebo or {}
    programs = exp.get("programs") if isinstance(exp.get("programs"), dict) else {}
    return [
        ("results schema version", str(v.r.get("version", 1))),
        ("program", f"{exp.get('program', '?')} (source sha256 {exp.get('program_sha256', 'not recorded')})"),
        ("programs (key: reference)", "; ".join(f"{k}: {ref}" for k, ref in programs.items()) or "main only"),
        ("seeds", f"{len(v.seeds)}: " + (", ".join(map(str, v.seeds)) or "none")),
        ("fork steps", ", ".join(map(str, exp.get("fork_steps") or [])) or "not given"),
        ("steps per run", fmt(exp.get("steps")) if exp.get("steps") is not None else "not given"),
        ("arms (perturbation, window)", "; ".join(arms) or "none"),
        ("probe definition", str(probe.get("definition", "not given"))),
        ("probe size", fmt(probe.get("size")) if probe.get("size") is not None else "not given"),
        ("probe sha256", str(probe.get("sha256", "not recorded"))),
        ("distances", ", ".join(exp.get("distances") or []) or "not given"),
        ("primary distance", str(v.distance)),
        ("distance conventions", "function space on the probe set, averaged over its examples; natural log (nats) for "
                                 "JS and loss; cka = 1 − linear CKA of the chosen layer; accuracy and loss "
                                 "differences are fork − factual (absolute value between seeds for the floor)"),
        ("horizons (h: steps after the window)", ", ".join(map(str, exp.get("horizons") or [])) or "not given"),
        ("primary horizon", str(v.horizon)),
        ("interval method", str(exp.get("interval_method") or "not stated")
         + f" (tables show the {v.interval_name()}; BCa only where labelled)"),
        ("bootstrap resamples", fmt(exp.get("bootstrap_resamples")) if exp.get("bootstrap_resamples") is not None
         else "not given"),
        ("multiple-testing correction", str(exp.get("multiple_testing") or "not stated")),
        ("equivalence test (TOST) margin", margin_text(v) +
         (f" at alpha {fmt(exp.get('alpha'))}" if exp.get("alpha") is not None else "")),
        ("reference arm", str(v.reference) if v.reference else "none (no chaos baseline)"),
        ("verdict rule", str(exp.get("verdict_rule") or "not stated")),
        ("placebo check", ("passed: " if placebo.get("exact_zero") else "FAILED: " if placebo else "not run")
         + str(placebo.get("detail", "")) + (f" ({placebo['checked']} values checked)" if "checked" in placebo else "")),
    ]


def margin_relative(v: View) -> bool:
    """Whether the equivalence margin is a fraction of the noise floor (results version 2: the
    absolute margin is per estimate, tost_margin) rather than an absolute distance."""
    return num(v.r.get("version")) >= 2 or any("tost_margin" in e for e in v.estimates)


def margin_text(v: View) -> str:
    margin = v.exp.get("equivalence_margin")
    if margin is None:
        return "not stated"
    if margin_relative(v):
        return (f"{fmt(margin)} × the seed noise floor at each horizon (the absolute margin of each estimate is its "
                f"TOST margin)")
    return f"±{fmt(margin)} (absolute)"


def arm_rows(v: View) -> list[dict]:
    """The primary rows that carry a verdict about memory: not the placebo, not the reference."""
    return [e for e in v.primary_rows() if v.kind(str(e.get("arm"))) == "arm"]


def verdict_summary(v: View) -> str:
    """One line counting the verdicts at the primary distance and horizon."""
    rows = arm_rows(v)
    if not rows:
        return f"Verdicts at {v.distance}, h = {v.horizon}: no arm estimates."
    counts: dict[str, int] = {}
    for e in rows:
        key = str(e.get("verdict")) if e.get("verdict") is not None else ("no verdict" if "verdict" in e
                                                                              else "not decided in the results")
        counts[key] = counts.get(key, 0) + 1
    order = list(VERDICTS) + sorted(k for k in counts if k not in VERDICTS)
    parts = [f"{counts.get(k, 0)} {k}" for k in order if k in counts or k in VERDICTS]
    text = (f"Verdicts at {v.distance}, h = {v.horizon}, over {len(rows)} arm estimate{'s' if len(rows) != 1 else ''}"
            f" (every program and fork step): " + ", ".join(parts) + ".")
    dead = sum(1 for e in rows if v.dead_flag(e))
    if dead:
        text += f" {dead} flagged: {DEAD_ARM}"
    return text


def verdict_legend(v: View) -> list[tuple[str, str]]:
    """'How to read a verdict': (verdict, meaning) pairs, the rule first."""
    exp = v.exp
    alpha = fmt(exp.get("alpha")) if exp.get("alpha") is not None else "alpha"
    ref = f"the one-bit flip '{v.reference}'" if v.reference else "the reference arm"
    return [
        ("rule", str(exp.get("verdict_rule") or "The results do not state their verdict rule.")),
        ("equivalence margin", margin_text(v)),
        ("memory beyond chaos", f"the arm moves the model's predictions more than {ref} does, seed by seed: the "
                                f"excess is positive and significant (q ≤ {alpha})."),
        ("no memory beyond chaos", "the excess is shown to lie below the equivalence margin: whatever the arm "
                                   "changed is forgotten as a one-bit flip is, up to the margin."),
        ("inconclusive", "neither shown: the interval of the excess is too wide (more seeds, or a longer delay)."),
        ("exactly 0 (checked)", "the placebo: it changes nothing, and every value is exactly 0.0."),
        ("reference", "the chaos baseline itself; each program and fork step has its own."),
        ("—", "no verdict (a signed metric, or the results decide none)."),
        ("flag", f"'{DEAD_ARM}': the arm measures exactly 0 at every horizon; its perturbation changed nothing."),
    ]
