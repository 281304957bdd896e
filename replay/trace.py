"""Per-op traces of one training step, their diffs, and a nondeterminism finder.

`replay verify` names the first step and the tensors where a replay parts from its recording;
a trace names the operator. `trace_step(run, T)` replays the run to step T from the nearest
checkpoint, then runs step T under `OpTracer`, a TorchDispatchMode that records, for every aten
op (and every custom op: replay's own optimizer and EMA kernels appear as `replay.*`) of the
forward pass, the backward pass, the optimizer and the rest of the step function:

    i, phase (forward | backward | optimizer | step), op, module path and type, source line,
    inputs and outputs as [dtype, shape, fingerprint], and `external`: the positions of the
    inputs no traced op produced (the state before the step, the batch, tensors made in Python)

The phase and module come from global module and optimizer hooks; a backward op gets the module
whose forward created its autograd node (marked in the node's metadata when the module's forward
returns; ops outside any module, such as the loss, have none) and no source line. Outputs of ops
that return uninitialized memory (empty, empty_like, ...) are described without a fingerprint,
and so is such a tensor when an op reads it before anything wrote it (bernoulli_ filling it). A tensor an op writes in place counts as an output, hashed
after the op; inputs are hashed before it. Fingerprints use replay's fingerprint kernel (16 hex
digits; null for a tensor it cannot hash: sparse, quantized).

A trace file is JSON lines: a header (format, run, step, the environment fingerprint, threads,
whether the traced step reproduced the ledger), one line per op, and a footer with the count.
It is streamed to a temporary file and renamed into place when complete, so memory stays bounded
by one op and a crash leaves no partial trace.

`diff_traces(a, b)` aligns two traces (difflib over (phase, op, module); where the sequences
themselves differ it says so and aligns past it) and names the origin: the first aligned op whose
inputs agree and whose outputs differ, or whose only differing inputs no traced op produced, with
its module and source line, plus how many later ops differ. `nondeterministic_ops(traces)` lists
every such op across repeated runs of the same step (or runs under different thread counts).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .store import RunDir, RunError

__all__ = [
    "OpTracer", "TraceDiff", "TraceError", "diff_traces", "nondeterministic_ops", "read_trace", "trace_step",
    "TRACE_FORMAT", "TRACE_VERSION",
]

TRACE_FORMAT = "replay.trace"
TRACE_VERSION = 1
MAX_LINE = 1 << 20  # one op's line; a longer one is not a trace this module wrote
MAX_OPS = 10_000_000


class TraceError(RunError):
    """A trace that cannot be made or read (a damaged file, a step outside the run)."""


# ------------------------------------------------------------------------ recording ----


def _user_source(frame) -> str | None:
    """file:line of the innermost frame outside replay, torch and the standard library."""
    while frame is not None:
        filename = frame.f_code.co_filename
        user = _USER_FILES.get(filename)
        if user is None:
            from .cli import _is_user_file, _library_roots

            user = _USER_FILES[filename] = _is_user_file(filename, _library_roots())
        if user:
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


_USER_FILES: dict[str, bool] = {}


def _tensors(obj, found: list | None = None) -> list[torch.Tensor]:
    """The tensors in an op's arguments or results (tensors, lists and tuples of them, dicts),
    in order: torch's tree_flatten cost more than the op it described."""
    found = [] if found is None else found
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, (torch.Tensor, list, tuple, dict)):
                _tensors(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, found)
    return found


# Ops whose outputs are uninitialized memory (filled by the next op): their bits are whatever
# the allocator returned, so they are described without a fingerprint.
_UNINITIALIZED = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                  "aten::new_empty_strided", "aten::empty_permuted"}


def _describe(tensors: list[torch.Tensor], hash_values: bool = True, skip=lambda t: False) -> list[list]:
    from .fingerprinting import fingerprints

    hashable = []
    for t in tensors:
        ok = hash_values and t.layout == torch.strided and not t.is_quantized and t.device.type != "meta" and not skip(t)
        hashable.append(ok)
    fps = iter(fingerprints([t for t, ok in zip(tensors, hashable) if ok]))
    return [[str(t.dtype).removeprefix("torch."), list(t.shape), f"{next(fps):016x}" if ok else None]
            for t, ok in zip(tensors, hashable)]


