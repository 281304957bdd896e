"""The `replay` command.

    replay record PROGRAM --seed S --steps N --out DIR    record a run
    replay resume DIR                                     continue a stopped recording
    (record, resume, verify and fork take --nproc N: N processes, torch.distributed; or
     --distributed under torchrun)
    replay verify DIR [--from A] [--to B]                 replay and compare with the ledger
    replay inspect DIR [--json]                           summary, checkpoints, order, environment
    replay fork RUN --at T --perturb SPEC [...] --out DIR  a counterfactual child run
    replay check RUN [--at T ...]                         placebo forks: is all state captured?
    replay forget RUN --examples IDS --out DIR [--dry-run] remove examples by replaying the tail
    replay trace RUN --step T --out FILE [--repeat N | --threads 1,2]   every op of one step
    replay trace-diff A B                                 the first op whose inputs agree and outputs differ
    replay tree DIR                                       the lineage tree of the runs below DIR
    replay diff A B                                       where two runs part, per component
    replay experiment SPEC.toml --out DIR [--workers N] [--ray [ADDRESS]]   seeds x forks x arms -> estimates
    replay report DIR [--out report.html]                 the audit report of an experiment
    replay demo [--quick] [--out DIR]                     the digits demo, end to end

Exit statuses: 0 done; 1 a negative answer (verify, check, trace --repeat/--threads or trace-diff
found a difference, a forget certificate fails), an error in the
user's program (its own frames, then `replay: error in the program (FILE, line N): ...`), or the
machine gave out (disk full, out of memory; a recording stays resumable); 2 bad input, one line
`replay: error: ...` (the types are listed in `bad_input_types`); 130 interrupted (Ctrl-C; a
recording or fork stays resumable with `replay resume`). No `--out` is ever inside a run or an
experiment's runs/ folder, and `report` overwrites only its own pages unless given --force
(replay/outputs.py).
"""

from __future__ import annotations

import argparse
import errno as _errno
import functools
import json
import math
import os
import sys

from .store import RunDir, RunError


def _cmd_record(args) -> int:
    from .outputs import check_run_out
    from .session import RecordSession

    check_run_out(args.out)
    _positive("--steps", args.steps)
    _positive("--checkpoint-every", args.checkpoint_every)
    dropped = _example_ids(args.drop_examples, args.drop_examples_file, "--drop-examples", required=False)
    traced = _int_list(args.trace_steps, "--trace-steps", minimum=0) if args.trace_steps is not None else []
    out = RecordSession(args.program, args.out, seed=args.seed, steps=args.steps, device=args.device,
                        checkpoint_every=args.checkpoint_every,
                        checkpoint_log_spaced=True if args.log_spaced else None,
                        progress=not args.no_progress, drop_examples=dropped, trace_steps=traced).run()
    with RunDir.open(out) as run:
        last = run.ledger.last_step()
    print(f"recorded {0 if last is None else last + 1} steps into {out}")
    return 0


def _cmd_resume(args) -> int:
    from .session import RecordSession

    out = RecordSession.resume(args.run, progress=not args.no_progress, allow_source_change=args.allow_source_change,
                               allow_environment_change=args.allow_environment_change, **_device_args(args))
    print(f"resumed and completed {out}")
    return 0


def _cmd_verify(args) -> int:
    from .session import ReplaySession, verify_files

    if args.files:  # integrity alone: nothing is executed or replayed
        problems = verify_files(args.run)
        if problems:
            print(f"DAMAGED: {len(problems)} problem(s) with the run's files:")
            for problem in problems:
                print(f"  {problem}")
            return 1
        with RunDir.open(args.run) as run:
            rows, checkpoints = len(run.ledger.rows()), len(run.ledger.checkpoints())
        print(f"OK: the manifest, the ledger ({rows} steps) and {checkpoints} checkpoints are intact (files only, not replayed)")
        return 0
    if args.certificate:
        from .forget import check_certificate

        if args.start is not None or args.end is not None:
            raise ValueError("--certificate replays the whole child; it takes no --from / --to")
        if args.device is not None or args.allow_device_change:
            raise ValueError("--certificate replays the child on the device it was recorded on; it takes no "
                             "--device / --allow-device-change")
        checked = check_certificate(args.run, progress=not args.no_progress,
                                    allow_source_change=args.allow_source_change,
                                    allow_environment_change=args.allow_environment_change)
        print(checked.describe())
        return 0 if checked.ok else 1
    session = ReplaySession(args.run, allow_source_change=args.allow_source_change,
                            allow_environment_change=args.allow_environment_change, **_device_args(args))
    report = session.verify(args.start, args.end, progress=not args.no_progress)
    print(report.describe())
    if report.divergence is not None:
        from .trace import explain_divergence

        print(explain_divergence(args.run, report.divergence.step, allow_source_change=args.allow_source_change,
                                 allow_environment_change=args.allow_environment_change, **_device_args(args)))
    return 0 if report.ok else 1


