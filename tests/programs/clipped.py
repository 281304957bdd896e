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


def _step_without_micro_hooks(ctx):  # accumulates, but never calls ctx.begin_micro_batch
    ctx.optimizer.zero_grad(set_to_none=True)
    for ids, (inputs, target) in ctx.micro_batches():
        (F.cross_entropy(ctx.model(inputs), target) * (len(ids) / len(ctx.ids))).backward()
    ctx.optimizer.step()


custom_accumulate_3 = replay.Program(model=model, dataset=(x_train, y_train), step=_step_without_micro_hooks,
                                     optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                     accumulate=3, batch_size=32, steps=20, checkpoint_every=10)
