"""Programs whose memory is known in closed form (tests/test_memory.py checks the estimators on them).

`drift_mu0`, `drift_mu05`, `drift_mu09`: a linear model under a *linear* loss, mean(model(x)),
    so the gradient is mean(dropout(x)) / 2 whatever the weights are, trained by SGD with momentum
    mu. No gradient feedback: a difference of the instruments' draws at step T moves the weights
    by -lr * e at T and, through the momentum buffer, by -lr * mu^j * e at step T + j. With k = 1
    and a common instrument of b steps, W / D1 = mu (1 - mu^b) / (1 - mu) in parameter distance;
    0 for mu = 0, and 0 after a causal break (reset_optimizer) whatever mu is. Weight
    perturbations persist unchanged and add exactly (logits are linear in the weights).
`expanding`: SGD on -C/2 * ||w||^2 (a custom step; the batch is ignored), so w <- (1 + lr C) w and
    any difference of two runs grows by exactly (1 + lr C) per step: divergence exponent
    ln(1 + lr C) per step. `frozen` (C = 0): nothing grows.
`probe`: 64 fixed inputs of dimension 8 with 2 classes.
"""

import torch

import replay

DIM = 8
LR = 0.01
C = 5.0  # lr * C = 0.05: divergence exponent ln(1.05) = 0.04879 per step

_g = torch.Generator().manual_seed(1234)
x_train = torch.rand(512, DIM, generator=_g) + 0.5
y_train = torch.randint(0, 2, (512,), generator=_g)
x_probe = torch.rand(64, DIM, generator=_g) - 0.5
y_probe = torch.randint(0, 2, (64,), generator=_g)


def probe():
    return x_probe, y_probe


def _dropout_linear():
    return torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(DIM, 2, bias=False))


def _linear_loss(output, target):
    return output.mean()


def _drift(mu: float) -> replay.Program:
    return replay.Program(
        model=_dropout_linear, dataset=(x_train, y_train), loss=_linear_loss,
        optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=LR, momentum=mu),
        batch_size=16, steps=24, checkpoint_every=8,
        description=f"linear loss (gradient independent of the weights), dropout, SGD momentum {mu}")


def drift_mu0():
    return _drift(0.0)


def drift_mu05():
    return _drift(0.5)


def drift_mu09():
    return _drift(0.9)


def _expanding_step(c: float):
    def step(ctx):
        ctx.model.train()
        ctx.optimizer.zero_grad(set_to_none=True)
        w = ctx.model.weight
        loss = -0.5 * c * (w * w).sum()
        loss.backward()
        ctx.optimizer.step()
        return {"loss": loss}
    return step


def _expanding(c: float) -> replay.Program:
    return replay.Program(
        model=lambda: torch.nn.Linear(DIM, 2, bias=False), dataset=(x_train, y_train), step=_expanding_step(c),
        optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=LR),
        batch_size=16, steps=40, checkpoint_every=10,
        description=f"SGD on -{c}/2 ||w||^2: every difference grows by (1 + lr * {c}) per step")


def expanding():
    return _expanding(C)


def frozen():
    return _expanding(0.0)