class OpTracer(TorchDispatchMode):
    """Records every op dispatched while active; `sink(record)` receives each op's dict.

    `module_names` maps id(module) to its path in the model (e.g. "encoder.0"); a module not in
    it is named by its type."""

    def __init__(self, sink, module_names: dict[int, str] | None = None):
        super().__init__()
        self.sink = sink
        self.module_names = module_names or {}
        self.count = 0
        self._modules: list[tuple[str, str]] = []
        self._optimizer_depth = 0
        self._handles = []
        # Storages by address, held until the tracer exits (so that an address is never reused
        # while it is looked up; a traced step's intermediate tensors live until its end): those
        # an empty-like op returned and no op has written yet (their bits are not data, so an op
        # reading one is not hashed on that input), and those a traced op returned or wrote (an
        # input not among them came from outside the traced ops: the state before the step, the
        # batch, or data made in Python: torch.from_numpy, torch.tensor of a list). Python
        # tensor objects cannot stand in for them: autograd keeps a tensor alive without its
        # Python object.
        self._uninitialized: dict[int, torch.UntypedStorage] = {}
        self._produced: dict[int, torch.UntypedStorage] = {}

    def _was_produced(self, t: torch.Tensor) -> bool:
        if t.layout != torch.strided or t.device.type == "meta":
            return True
        return t.untyped_storage().data_ptr() in self._produced

    def _is_uninitialized(self, t: torch.Tensor) -> bool:
        if not self._uninitialized or t.layout != torch.strided or t.device.type == "meta":
            return False
        return t.untyped_storage().data_ptr() in self._uninitialized

    # -- hooks that tell the phase and the module --

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(module, args):
            self._modules.append((self.module_names.get(id(module), ""), type(module).__name__))

        def post(module, args, output):
            if self._modules:
                path, kind = self._modules.pop()
                self._tag_backward(output, path, kind)

        def step_pre(optimizer, args, kwargs):
            self._optimizer_depth += 1

        def step_post(optimizer, args, kwargs):
            self._optimizer_depth -= 1

        self._handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post),
                         register_optimizer_step_pre_hook(step_pre), register_optimizer_step_post_hook(step_post)]
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self._uninitialized.clear()
            self._produced.clear()

    @staticmethod
    def _tag_backward(output, path: str, kind: str) -> None:
        """Mark the autograd nodes this module's forward created (those reachable from its
        outputs and not yet marked: inner modules finish first and mark theirs) with the
        module, so that their backward ops are attributed to it."""
        stack = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        seen = set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen or not hasattr(node, "metadata"):
                continue
            seen.add(id(node))
            metadata = node.metadata
            if "replay_trace" in metadata or type(node).__name__ == "AccumulateGrad":
                continue
            metadata["replay_trace"] = (path, kind, None)
            stack.extend(next_node for next_node, _ in node.next_functions)

    def _where(self) -> tuple[str, str, str, str | None]:
        """(phase, module path, module type, source) of the op being dispatched."""
        node = torch._C._current_autograd_node()
        if node is not None:
            meta = node.metadata.get("replay_trace") if hasattr(node, "metadata") else None
            module, kind, source = meta if meta else ("", "", None)
            return "backward", module, kind, source
        module, kind = self._modules[-1] if self._modules else ("", "")
        phase = "optimizer" if self._optimizer_depth else ("forward" if self._modules else "step")
        return phase, module, kind, _user_source(sys._getframe(2))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        name = schema.name if schema is not None else str(func)
        if name.startswith("profiler::"):  # record_function markers: no data
            return func(*args, **kwargs)
        phase, module, kind, source = self._where()
        flat = _tensors(args, _tensors(kwargs)) if kwargs else _tensors(args)
        inputs = _describe(flat, skip=self._is_uninitialized)
        external = [k for k, t in enumerate(flat) if not self._was_produced(t)]
        out = func(*args, **kwargs)
        results = _tensors(out)
        written = []
        if schema is not None:
            for k, argument in enumerate(schema.arguments):
                value = args[k] if k < len(args) else kwargs.get(argument.name)
                if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, torch.Tensor):
                    if not any(value is r for r in results):
                        written.append(value)
        fresh = name in _UNINITIALIZED
        for t in results if fresh else written:  # (a view of an unwritten tensor stays unwritten)
            if t.layout == torch.strided and t.device.type != "meta":
                storage = t.untyped_storage()
                if fresh:
                    self._uninitialized[storage.data_ptr()] = storage
                else:
                    self._uninitialized.pop(storage.data_ptr(), None)
        for t in results + written:
            if t.layout == torch.strided and t.device.type != "meta":
                storage = t.untyped_storage()
                self._produced[storage.data_ptr()] = storage
        self.sink({"i": self.count, "phase": phase, "op": str(func), "module": module, "module_type": kind,
                   "source": source, "inputs": inputs, "outputs": _describe(results + written, not fresh),
                   "external": external})
        self.count += 1
        return out