def _device_args(args) -> dict:
    return {"device": args.device, "allow_device_change": args.allow_device_change}


def _int_list(text: str, flag: str, minimum: int) -> list[int]:
    """Integers from "0,100,200" (commas or spaces)."""
    values = []
    for token in text.replace(",", " ").split():
        try:
            values.append(int(token))
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {token!r} is not an integer") from None
    if not values:
        raise ValueError(f"{flag}: give at least one number")
    if any(v < minimum for v in values):
        raise ValueError(f"{flag} {text!r}: every value must be >= {minimum}")
    return sorted(set(values))


def _cmd_trace(args) -> int:
    from .trace import describe_nondeterminism, trace_step

    finder = args.repeat is not None or args.threads is not None
    if args.repeat is not None and args.threads is not None:
        raise ValueError("give --repeat or --threads, not both")
    if args.out is None and not finder:
        raise ValueError("replay trace needs --out FILE (or --repeat N / --threads 1,2 to look for nondeterminism)")
    if args.repeat is not None and not 2 <= args.repeat <= 100:
        raise ValueError(f"--repeat {args.repeat}: must be between 2 and 100")
    threads = _int_list(args.threads, "--threads", minimum=1) if args.threads is not None else None
    if threads is not None and len(threads) < 2:
        raise ValueError("--threads: give at least two thread counts, e.g. 1,2")
    if args.out is not None:
        from .outputs import check_trace_out

        check_trace_out(args.out, force=args.force)
    result = trace_step(args.run, args.step, args.out, repeat=args.repeat or 1, threads=threads,
                        progress=not args.no_progress, allow_source_change=args.allow_source_change,
                        allow_environment_change=args.allow_environment_change, **_device_args(args))
    if args.out is not None:
        print(f"traced step {args.step} of {args.run}: {result.ops} ops into {args.out}")
    if result.diverged_before is not None:
        print(f"note: the replay to step {args.step} already diverged from the ledger at step {result.diverged_before}")
    if result.matches_ledger is False:
        print(f"note: the traced step {args.step} does not reproduce the ledger's row (this machine diverges there)")
    if finder:
        print(describe_nondeterminism(result))
        return 1 if result.nondeterministic or result.structure else 0
    return 0


def _cmd_trace_diff(args) -> int:
    from .trace import diff_traces, read_trace

    header_a, ops_a = read_trace(args.a)
    header_b, ops_b = read_trace(args.b)
    if (header_a.get("step"), header_a.get("run_id")) != (header_b.get("step"), header_b.get("run_id")):
        print(f"note: A traces step {header_a.get('step')} of run {header_a.get('run_id')}, "
              f"B step {header_b.get('step')} of run {header_b.get('run_id')}")
    diff = diff_traces(ops_a, ops_b, header_a, header_b)
    print(f"A: {args.a} ({len(ops_a)} ops)\nB: {args.b} ({len(ops_b)} ops)")
    print(diff.describe())
    return 0 if diff.identical else 1


def _inspect_data(run: RunDir) -> dict:
    m = run.manifest
    ledger = run.ledger
    last = ledger.last_step()
    return {
        "path": str(run.path),
        "status": m["status"],
        "program": m["program"],
        "seed": m["seed"],
        "steps_planned": m["steps"],
        "steps_recorded": 0 if last is None else last + 1,
        "batch_size": m["batch_size"],
        # each step's ids cut into this many contiguous micro-batches (StepContext.micro_batches)
        "accumulate": m.get("accumulate", 1),
        "dataset_size": m["dataset_size"],
        "order": m["order"],
        "optimizer": m["optimizer"],
        # replay.device.recorded_device's rule (not imported: inspect loads no torch)
        "device": m.get("device") or {"kind": "cpu", "device": "cpu"},
        # processes that recorded it (replay.distributed); 1 when absent
        "world_size": m.get("distributed", {}).get("world_size", 1),
        "rng": m["rng"],
        "checkpoints": sorted(ledger.checkpoints()),
        "epoch_order_hashes": {str(k): v for k, v in sorted(ledger.epochs().items())},
        "environment": m["environment"],
        "events": ledger.events(),
    }


