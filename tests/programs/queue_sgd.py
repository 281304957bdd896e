"""A small SGD-with-momentum program with an extra stateful component (a running queue of
batch means) for the fork tests; no BatchNorm, no EMA."""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


class Queue:
    def __init__(self):
        self.items = torch.zeros(8, 64)
        self.pointer = 0

    def state_dict(self):
        return {"items": self.items, "pointer": self.pointer}

    def load_state_dict(self, state):
        self.items = state["items"].clone()
        self.pointer = int(state["pointer"])


def step(ctx):
    x, y = ctx.batch
    queue = ctx.components["queue"]
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ctx.model(x + 0.1 * queue.items.mean(0)), y)
    loss.backward()
    ctx.optimizer.step()
    queue.items[queue.pointer] = x.mean(0)
    queue.pointer = (queue.pointer + 1) % queue.items.shape[0]
    return {"loss": loss}


program = replay.Program(
    model=lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)),
    dataset=(x_train, y_train), step=step,
    optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    components=lambda m: {"queue": Queue()}, batch_size=32, steps=30, checkpoint_every=10,
)
