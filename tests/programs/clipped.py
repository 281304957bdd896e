"""The default step with gradient-norm clipping (Program.clip_grad_norm) and accumulation
(Program.accumulate) on scikit-learn's digits:
`clipped` clips to a norm the gradients often exceed, `unclipped` is the same program without it;
`accumulate_1` / `accumulate_3`: clipped, one batch of 32 as 1 or 3 micro-batches."""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _program(clip):
    return replay.Program(model=model, dataset=(x_train, y_train), loss=F.cross_entropy,
                          optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                          clip_grad_norm=clip, batch_size=32, steps=20, checkpoint_every=10)


clipped = _program(0.5)
unclipped = _program(None)


def _accumulating(k, batch_size=32):
    return replay.Program(model=model, dataset=(x_train, y_train), loss=F.cross_entropy,
                          optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                          accumulate=k, clip_grad_norm=0.5, batch_size=batch_size, steps=20, checkpoint_every=10)


accumulate_1 = _accumulating(1)
accumulate_3 = _accumulating(3)  # 32 examples: micro-batches of 11, 11 and 10
