"""A tiny program for the record/replay tests: an MLP with BatchNorm, dropout, an EMA teacher,
a LR scheduler and an augmentation stream, on scikit-learn's digits. Steps are ~1 ms."""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()
LR = 5e-3


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Dropout(0.1), torch.nn.Linear(32, 10))


def step(ctx):
    x, y = ctx.batch
    x = x + 0.01 * torch.randn(x.shape, generator=ctx.generators["augment"])
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ctx.model(x), y)
    loss.backward()
    ctx.optimizer.step()
    ctx.ema.update()
    return {"loss": loss, "accuracy": (ctx.model(x).argmax(1) == y).float().mean()}


program = replay.Program(
    model=model,
    dataset=(x_train, y_train),
    step=step,
    optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=LR),
    scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
    ema_decay=0.9,
    batch_size=32,
    steps=30,
    checkpoint_every=10,
)
