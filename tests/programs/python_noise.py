"""Nondeterminism from Python, not from an op: a module adds noise made with os.urandom and
torch.from_numpy (no torch op makes it, so it enters the trace as an input no traced op
produced). `replay trace --repeat 2` must name the op that first reads it."""

import os

import numpy as np
import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


class PythonNoise(torch.nn.Module):
    def forward(self, x):
        noise = np.frombuffer(os.urandom(4 * x.numel()), dtype=np.int32).reshape(tuple(x.shape)) / 2.0**31
        return x + 1e-6 * torch.from_numpy(noise.astype(np.float32))


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), PythonNoise(), torch.nn.Linear(32, 10))


program = replay.Program(model=model, dataset=(x_train, y_train), loss=F.cross_entropy,
                         optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05),
                         batch_size=32, steps=4, checkpoint_every=2)
