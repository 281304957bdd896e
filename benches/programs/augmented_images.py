"""A CPU-heavy augmentation pipeline for the data-worker bench: 3x32x32 synthetic images
(no download), each example padded and randomly cropped, randomly flipped, blurred with a random
5x5 kernel and colour-jittered in __getitem__ (torch's global generator, seeded per example by
the engine); a small linear model, so the batch, not the step, is the cost."""

import torch
import torch.nn.functional as F

import replay

SIZE = 2048


class AugmentedImages(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(SIZE, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, 10, (SIZE,), generator=g)

    def __len__(self):
        return SIZE

    def __getitem__(self, i):
        x = F.pad(self.images[i], (4, 4, 4, 4), mode="reflect")
        top, left = torch.randint(0, 9, (2,)).tolist()
        x = x[:, top:top + 32, left:left + 32]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        for _ in range(4):  # the heavy part: random blurs, per channel
            kernel = torch.softmax(torch.randn(25), 0).view(1, 1, 5, 5).expand(3, 1, 5, 5)
            x = F.conv2d(x.unsqueeze(0), kernel, padding=2, groups=3).squeeze(0)
        x = x * (1 + 0.2 * (torch.rand(3, 1, 1) - 0.5))
        return x, self.labels[i]


def model():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))


def with_workers(workers: int) -> replay.Program:
    return replay.Program(model=model, dataset=AugmentedImages(), loss=F.cross_entropy, batch_size=64,
                          steps=10_000, workers=workers)


program = with_workers(0)