def _header(run: str | os.PathLike, run_id: str, step: int, variant: str | None, device_kind: str) -> dict:
    """A trace file's first line: what was traced, and where (threads, environment)."""
    from . import environment as env_module

    return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "run": str(run), "run_id": run_id, "step": step,
            **({"variant": variant} if variant is not None else {}), "threads": torch.get_num_threads(),
            "environment": env_module.environment(device_kind)}


class _TraceWriter:
    """Streams a trace to a temporary file beside `path`; `commit()` renames it into place."""

    def __init__(self, path: str | os.PathLike, header: dict):
        from .store.atomic import temp_name

        self.path = Path(path)
        self.tmp = self.path.parent / temp_name(self.path.name)
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.count = 0
        self._line(header)

    def _line(self, obj) -> None:
        self.file.write(json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n")

    def __call__(self, record: dict) -> None:
        self._line(record)
        self.count += 1

    def commit(self, footer: dict) -> None:
        from .store.atomic import fsync_dir

        self._line({"end": True, "ops": self.count, **footer})
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def module_names(engine) -> dict[int, str]:
    """id(module) -> its path, for the model and every module among the extra components."""
    names = {id(m): name or "(model)" for name, m in engine.model.named_modules()}
    for component, value in (engine.components or {}).items():
        if isinstance(value, torch.nn.Module):
            for name, m in value.named_modules():
                names.setdefault(id(m), f"{component}.{name}" if name else component)
    if engine.ema is not None and isinstance(getattr(engine.ema, "model", None), torch.nn.Module):
        for name, m in engine.ema.model.named_modules():
            names.setdefault(id(m), f"ema.{name}" if name else "ema")
    return names


@contextmanager
def tracing_engine(engine, sink):
    """Run the engine's next steps with their step function under an OpTracer feeding `sink`."""
    tracer = OpTracer(sink, module_names(engine))
    previous = engine.step_context
    engine.step_context = lambda step: tracer
    try:
        yield tracer
    finally:
        engine.step_context = previous


# ------------------------------------------------------------------------ the step ----


@dataclass
class TraceResult:
    """What `trace_step` did: the trace file, the step, how many ops, whether the traced step
    reproduced the ledger (None when the ledger has no row for it), the first divergence while
    replaying to it, and, for --repeat / --threads, the ops whose outputs differ between runs."""

    path: Path | None
    step: int
    ops: int
    matches_ledger: bool | None
    diverged_before: int | None
    variants: list[str] = field(default_factory=list)
    nondeterministic: list[dict] = field(default_factory=list)
    structure: list[str] = field(default_factory=list)


def _engine_at(run: RunDir, program, step: int, progress: bool):
    """An engine whose next step is `step`, and the first step before it that diverged from the
    ledger on the way (None)."""
    from .driver import compare_record, engine_for_run, progress_bar, restore

    engine = engine_for_run(run, program)
    restored = run.latest_checkpoint_at_or_before(step)
    if restored is None:
        if run.manifest.get("lineage") or run.manifest.get("first_step", 0) != 0:
            raise TraceError(f"{run.path}: no checkpoint at or before step {step}")
    else:
        restore(run, engine, restored)
    rows = {r.step: r for r in run.ledger.rows(engine.completed, step - 1)} if step > engine.completed else {}
    diverged = None
    bar = progress_bar(step - engine.completed, "replay", progress)
    try:
        while engine.completed < step:
            record = engine.run_step()
            if diverged is None and record.step in rows and compare_record(rows[record.step], record) is not None:
                diverged = record.step
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return engine, diverged


def trace_step(run_dir: str | os.PathLike, step: int, out: str | os.PathLike | None, *, repeat: int = 1,
               threads: list[int] | None = None, progress: bool = True, allow_source_change: bool = False,
               allow_environment_change: bool = False, allow_device_change: bool = False,
               device: str | None = None) -> TraceResult:
    """Replay `run_dir` to `step` and trace that step into `out` (JSON lines; None: not
    written). With repeat > 1 the step runs that many times from the same state, with `threads`
    once per thread count; the result then lists the ops whose outputs differ between runs
    although their inputs agree. The first run is the one written."""
    from .driver import compare_record, load_run_program

    if repeat < 1:
        raise ValueError(f"--repeat {repeat}: must be at least 1")
    if threads is not None and (not threads or any(n < 1 for n in threads)):
        raise ValueError(f"--threads {threads}: thread counts must be positive")
    writable = allow_source_change or allow_environment_change or allow_device_change
    with RunDir.open(run_dir, writable=writable) as run:
        first, last = run.manifest.get("first_step", 0), run.ledger.last_step()
        if last is None or not first <= step <= last:
            recorded = "no steps" if last is None else f"steps {first}..{last}"
            raise TraceError(f"cannot trace step {step} of {run_dir}: it recorded {recorded}")
        program, _ = load_run_program(run, allow_source_change, allow_environment_change, "trace",
                                      allow_device_change=allow_device_change, device=device)
        engine, diverged = _engine_at(run, program, step, progress)
        row = run.ledger.step_row(step)
        run_id = run.manifest["run_id"]
    variants = ([f"threads={n}" for n in threads] if threads else [f"repeat {k + 1}" for k in range(repeat)])
    state = copy.deepcopy(engine.state_dict()) if len(variants) > 1 else None
    original_threads = torch.get_num_threads()
    traces: list[list[dict]] = []
    matches = None
    for k, variant in enumerate(variants):
        if k > 0:
            engine.load_state_dict(copy.deepcopy(state))
        if threads:
            torch.set_num_threads(threads[k])
        header = _header(run_dir, run_id, step, variant if len(variants) > 1 else None, engine.device.type)
        ops: list[dict] = []
        writer = _TraceWriter(out, header) if (out is not None and k == 0) else None

        def sink(record, ops=ops, writer=writer):
            if len(variants) > 1:
                ops.append(record)
            if writer is not None:
                writer(record)

        try:
            with tracing_engine(engine, sink) as tracer:
                record = engine.run_step()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            torch.set_num_threads(original_threads)
        same = None if row is None else compare_record(row, record) is None
        if k == 0:
            matches = same
            count = tracer.count
            if writer is not None:
                writer.commit({"matches_ledger": same, "diverged_before": diverged})
        traces.append(ops)
    result = TraceResult(Path(out) if out is not None else None, step, count, matches, diverged, variants)
    if len(traces) > 1:
        diffs = [diff_traces(traces[0], other) for other in traces[1:]]
        result.nondeterministic = _origins_across(diffs)
        result.structure = [s for d in diffs for s in d.structure]
    return result


# ------------------------------------------------------------------------ reading ----


def _check_values(values, where: str) -> None:
    if not isinstance(values, list):
        raise ValueError(f"{where}: not a list")
    for v in values:
        if not (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and isinstance(v[1], list)
                and all(type(n) is int for n in v[1]) and (v[2] is None or (isinstance(v[2], str) and len(v[2]) == 16))):
            raise ValueError(f"{where}: not [dtype, shape, fingerprint]")


def read_trace(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(header, ops) of a trace file. TraceError naming the file and line when it is not a
    complete trace this module wrote."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise TraceError(f"{path}: not a trace file")
    ops: list[dict] = []
    header = footer = None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}, line {number}"
            if footer is not None:
                raise TraceError(f"{where}: data after the end of the trace")
            if len(raw) > MAX_LINE:
                raise TraceError(f"{where}: a line longer than {MAX_LINE} bytes")
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                raise TraceError(f"{where}: not JSON ({str(error)[:100]})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{where}: not a JSON object")
            if header is None:
                if obj.get("format") != TRACE_FORMAT:
                    raise TraceError(f"{path}: not a replay trace (no trace header)")
                if obj.get("version") != TRACE_VERSION:
                    raise TraceError(f"{path}: trace version {obj.get('version')!r}; this replay reads {TRACE_VERSION}")
                header = obj
                continue
            if obj.get("end") is True:
                footer = obj
                continue
            try:
                if obj.get("i") != len(ops) or not isinstance(obj.get("op"), str) or \
                        obj.get("phase") not in ("forward", "backward", "optimizer", "step"):
                    raise ValueError("not an op record in sequence")
                if not isinstance(obj.get("module"), str) or not (obj.get("source") is None or isinstance(obj["source"], str)):
                    raise ValueError("bad module or source")
                _check_values(obj.get("inputs"), "inputs")
                _check_values(obj.get("outputs"), "outputs")
                external = obj.get("external")
                if not isinstance(external, list) or not all(type(k) is int and 0 <= k < len(obj["inputs"])
                                                             for k in external):
                    raise ValueError("external: not a list of input positions")
            except ValueError as error:
                raise TraceError(f"{where}: {error}") from None
            ops.append(obj)
            if len(ops) > MAX_OPS:
                raise TraceError(f"{path}: more than {MAX_OPS} ops")
    if header is None:
        raise TraceError(f"{path}: empty, not a trace")
    if footer is None or footer.get("ops") != len(ops):
        raise TraceError(f"{path}: incomplete trace (no end record, or a count that disagrees)")
    header["matches_ledger"] = footer.get("matches_ledger")
    header["diverged_before"] = footer.get("diverged_before")
    return header, ops


# ------------------------------------------------------------------------ diffing ----


def _key(op: dict) -> tuple:
    return op["phase"], op["op"], op["module"]


def _fps(values) -> list:
    return [v[2] for v in values]


def _meta(values) -> list:
    return [(v[0], tuple(v[1])) for v in values]


def _where(op: dict) -> str:
    module = f" in {op['module']} ({op['module_type']})" if op.get("module") else ""
    source = f" at {op['source']}" if op.get("source") else ""
    return f"#{op['i']} {op['op']} [{op['phase']}]{module}{source}"


@dataclass
class TraceDiff:
    """How two traces of a step differ. An origin is an aligned op whose outputs differ while
    its inputs agree (cause "op"), or whose only differing inputs came from outside the traced
    ops (cause "input": the state before the step, the batch, or data made in Python)."""

    ops_a: int
    ops_b: int
    aligned: int
    origin: tuple[dict, dict, str] | None = None
    first_difference: tuple[dict, dict] | None = None
    downstream: int = 0
    differing: int = 0
    structure: list[str] = field(default_factory=list)
    origins: list[tuple[dict, str]] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not self.structure and self.differing == 0 and self.ops_a == self.ops_b

    def describe(self) -> str:
        lines = []
        if self.environment:
            shown = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in sorted(self.environment.items()))
            lines.append(f"environments differ: {shown}")
        if self.identical:
            lines.append(f"identical: {self.ops_a} ops, every input and output fingerprint equal")
            return "\n".join(lines)
        if self.structure:
            lines.append(f"the op sequences differ in {len(self.structure)} place(s) (aligned past them):")
            lines += [f"  {s}" for s in self.structure[:10]]
            if len(self.structure) > 10:
                lines.append(f"  ... {len(self.structure) - 10} more")
        if self.origin is not None:
            a, b, cause = self.origin
            lines.append(f"origin: {_where(a)}")
            if cause == "op":
                n = len(a["inputs"])
                lines.append(f"  inputs agree ({n} tensor{'s' if n != 1 else ''}); outputs differ: "
                             + ", ".join(f"{x} vs {y}" for x, y in zip(_fps(a["outputs"]), _fps(b["outputs"])) if x != y))
            else:
                differing = [k for k in range(len(a["inputs"])) if a["inputs"][k] != b["inputs"][k]]
                lines.append(f"  input{'s' if len(differing) != 1 else ''} {', '.join(map(str, differing))} differ and "
                             "no traced op produced them: the state before the step or the batch differs, or the "
                             "tensor was made outside torch's ops (torch.from_numpy, torch.tensor of Python data: "
                             "os.urandom, random, numpy.random)")
            if b.get("source") != a.get("source") or b["i"] != a["i"]:
                lines.append(f"  (in B: {_where(b)})")
            lines.append(f"downstream: {self.downstream} later op(s) of {self.aligned} aligned have different outputs")
        elif self.first_difference is not None:
            a, _ = self.first_difference
            lines.append(f"no op with equal inputs has different outputs: the inputs already differ at the first "
                         f"differing op, {_where(a)}, the difference coming from an op the sequences do not share")
        elif self.differing == 0:
            lines.append("every aligned op has equal inputs and outputs")
        return "\n".join(lines)


