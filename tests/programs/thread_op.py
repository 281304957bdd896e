"""A program with an op whose result depends on the thread count: `replay_test::per_thread`
adds torch.get_num_threads() * 1e-6 (as a reduction split over threads would change its
rounding). `replay trace --threads 1,2` must name it; `--repeat 2` must not."""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()

if not hasattr(torch.ops.replay_test, "per_thread"):  # the file may be executed more than once

    @torch.library.custom_op("replay_test::per_thread", mutates_args=())
    def per_thread(x: torch.Tensor) -> torch.Tensor:
        return x + torch.get_num_threads() * 1e-6

    @per_thread.register_fake
    def _(x):
        return torch.empty_like(x)

    per_thread.register_autograd(lambda ctx, grad: grad)


class PerThread(torch.nn.Module):
    def forward(self, x):
        return torch.ops.replay_test.per_thread(x)


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), PerThread(), torch.nn.ReLU(), torch.nn.Linear(32, 10))


program = replay.Program(model=model, dataset=(x_train, y_train), loss=F.cross_entropy,
                         optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-3),
                         batch_size=32, steps=4, checkpoint_every=2)
