"""A program that keeps state outside its checkpoints (a Python counter): `replay check` must
catch it."""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()
calls = {"n": 0}


def step(ctx):
    x, y = ctx.batch
    calls["n"] += 1  # not in any state_dict: a restored or forked run starts it from 0
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ctx.model(x), y) * (1.0 + 0.01 * calls["n"])
    loss.backward()
    ctx.optimizer.step()
    return {"loss": loss}


program = replay.Program(model=lambda: torch.nn.Linear(64, 10), dataset=(x_train, y_train), step=step,
                         batch_size=32, steps=24, checkpoint_every=8)
