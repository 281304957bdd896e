"""Runs of several processes (torch.distributed). `replay record|resume|verify|fork --nproc N`
starts N processes on this machine (replay/launch.py); `--distributed` joins a world that torchrun or
another launcher started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; `World.from_environment`).

How a step runs in a world of N ranks (the engine's part is in engine.py):

* The global batch is the one-process plan (the order policy, then any data-order
  perturbation); rank r takes the r-th of N contiguous shards (sizes differing by at most one,
  the first ones larger: `shard_bounds`). Each example is built from its own seed, as in one
  process, so an example's bits do not depend on N or on its rank.
* Each rank draws its own random streams: rank 0 the one-process draws, rank r > 0 those of
  RngContract.seed(stream, step, rank=r) (dropout masks differ across ranks, as in DDP).
* Gradients: each rank's loss is weighted by its shard's share of the global batch; after the
  backward passes `StepContext.synchronize_ranks()` gathers every rank's gradients (one flat
  buffer per dtype, in parameter order) and sums them in rank order, on every rank, and takes
  rank 0's buffers (BatchNorm statistics). Every rank then holds the same bits, fixed by the
  parameter order and N alone. There is no DistributedDataParallel wrapper, so none of its
  hazards: no gradient buckets rebuilt after the first iteration (a resumed or forked run would
  start with another layout), no `bucket_cap_mb` that changes the bits, no reduction order
  chosen by the backend's algorithm.
* After every step each rank fingerprints its whole state; the fingerprints are gathered, the
  ledger row records every rank's digest, and a rank whose state differs from rank 0's is a
  divergence naming the rank and the tensors (a recording stops there with `RankDivergence`).

Rank 0 is the only process that touches the run directory and runs the command itself (record,
resume, verify, fork: the one-process code). The other ranks follow it (`follow`): before the
first step of each engine, and after its state was loaded, rank 0 sends them how to build the
engine (program reference and hash, overrides, RNG contract, order, perturbations) and its whole
state (safetensors bytes and a JSON skeleton: no pickle); then, before every step, the step. A
follower runs the same steps with the same collectives, and exits when rank 0 says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from .store import RunError

__all__ = ["DistributedError", "RankDivergence", "World", "current", "follow", "shard_bounds"]

ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# A collective that waits longer than this has lost a peer (rank 0 reading a large run may keep
# the others waiting for minutes, so it is generous).
TIMEOUT = timedelta(minutes=30)


class DistributedError(RunError):
    """A run of several processes that cannot go on: a missing launcher variable, a world size
    other than the recorded one, a step with fewer examples than ranks."""


class RankDivergence(RunError):
    """After a step, a rank's state differs from rank 0's (replicated state that disagrees)."""


def shard_bounds(examples: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s contiguous share of a batch of `examples` examples split
    over `size` ranks: sizes differ by at most one, the first ones larger."""
    base, extra = divmod(examples, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class World:
    """This process's place in a run of several processes, and the collectives replay uses."""

    rank: int
    size: int
    local_rank: int = 0
    # rank 0: the engine the followers hold a copy of (its token), and whether they are waiting
    # for a command (between steps) rather than inside a step's collectives
    mirrored: object = None
    followers_waiting: bool = True
    _nccl: object = field(default=None, repr=False)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "World":
        """This process's place in the world a launcher started (torchrun, or `--nproc`). The
        process group (gloo over TCP) is joined with the first collective, not here: rank 0
        builds its engine first, and a model factory that runs collectives of its own (one that
        returns DistributedDataParallel) then fails at once instead of waiting for ranks that
        wait for rank 0."""
        missing = [k for k in ENVIRONMENT if not os.environ.get(k)]
        if missing:
            raise DistributedError(
                f"--distributed joins a world a launcher started, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set (torchrun sets them); "
                "`--nproc N` starts N processes on this machine instead")
        try:
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError:
            raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if not 0 <= rank < size:
            raise DistributedError(f"RANK {rank} is not in [0, WORLD_SIZE {size})")
        if torch.cuda.is_available():  # "cuda" means this rank's own device
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return cls(rank=rank, size=size, local_rank=local_rank)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # ---------------------------------------------------------------- collectives ----

    def _dist(self):
        """torch.distributed, with this process in the world's group (joined on first use)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.size, timeout=TIMEOUT)
        return dist

    def _group_for(self, tensor: torch.Tensor):
        """The group a tensor's collectives use: gloo for CPU tensors; for CUDA tensors nccl (a
        group made once) when every rank of this node has a GPU of its own, else gloo, which
        stages them through the host (nccl refuses two ranks on one GPU).
        REPLAY_CUDA_COLLECTIVES=nccl|gloo chooses. The transport only copies: every sum is
        replay's own (sum_gradients), so the bits do not depend on it."""
        if tensor.device.type != "cuda":
            return None
        choice = os.environ.get("REPLAY_CUDA_COLLECTIVES", "auto")
        if choice not in ("auto", "nccl", "gloo"):
            raise DistributedError(f"REPLAY_CUDA_COLLECTIVES={choice!r}: use nccl, gloo or auto")
        if choice == "auto":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.size))
            choice = "nccl" if torch.cuda.device_count() >= local else "gloo"
        if choice == "gloo":
            return None
        if self._nccl is None:
            dist = self._dist()

            self._nccl = dist.new_group(backend="nccl")
        return self._nccl

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's bytes, on every rank (others pass None)."""
        length = torch.tensor([len(data) if self.leader else 0], dtype=torch.int64)
        self._dist().broadcast(length, 0)
        return self._broadcast_payload(data, int(length.item()))

    def _broadcast_payload(self, data: bytes | None, length: int) -> bytes:
        """Rank 0's `length` bytes `data` on every rank, their length already known to all (none
        sent when it is 0)."""
        if not length:
            return b""
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.leader
                  else torch.empty(length, dtype=torch.uint8))
        self._dist().broadcast(buffer, 0)
        return data if self.leader else bytes(buffer.numpy())

    def broadcast_json(self, obj=None):
        text = json.dumps(obj, sort_keys=True, allow_nan=True).encode() if self.leader else None
        return json.loads(self.broadcast_bytes(text).decode())

    def broadcast_state(self, state=None):
        """Rank 0's nested state (a checkpoint's: tensors and plain values) on every rank, sent
        as a JSON skeleton and safetensors bytes."""
        from safetensors.torch import load, save

        from .device import host_copy
        from .store.encode import flatten_state, unflatten_state

        if self.leader:
            skeleton, tensors = flatten_state(host_copy(state))
            self.broadcast_json(skeleton)
            self.broadcast_bytes(save({k: t.contiguous() for k, t in tensors.items()}))
            return state
        skeleton = self.broadcast_json()
        return unflatten_state(skeleton, load(self.broadcast_bytes(None)))

    def all_gather_int64(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's int64 vector (the same length on every rank), as rows in rank order."""
        dist = self._dist()

        rows = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(rows, values)
        return torch.stack(rows)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 in rank order, on every rank (the
        ranks' row counts may differ; the other dimensions must agree)."""
        dist = self._dist()

        rows = self.all_gather_int64(torch.tensor([tensor.shape[0]], dtype=torch.int64))[:, 0].tolist()
        padded = torch.zeros((max(rows), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self._group_for(padded))
        return torch.cat([part[:n] for part, n in zip(parts, rows)])

    def sum_gradients(self, parameters) -> None:
        """Every rank's gradients summed in rank order (((g0 + g1) + g2) + ...), on every rank,
        in one all_gather per (device, dtype): the gradients of the parameters that require one,
        flat in parameter order (zeros for a missing one), then a flag per parameter, 1 where
        this rank has a gradient (exact in any float dtype). A parameter with a gradient on some
        rank counts as zeros where it has none; one with none on any rank stays None."""
        dist = self._dist()

        groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in parameters:
            if p.requires_grad:
                groups.setdefault((str(p.device), p.dtype), []).append(p)
        for members in groups.values():
            pieces = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                      for p in members]
            present = torch.tensor([p.grad is not None for p in members], dtype=members[0].dtype,
                                   device=members[0].device)
            flat = torch.cat(pieces + [present])
            parts = [torch.empty_like(flat) for _ in range(self.size)]
            dist.all_gather(parts, flat, group=self._group_for(flat))
            total = parts[0]
            for part in parts[1:]:
                total.add_(part)  # the flags too: their sum counts the ranks with a gradient
            counts = total[-len(members):].tolist()
            offset = 0
            for p, count in zip(members, counts):
                n = p.numel()
                if count:
                    if p.grad is None:
                        p.grad = torch.empty_like(p)
                    p.grad.copy_(total[offset:offset + n].view_as(p.grad))
                offset += n

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics, ...) in `module`, on every rank: one
        broadcast per (device, dtype), in the order of named_buffers."""
        dist = self._dist()

        groups: dict[tuple, list[torch.Tensor]] = {}
        for _, buffer in module.named_buffers():
            groups.setdefault((str(buffer.device), buffer.dtype), []).append(buffer)
        for members in groups.values():
            flat = torch.cat([b.detach().reshape(-1) for b in members])
            dist.broadcast(flat, 0, group=self._group_for(flat))
            if not self.leader:
                offset = 0
                for b in members:
                    b.data.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def barrier(self) -> None:
        """Every rank here before any goes on: at the end, so that no rank tears its connections
        down while another still reads the last command."""
        self._dist().barrier()

    # ------------------------------------------------------------------- commands ----

    def send_command(self, kind: str, step: int = 0, payload: bytes = b"") -> None:
        """Rank 0: one broadcast of (command, step, payload length), then the payload if any."""
        self._dist().broadcast(torch.tensor([_COMMANDS[kind], step, len(payload)], dtype=torch.int64), 0)
        self._broadcast_payload(payload, len(payload))

    def receive_command(self) -> tuple[str, int, bytes]:
        """Ranks > 0: the command rank 0 sent (its name, step and payload)."""
        header = torch.zeros(3, dtype=torch.int64)
        self._dist().broadcast(header, 0)
        code, step, length = header.tolist()
        payload = self._broadcast_payload(None, length)
        kinds = {v: k for k, v in _COMMANDS.items()}
        if code not in kinds:
            raise DistributedError(f"rank {self.rank}: unknown command {code} from rank 0")
        return kinds[code], step, payload


_COMMANDS = {"step": 1, "engine": 2, "exit": 3}


_current: World | None = None


def current() -> World | None:
    """The world this process belongs to (a `--distributed` command), or None."""
    return _current


def set_current(world: World | None) -> None:
    global _current
    _current = world


# ------------------------------------------------------------ after every step ----

_U64 = 1 << 64


def _signed(value: int) -> int:
    return value - _U64 if value >= 1 << 63 else value


def gather_step(world: World, fps: dict[str, dict[str, int]], digest: int, loss: float | None):
    """Every rank's fingerprints after a step, compared on every rank: (the global batch's loss:
    the ranks' weighted shares summed in rank order, every rank's digest, per rank whose state
    differs from rank 0's the differing tensors by component). One all_gather of each rank's
    digest and loss; only when a digest differs, a second of every tensor's fingerprint, to
    name them."""
    import struct

    from .engine import _json_hash

    names = sorted((c, n) for c, entries in fps.items() for n in entries)
    loss_bits = 0 if loss is None else struct.unpack("<q", struct.pack("<d", loss))[0]
    header = torch.tensor([_signed(digest), len(names), _signed(_json_hash(names)), int(loss is not None), loss_bits],
                          dtype=torch.int64)
    headers = world.all_gather_int64(header)
    rank_digests = [v % _U64 for v in headers[:, 0].tolist()]
    losses = [struct.unpack("<d", struct.pack("<q", b))[0] if has else None
              for has, b in zip(headers[:, 3].tolist(), headers[:, 4].tolist())]
    total = None
    if all(v is not None for v in losses):
        total = losses[0]
        for v in losses[1:]:
            total += v
    differences: dict[int, dict[str, list[str]]] = {}
    if len(set(rank_digests)) == 1:
        return total, rank_digests, differences
    length = int(headers[:, 1].max())
    values = torch.zeros(length, dtype=torch.int64)
    values[:len(names)] = torch.tensor([_signed(fps[c][n]) for c, n in names], dtype=torch.int64)
    rows = world.all_gather_int64(values)
    for r in range(1, world.size):
        if headers[r, 0] == headers[0, 0]:
            continue
        if headers[r, 1] != headers[0, 1] or headers[r, 2] != headers[0, 2]:
            differences[r] = {"_structure": ["the ranks hold different sets of state tensors"]}
            continue
        for i in (rows[r, :len(names)] != rows[0, :len(names)]).nonzero().flatten().tolist():
            component, name = names[i]
            differences.setdefault(r, {}).setdefault(component, []).append(name)
        if r not in differences:  # equal fingerprints, another digest: cannot be, but never silent
            differences[r] = {"_digest": ["the digest differs from rank 0's"]}
    return total, rank_digests, differences


# -------------------------------------------------------------------- rank 0's side ----


def engine_description(engine) -> dict:
    """What a follower needs to build a copy of rank 0's engine (before its state arrives)."""
    program = engine.program
    source = getattr(program, "source", None)
    if source is None:
        raise DistributedError("a run of several processes needs a program loaded from a reference "
                               "(module:attribute or file.py:attribute), which every rank loads")
    return {
        "reference": source.reference,
        "sha256": source.sha256,
        "overrides": {"seed": program.seed, "steps": program.steps, "checkpoint_every": program.checkpoint_every,
                      "checkpoint_log_spaced": program.checkpoint_log_spaced, "device": program.device},
        "rng": engine.base_contract.to_json(),
        "order": engine.policy.to_json(),
        "perturbations": [p.to_json() for p in engine.perturbations],
    }


def lead_step(world: World, engine) -> None:
    """Rank 0, before each step: bring the followers' engine in line with this one (a new
    engine, or state loaded since), then tell them to run the step."""
    if world.mirrored is not engine.token or engine.state_loaded:
        world.send_command("engine", payload=json.dumps(engine_description(engine), sort_keys=True).encode())
        world.broadcast_state(engine.state_dict())
        world.mirrored, engine.state_loaded = engine.token, False
    world.send_command("step", engine.completed)
    world.followers_waiting = False


def dismiss(world: World, code: int) -> None:
    """Rank 0, at the end of the command (`code`: its exit status): tell the followers to exit. Followers
    inside a step's collectives (rank 0 failed mid-step) cannot hear it; their launcher stops
    them (`launch` does; torchrun stops the other ranks when one fails)."""
    if world.followers_waiting:
        world.send_command("exit", code)
        world.barrier()


# ------------------------------------------------------------------ the followers ----


def follow(world: World) -> int:
    """Ranks > 0: run what rank 0 says until it says exit; then return 0."""
    from .engine import Engine
    from .perturb import from_spec
    from .program import load_program
    from .rng import RngContract

    engine = None
    try:
        while True:
            what, step, payload = world.receive_command()
            if what == "exit":  # rank 0's status is the command's; this rank did its part
                world.barrier()
                return 0
            if what == "engine":
                spec = json.loads(payload.decode())
                if engine is not None:
                    engine.close()
                program, _ = load_program(spec["reference"], expected_sha256=spec["sha256"])
                program = program.with_overrides(**spec["overrides"])
                engine = Engine(program, RngContract.from_json(spec["rng"]), spec["order"],
                                [from_spec(p) for p in spec["perturbations"]])
                engine.load_state_dict(world.broadcast_state())
            else:  # a step
                if engine is None or engine.completed != step:
                    raise DistributedError(f"rank {world.rank}: told to run step {step} "
                                           f"with engine at {None if engine is None else engine.completed}")
                engine.run_step()
    finally:
        if engine is not None:
            engine.close()
