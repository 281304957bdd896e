"""A program with a deliberately nondeterministic op: `replay_test::noisy`, a custom op that
adds noise drawn from os.urandom (no generator, no seed) inside an otherwise deterministic MLP.
`replay trace --repeat 2` must name it."""

import os

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()

if not hasattr(torch.ops.replay_test, "noisy"):  # the file may be executed more than once

    @torch.library.custom_op("replay_test::noisy", mutates_args=())
    def noisy(x: torch.Tensor) -> torch.Tensor:
        words = torch.frombuffer(bytearray(os.urandom(4 * x.numel())), dtype=torch.int32).reshape(x.shape)
        return x + 1e-6 * (words.to(torch.float32) / 2**31)

    @noisy.register_fake
    def _(x):
        return torch.empty_like(x)

    noisy.register_autograd(lambda ctx, grad: grad)


class Noisy(torch.nn.Module):
    def forward(self, x):
        return torch.ops.replay_test.noisy(x)


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), Noisy(), torch.nn.Linear(32, 10))


program = replay.Program(model=model, dataset=(x_train, y_train), loss=F.cross_entropy,
                         optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                         batch_size=32, steps=6, checkpoint_every=3)