def _cmd_inspect(args) -> int:
    with RunDir.open(args.run) as run:
        data = _inspect_data(run)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"run          {data['path']} ({data['status']})")
    print(f"program      {data['program']['reference']}  sha256 {data['program']['sha256'][:16]}")
    print(f"seed         {data['seed']}")
    print(f"steps        {data['steps_recorded']} recorded of {data['steps_planned']}, batch {data['batch_size']} "
          f"of {data['dataset_size']} examples"
          + (f", {data['accumulate']} micro-batches a step (contiguous runs of the step's ids)" if data["accumulate"] > 1 else ""))
    print(f"order        {json.dumps(data['order'])[:120]}")
    print(f"optimizer    {data['optimizer']['class']} (numerics {data['optimizer']['numerics']})")
    device = data["device"]
    print(f"device       {device['device']}" + (f" ({device['name']})" if device.get("name") else ""))
    if data["world_size"] > 1:
        print(f"processes    {data['world_size']} (torch.distributed, gloo; replay, resume and fork with "
              f"--nproc {data['world_size']})")
    print(f"rng streams  {', '.join(data['rng']['streams'])}")
    print(f"checkpoints  {data['checkpoints']}")
    print("epoch order hashes")
    for epoch, h in list(data["epoch_order_hashes"].items())[:20]:
        print(f"  {epoch:>5}  {h}")
    if len(data["epoch_order_hashes"]) > 20:
        print(f"  ... {len(data['epoch_order_hashes'])} epochs")
    print("environment")
    for key, value in data["environment"].items():
        print(f"  {key:<24} {value}")
    if data["events"]:
        print("events")
        for event in data["events"]:
            print(f"  {event}")
    return 0


def _cmd_fork(args) -> int:
    from .fork import ForkSession
    from .perturb import catalogue

    if args.list:
        for name, summary, params in catalogue():
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            print(f"{name:<16} {summary}" + (f"  ({shown})" if shown else ""))
        return 0
    if args.run is None or args.at is None or not args.perturb or args.out is None:
        raise ValueError("replay fork needs RUN, --at, at least one --perturb and --out (or --list)")
    from .outputs import check_run_out

    check_run_out(args.out)
    first, last = _recorded_steps(args.run)  # --at itself is checked by ForkSession (a ForkError)
    _positive("--steps", args.steps)
    _positive("--window", args.window)
    if args.until is not None and args.until <= args.at:
        raise ValueError(f"--until {args.until}: must lie after the fork step {args.at}")
    end = args.at + args.steps if args.steps is not None else (args.until if args.until is not None else last + 1)
    if first <= args.at <= last and args.window > end - args.at:  # (a bad --at: ForkSession says so)
        raise ValueError(f"--window {args.window}: longer than the {end - args.at} steps the child runs")
    session = ForkSession(args.run, args.at, progress=not args.no_progress,
                          allow_source_change=args.allow_source_change,
                          allow_environment_change=args.allow_environment_change, **_device_args(args))
    out = session.fork(args.out, args.perturb, window=args.window, steps=args.steps, until=args.until)
    print(f"forked {args.run} at step {args.at} into {out}")
    return 0


