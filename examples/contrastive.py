"""A toy contrastive learner (MoCo-style) on scikit-learn's digits: a query encoder trained
with InfoNCE against an EMA teacher (the key encoder) and a queue of past keys with its
pointer, kept as an extra stateful component.

    replay record examples/contrastive.py:program --seed 1 --steps 200 --out runs/moco
    replay record examples/contrastive.py:program --steps 200 --out runs/moco2 --nproc 2
"""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()
DIM = 32
QUEUE = 256
TEMPERATURE = 0.2


class KeyQueue:
    """A FIFO of the last QUEUE keys and the position of the next write."""

    def __init__(self, size: int, dim: int):
        generator = torch.Generator().manual_seed(0)
        self.keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.pointer = 0

    def push(self, keys: torch.Tensor) -> None:
        n = keys.shape[0]
        index = (self.pointer + torch.arange(n)) % self.keys.shape[0]
        self.keys[index] = keys
        self.pointer = int((self.pointer + n) % self.keys.shape[0])

    def state_dict(self) -> dict:
        return {"keys": self.keys, "pointer": self.pointer}

    def load_state_dict(self, state: dict) -> None:
        self.keys = state["keys"].clone()
        self.pointer = int(state["pointer"])


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, DIM))


def view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    keep = (torch.rand(x.shape, generator=generator) > 0.2).to(x.dtype)
    return x * keep + 0.05 * torch.randn(x.shape, generator=generator)


def step(ctx: replay.StepContext):
    x, _ = ctx.batch
    g = ctx.generators["augment"]
    queries = F.normalize(ctx.model(view(x, g)), dim=1)
    with torch.no_grad():
        keys = F.normalize(ctx.ema.module(view(x, g)), dim=1)
    queue = ctx.components["queue"]
    positives = (queries * keys).sum(dim=1, keepdim=True)
    negatives = queries @ queue.keys.T
    logits = torch.cat([positives, negatives], dim=1) / TEMPERATURE
    # This rank's share of the batch's loss (all of it in one process: the factor is 1.0)
    loss = F.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long)) * (len(ctx.ids) / len(ctx.global_ids))
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.synchronize_ranks()  # several processes (--nproc N): the ranks' gradients summed; nothing in one
    ctx.optimizer.step()
    ctx.ema.update()
    queue.push(ctx.gather_ranks(keys))  # every rank's keys, in rank order: one queue on every rank
    return {"loss": loss}


program = replay.Program(
    model=model,
    dataset=(x_train, y_train),
    step=step,
    optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4),
    ema_decay=0.99,
    components=lambda m: {"queue": KeyQueue(QUEUE, DIM)},
    batch_size=64,
    steps=200,
    checkpoint_every=50,
    description="toy MoCo: InfoNCE, EMA key encoder, key queue",
)
