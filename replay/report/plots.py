"""Plots of an experiment's results with matplotlib's Agg backend (no display, no network).

Two kinds of figure: the decay curves of one arm (raw effect and excess over the bit-flip
reference against the delay after the intervention window, with interval bands, the seed noise
floor as a band, the fitted model of the excess curve and its plateau; and, when the results
have it, a third panel with the state-space lifetime), and the per-seed effects of every arm at the primary horizon against
the noise floor (a strip plot, one row per arm, one colour per seed so the pairing shows).

Each figure is written both as inline SVG (for the HTML page) and as PNG (for the Markdown
twin) from one drawing. SVG output is deterministic: no date in the metadata, ids salted per
figure (so several figures can live in one page without id clashes), text as paths (no font is
needed to display it).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BLUE, BLUE_DARK = "#3465a4", "#204a87"
ORANGE, ORANGE_DARK = "#f57900", "#ce5c00"
GREEN = "#4e9a06"
GREY = "#888a85"
RC = {"font.size": 8.5, "axes.titlesize": 9.5, "axes.labelsize": 8.5, "legend.fontsize": 7.5,
      "xtick.labelsize": 8, "ytick.labelsize": 8, "svg.fonttype": "path", "axes.spines.top": False,
      "axes.spines.right": False}


def finite(values) -> list[float]:
    """Floats, with anything missing or non-finite as NaN (a gap in a line or band)."""
    out = []
    for v in values or []:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        out.append(f if math.isfinite(f) else math.nan)
    return out


def _any_finite(values) -> bool:
    return any(not math.isnan(v) for v in finite(values))


@dataclass
class Series:
    """A curve over delays: mean with a lower/upper band (lists aligned with `h`)."""

    h: list
    mean: list
    lo: list = field(default_factory=list)
    hi: list = field(default_factory=list)

    def draw(self, ax, color, band_color, label, band_label=None, style="o-", alpha=0.25, zorder=3):
        h = [float(x) for x in self.h]
        if self.lo and self.hi and (_any_finite(self.lo) or _any_finite(self.hi)):
            ax.fill_between(h, finite(self.lo), finite(self.hi), color=band_color, alpha=alpha, lw=0,
                            label=band_label, zorder=zorder - 1)
        ax.plot(h, finite(self.mean), style, color=color, label=label, ms=3.5, lw=1.4, zorder=zorder)


def _note(ax, text):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="#555",
            wrap=True, bbox={"boxstyle": "round", "fc": "#fafafa", "ec": "#ccc"})


def decay_figure(*, title: str, distance: str, raw: Series, excess: Series | None, floor: Series | None,
                 reference: Series | None, fit: dict | None, excess_note: str = "", note_color: str = "#a40000",
                 fitted: Series | None = None, model: str = "", plateau: tuple | None = None,
                 state: dict | None = None):
    """Raw effect (with the noise floor band and the bit-flip reference) and the excess over the
    reference (with the fitted model of the excess curve and its plateau), against the delay h
    after the intervention window; a third panel for the state-space lifetime (the excess
    per-step update difference with its band and half-life) when `state` is given."""
    with plt.rc_context(RC):
        n_panels = 3 if state else 2
        fig, axes = plt.subplots(1, n_panels, figsize=(14.5 if state else 10, 3.4 if state else 3.3))
        a_raw, a_ex = axes[0], axes[1]
        if floor is not None and _any_finite(floor.mean):
            floor.draw(a_raw, ORANGE_DARK, ORANGE, "noise floor (seed vs seed)", "noise floor 95% band",
                       style="--", alpha=0.18, zorder=1)
        if reference is not None and _any_finite(reference.mean):
            reference.draw(a_raw, GREY, GREY, "bit-flip reference", None, style="s:", alpha=0.12, zorder=2)
        if _any_finite(raw.mean):
            raw.draw(a_raw, BLUE_DARK, BLUE, "mean over seeds", "95% interval")
        else:
            _note(a_raw, "no finite effect values")
        a_raw.set_title("raw effect: factual vs fork")
        a_raw.set_ylabel(distance)

        if excess is None or not _any_finite(excess.mean):
            _note(a_ex, excess_note or "no excess over a reference arm")
        else:
            a_ex.axhline(0.0, color="#555", lw=0.8, zorder=1)
            excess.draw(a_ex, BLUE_DARK, BLUE, "mean over seeds", "95% interval")
            drawn = False
            if plateau is not None and _finite_num(plateau[0]):
                p, lo, hi = plateau
                if _finite_num(lo) and _finite_num(hi):
                    a_ex.axhspan(lo, hi, color=GREEN, alpha=0.10, lw=0, zorder=1)
                a_ex.axhline(p, color=GREEN, lw=1.1, ls="--", zorder=2, label=f"plateau {p:.3g}")
            if fitted is not None and _any_finite(fitted.mean):
                a_ex.plot([float(x) for x in fitted.h], finite(fitted.mean), "-", color=GREEN, lw=1.6, zorder=4,
                          label=f"fitted model{f' ({model})' if model else ''}")
                drawn = True
            elif fit and fit.get("fit_ok") and _finite_pos(fit.get("half_life")) and _finite_num(fit.get("amplitude")):
                hs = [float(x) for x in excess.h]
                h0, h1 = min(hs), max(hs)
                xs = [h0 + (h1 - h0) * i / 200 for i in range(201)]
                hl, amp = float(fit["half_life"]), float(fit["amplitude"])
                a_ex.plot(xs, [amp * 2 ** (-x / hl) for x in xs], color=GREEN, lw=1.6,  # amplitude at h = 0
                          label=f"fitted decay, half-life {hl:.3g}", zorder=4)
                drawn = True
            if excess_note and not drawn:
                a_ex.text(0.98, 0.96, excess_note, transform=a_ex.transAxes, ha="right", va="top", fontsize=7.5,
                          color=note_color, bbox={"boxstyle": "round", "fc": "white", "ec": "#ccc"})
            elif fit and fit.get("extrapolated"):
                a_ex.text(0.98, 0.96, "half-life extrapolated", transform=a_ex.transAxes, ha="right", va="top",
                          fontsize=7.5, color="#9a6700", bbox={"boxstyle": "round", "fc": "white", "ec": "#e7cf8a"})
        a_ex.set_title("excess over the bit-flip reference (function space)")
        if state:
            _state_panel(axes[2], state)
        labels: dict = {}
        for ax in axes:
            ax.set_xlabel("h: steps after the intervention window")
            ax.grid(alpha=0.3, lw=0.6)
            for handle, text in zip(*ax.get_legend_handles_labels()):
                labels.setdefault(text, handle)  # one legend for all panels, below them
        fig.suptitle(title, fontsize=10.5, x=0.01, ha="left", fontweight="bold")
        fig.tight_layout(rect=(0, 0.09 if labels else 0, 1, 1))
        if labels:
            fig.legend(list(labels.values()), list(labels.keys()), loc="lower center", ncol=min(len(labels), 8),
                       frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


def _state_panel(ax, state: dict) -> None:
    """The state-space lifetime: the excess per-step update difference (child vs parent, minus the
    reference child's) against the delay, with its band, the fitted decay and the half-life."""
    hs = list(state.get("horizons") or [])
    series = Series(hs, state.get("excess_mean") or [], state.get("excess_lo") or [], state.get("excess_hi") or [])
    ax.set_title("state space: update difference in excess of the reference")
    ax.set_ylabel("excess update difference")
    if not hs or len(finite(series.mean)) != len(hs) or not _any_finite(series.mean):
        _note(ax, "no finite state-space values")
        return
    ax.axhline(0.0, color="#555", lw=0.8, zorder=1)
    series.draw(ax, "#5c3566", "#ad7fa8", "excess update difference", "update difference 95% interval")
    hl, amp = state.get("half_life"), state.get("amplitude")
    h = [float(x) for x in hs]
    h0, h1 = min(h), max(h)
    if state.get("fit_ok") and _finite_pos(hl):
        if _finite_num(amp):
            xs = [h0 + (h1 - h0) * i / 200 for i in range(201)]
            # estimands.fit_decay: the amplitude is the fitted curve's value at h = 0 (not at the first delay)
            ax.plot(xs, [amp * 2 ** (-x / hl) for x in xs], color=GREEN, lw=1.4, zorder=4,
                    label="fitted state decay")
        iv = [_float(x) for x in (list(state.get("interval") or []) + [None, None])[:2]]
        ci = f" ({_g(iv[0])}, {_g(iv[1])})" if not any(math.isnan(x) for x in iv) else ""
        text = f"half-life {hl:.3g}{ci}" + (", extrapolated" if state.get("extrapolated") else "")
        if h0 + hl <= h1:
            ax.axvline(h0 + hl, color=GREEN, lw=1.0, ls=":", zorder=2)
        ax.text(0.98, 0.96, text, transform=ax.transAxes, ha="right", va="top", fontsize=7.5,
                color="#9a6700" if state.get("extrapolated") else "#2e7d32",
                bbox={"boxstyle": "round", "fc": "white", "ec": "#ccc"})
    else:
        ax.text(0.98, 0.96, "no fit: " + str(state.get("reason") or "unknown reason"), transform=ax.transAxes,
                ha="right", va="top", fontsize=7.5, color="#a40000", wrap=True,
                bbox={"boxstyle": "round", "fc": "white", "ec": "#ccc"})


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _g(x: float) -> str:
    return ("∞" if x > 0 else "−∞") if math.isinf(x) else f"{x:.3g}"


def _finite_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _finite_pos(x) -> bool:
    return _finite_num(x) and x > 0


@dataclass
class StripRow:
    label: str
    per_seed: list
    mean: float
    ci: list
    floor: float | None
    floor_lo: float | None = None
    floor_hi: float | None = None
    kind: str = "arm"  # "arm" | "placebo" | "reference"


def seeds_figure(rows: list[StripRow], seeds: list, distance: str, horizon: int):
    """One row per arm: each seed's effect (colour = seed), the mean with its interval, and the seed
    noise floor at the same step (orange tick, with its interval as a band)."""
    palette = plt.get_cmap("tab10")
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(10, 0.42 * max(len(rows), 3) + 1.3))
        n = len(rows)
        for i, r in enumerate(rows):
            y = n - 1 - i
            if r.floor_lo is not None and r.floor_hi is not None and _finite_num(r.floor_lo) and _finite_num(r.floor_hi):
                ax.fill_between([r.floor_lo, r.floor_hi], [y - 0.38] * 2, [y + 0.38] * 2, color=ORANGE, alpha=0.18,
                                lw=0, zorder=1)
            if r.floor is not None and _finite_num(r.floor):
                ax.plot([r.floor, r.floor], [y - 0.38, y + 0.38], color=ORANGE_DARK, lw=2, zorder=2,
                        label="noise floor (band: 95%)" if i == 0 else None)
            vals = finite(r.per_seed)
            k = len(vals)
            for j, v in enumerate(vals):
                if math.isnan(v):
                    continue
                offset = (j - (k - 1) / 2) * (0.5 / max(k, 1)) if k > 1 else 0.0
                ax.scatter([v], [y + offset], color=palette(j % 10), s=20, zorder=4, edgecolors="white", linewidths=0.4)
            lo, hi = (finite(r.ci) + [math.nan, math.nan])[:2]
            if not (math.isnan(lo) or math.isnan(hi)):
                ax.plot([lo, hi], [y, y], color="#222", lw=1.1, zorder=3)
            if _finite_num(r.mean):
                ax.scatter([r.mean], [y], marker="|", color="#222", s=160, linewidths=2, zorder=3,
                           label="mean and 95% interval" if i == 0 else None)
        for j, s in enumerate(seeds[:10]):
            ax.scatter([], [], color=palette(j % 10), s=20, label=f"seed {s}")
        ax.set_yticks(range(n))
        ax.set_yticklabels([r.label for r in reversed(rows)])
        for tick, r in zip(ax.get_yticklabels(), reversed(rows)):
            if r.kind == "reference":
                tick.set_color("#666")
                tick.set_fontstyle("italic")
            elif r.kind == "placebo":
                tick.set_color("#2e7d32")
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_xlabel(f"{distance} at h = {horizon} steps after the intervention window")
        ax.grid(axis="x", alpha=0.3, lw=0.6)
        if not rows:
            _note(ax, "no estimates at the primary distance and horizon")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
    return fig


def render(fig, png_path, salt: str) -> str:
    """Write `fig` as PNG to png_path and return it as an inline SVG element (then close it)."""
    try:
        fig.savefig(png_path, format="png", dpi=110, metadata={"Software": None})
        buffer = io.StringIO()
        with plt.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
            fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    finally:
        plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]
