"""`replay demo`: how much does each piece of training memory matter, on scikit-learn's digits?

An MLP with BatchNorm, dropout, AdamW and an EMA teacher (and an SGD-with-momentum variant for
the momentum arm) is trained from several seeds; each run is forked at one step with each
perturbation; the probe set (the 297 held-out digits) measures the effect against the
seed-to-seed noise floor and over time. No downloads: the data ships with scikit-learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import optim
from .datasets import digits
from .experiment import Arm, ExperimentSpec
from .program import Program, StepContext

HIDDEN = 128


def _model():
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.BatchNorm1d(HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(HIDDEN, 10),
    )


def _mean_teacher_step(ctx: StepContext):
    """Cross-entropy plus a consistency term towards the EMA teacher's predictions."""
    x, y = ctx.batch
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    logits = ctx.model(x)
    with torch.no_grad():
        target = F.softmax(ctx.ema.module.eval()(x), dim=1)
    loss = F.cross_entropy(logits, y) + 0.5 * F.mse_loss(F.softmax(logits, dim=1), target)
    loss.backward()
    ctx.optimizer.step()
    ctx.ema.update()
    return {"loss": loss}


def probe():
    """The probe set: the 297 digits the programs never train on."""
    _, (x, y) = digits()
    return x, y


def adamw_program() -> Program:
    (x, y), _ = digits()
    return Program(model=_model, dataset=(x, y), step=_mean_teacher_step,
                   optimizer=lambda m: optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-2),
                   ema_decay=0.98, batch_size=64, steps=200, checkpoint_every=50,
                   description="digits MLP: BatchNorm, dropout, AdamW, EMA teacher")


def sgd_program() -> Program:
    (x, y), _ = digits()
    return Program(model=_model, dataset=(x, y), step=_mean_teacher_step,
                   optimizer=lambda m: optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                   ema_decay=0.98, batch_size=64, steps=200, checkpoint_every=50,
                   description="digits MLP, SGD with momentum variant")


def spec(quick: bool = False) -> ExperimentSpec:
    steps, fork = (80, 30) if quick else (200, 60)
    horizons = [0, 5, 10, 20, 40] if quick else [0, 5, 10, 20, 40, 70, 110]
    arms = [
        Arm("placebo", ["placebo"]),
        Arm("adam_m_reset", ["reset_exp_avg"]),
        Arm("adam_v_reset", ["reset_exp_avg_sq"]),
        Arm("momentum_reset", ["reset_momentum"], program="replay.demo:sgd_program"),
        Arm("bn_reset", ["reset_bn"]),
        Arm("ema_reset", ["reset_ema"]),
        Arm("order_swap", ["swap_windows:offset=10,w=10"], window=20),
        Arm("bitflip", ["bitflip"], reference=True),
    ]
    return ExperimentSpec(
        name="replay demo: training memory on digits" + (" (quick)" if quick else ""),
        program="replay.demo:adamw_program",
        seeds=[1, 2, 3, 4, 5],  # the t interval covers at n = 5 (docs/estimands.md); fewer would not
        fork_steps=[fork],
        arms=arms,
        horizons=[h for h in horizons if fork + 20 + h <= steps],
        primary_horizon=10 if quick else 20,
        steps=steps,
        probe={"source": "replay.demo:probe", "layer": "3"},
        bootstrap_resamples=500 if quick else 2000,
    )
