"""A program one of whose ops changes under an environment variable: the module `head.scale`
multiplies by 1.0, or by 1.001 when REPLAY_TEST_NUDGE is set. Recorded without the variable and
replayed with it, verify diverges and trace-diff names that op and module."""

import os

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


class Scale(torch.nn.Module):
    def forward(self, x):
        factor = 1.001 if os.environ.get("REPLAY_TEST_NUDGE") else 1.0
        return torch.mul(x, factor)


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 10)
        self.scale = Scale()

    def forward(self, x):
        return self.scale(self.linear(x))


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), Head())


program = replay.Program(model=model, dataset=(x_train, y_train), loss=F.cross_entropy,
                         optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-3),
                         batch_size=32, steps=6, checkpoint_every=3)
