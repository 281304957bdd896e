"""Mixed-precision programs for tests/test_precision.py and tests/test_fork.py, on scikit-learn's
digits with the default step:

* `bf16`: autocast to bfloat16, AdamW; `float32` is the same program without autocast.
* `fp16`: autocast to float16 with a GradScaler (init_scale 2**8, growth every 4 clean steps),
  gradient clipping after unscaling, AdamW, the data in sequential order. Example OVERFLOW_ID has
  an inf feature, so the gradients of the step that holds it (OVERFLOW_STEP) are inf/NaN and
  the scaler skips that optimizer step.
* `fp16_unscaled`: `fp16` without the scaler.
* `fp16_custom`: `fp16` with a custom step doing what the default step does through
  ctx.autocast() and ctx.scaler.
"""

import dataclasses

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()
BATCH = 32
OVERFLOW_STEP = 4
OVERFLOW_ID = OVERFLOW_STEP * BATCH + 5  # sequential order: step t holds ids [32 t, 32 t + 32)
x_overflow = x_train.clone()
x_overflow[OVERFLOW_ID, 0] = float("inf")
SCALER = {"init_scale": 2.0 ** 8, "growth_interval": 4}


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _optimizer(m):
    return replay.optim.AdamW(m.parameters(), lr=1e-2)


def custom_step(ctx):
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    x, y = ctx.batch
    with ctx.autocast():
        loss = F.cross_entropy(ctx.model(x), y)
    ctx.scaler.scale(loss).backward()
    ctx.scaler.unscale_(ctx.optimizer)
    norm = replay.clipping.clip_grad_norm_(ctx.model.parameters(), 1.0)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    return {"loss": loss, "grad_norm": norm}


def _program(**changes):
    settings = dict(model=model, dataset=(x_overflow, y_train), loss=F.cross_entropy, optimizer=_optimizer,
                    autocast="fp16", grad_scaler=SCALER, clip_grad_norm=1.0, order="sequential",
                    batch_size=BATCH, steps=12, checkpoint_every=5)
    settings.update(changes)
    return replay.Program(**settings)


bf16 = replay.Program(model=model, dataset=(x_train, y_train), loss=F.cross_entropy, optimizer=_optimizer,
                      autocast="bf16", batch_size=BATCH, steps=12, checkpoint_every=5)
float32 = dataclasses.replace(bf16, autocast=None)
fp16 = _program()
fp16_unscaled = _program(grad_scaler=False)
fp16_custom = _program(loss=None, step=custom_step, clip_grad_norm=None)


# bfloat16 parameters (the whole model in bf16, inputs cast in the loss wrapper) with replay.optim's
# fp32 master weights: tests/test_master_weights.py records and verifies it.
def bf16_model():
    return model().to(torch.bfloat16)


def _bf16_loss(output, target):
    return F.cross_entropy(output.float(), target)


class _Bf16Inputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = bf16_model()

    def forward(self, x):
        return self.inner(x.to(torch.bfloat16))


bf16_master = replay.Program(model=_Bf16Inputs, dataset=(x_train, y_train), loss=_bf16_loss,
                             optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-2, master_weights=True),
                             batch_size=BATCH, steps=12, checkpoint_every=4)
