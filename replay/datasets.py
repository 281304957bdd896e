"""Small data sets that ship with a package, for examples, tests and the demo (no downloads)."""

from __future__ import annotations

import torch

DIGITS_TRAIN = 1500  # of scikit-learn's 1,797 bundled 8x8 digits; the rest is the probe set


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits as ((x_train, y_train), (x_probe, y_probe)): x float32 in
    [0, 1] of shape [n, 64], y int64 class labels. The split is fixed (first 1,500 / last 297)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError("replay.datasets.digits needs scikit-learn (pip install scikit-learn)") from error
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return (x[:DIGITS_TRAIN], y[:DIGITS_TRAIN]), (x[DIGITS_TRAIN:], y[DIGITS_TRAIN:])
