"""An MLP trained for one epoch over 19,200 synthetic examples (600 steps of 32): the forget
benchmark's program. Under reshuffling every example is first seen in the first epoch, so ids
first seen at 10%, 50% and 90% of a run exist only in a run of about one epoch."""

import torch
import torch.nn.functional as F

import replay

generator = torch.Generator().manual_seed(0)
X = torch.randn(19200, 64, generator=generator)
Y = torch.randint(0, 10, (19200,), generator=generator)


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


program = replay.Program(model=model, dataset=(X, Y), loss=F.cross_entropy,
                         optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-3),
                         batch_size=32, steps=600, checkpoint_every=100,
                         description="MLP, one epoch of 19,200 synthetic examples")
