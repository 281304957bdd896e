"""Programs of the validation experiments (docs/validation.md): an MLP on scikit-learn's digits.

`momentum_090` / `momentum_099`: plain SGD with momentum 0.9 and 0.99 at the same effective
               step size lr / (1 - beta) = 0.1, no BatchNorm, no dropout, no EMA, so that the
               only memory a momentum reset removes is the momentum buffer;
`momentum_090_large` / `momentum_099_large`: the same at lr / (1 - beta) = 0.5, where the
               gradient feedback of the displaced weights is no longer small;
`dropout_sgd_00` / `_05` / `_09`: an MLP with dropout 0.2 and plain SGD with momentum 0, 0.5
               and 0.9 at the same effective step size lr / (1 - mu) = 0.1 (the back-flow witness:
               its instruments A and A' differ in their dropout masks);
`probe`        the 297 held-out digits.
"""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), (x_probe, y_probe) = digits()


def probe():
    return x_probe, y_probe


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def _sgd(momentum: float, lr: float, steps: int) -> replay.Program:
    return replay.Program(
        model=mlp, dataset=(x_train, y_train), loss=F.cross_entropy,
        optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=lr, momentum=momentum),
        batch_size=64, steps=steps, checkpoint_every=100,
        description=f"digits MLP, SGD momentum {momentum}, lr {lr} (lr / (1 - beta) = {lr / (1 - momentum):g})")


def momentum_090() -> replay.Program:
    return _sgd(0.9, 0.01, 400)


def momentum_099() -> replay.Program:
    return _sgd(0.99, 0.001, 400)


def momentum_090_large() -> replay.Program:
    return _sgd(0.9, 0.05, 400)


def momentum_099_large() -> replay.Program:
    return _sgd(0.99, 0.005, 400)


def dropout_mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(128, 10))


def _dropout_sgd(momentum: float) -> replay.Program:
    lr = 0.1 * (1 - momentum)
    return replay.Program(
        model=dropout_mlp, dataset=(x_train, y_train), loss=F.cross_entropy,
        optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=lr, momentum=momentum),
        batch_size=64, steps=160, checkpoint_every=50,
        description=f"digits MLP with dropout 0.2, SGD momentum {momentum}, lr {lr:g} (lr / (1 - mu) = 0.1)")


def dropout_sgd_00() -> replay.Program:
    return _dropout_sgd(0.0)


def dropout_sgd_05() -> replay.Program:
    return _dropout_sgd(0.5)


def dropout_sgd_09() -> replay.Program:
    return _dropout_sgd(0.9)