def diff_traces(a: list[dict], b: list[dict], header_a: dict | None = None, header_b: dict | None = None) -> TraceDiff:
    """Align two traces' ops and find where they part (see the module docstring)."""
    matcher = difflib.SequenceMatcher(None, [_key(op) for op in a], [_key(op) for op in b], autojunk=False)
    result = TraceDiff(len(a), len(b), 0)
    if header_a is not None and header_b is not None:
        from .environment import differences

        result.environment = differences(header_a.get("environment") or {}, header_b.get("environment") or {})
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for x, y in zip(a[i1:i2], b[j1:j2]):
                result.aligned += 1
                if len(x["inputs"]) != len(y["inputs"]):
                    differing_inputs = list(range(max(len(x["inputs"]), len(y["inputs"]))))
                else:
                    differing_inputs = [k for k, (u, v) in enumerate(zip(x["inputs"], y["inputs"])) if u != v]
                outputs_same = x["outputs"] == y["outputs"]
                if outputs_same and not differing_inputs:
                    continue
                result.differing += 1
                if result.first_difference is None:
                    result.first_difference = (x, y)
                external = set(x.get("external", ())) & set(y.get("external", ()))
                cause = ("op" if not differing_inputs and not outputs_same else
                         "input" if differing_inputs and all(k in external for k in differing_inputs) else None)
                if cause is not None:
                    result.origins.append((x, cause))
                    if result.origin is None:
                        result.origin = (x, y, cause)
                        continue
                if result.origin is not None and not outputs_same:
                    result.downstream += 1
            continue
        shown_a = ", ".join(f"{op['op']}" for op in a[i1:min(i2, i1 + 3)]) + (" ..." if i2 - i1 > 3 else "")
        shown_b = ", ".join(f"{op['op']}" for op in b[j1:min(j2, j1 + 3)]) + (" ..." if j2 - j1 > 3 else "")
        where = a[i1] if i1 < i2 else (b[j1] if j1 < j2 else None)
        module = f" in {where['module']}" if where is not None and where.get("module") else ""
        result.structure.append(f"A ops #{i1}..{i2 - 1} ({shown_a or 'none'}) vs B ops #{j1}..{j2 - 1} "
                                f"({shown_b or 'none'}){module}" if i2 > i1 and j2 > j1 else
                                (f"only in A: ops #{i1}..{i2 - 1} ({shown_a}){module}" if i2 > i1 else
                                 f"only in B: ops #{j1}..{j2 - 1} ({shown_b}){module}"))
    return result


