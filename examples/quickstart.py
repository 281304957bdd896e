"""Quick start: swap torch.optim.AdamW for replay.optim.AdamW and print fingerprints.

Run: python examples/quickstart.py
"""

import torch

import replay


def train(optimizer_factory, steps=50):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = optimizer_factory(model.parameters())
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, 8, generator=data)
        y = x.sum(dim=1, keepdim=True)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, optimizer


# The one-line change: replay.optim.AdamW instead of torch.optim.AdamW. numerics="torch" keeps
# torch's exact bits on this CPU; the default, numerics="portable", gives the same bits on
# CPU and CUDA on any machine.
theirs, _ = train(lambda params: torch.optim.AdamW(params, lr=1e-2))
ours, optimizer = train(lambda params: replay.optim.AdamW(params, lr=1e-2, numerics="torch"))

print("model fingerprint, torch.optim.AdamW: ", f"{replay.state_fingerprint(theirs.state_dict()):016x}")
print("model fingerprint, replay.optim.AdamW:", f"{replay.state_fingerprint(ours.state_dict()):016x}")
print("last step wrote, for parameter 0:")
for name, fp in optimizer.fingerprints[0].items():
    print(f"  {name:<11} {fp:016x}")
same = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(theirs.parameters(), ours.parameters()))
print("bit-identical to torch.optim:", same)
if not same:
    raise SystemExit(1)
