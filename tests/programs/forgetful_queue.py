"""A program whose queue component forgets its write pointer: state_dict() saves the items but
not the pointer, so a placebo fork restores the items and writes the next one into slot 0
instead of the parent's slot. `replay check --at 13` must name step 13 and component:queue
(the loss of step 13 reads the queue before the write, so the model still agrees there)."""

import torch
import torch.nn.functional as F

import replay
from replay.datasets import digits

(x_train, y_train), _ = digits()


class ForgetfulQueue:
    def __init__(self):
        self.items = torch.zeros(8, 64)
        self.pointer = 0

    def state_dict(self):
        return {"items": self.items}  # the pointer is missing: state outside the checkpoint

    def load_state_dict(self, state):
        self.items = state["items"].clone()


def step(ctx):
    x, y = ctx.batch
    queue = ctx.components["queue"]
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ctx.model(x + queue.items.mean(0)), y)
    loss.backward()
    ctx.optimizer.step()
    queue.items[queue.pointer] = x.mean(0)
    queue.pointer = (queue.pointer + 1) % queue.items.shape[0]
    return {"loss": loss}


program = replay.Program(model=lambda: torch.nn.Linear(64, 10), dataset=(x_train, y_train), step=step,
                         optimizer=lambda m: replay.optim.SGD(m.parameters(), lr=0.05),
                         components=lambda m: {"queue": ForgetfulQueue()}, batch_size=32, steps=24,
                         checkpoint_every=8)
