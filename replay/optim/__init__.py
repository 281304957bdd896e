"""Drop-in replacements for torch.optim.SGD, Adam and AdamW running replay's fused,
bit-exact, fingerprinting kernels."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