def nondeterministic_ops(traces: list[list[dict]]) -> list[dict]:
    """The ops of the first trace whose outputs differ from another trace's while their inputs
    agree, or whose only differing inputs came from outside the traced ops (the same step run
    several times from the same state: such an input was made from Python-side randomness).
    Each op dict gets "cause": "op" or "input"."""
    return _origins_across([diff_traces(traces[0], other) for other in traces[1:]])


def _origins_across(diffs: list[TraceDiff]) -> list[dict]:
    """The origins of several diffs against one trace, once each, in op order, with their cause."""
    found: dict[int, dict] = {}
    for diff in diffs:
        for op, cause in diff.origins:
            found.setdefault(op["i"], {**op, "cause": cause})
    return [found[i] for i in sorted(found)]


def describe_nondeterminism(result: TraceResult) -> str:
    what = "thread counts" if result.variants and result.variants[0].startswith("threads") else "repeats"
    if not result.nondeterministic and not result.structure:
        return (f"step {result.step}: {result.ops} ops, every output equal across {len(result.variants)} {what} "
                f"({', '.join(result.variants)})")
    lines = [f"step {result.step}: {len(result.nondeterministic)} op(s) whose outputs differ across {what} "
             f"({', '.join(result.variants)}) although their inputs agree (or differ only in a tensor made "
             "outside torch's ops):"]
    lines += [f"  {_where(op)}" + ("  [an input made outside torch's ops differs]" if op.get("cause") == "input" else "")
              for op in result.nondeterministic[:50]]
    if len(result.nondeterministic) > 50:
        lines.append(f"  ... {len(result.nondeterministic) - 50} more")
    if result.structure:
        lines.append(f"the op sequences themselves differ across {what}:")
        lines += [f"  {s}" for s in result.structure[:10]]
    return "\n".join(lines)


