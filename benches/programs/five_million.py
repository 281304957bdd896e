"""A ~5M-parameter MLP on synthetic data (fixed seed): the recording-overhead benchmark's model."""

import torch
import torch.nn.functional as F

import replay

generator = torch.Generator().manual_seed(0)
X = torch.randn(8192, 1024, generator=generator)
Y = torch.randint(0, 10, (8192,), generator=generator)


def model():
    return torch.nn.Sequential(
        torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10),
    )


program = replay.Program(model=model, dataset=(X, Y), loss=F.cross_entropy,
                         optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-3),
                         batch_size=128, steps=300, checkpoint_every=100,
                         description="5M-parameter MLP, synthetic data")
