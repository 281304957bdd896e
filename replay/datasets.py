"""Small data sets that ship with a package, for examples, tests and the demo (no downloads)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch

DIGITS_TRAIN = 1500  # of scikit-learn's 1,797 bundled 8x8 digits; the rest is the probe set


def _digits_file() -> Path:
    """scikit-learn's bundled digits.csv.gz, found without importing scikit-learn.

    Why not sklearn.datasets.load_digits: importing sklearn.datasets pulls in scipy.stats and takes
    about 1 s, which every fresh process that loads a digits program (experiment workers, Ray
    tasks) would pay before its first step. The file is what load_digits itself reads
    (np.loadtxt, comma-separated, the label in the last column); tests/test_datasets.py checks
    that both give the same arrays, so a scikit-learn that moves the file fails there loudly."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("replay.datasets.digits needs scikit-learn (pip install scikit-learn)")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"replay.datasets.digits: scikit-learn's digits data is not at {path} "
                                "(an unsupported scikit-learn layout)")
    return path


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits as ((x_train, y_train), (x_probe, y_probe)): x float32 in
    [0, 1] of shape [n, 64], y int64 class labels. The split is fixed (first 1,500 / last 297)."""
    import numpy as np

    with gzip.open(_digits_file(), mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    x = torch.tensor(data[:, :-1], dtype=torch.float32) / 16.0
    y = torch.tensor(data[:, -1].astype(int, copy=False), dtype=torch.int64)
    return (x[:DIGITS_TRAIN], y[:DIGITS_TRAIN]), (x[DIGITS_TRAIN:], y[DIGITS_TRAIN:])