# ------------------------------------------------------------- traces inside a run ----

TRACES = "traces"
TRACE_EVENT = "trace"


def stored_trace_name(step: int) -> str:
    return f"step-{step:08d}.jsonl"


@contextmanager
def recording_traces(run: RunDir, engine, steps):
    """While recording: trace each step of `steps` into the run's traces/ folder (a reference
    for later diffs), recording each file's SHA-256 in a ledger event once it is complete."""
    from .store.atomic import sha256_file
    from .store.paths import no_link

    wanted = set(steps or ())
    if not wanted:
        yield
        return
    folder = Path(run.path) / TRACES
    no_link(str(folder))
    folder.mkdir(exist_ok=True)
    names = module_names(engine)
    done = set(stored_traces(run))

    @contextmanager
    def around(step):
        if step not in wanted or step in done:
            yield
            return
        header = _header(run.path, run.manifest["run_id"], step, "recording", engine.device.type)
        target = folder / stored_trace_name(step)
        no_link(str(target))
        writer = _TraceWriter(target, header)
        try:
            with OpTracer(writer, names):
                yield
        except BaseException:
            writer.abort()
            raise
        writer.commit({"matches_ledger": None, "diverged_before": None})
        run.ledger.add_event(TRACE_EVENT, {"step": step, "file": f"{TRACES}/{target.name}",
                                           "sha256": sha256_file(target), "ops": writer.count})

    previous = engine.step_context
    engine.step_context = around
    try:
        yield
    finally:
        engine.step_context = previous


