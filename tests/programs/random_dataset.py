"""A map-style dataset whose __getitem__ draws from torch's, Python's and numpy's global
generators (as most augmentation pipelines do), and a collate function that draws too."""

import random

import numpy as np
import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


class NoisyDigits(torch.utils.data.Dataset):
    def __len__(self):
        return len(x_train)

    def __getitem__(self, i):
        noise = 0.1 * torch.rand(64) + 0.01 * random.random() + 0.01 * float(np.random.rand())
        return x_train[i] + noise, y_train[i]


def collate(examples):
    x = torch.stack([e[0] for e in examples])
    y = torch.stack([e[1] for e in examples])
    return x * (1 + 0.01 * torch.rand(1)), y  # a random batch-level scale


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 10))


program = replay.Program(model=model, dataset=NoisyDigits(), loss=F.cross_entropy, collate=collate,
                         batch_size=16, steps=24, checkpoint_every=8)

# The same program with its batches built in data-loader worker processes: the same bits.
program_workers1 = program.with_overrides(workers=1)
program_workers2 = program.with_overrides(workers=2)


def model_bn():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


# With BatchNorm: recompute_bn runs passes over the data, which must build it seeded too.
program_bn = replay.Program(model=model_bn, dataset=NoisyDigits(), loss=F.cross_entropy, collate=collate,
                            batch_size=16, steps=24, checkpoint_every=8)
