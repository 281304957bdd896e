"""Programs for runs of several processes (replay.distributed, tests/test_distributed.py).

`mlp`: an MLP with dropout on the digits, AdamW, an EMA (the default step). `bn`: a small net
with BatchNorm (buffers taken from rank 0) and SGD with momentum, 3 micro-batches a step.
`custom_unsynced`: a custom step that never calls ctx.synchronize_ranks(). `rank_drift`: a custom
step that nudges one gradient on rank 1 at step 3, after the ranks' sum (replicated state that disagrees)."""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


def mlp_model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(32, 10))


def bn_model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10))


mlp = replay.Program(model=mlp_model, dataset=(x_train, y_train), loss=F.cross_entropy,
                     optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-2), ema_decay=0.9,
                     batch_size=30, steps=12, checkpoint_every=4)

bn = replay.Program(model=bn_model, dataset=(x_train, y_train), loss=F.cross_entropy,
                    optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                    accumulate=3, batch_size=31, steps=12, checkpoint_every=4)


def _unsynced_step(ctx):
    ctx.optimizer.zero_grad(set_to_none=True)
    inputs, target = ctx.batch
    F.cross_entropy(ctx.model(inputs), target).backward()
    ctx.optimizer.step()


custom_unsynced = replay.Program(model=mlp_model, dataset=(x_train, y_train), step=_unsynced_step,
                                 batch_size=30, steps=6, checkpoint_every=3)


def _drifting_step(ctx):
    ctx.optimizer.zero_grad(set_to_none=True)
    inputs, target = ctx.batch
    loss = F.cross_entropy(ctx.model(inputs), target) * (len(ctx.ids) / len(ctx.global_ids))
    loss.backward()
    ctx.synchronize_ranks()
    if ctx.step == 3 and ctx.world is not None and ctx.world.rank == 1:
        with torch.no_grad():
            ctx.model[3].bias.grad[0] += 1e-3
    ctx.optimizer.step()
    return loss


rank_drift = replay.Program(model=mlp_model, dataset=(x_train, y_train), step=_drifting_step,
                            batch_size=30, steps=6, checkpoint_every=3)


def _slow_step(ctx):  # the default step, then a pause (REPLAY_TEST_STEP_SLEEP seconds): time to kill a rank
    import os
    import time

    from replay.engine import default_step

    metrics = default_step(ctx)
    time.sleep(float(os.environ.get("REPLAY_TEST_STEP_SLEEP", "0")))
    return metrics


slow = replay.Program(model=mlp_model, dataset=(x_train, y_train), step=_slow_step, loss=F.cross_entropy,
                      optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-2), ema_decay=0.9,
                      batch_size=30, steps=24, checkpoint_every=4)


def linear_model():
    return torch.nn.Linear(64, 10)


# Plain SGD on a linear model, a checkpoint after every step: the state after step 0 is checked
# against the arithmetic done by hand (tests/test_distributed.py).
linear = replay.Program(model=linear_model, dataset=(x_train, y_train), loss=F.cross_entropy,
                        optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                        batch_size=31, steps=2, checkpoint_every=1)


class _Jittered(torch.utils.data.Dataset):
    """Digits with noise drawn in __getitem__ (from the example's own seed)."""

    def __len__(self):
        return len(x_train)

    def __getitem__(self, i):
        return x_train[i] + 0.1 * torch.randn(64), y_train[i]


def _jittered(workers):
    return replay.Program(model=mlp_model, dataset=_Jittered(), loss=F.cross_entropy, workers=workers,
                          batch_size=30, steps=8, checkpoint_every=4)


jitter_workers_0 = _jittered(0)
jitter_workers_1 = _jittered(1)

# One example a step: too few for two ranks.
one_example = replay.Program(model=mlp_model, dataset=(x_train, y_train), loss=F.cross_entropy,
                             batch_size=1, steps=2, checkpoint_every=1)


def _wrapped_model():  # what replay refuses: it exchanges the gradients itself
    return torch.nn.parallel.DistributedDataParallel(mlp_model())


ddp_wrapped = replay.Program(model=_wrapped_model, dataset=(x_train, y_train), loss=F.cross_entropy,
                             batch_size=30, steps=2, checkpoint_every=1)