def stored_traces(run: RunDir) -> dict[int, dict]:
    """step -> {"file", "sha256", "ops"} of the reference traces recorded inside a run."""
    found = {}
    for event in run.ledger.events():
        detail = event["detail"]
        if event["kind"] == TRACE_EVENT and isinstance(detail, dict) and type(detail.get("step")) is int:
            found[detail["step"]] = detail
    return found


def read_stored_trace(run: RunDir, step: int) -> tuple[dict, list[dict]]:
    """The reference trace of `step` recorded inside `run`, its hash checked first."""
    from .store.atomic import sha256_file

    from .store.errors import RunError as StoreError
    from .store.paths import inside

    detail = stored_traces(run).get(step)
    if detail is None:
        raise TraceError(f"{run.path}: no reference trace of step {step} was recorded")
    try:
        path = Path(inside(run.path, TRACES, stored_trace_name(step)))
    except StoreError as error:  # a link inside the run
        raise TraceError(str(error)) from None
    if not path.is_file():
        raise TraceError(f"{path}: the reference trace of step {step} is missing")
    if sha256_file(path) != detail.get("sha256"):
        raise TraceError(f"{path}: the reference trace of step {step} is damaged (its SHA-256 differs from the ledger's)")
    return read_trace(path)


def explain_divergence(run_dir: str | os.PathLike, step: int, *, progress: bool = False, **allow) -> str:
    """What to do about a divergence at `step`: with a reference trace of that step recorded in
    the run, trace the step here and diff the two (the origin op and its module); otherwise the
    `replay trace` command to run."""
    import tempfile

    with RunDir.open(run_dir) as run:
        has_reference = step in stored_traces(run)
    command = f"replay trace {run_dir} --step {step} --out trace-{step}.jsonl"
    if not has_reference:
        return (f"to name the operator: `{command}` here and on the machine that recorded the run, "
                f"then `replay trace-diff RECORDED.jsonl trace-{step}.jsonl`")
    try:
        with RunDir.open(run_dir) as run:
            header_a, ops_a = read_stored_trace(run, step)
    except TraceError as error:
        return f"step {step} has a reference trace, but it cannot be used: {error}; to trace it here: `{command}`"
    with tempfile.TemporaryDirectory(prefix="replay-trace-") as folder:
        here = Path(folder) / "here.jsonl"
        trace_step(run_dir, step, here, progress=progress, **allow)
        header_b, ops_b = read_trace(here)
    diff = diff_traces(ops_a, ops_b, header_a, header_b)
    return (f"step {step} has a reference trace from the recording; traced here and compared "
            f"(A = recorded, B = this machine):\n" + diff.describe())


def check_stored_traces(run: RunDir) -> list[str]:
    """Problems with the reference traces a run records (missing, a link, damaged), one line
    each: part of `verify --files`."""
    problems = []
    for step in sorted(stored_traces(run)):
        try:
            read_stored_trace(run, step)
        except RunError as error:
            problems.append(str(error))
    return problems
