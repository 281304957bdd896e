"""A small program written to run on any device (tests/test_device.py records it on the CPU and,
with a GPU, on CUDA): an MLP with BatchNorm and dropout, AdamW, an EMA teacher, a StepLR
schedule, an augmentation stream and a queue component kept on the model's device. Its step
draws from the CPU generators the engine gives and moves the draws to the batch's device."""

import torch
import torch.nn.functional as F

import replay

_g = torch.Generator().manual_seed(0)
X = torch.randn(96, 8, generator=_g)
Y = torch.randint(0, 3, (96,), generator=_g)


class Queue:
    """The last few batch means, on the device the model lives on."""

    def __init__(self, device):
        self.items = torch.zeros(4, 8, device=device)
        self.pointer = 0

    def state_dict(self):
        return {"items": self.items, "pointer": self.pointer}

    def load_state_dict(self, state):
        self.items = state["items"].clone()  # keeps the device of the tensor it is given
        self.pointer = int(state["pointer"])


def model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.1), torch.nn.Linear(16, 3))


def step(ctx):
    x, y = ctx.batch
    queue = ctx.components["queue"]
    noise = torch.randn(x.shape, generator=ctx.generators["augment"]).to(x.device)
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ctx.model(x + 0.01 * noise + 0.1 * queue.items.mean(0)), y)
    loss.backward()
    ctx.optimizer.step()
    ctx.ema.update()
    queue.items[queue.pointer] = x.mean(0)
    queue.pointer = (queue.pointer + 1) % queue.items.shape[0]
    return {"loss": loss}


program = replay.Program(
    model=model,
    dataset=(X, Y),
    step=step,
    optimizer=lambda m: replay.optim.AdamW(m.parameters(), lr=1e-2),
    scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    ema_decay=0.9,
    components=lambda m: {"queue": Queue(next(m.parameters()).device)},
    batch_size=8,
    steps=20,
    checkpoint_every=5,
)
