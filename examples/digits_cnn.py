"""A small CNN with SGD and momentum on scikit-learn's digits, with augmentation drawn from the
run's "augment" random stream (random shifts and pixel noise).

    replay record examples/digits_cnn.py:program --seed 1 --steps 200 --out runs/cnn
"""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


def model():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    images = x.view(-1, 8, 8)
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    images = torch.roll(images, shifts=(dy, dx), dims=(1, 2))
    noise = 0.05 * torch.randn(images.shape, generator=generator)
    return (images + noise).reshape(-1, 64)


def step(ctx: replay.StepContext):
    x, y = ctx.batch
    x = augment(x, ctx.generators["augment"])
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    # This rank's share of the batch's loss (all of it in one process: the factor is 1.0)
    loss = F.cross_entropy(ctx.model(x), y) * (len(ctx.ids) / len(ctx.global_ids))
    loss.backward()
    ctx.synchronize_ranks()  # several processes (--nproc N): the ranks' gradients summed; nothing in one
    ctx.optimizer.step()
    return {"loss": loss}


program = replay.Program(
    model=model,
    dataset=(x_train, y_train),
    step=step,
    optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    batch_size=64,
    steps=200,
    checkpoint_every=50,
    description="digits CNN: SGD with momentum, augmentation stream",
)
