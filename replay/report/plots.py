"""Plots of an experiment's results (matplotlib, Agg backend): decay curves with interval bands
against the noise floor, and per-seed effects against the noise floor."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finite(values):
    return [v if v is not None and isinstance(v, (int, float)) and math.isfinite(v) else float("nan") for v in values]


def decay_figure(lifetime: dict, floor: dict | None):
    """Raw effect and excess over the bit-flip reference against the delay after the window."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
    h = lifetime["horizons"]
    for ax, key, title in ((axes[0], "raw", "effect (factual vs fork)"), (axes[1], "excess", "excess over the bit flip")):
        mean, lo, hi = (_finite(lifetime[f"{key}_{part}"]) for part in ("mean", "lo", "hi"))
        ax.fill_between(h, lo, hi, alpha=0.25, color="#3465a4", label="95% BCa")
        ax.plot(h, mean, "o-", color="#204a87", label="mean over seeds")
        if key == "raw" and floor:
            ax.axhspan(min(_finite(floor["lo"]) or [0]), max(_finite(floor["hi"]) or [0]), color="#f57900", alpha=0.15,
                       label="seed noise floor")
            ax.plot(floor["horizons"], _finite(floor["mean"]), "--", color="#ce5c00")
        if key == "excess":
            ax.axhline(0.0, color="#555", lw=0.8)
            hl = lifetime.get("half_life")
            if lifetime.get("fit_ok") and hl and math.isfinite(hl):
                xs = [h[0] + (h[-1] - h[0]) * i / 100 for i in range(101)]
                ax.plot(xs, [lifetime["amplitude"] * 2 ** (-x / hl) for x in xs], color="#4e9a06", label=f"fit: half-life {hl:.1f}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("steps after the intervention window")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(lifetime["distance"])
    fig.suptitle(f"{lifetime['arm']} (fork at step {lifetime['fork_step']})", fontsize=11)
    fig.tight_layout()
    return fig


def seeds_figure(estimates: list[dict], distance: str, horizon: int):
    """Per-seed effects of every arm at the primary horizon, against the noise floor."""
    rows = [e for e in estimates if e["distance"] == distance and e["horizon"] == horizon]
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(len(rows), 3) + 1.2))
    for i, e in enumerate(rows):
        ys = [i] * len(e["per_seed"])
        ax.scatter(_finite(e["per_seed"]), ys, color="#204a87", s=22, zorder=3)
        floor = e.get("noise_floor")
        if floor is not None and math.isfinite(floor):
            ax.plot([floor, floor], [i - 0.35, i + 0.35], color="#ce5c00", lw=2, zorder=2)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{e['arm']} ({e.get('program', 'main')})" for e in rows], fontsize=8)
    ax.set_xlabel(f"{distance} at {horizon} steps after the window (dots: seeds; orange: seed noise floor)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def to_svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def to_png(fig, path) -> None:
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
