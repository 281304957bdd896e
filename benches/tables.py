"""Print the README's benchmark tables (Markdown) from one pytest-benchmark JSON file.

    python benches/tables.py benches/results.json [--command "..."]

The JSON is what `pytest benches/ --benchmark-only --benchmark-json=benches/results.json`
(`make bench`) writes. Every figure printed comes from the benches' `extra_info` (medians of
interleaved rounds and the ratios within one run, see benches/_timing.py); pytest-benchmark's
own statistics time whole rounds and are not used. Each goal is printed beside its figure with
"met" or "NOT met (gap ...)": the gap is measured, the cause is for the reader to state (the
recording-overhead breakdown is printed to help). Nothing here runs a benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

GROUPS = ["optimizer step", "fingerprint", "recording overhead", "fork latency", "experiment throughput", "forget", "trace",
          "data workers", "scaling", "distributed recording"]
DEFAULT_COMMAND = "pytest benches/ --benchmark-only --benchmark-json=benches/results.json  (make bench)"


# ------------------------------------------------------------------------- formatting ----


def fmt_value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{100 * value:+.1f}%" if value < 0 else f"{100 * value:.1f}%"
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value:g} {unit}"


def fmt_gap(g: dict) -> str:
    gap = g["goal"] - g["value"] if g["op"] == ">=" else g["value"] - g["goal"]
    if g["unit"] == "x":
        return f"{gap:.2f}x {'short' if g['op'] == '>=' else 'over'}"
    if g["unit"] == "%":
        return f"{100 * gap:.1f} percentage points {'short' if g['op'] == '>=' else 'over'}"
    if g["unit"] == "ms":
        return f"{gap:.3f} ms {'short' if g['op'] == '>=' else 'over'}"
    return f"{gap:g}"


def verdict(g: dict) -> str:
    return "met" if g["met"] else f"NOT met (gap {fmt_gap(g)})"


def goal_cell(g: dict | None) -> str:
    """'figure / goal: verdict' for a table cell, or a dash where no goal is stated."""
    if g is None:
        return "no goal"
    return f"{fmt_value(g['value'], g['unit'])} vs {g['text']}: {verdict(g)}"


def rounds(n: int) -> str:
    return f"{n} round" if n == 1 else f"{n} rounds"


def size_label(info: dict, key: str) -> str:
    """The measured size, and the nominal one it stands for in a quick run."""
    actual, nominal = info[key], info.get("size", info[key])
    return f"{actual:,}" if actual == nominal else f"{actual:,} (quick run; stands for {nominal:,})"


def ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def pct(value: float) -> str:
    return f"{100 * value:+.1f}%"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- header ----


def header(doc: dict, command: str) -> str:
    machine = doc.get("machine_info", {})
    cpu = machine.get("cpu", {})
    commit = doc.get("commit_info", {})
    infos = [b["extra_info"] for b in doc["benchmarks"]]
    torch_info = next((i["machine"] for i in infos if "machine" in i), {})
    loads = [i["machine"][k] for i in infos if "machine" in i for k in ("load_start", "load_end")]
    cpus = torch_info.get("cpus") or cpu.get("count") or 1
    smoke = any(i.get("smoke") for i in infos)
    lines = [f"Reproduce: `{command}`", ""]
    facts = [cpu.get("brand_raw") or machine.get("processor") or "CPU ?", f"{cpus} CPUs",
             f"torch {torch_info.get('torch', '?')} ({torch_info.get('cpu_capability', '?')}, "
             f"{torch_info.get('torch_threads', '?')} thread{'' if torch_info.get('torch_threads') == 1 else 's'})",
             f"Python {machine.get('python_version', '?')}", f"{doc.get('datetime', '?')[:16].replace('T', ' ')} UTC"]
    if commit.get("id"):
        facts.append(f"commit {commit['id'][:10]}{' + uncommitted changes' if commit.get('dirty') else ''}")
    lines.append("Measured on " + ", ".join(facts) + ".")
    if loads:
        busy = max(loads) > 0.75 * cpus
        lines.append(f"1-minute load average {min(loads):.1f} to {max(loads):.1f} during the benches"
                     + (" (BUSY: other jobs shared the cores; absolute times are inflated, compare the ratios)."
                        if busy else "."))
    lines.append("Candidates are interleaved within each round (every candidate once per round); figures are "
                 "medians; ratios are taken within one run.")
    if smoke:
        lines += ["", "**QUICK/SMOKE RUN: tiny sizes, one round. These figures mean nothing.**"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- groups ----


def goals_of(info: dict) -> dict[str, dict]:
    return {g["figure"]: g for g in info.get("goals", [])}


def optimizer_step(benches: list[dict]) -> str:
    out = []
    order = {"AdamW": 0, "SGD momentum": 1}
    for b in sorted(benches, key=lambda b: (order.get(b["extra_info"]["optimizer"], 9), b["extra_info"]["size"])):
        info = b["extra_info"]
        med, speed = info["median_ms"], info["speed_vs_fused"]
        out.append(f"#### {info['optimizer']}, {size_label(info, 'parameters')} parameters ({rounds(info['rounds'])})\n")
        out.append(table(["step", "median ms", "torch fused / this"],
                         [[name, ms(t), f"{speed[name]:.2f}"] for name, t in med.items()]))
        notes = [f"fingerprints add {pct(info['fingerprints_over_replay_step'])} to a replay step "
                 f"({pct(info['fingerprints_over_fused'])} of torch's fused step)"]
        if "yardstick_share" in info:
            y = info["yardstick_share"]
            notes.append(f"replay + fingerprints runs at {100 * y['with fingerprints']:.0f}% of the yardstick's "
                         f"bandwidth ({100 * y['without fingerprints']:.0f}% without fingerprints)")
        for g in info["goals"]:
            notes.append(f"goal: {g['figure']}: {goal_cell(g)}")
        if not info["goals"]:
            notes.append("no goal stated for this optimizer (the goals are AdamW's)")
        out.append("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(out)


def fingerprint(benches: list[dict]) -> str:
    rows = []
    for b in sorted(benches, key=lambda b: (b["extra_info"]["dtype"] != "float32", b["extra_info"]["size"])):
        info = b["extra_info"]
        med = info["median_ms"]
        g = info["goals"][0] if info["goals"] else None
        rows.append([f"{size_label(info, 'elements')} {info['dtype']}", ms(med["torch.sum"]), ms(med["replay.fingerprint"]),
                     f"{info['speed_vs_sum']:.2f}", goal_cell(g)])
    n = benches[0]["extra_info"]["rounds"] if benches else 0
    return (f"{rounds(n)}\n\n"
            + table(["tensor", "torch.sum ms", "replay.fingerprint ms", "sum / fingerprint (speed)", "goal"], rows,
                    ["---", "---:", "---:", "---:", "---"]))


PART_LABELS = {
    "rng": "RNG contract: per-step seeding, stream generators",
    "kernel_fp": "fingerprints in the optimizer kernel",
    "engine_fp": "fingerprints assembled by the engine",
    "ledger": "ledger rows, SQLite, epoch hashes",
    "ckpt_main": "checkpoints on the main thread (state_dict, copy, waits)",
    "setup": "run setup and finish",
    "rest": "bookkeeping, the rest",
}


def recording_overhead(benches: list[dict]) -> str:
    benches = sorted(benches, key=lambda b: b["extra_info"]["parameters"])
    rows, goal_rows = [], []
    for b in benches:
        info = b["extra_info"]
        med, whole, lock = info["median_ms"], info["whole_run"], info["lockstep"]
        rows.append([
            f"{info['program']} ({info['reference']})", f"{info['parameters']:,}",
            f"{info['steps']} x {info['rounds']}", ms(med["bare"]), ms(med["torch.optim"]), ms(med["recorded"]),
            f"{pct(whole['overhead'])} ({pct(whole['overhead_min'])}..{pct(whole['overhead_max'])})",
            pct(whole["vs_torch_optim"]),
            f"{lock['per_step_ms']:.3f} ({pct(lock['per_step'])})", f"{lock['per_checkpoint_ms']:.0f}",
            f"{pct(lock['steady_state'])} ({', '.join(pct(v) for v in lock['steady_state_by_round'])})",
        ])
        for g in info["goals"]:
            goal_rows.append([g["figure"], fmt_value(g["value"], g["unit"]), g["text"], verdict(g)])
    out = [table(["program", "parameters", "steps x rounds", "bare ms/step", "torch.optim ms/step",
                  "recorded ms/step", "whole run vs bare (min..max)", "whole run vs torch.optim",
                  "clean-step cost ms (of bare)", "per checkpoint ms", "steady state (by round)"], rows)]
    out.append("\nWhole runs: seconds per step of each loop (bare, torch.optim, a default recording with its setup "
               "and every checkpoint), alternated within each round. Step by step (lockstep): one bare step after "
               "each recorded step; clean-step cost = median of (recorded - bare) over steps without checkpoint or "
               "epoch work; per checkpoint = the excess of the steps with checkpoint work, per checkpoint; steady "
               "state = clean-step cost + one checkpoint per default spacing ("
               + ", ".join(f"{b['extra_info']['program']}: {b['extra_info']['checkpoint_every']} steps" for b in benches)
               + ") + epoch records, over the bare step.\n")
    out.append(table(["goal", "measured", "target", "verdict"], goal_rows, ["---", "---:", "---", "---"]))
    # Where the time goes.
    names = [b["extra_info"]["program"] for b in benches]
    bare = {b["extra_info"]["program"]: b["extra_info"]["lockstep"]["bare_ms"] for b in benches}
    parts = {b["extra_info"]["program"]: b["extra_info"]["breakdown"] for b in benches}
    rows = []
    for key, label in PART_LABELS.items():
        cells = [label]
        for n in names:
            v = parts[n]["ms_per_step"].get(key, 0.0)
            cells.append(f"{v:.3f} ({100 * v / bare[n]:.1f}%)")
        rows.append(cells)
    rows.append(["background checkpoint writer, ms per checkpoint (off the main thread)"]
                + [f"{parts[n]['background_ms_per_checkpoint']:.0f} (x{parts[n]['background_writes']})" for n in names])
    out.append("\nWhere a recording's time goes (one instrumented recording; ms per step, % of the bare step; "
               "exclusive main-thread time of wrapped functions; the kernel's fingerprints priced by an interleaved "
               "micro-benchmark):\n")
    out.append(table(["part"] + [f"{n} ms/step" for n in names], rows))
    stored = "; ".join(f"{b['extra_info']['program']}: {b['extra_info']['stored']['ledger_bytes_per_step']:,.0f} ledger "
                       f"bytes/step, checkpoint {b['extra_info']['stored']['checkpoint_mb']:.1f} MB" for b in benches)
    out.append(f"\nStored: {stored}.")
    return "\n".join(out)


def fork_latency(benches: list[dict]) -> str:
    rows = []
    for b in sorted(benches, key=lambda b: b["extra_info"]["parameters"]):
        info = b["extra_info"]
        child = info["child"]
        g = info["goals"][0] if info["goals"] else None
        rows.append([
            info["program"], f"{info['checkpoint_every']}", f"{info['restore_ms']:.0f}",
            f"{info['replayed_step_ms']:.2f} ({info['steps_replayed']} replayed)",
            f"{child['recorded_clean_ms']:.2f}", f"{child['bare_ms']:.2f}", pct(child["per_step"]),
            pct(child["steady_state"]), f"{info['rounds']}", goal_cell(g),
        ])
    align = ["---"] + ["---:"] * 8 + ["---"]
    return (table(["program", "checkpoint every", "ForkSession at a checkpoint ms (restore)",
                   "each step replayed to reach T ms", "child step ms (clean)", "bare step ms",
                   "child step vs bare", "child steady state vs bare", "rounds", "goal"], rows, align)
            + "\n\nForkSession(parent, T) restores the checkpoint before T and replays to T, checking each step "
              "against the parent's ledger; each child (a placebo fork written as a full run) is timed step by step "
              "against the bare loop, one bare step after each child step.")


def experiment_throughput(benches: list[dict]) -> str:
    rows = []
    for b in benches:
        info = b["extra_info"]
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in info["phase_s"].items())
        rows.append([f"`{info['program']}`", f"{info['seeds']} x {info['arms']} x {len(info['fork_steps'])}",
                     f"{info['child_steps']}", f"{info['median_ms']['experiment'] / 1e3:.1f}",
                     f"{info['forks_per_minute']:.0f}", f"{info['forks_per_minute_writing_only']:.0f}", phases,
                     f"{info['rounds']}"])
    return (table(["program", "seeds x arms x fork steps", "steps per child", "experiment s",
                  "forks per minute (whole experiment)", "forks per minute (writing children only)",
                  "time by phase", "rounds"], rows, ["---"] + ["---:"] * 5 + ["---", "---:"])
            + "\n\nNo goal: the figure is tracked.")


def forget(benches: list[dict]) -> str:
    rows = []
    for b in benches:
        info = b["extra_info"]
        for c in info["cases"]:
            rows.append([f"{c['share_first_seen']:.0%} (step {c['fork_step']})",
                         f"{c['steps_replayed']} of {info['steps']} ({c['share_replayed']:.0%})",
                         f"{c['forget_ms'] / 1e3:.2f}", f"{c['retrain_ms'] / 1e3:.2f}",
                         f"{c['forget_over_retrain']:.2f}", f"{c['speedup']:.2f}x", f"{info['rounds']}"])
    return (table(["ids first seen at", "steps replayed", "forget s", "full retraining s", "forget / retraining",
                   "speed-up", "rounds"], rows, ["---"] + ["---:"] * 6)
            + "\n\nforget = plan (ledger scan), restore the checkpoint before the fork step and replay to it, the "
              "tail without the ids, the certificate; full retraining = `record --drop-examples` from step 0, which "
              "forget equals bit for bit. Both write a complete run. No goal: the figure is tracked.")


def trace(benches: list[dict]) -> str:
    rows = []
    for b in benches:
        info = b["extra_info"]
        rows.append([info["program"], f"{info['step_ms']:.2f}", f"{info['traced_step_ms']:.2f}", f"{info['ratio']:.1f}x",
                     f"{info['ops_per_step']:.0f}", f"{info['us_per_op']:.0f}", f"{info['trace_kib_per_step']:.0f}",
                     f"{info['rounds']}"])
    return (table(["program", "step ms", "traced step ms", "traced / untraced", "ops per step", "us per op",
                   "trace KiB per step", "rounds"], rows, ["---"] + ["---:"] * 7)
            + "\n\nA step of the engine (step function and fingerprints of every component) with and without the op "
              "tracer streaming every op to a JSON-lines file. No goal: the figure is tracked.")


def data_workers(benches: list[dict]) -> str:
    rows = []
    for b in benches:
        info = b["extra_info"]
        for n, step_ms in info["step_ms"].items():
            rows.append([n, f"{step_ms:.1f}", f"{info['speedup'][n]:.2f}x", f"{info['rounds']}"])
    info = benches[0]["extra_info"]
    return (table(["workers", "step ms", "speed-up over 0", "rounds"], rows, ["---:"] * 4)
            + f"\n\nbenches/programs/augmented_images.py: a batch of {info['batch_size']} examples, each cropped, "
              "flipped, blurred four times and jittered in __getitem__, a linear model. Steady state: workers started "
              f"at each engine's turn, {info['warmup_steps']} steps untimed (start-up, pipeline filling), then "
              f"{info['steps_per_round']} timed; the three engines' ledger digests agree (checked). No goal: the gain "
              "depends on the free cores.")


def scaling(benches: list[dict]) -> str:
    rows = []
    for b in benches:
        info = b["extra_info"]
        for name, f in info["candidates"].items():
            executor, n = name.split()
            rows.append([f"{info['task_threads']}", executor, n, f"{f['experiment_s']:.1f}", f"{f['forks_per_minute']:.0f}",
                         f"{f['speedup']:.2f}x", f"{f['instance_start_s']:.1f}" if executor == "ray" else "-",
                         f"{info['rounds']}"])
    info = benches[0]["extra_info"]
    return (table(["torch threads per process", "executor", "workers (Ray: CPUs)", "experiment s", "forks per minute",
                   "speed-up over local 1", "Ray instance start s (not in the time)", "rounds"], rows,
                  ["---:", "---"] + ["---:"] * 6)
            + f"\n\n`{info['program']}`, {info['seeds']} seeds x {info['arms']} arms x {len(info['fork_steps'])} fork "
              f"step, {info['steps']} steps: {info['seeds']} tasks, {info['children']} children; Ray {info['ray']}. "
              "The time is Experiment.run's (worker start-up included, the Ray instance's start not); the results "
              "of every candidate at one thread count agree (checked). No goal: the gain depends on the free cores.")


def distributed_recording(benches: list[dict]) -> str:
    rows = []
    for b in benches:
        info = b["extra_info"]
        for name, f in info["candidates"].items():
            rows.append([f"`{name}`" if name.startswith("--") else name, f"{f['step_ms']:.1f}",
                         f"{f['vs_1_thread']:.2f}x",
                         "-" if f["vs_2_threads"] is None else f"{f['vs_2_threads']:.2f}x", f"{f['startup_s']:.1f}",
                         f"{info['rounds']}"])
    info = benches[0]["extra_info"]
    return (table(["recorded by", "step ms", "time / 1 process, 1 thread", "time / 1 process, 2 threads",
                   "start-up s", "rounds"], rows, ["---"] + ["---:"] * 5)
            + f"\n\n`{info['program']}`, global batch {info['batch_size']}: the time per step is that of "
              f"`replay record` over {info['steps']} steps less {info['short']} steps (start-up removed), "
              "checkpoints and ledger included; below 1x is faster. `--nproc 1` records the same bits as one "
              "process with one thread (checked). No goal: the gain depends on the free cores.")


RENDER = {"optimizer step": optimizer_step, "fingerprint": fingerprint, "recording overhead": recording_overhead,
          "fork latency": fork_latency, "experiment throughput": experiment_throughput, "forget": forget,
          "trace": trace, "data workers": data_workers, "scaling": scaling,
          "distributed recording": distributed_recording}
TITLES = {"optimizer step": "Optimizer step", "fingerprint": "Fingerprint: replay.fingerprint vs torch.sum",
          "recording overhead": "Recording overhead at default settings", "fork latency": "Fork latency",
          "experiment throughput": "Experiment throughput", "forget": "Forget vs full retraining",
          "trace": "Tracing a step", "data workers": "Data-loader workers on a CPU-heavy augmentation",
          "scaling": "Experiment scaling: local processes and Ray",
          "distributed recording": "Recording by several processes (DDP) against one"}


def render(doc: dict, command: str = DEFAULT_COMMAND) -> str:
    """The Markdown for a pytest-benchmark JSON document (a dict)."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for b in doc["benchmarks"]:
        by_group[b["group"]].append(b)
    parts = [header(doc, command)]
    for group in GROUPS + sorted(set(by_group) - set(GROUPS)):
        if group not in by_group:
            continue
        parts.append(f"### {TITLES.get(group, group)}\n")
        parts.append(RENDER[group](by_group[group]) if group in RENDER else f"(no table for group {group!r})")
    rank = {g: i for i, g in enumerate(GROUPS)}
    ordered = sorted(doc["benchmarks"], key=lambda b: rank.get(b["group"], len(GROUPS)))
    goals = [g for b in ordered for g in b["extra_info"].get("goals", [])]
    if goals:
        met = sum(g["met"] for g in goals)
        parts.append(f"### Goals: {met} of {len(goals)} met\n")
        parts.append(table(["figure", "measured", "goal", "verdict"],
                           [[g["figure"], fmt_value(g["value"], g["unit"]), g["text"], verdict(g)] for g in goals],
                           ["---", "---:", "---", "---"]))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="the --benchmark-json output of pytest benches/ --benchmark-only")
    parser.add_argument("--command", default=DEFAULT_COMMAND, help="the command shown as the way to reproduce the run")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        doc = json.load(f)
    if not doc.get("benchmarks"):
        print(f"{args.json}: no benchmarks recorded (run with --benchmark-only)", file=sys.stderr)
        return 1
    sys.stdout.write(render(doc, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
