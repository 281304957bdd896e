"""An MLP with BatchNorm, dropout, AdamW and an EMA teacher on scikit-learn's digits.

The student learns from the labels and from its EMA teacher's predictions (a mean-teacher
consistency term), so the teacher is state that shapes the trajectory.

    replay record examples/digits_mlp.py:program --seed 1 --steps 300 --out runs/mlp
    replay verify runs/mlp
"""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


def model():
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 10),
    )


def step(ctx: replay.StepContext):
    x, y = ctx.batch
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    logits = ctx.model(x)
    teacher = ctx.ema.module.eval()
    with torch.no_grad():
        target = F.softmax(teacher(x), dim=1)
    supervised = F.cross_entropy(logits, y)
    consistency = F.mse_loss(F.softmax(logits, dim=1), target)
    # This rank's share of the batch's loss (all of it in one process: the factor is 1.0); with
    # --nproc N the ranks' gradients, and the losses in the ledger, add up to the batch's.
    loss = (supervised + 0.5 * consistency) * (len(ctx.ids) / len(ctx.global_ids))
    loss.backward()
    ctx.synchronize_ranks()  # several processes: the ranks' gradients summed; nothing in one
    ctx.optimizer.step()
    ctx.ema.update()
    return {"loss": loss, "supervised": supervised, "consistency": consistency}


program = replay.Program(
    model=model,
    dataset=(x_train, y_train),
    step=step,
    optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-2),
    ema_decay=0.99,
    batch_size=64,
    steps=300,
    checkpoint_every=100,
    description="digits MLP: BatchNorm, dropout, AdamW, EMA teacher",
)