def _cmd_check(args) -> int:
    from .fork import check

    first, last = _recorded_steps(args.run)
    bad = [t for t in args.at or [] if not first <= t <= last]
    if bad:
        raise ValueError(f"--at {' '.join(map(str, bad))}: {args.run} has steps {first}..{last}; "
                         "a placebo fork must start at one of them")
    _positive("--steps", args.steps)
    _positive("--workers", args.workers)
    at = args.at or sorted({first + (last + 1 - first) * k // 4 for k in (1, 2, 3)})
    results = check(args.run, at, steps=args.steps, workers=args.workers)
    failed = 0
    for r in results:
        if r["divergence"] is None:
            print(f"placebo fork at step {r['at']}: identical to the parent through step {r['end'] - 1}")
        else:
            failed += 1
            print(f"placebo fork at step {r['at']}: DIVERGES, state the program does not capture:")
            print("  " + r["divergence"].replace("\n", "\n  "))
    return 1 if failed else 0


def _example_ids(inline: list[str] | None, file: str | None, flag: str, required: bool = True) -> list[int]:
    """Example ids from `flag IDS...` or `flag-file F` (exactly one of them when required)."""
    from .forget import parse_ids, read_ids_file

    if inline and file:
        raise ValueError(f"give {flag} or {flag}-file, not both")
    if inline:
        return parse_ids(" ".join(inline))
    if file:
        return read_ids_file(file)
    if required:
        raise ValueError(f"give the example ids: {flag} IDS (e.g. 3,17,40-49) or {flag}-file FILE")
    return []


def _cmd_forget(args) -> int:
    from .forget import CERTIFICATE, forget, plan_forget

    ids = _example_ids(args.examples, args.examples_file, "--examples")
    if args.dry_run:
        print(plan_forget(args.run, ids).describe())
        return 0
    if args.out is None:
        raise ValueError("replay forget needs --out DIR (or --dry-run)")
    from .outputs import check_run_out

    check_run_out(args.out)
    out = forget(args.run, ids, args.out, progress=not args.no_progress)
    with open(os.path.join(out, CERTIFICATE), encoding="utf-8") as f:  # what was done, as certified
        cert = json.load(f)
    t, total = cert["fork_step"], cert["steps_total"]
    print(f"forgot {len(cert['ids'])} example(s) from {args.run}: forked at step {t} (the first step any was seen), "
          f"replayed steps {t}..{total - 1} ({cert['steps_replayed']} of {total}, "
          f"{100 * cert['share_replayed']:.1f}%) into {out}")
    print(f"certificate: {os.path.join(out, CERTIFICATE)} (re-check: replay verify {out} --certificate)")
    return 0


MAX_STEPS = 10**9  # no run, window or horizon is longer


def _positive(flag: str, value) -> None:
    """A count given on the command line: None (not given) or an integer in [1, MAX_STEPS]."""
    if value is not None and not 1 <= value <= MAX_STEPS:
        raise ValueError(f"{flag} {value}: must be a positive number of at most {MAX_STEPS}")


def _recorded_steps(run_dir) -> tuple[int, int]:
    """(first, last) step recorded in a run; ValueError when it has none."""
    with RunDir.open(run_dir) as run:
        first = run.manifest.get("first_step", 0)
        last = run.ledger.last_step()
    if last is None:
        raise ValueError(f"{run_dir}: no recorded steps")
    return first, last


def _cmd_tree(args) -> int:
    from .lineage import tree

    print(tree(args.dir))
    return 0


def _cmd_diff(args) -> int:
    from .lineage import diff

    print(diff(args.a, args.b).describe())
    return 0


def _f(x, width: int = 0, digits: int = 4) -> str:
    """A number for a table: NaN as '-', inf as 'inf'."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-".rjust(width)
    text = "-" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.{digits}f}")
    return text.rjust(width)


def _ci(pair, digits: int = 4) -> str:
    if not pair or len(pair) != 2:
        return "-"
    return f"({_f(pair[0], 0, digits)}, {_f(pair[1], 0, digits)})"


def _life(value, interval, extrapolated: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{_f(value, 0, 1)} {_ci(interval, 1)}"
    return text + (" extrapolated" if extrapolated else "")


def print_estimates(results: dict) -> None:
    """The estimates table at the primary horizon and distance (one row per program and arm), then
    the lifetimes table. Every number is in results.json."""
    exp = results["experiment"]
    d, h = exp["primary_distance"], exp["primary_horizon"]
    rows = [e for e in results["estimates"] if e["distance"] == d and e["horizon"] == h]
    print(f"\n{exp['name']}: {d} on the probe set ({exp['probe']['size']} examples), {len(exp['seeds'])} seeds, "
          f"{h} steps after each intervention window")
    pw = max([len("program")] + [len(str(e["program"])) for e in results["estimates"]]) + 2
    aw = max([len("arm")] + [len(str(e["arm"])) for e in results["estimates"]]) + 2
    head = (f"{'program':<{pw}}{'arm':<{aw}}{'fork':>5} {'effect':>8} {'95% t interval':>20} {'floor':>8} {'ratio':>6} "
            f"{'excess over reference (95% CI)':>32} {'q':>6}  verdict")
    print(head)
    print("-" * len(head))
    for e in rows:
        if e.get("placebo"):
            interval = "exactly 0 (checked)" if results["placebo"]["exact_zero"] else "NOT ZERO"
            excess, q = "", ""
        else:
            interval = _ci(e["interval"])
            excess = "" if e.get("excess_mean") is None else f"{_f(e['excess_mean'])} {_ci(e['excess_interval'])}"
            q = _f(e.get("q_value"), 0, 3)
        verdict = e.get("verdict") or ""
        if e.get("zero_everywhere") and not e.get("placebo"):
            verdict += " [exactly 0 at every horizon]"
        print(f"{e['program']:<{pw}}{e['arm']:<{aw}}{e['fork_step']:>5} {_f(e['mean'], 8)} {interval:>20} "
              f"{_f(e['noise_floor'], 8)} {_f(e['ratio'], 6, 2)} {excess:>32} {q:>6}  {verdict}")
    lifetimes = results.get("lifetimes") or []
    if lifetimes:
        print(f"\nlifetimes ({d}; excess over the reference against the delay h):")
        head = (f"{'program':<{pw}}{'arm':<{aw}}{'fork':>5}  {'model':<14}{'plateau (95% CI)':>26} {'/floor':>7}  "
                f"{'half-life (95% CI)':<30} {'state half-life (95% CI)'}")
        print(head)
        print("-" * len(head))
        for l in lifetimes:
            state = l.get("state") or {}
            plateau = f"{_f(l['plateau'])} {_ci(l['plateau_interval'])}"
            print(f"{l['program']:<{pw}}{l['arm']:<{aw}}{l['fork_step']:>5}  {l['model']:<14}{plateau:>26} "
                  f"{_f(l['plateau_ratio'], 7, 2)}  {_life(l['half_life'], l['interval'], l['extrapolated']):<30} "
                  f"{_life(state.get('half_life'), state.get('interval'), state.get('extrapolated', False))}")
    dead = [r for r in results.get("references") or [] if r.get("zero_everywhere")]
    for r in dead:
        print(f"\nWARNING: the reference arm is exactly 0 at every horizon ({r['program']}, fork step {r['fork_step']})")
    print(f"\nverdicts: excess over the reference, BH across arms; 'no memory beyond chaos' means below "
          f"{exp.get('equivalence_margin')} x the noise floor (TOST, upper side). See docs/estimands.md.")
    print()


def print_memory(results: dict) -> None:
    """The memory analyses (witness, additivity, divergence, calibration) as the report shows them."""
    from .report.memory import memory_sections

    for section in memory_sections(results, results["experiment"].get("primary_horizon")):
        print(f"{section.title}:")
        for caption, head, rows in section.tables:
            if not rows:
                continue
            print(f"  {caption}")
            widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
            for row in [head] + rows:
                print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        print()


def _cmd_experiment(args) -> int:
    from .experiment import Experiment, ExperimentSpec
    from .outputs import check_experiment_out

    check_experiment_out(args.out)
    _positive("--workers", args.workers)
    if not os.path.isfile(args.spec):
        raise ValueError(f"{args.spec}: not a file (an experiment spec is a TOML file)")
    import tomllib

    try:
        spec = ExperimentSpec.from_toml(args.spec)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{args.spec}: not valid TOML ({error})") from None
    ray = False if args.ray is None else (args.ray or True)
    results = Experiment(spec, args.out).run(workers=args.workers, progress=not args.no_progress, ray=ray)
    print_estimates(results)
    print_memory(results)
    print(f"results in {args.out}/results.json; `replay report {args.out}` writes the report")
    return 0


def _cmd_report(args) -> int:
    from .outputs import check_file_out
    from .report import load_results, write_report

    out = check_file_out(args.out or os.path.join(args.dir, "report.html"), force=args.force)
    html, md = write_report(load_results(args.dir), out)
    print(f"wrote {html} and {md}")
    return 0


def _cmd_demo(args) -> int:
    from . import demo
    from .experiment import Experiment
    from .report import write_report

    from .outputs import check_experiment_out, check_file_out

    out = args.out or ("replay-demo-quick" if args.quick else "replay-demo")
    check_experiment_out(out)
    check_file_out(os.path.join(out, "report.html"))
    _positive("--workers", args.workers)
    results = Experiment(demo.spec(quick=args.quick), out).run(workers=args.workers, progress=not args.no_progress)
    print_estimates(results)
    html, md = write_report(results, f"{out}/report.html")
    print(f"report: {html} (and {md}); runs and evaluations in {out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replay", description="Deterministic replay for PyTorch training.")
    sub = parser.add_subparsers(dest="command", required=True)

    def allow_flags(p):
        p.add_argument("--allow-source-change", action="store_true",
                       help="replay although the program's source changed (recorded in the run)")
        p.add_argument("--allow-environment-change", action="store_true",
                       help="replay although the environment differs (recorded in the run)")
        p.add_argument("--device", metavar="DEVICE",
                       help="replay on this device (cpu, cuda, cuda:N; default: the one the run was recorded on)")
        p.add_argument("--allow-device-change", action="store_true",
                       help="replay on another kind of device than the recorded one (recorded in the run); "
                            "the bits may differ, and verify reports where")

    p = sub.add_parser("record", help="record a program into a new run directory")
    p.add_argument("program", help="module:attribute or path/to/file.py:attribute")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--log-spaced", action="store_true", help="also checkpoint at steps 1, 2, 4, 8, ...")
    p.add_argument("--drop-examples", nargs="+", action="extend", metavar="IDS",
                   help="leave these example ids out of every batch from step 0 (e.g. 3,17,40-49)")
    p.add_argument("--drop-examples-file", metavar="FILE", help="the ids to leave out, from a file")
    p.add_argument("--trace-steps", metavar="STEPS",
                   help="trace these steps op by op into the run (e.g. 0,100): references for `verify` elsewhere")
    p.add_argument("--device", metavar="DEVICE", help="run on this device instead of the program's (cpu, cuda, cuda:N)")
    p.add_argument("--no-progress", action="store_true")
    _distributed_flags(p)
    p.set_defaults(func=_cmd_record)

    p = sub.add_parser("resume", help="continue a recording that stopped or crashed")
    p.add_argument("run")
    p.add_argument("--no-progress", action="store_true")
    allow_flags(p)
    _distributed_flags(p)
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("verify", help="check every file of a run, replay it and compare with its ledger and checkpoints")
    p.add_argument("run")
    p.add_argument("--files", action="store_true",
                   help="check the integrity of every recorded file only (hash, then parse); no replay, no code run")
    p.add_argument("--from", dest="start", type=int)
    p.add_argument("--to", dest="end", type=int, help="exclusive")
    p.add_argument("--certificate", action="store_true",
                   help="re-check a forget certificate: recompute it from the ledgers and replay the child")
    p.add_argument("--no-progress", action="store_true")
    allow_flags(p)
    _distributed_flags(p)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("inspect", help="summary, checkpoints, order hashes, environment")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("fork", help="fork a run at a step with a perturbation")
    p.add_argument("run", nargs="?")
    p.add_argument("--at", type=int, help="the fork step T")
    p.add_argument("--perturb", action="append", default=[],
                   help="name or name:key=value,...; repeat to compose (see --list)")
    p.add_argument("--window", type=int, default=1, help="act over steps [T, T+W)")
    p.add_argument("--steps", type=int, help="run this many steps after T")
    p.add_argument("--until", type=int, help="run up to this step (default: the parent's end)")
    p.add_argument("--out")
    p.add_argument("--list", action="store_true", help="list the perturbation primitives")
    p.add_argument("--no-progress", action="store_true")
    allow_flags(p)
    _distributed_flags(p)
    p.set_defaults(func=_cmd_fork)

    p = sub.add_parser("check", help="placebo forks at several steps: find state the program fails to capture")
    p.add_argument("run")
    p.add_argument("--at", type=int, nargs="+", help="fork steps (default: at 1/4, 1/2 and 3/4 of the run)")
    p.add_argument("--steps", type=int, help="steps to run after each fork (default: to the end)")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("forget", help="remove examples from a run exactly: fork where they were first seen, "
                                      "replay the tail without them, write a certificate")
    p.add_argument("run")
    p.add_argument("--examples", nargs="+", action="extend", metavar="IDS", help="example ids, e.g. 3,17,40-49")
    p.add_argument("--examples-file", metavar="FILE", help="ids from a file (a JSON list, or ids and ranges as text)")
    p.add_argument("--out", help="the child run directory")
    p.add_argument("--dry-run", action="store_true",
                   help="print the fork step and the share of the run to replay, for each id and the set")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_forget)

    p = sub.add_parser("trace", help="replay to a step and record every op of it (module, source line, fingerprints)")
    p.add_argument("run")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--out", help="the trace file (JSON lines)")
    p.add_argument("--repeat", type=int, help="run the step N times from the same state: list ops whose outputs differ")
    p.add_argument("--threads", metavar="N,M", help="run the step under each thread count: list ops whose outputs differ")
    p.add_argument("--force", action="store_true", help="overwrite an --out file that replay did not write")
    p.add_argument("--no-progress", action="store_true")
    allow_flags(p)
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("trace-diff", help="align two traces of a step and name the op where they part")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=_cmd_trace_diff)

    p = sub.add_parser("tree", help="the lineage tree of the runs below a folder")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_tree)

    p = sub.add_parser("diff", help="the first step where two runs differ, per component")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("experiment", help="run an experiment spec (TOML): seeds x fork steps x arms")
    p.add_argument("spec")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, help="local processes (default 1); with --ray and no address: the local "
                                               "Ray instance's CPUs (default: all)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the tasks on Ray: a local instance, or the cluster at ADDRESS ('auto' for one started "
                        "with `ray start` on this machine, HEAD:6379 for another); needs pip install \"replay[ray]\"")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("report", help="write the HTML (and Markdown) audit report of an experiment")
    p.add_argument("dir")
    p.add_argument("--out", help="default: DIR/report.html")
    p.add_argument("--force", action="store_true", help="overwrite files that `replay report` did not write")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="the digits training-memory demo, end to end (no downloads)")
    p.add_argument("--quick", action="store_true", help="3 seeds and short runs, about a minute")
    p.add_argument("--out")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


# ------------------------------------------------------------------------ error contract ----
#
# Exit statuses: 0 done; 1 a negative answer (verify diverged, check found uncaptured state), an
# error in the user's program (its traceback, then one line), or the machine failed (disk full,
# out of memory: one line, the run stays resumable); 2 bad input (one line, `replay: error: ...`);
# 130 interrupted (Ctrl-C; a recording stays resumable). Anything else is a bug in replay and
# keeps its traceback.

_USER_PATH_ERRNOS = {_errno.ENOENT, _errno.EISDIR, _errno.ENOTDIR, _errno.EACCES, _errno.EPERM, _errno.EEXIST,
                     _errno.ENAMETOOLONG, _errno.ELOOP, _errno.ENOTEMPTY}
_DISK_FULL_ERRNOS = {_errno.ENOSPC, _errno.EFBIG, getattr(_errno, "EDQUOT", _errno.ENOSPC)}


def bad_input_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the input is wrong" (exit 2, one line): the one list.

    ValueError covers validation everywhere (PerturbationRefused, OutputRefused, tomllib's
    TOMLDecodeError, ProgramReferenceError and SourceChanged are ValueErrors); RunError covers the
    store and the sessions (CorruptRunError, RunLockedError, RunExistsError, ForkError,
    ReplayRefused). Imported here, not at the top, so that `replay --help` loads no torch."""
    from .experiment.probe import ProbeError
    from .experiment.spec import ExperimentError
    from ._numerics import NumericsUnavailable

    return (ValueError, RunError, ExperimentError, ProbeError, NumericsUnavailable, ImportError, FileNotFoundError,
            IsADirectoryError, NotADirectoryError, PermissionError)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    import os
    import sysconfig

    roots = {os.path.dirname(os.path.abspath(__file__))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib", "scripts"):  # scripts: the `replay` entry point
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.realpath(path))
            roots.add(path)
    return tuple(sorted(roots))


def _is_user_file(filename: str | None, roots: tuple[str, ...]) -> bool:
    import os

    if not filename or filename.startswith("<"):
        return False
    real = os.path.realpath(filename)
    return not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from or while handling."""
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _user_frames(error: BaseException):
    """The frames of the traceback that lie in the user's files (not replay, not Python's or a
    package's), and a SyntaxError in a user file; (frames, syntax_error)."""
    import traceback

    roots = _library_roots()
    for e in _chain(error):
        if isinstance(e, SyntaxError) and _is_user_file(e.filename, roots):
            return [], e
    frames = [f for f in traceback.extract_tb(error.__traceback__) if _is_user_file(f.filename, roots)]
    if not frames:  # raised in a worker process: its traceback comes back as text
        frames = [f for f in _remote_frames(error) if _is_user_file(f.filename, roots)]
    return frames, None


def _remote_frames(error: BaseException) -> list:
    """The frames of a worker process's traceback that concurrent.futures attaches as the cause
    (a _RemoteTraceback holding the formatted text)."""
    import re
    import traceback

    cause = error.__cause__
    text = getattr(cause, "tb", None) if type(cause).__name__ == "_RemoteTraceback" else None
    if not isinstance(text, str):
        return []
    return [traceback.FrameSummary(m.group(1), int(m.group(2)), m.group(3), line=m.group(4))
            for m in re.finditer(r'^  File "(.+?)", line (\d+), in (.+)\n(?:    (.*)\n)?', text, re.M)]


def _raised_by_replay(error: BaseException) -> bool:
    """Whether the innermost frame of the traceback is replay's own code."""
    import os
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return bool(frames) and os.path.realpath(frames[-1].filename).startswith(package)


def _report_user_error(error: BaseException, frames, syntax: SyntaxError | None) -> None:
    import traceback

    if syntax is not None:
        sys.stderr.write("".join(traceback.format_exception_only(type(syntax), syntax)))
        where = f"{syntax.filename}, line {syntax.lineno}"
        summary = f"SyntaxError: {syntax.msg}"
    else:
        sys.stderr.write("Traceback (the program's frames; replay's own are left out):\n")
        sys.stderr.write("".join(traceback.format_list(frames)))
        sys.stderr.write("".join(traceback.format_exception_only(type(error), error)))
        where = f"{frames[-1].filename}, line {frames[-1].lineno}"
        summary = f"{type(error).__name__}: {_one_line(error)}"
    print(f"replay: error in the program ({where}): {summary}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"replay: error: {message}", file=sys.stderr)


def _distributed_flags(p) -> None:
    p.add_argument("--nproc", type=int, metavar="N",
                   help="run as N processes on this machine (torch.distributed, gloo): each step's batch is "
                        "shared out across the ranks; a run recorded so is replayed, resumed and forked with the same N")
    p.add_argument("--distributed", action="store_true",
                   help="join the world a launcher started (torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); "
                        "rank 0 writes the run")


def _dispatch(args, raw: list[str]) -> int:
    nproc = getattr(args, "nproc", None)
    if nproc is not None:
        from .launch import launch

        if args.distributed:
            raise ValueError("--nproc starts the processes, --distributed joins processes a launcher started: give one")
        _positive("--nproc", nproc)
        return launch(raw, nproc)
    if getattr(args, "distributed", False):
        return _run_distributed(args)
    return args.func(args)


def _run_distributed(args) -> int:
    """One rank of a run of several processes: rank 0 runs the command; the others follow it
    (replay.distributed) and report an error of their own in one line naming their rank."""
    from . import distributed

    world = distributed.World.from_environment()
    distributed.set_current(world)
    try:
        if world.leader:
            status = 1
            try:
                status = args.func(args)
            finally:
                distributed.dismiss(world, status)
            return status
        args.no_progress = True
        try:
            return distributed.follow(world)
        except Exception as error:  # rank 0 reports the run's own errors; this is what this rank saw
            print(f"replay: rank {world.rank} of {world.size}: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
            # An error every rank meets (a refused input) is rank 0's to report: give it the time
            # to, so that a launcher sees rank 0's status first.
            import time

            time.sleep(3.0)
            return 1
    finally:
        distributed.set_current(None)
        world.close()


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    try:
        status = _dispatch(args, raw)
        sys.stdout.flush()  # here, where a reader that went away is caught (below), not at exit
        return status
    except KeyboardInterrupt:
        run = args.run if args.command == "resume" else getattr(args, "out", None)
        hint = f"; `replay resume {run}` continues the recording" if args.command in ("record", "resume", "fork", "forget") and run else ""
        print(f"replay: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`replay inspect RUN | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
        return 141
    except MemoryError as error:
        _error(f"out of memory{': ' + _one_line(error) if str(error) else ''}; a recording stays resumable "
               "(`replay resume RUN`) once memory is available")
        return 1
    except Exception as error:
        full = next((e for e in _chain(error) if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS), None)
        if full is not None:
            _error(f"the disk is full or a file too large ({_one_line(full)}); nothing recorded is lost: "
                   "free space, then `replay resume RUN` continues a recording")
            return 1
        frames, syntax = _user_frames(error)
        bad_input = isinstance(error, bad_input_types()) or (
            isinstance(error, OSError) and error.errno in _USER_PATH_ERRNOS)
        if bad_input and syntax is None and _raised_by_replay(error):  # e.g. NumericsUnavailable in ctx.optimizer.step()
            _error(_one_line(error))
            return 2
        if frames or syntax is not None:
            _report_user_error(error, frames, syntax)
            return 1
        if bad_input:
            _error(_one_line(error))
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
