"""An MLP (64 -> 512 -> 512 -> 10, about 300,000 parameters) on 20,480 synthetic examples,
batches of 256, AdamW: the program of benches/test_bench_ddp.py, recorded by one process and by
two (each with half of every batch)."""

import torch
import torch.nn.functional as F

import replay

generator = torch.Generator().manual_seed(0)
X = torch.randn(20480, 64, generator=generator)
Y = torch.randint(0, 10, (20480,), generator=generator)


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 10))


program = replay.Program(model=model, dataset=(X, Y), loss=F.cross_entropy,
                         optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-3),
                         batch_size=256, steps=300, checkpoint_every=100,
                         description="MLP 64-512-512-10, batches of 256 synthetic examples")
