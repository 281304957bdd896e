"""A CIFAR-like run as people train it: a small ResNet under bf16 autocast on a synthetic
10-class image set (no download), random crop and flip in the dataset's __getitem__ built by 2
data-loader workers, 2 micro-batches per step, gradient-norm clipping, an EMA teacher and
OneCycleLR.

    replay record examples/cifar_like.py:program --seed 1 --out runs/cifar
    replay verify runs/cifar
    replay fork runs/cifar --at 40 --perturb reset_bn --out runs/cifar-bn
    replay experiment examples/cifar_like.toml --out runs/cifar-exp

The images: each class has a fixed random 3x8x8 pattern, upsampled to 32x32, and every image
is its class's pattern plus noise, so a small network learns it in a few hundred steps on a CPU.
"""

import torch
import torch.nn.functional as F

import replay

CLASSES = 10
TRAIN, PROBE = 2048, 256
STEPS = 120  # OneCycleLR's length: --steps beyond it is refused by the scheduler


def _images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                             size=32, mode="bilinear", align_corners=False)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return patterns[labels] + 0.35 * torch.randn(n, 3, 32, 32, generator=g), labels


x_train, y_train = _images(TRAIN, 1)
x_probe, y_probe = _images(PROBE, 2)


class AugmentedImages(torch.utils.data.Dataset):
    """Random crop (4 pixels of reflected padding) and horizontal flip, drawn from torch's global
    generator in __getitem__, as torchvision's transforms do (the engine seeds it per example)."""

    def __len__(self):
        return TRAIN

    def __getitem__(self, i):
        x = F.pad(x_train[i], (4, 4, 4, 4), mode="reflect")
        top, left = torch.randint(0, 9, (2,)).tolist()
        x = x[:, top:top + 32, left:left + 32]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, y_train[i]


class Block(torch.nn.Module):
    """A ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.skip = (torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else torch.nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


def model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        Block(8, 8, 1), Block(8, 16, 2), Block(16, 32, 2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, CLASSES),
    )


def probe():
    return x_probe, y_probe


program = replay.Program(
    model=model,
    dataset=AugmentedImages(),
    loss=F.cross_entropy,
    optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4),
    scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS,
                                                              cycle_momentum=False),
    ema_decay=0.99,
    autocast="bf16",
    workers=2,
    accumulate=2,
    clip_grad_norm=2.0,
    batch_size=32,
    steps=STEPS,
    checkpoint_every=20,
    description="CIFAR-like ResNet: bf16 autocast, crop/flip in 2 workers, 2 micro-batches, clipping, EMA, OneCycleLR",
)
