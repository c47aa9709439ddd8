"""Report figures as PNG bytes: loss curves, robustness curves, transferability heatmaps, and the
GAL paper's coherence histograms (its Figure 4) and GAAS curves (its Figure 5).

Each function draws on its own `Figure` with the Agg canvas (no pyplot, no global backend
state), so it can run in any process. Figures must read in grey-scale: every line has its own
line style and marker, heatmaps use a monotone-luminance colormap and print each cell's value.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path

from phalanx.files import write_bytes_atomic

DPI = 120
# (line style, marker) pairs that stay distinct without colour.
_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P"), ("-.", "X"), (":", "*"))
_MIXTURE_STYLE = {"color": "black", "linestyle": "-", "marker": "o", "linewidth": 2.6, "markersize": 6}


@dataclass(frozen=True)
class Curve:
    """One line of a robustness plot: accuracies (in [0, 1]) at epsilons (pixel units in [0, 1])."""

    label: str
    eps: Sequence[float]
    accuracy: Sequence[float]
    emphasis: bool = True  # False: a thin secondary line (e.g. one member)


@dataclass(frozen=True)
class Panel:
    """One subplot of a robustness figure: the curves of one attack."""

    title: str
    curves: Sequence[Curve] = field(default_factory=tuple)


def eps_label(eps: float) -> str:
    """Epsilon in the papers' pixel notation: 0.0314 -> '8/255', 0.03 -> '7.65/255', 0.5 -> '127.5/255'."""
    scaled = eps * 255
    if abs(scaled - round(scaled)) < 1e-3:
        return f"{round(scaled)}/255"
    return f"{scaled:.4g}/255"


def save_png(path: str | Path, png: bytes) -> Path:
    write_bytes_atomic(path, png)
    return Path(path)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _markevery(n: int) -> int:
    return max(1, n // 12)


def loss_figure(metrics: Sequence[Mapping], *, title: str, val_label: str = "validation") -> bytes:
    """Training loss per member, validation loss per member and of the mixture, validation accuracy.

    The DVERGE report's Figures 2-4: losses against epochs, one line per member, the mixture
    line thick and black. Epochs whose line lacks a key are skipped for that panel.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(13.5, 4.2)
    axes = fig.subplots(1, 3)
    panels = (
        (axes[0], "train_loss", None, "training loss (per member)", "cross-entropy loss"),
        (axes[1], "val_member_loss", "val_mixture_loss", f"{val_label} loss", "cross-entropy loss"),
        (axes[2], "val_member_acc", "val_mixture_acc", f"{val_label} accuracy", "accuracy (%)"),
    )
    for ax, member_key, mixture_key, panel_title, ylabel in panels:
        scale = 100.0 if ylabel.startswith("accuracy") else 1.0
        rows = [m for m in metrics if isinstance(m.get(member_key), list)]
        n_members = max((len(m[member_key]) for m in rows), default=0)
        for i, (ls, mk) in zip(range(n_members), cycle(_STYLES)):
            pts = [(m["epoch"], m[member_key][i]) for m in rows if i < len(m[member_key])]
            _line(ax, pts, scale, label=f"member {i + 1}", linestyle=ls, marker=mk, linewidth=1.2,
                  markersize=4, alpha=0.9)
        if mixture_key:
            pts = [(m["epoch"], m[mixture_key]) for m in metrics if _is_number(m.get(mixture_key))]
            _line(ax, pts, scale, label="mixture", **_MIXTURE_STYLE)
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return _png(fig)


def _line(ax, pts, scale: float, **style) -> None:
    pts = [(x, y) for x, y in pts if _is_number(y)]
    if not pts:
        return
    xs, ys = zip(*pts)
    ax.plot(xs, [scale * y for y in ys], markevery=_markevery(len(xs)), **style)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def robustness_figure(panels: Sequence[Panel], *, title: str) -> bytes:
    """Accuracy against epsilon, one subplot per attack; x in the papers' pixel scale (x/255)."""
    from matplotlib.ticker import FuncFormatter

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = _new_figure(4.6 * cols + 0.6, 3.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        main_styles, thin_markers = cycle(_STYLES), cycle(mk for _, mk in _STYLES[1:])
        for curve in panel.curves:
            pts = sorted(zip(curve.eps, curve.accuracy))
            xs = [255 * e for e, _ in pts]
            ys = [100 * a for _, a in pts]
            if curve.emphasis:
                ls, mk = next(main_styles)
                ax.plot(xs, ys, linestyle=ls, marker=mk, linewidth=2.4, markersize=6.5, label=curve.label,
                        zorder=3)
            else:
                ax.plot(xs, ys, linestyle=":", marker=next(thin_markers), linewidth=1.0, markersize=4,
                        alpha=0.8, color="grey", label=curve.label, zorder=2)
        ticks = sorted({255 * e for c in panel.curves for e in c.eps})
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(_eps_tick))
        ax.tick_params(axis="x", labelrotation=45 if len(ticks) > 5 else 0)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("ε (pixel scale, x/255)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(panel.title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _png(fig)


@dataclass(frozen=True)
class Bar:
    """One bar of a grouped bar chart: accuracy in [0, 1] with its 95% interval."""

    group: str  # e.g. a run
    series: str  # e.g. "worst case"
    accuracy: float
    ci95: tuple[float, float] | None = None


_HATCHES = ("", "//", "..", "xx", "\\\\", "oo")


def interval_bars_figure(bars: Sequence[Bar], *, title: str, ylabel: str = "accuracy (%)") -> bytes:
    """Grouped bars (one group per run, one bar per series) with 95% interval whiskers; series are told
    apart by hatching and grey level, so the figure reads without colour."""
    groups = list(dict.fromkeys(b.group for b in bars))
    series = list(dict.fromkeys(b.series for b in bars))
    fig = _new_figure(1.6 + 1.1 * len(groups) * max(len(series), 1) * 0.6 + 1.5, 4.2)
    ax = fig.subplots()
    width = 0.8 / max(len(series), 1)
    for k, name in enumerate(series):
        shade = 0.15 + 0.7 * k / max(len(series) - 1, 1)
        for g, group in enumerate(groups):
            bar = next((b for b in bars if b.group == group and b.series == name), None)
            if bar is None:
                continue
            x = g - 0.4 + width * (k + 0.5)
            err = None
            if bar.ci95 is not None:
                err = [[100 * (bar.accuracy - bar.ci95[0])], [100 * (bar.ci95[1] - bar.accuracy)]]
            ax.bar(x, 100 * bar.accuracy, width, yerr=err, capsize=3, color=str(shade), edgecolor="black",
                   hatch=_HATCHES[k % len(_HATCHES)], label=name if g == 0 else None)
            top = bar.ci95[1] if bar.ci95 is not None else bar.accuracy
            ax.text(x, 100 * top + 1, f"{100 * bar.accuracy:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(series), frameon=False)
    fig.suptitle(title)
    return _png(fig)


@dataclass(frozen=True)
class LeaguePoint:
    """One defense of a league: clean and robust accuracy in [0, 1], each with its 95% interval."""

    label: str
    clean: float
    robust: float
    clean_ci95: tuple[float, float] | None = None
    robust_ci95: tuple[float, float] | None = None


def _interval_error(value: float, ci95: tuple[float, float] | None) -> list[list[float]] | None:
    return None if ci95 is None else [[100 * (value - ci95[0])], [100 * (ci95[1] - value)]]


def league_figure(points: Sequence[LeaguePoint], *, title: str, robust_label: str = "robust accuracy (%)") -> bytes:
    """Robust accuracy against clean accuracy, one point per defense with its 95% intervals on both
    axes; the dotted diagonal is robust = clean (no point can lie above it). Each defense has its own
    marker, black or white-filled, named in the legend, so the figure reads without colour (points
    that coincide overlap: the table beside the figure has the numbers)."""
    fig = _new_figure(7.8, 5.0)
    ax = fig.subplots()
    ax.plot([0, 100], [0, 100], linestyle=":", color="grey", linewidth=1, label="robust = clean", zorder=1)
    for k, (point, (_, marker)) in enumerate(zip(points, cycle(_STYLES))):
        ax.errorbar(100 * point.clean, 100 * point.robust, xerr=_interval_error(point.clean, point.clean_ci95),
                    yerr=_interval_error(point.robust, point.robust_ci95), fmt=marker, color="black",
                    markerfacecolor="black" if k % 2 == 0 else "white", markersize=8, capsize=3, elinewidth=1,
                    label=point.label, zorder=3)
    lows = [100 * (p.clean_ci95[0] if p.clean_ci95 else p.clean) for p in points]
    highs = [100 * (p.robust_ci95[1] if p.robust_ci95 else p.robust) for p in points]
    ax.set_xlim(max(0.0, min(lows, default=0.0) - 5), 101)
    ax.set_ylim(0, min(101.0, max(highs, default=100.0) + 8))
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(robust_label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _eps_tick(value: float, _pos: int) -> str:
    return "0\n(clean)" if abs(value) < 1e-9 else eps_label(value / 255)


def heatmap_figure(matrix: Sequence[Sequence[float]], *, title: str, colorbar_label: str,
                   percent: bool = True, xlabel: str = "target member (evaluated)",
                   ylabel: str = "source member (attacked)") -> bytes:
    """An annotated N x N heatmap; entry [i][j] sits at row i (source), column j (target)."""
    import numpy as np

    values = np.asarray(matrix, dtype=float) * (100.0 if percent else 1.0)
    n_rows, n_cols = values.shape
    fig = _new_figure(1.3 * n_cols + 2.6, 1.1 * n_rows + 1.6)
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    lo, hi = (0.0, 100.0) if percent else (float(finite.min(initial=0.0)), float(finite.max(initial=1.0)))
    if hi <= lo:
        hi = lo + 1.0
    image = ax.imshow(values, cmap="viridis", vmin=lo, vmax=hi)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(colorbar_label)
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            text = "n/a" if not np.isfinite(v) else (f"{v:.1f}" if percent else f"{v:.3g}")
            dark = np.isfinite(v) and (v - lo) / (hi - lo) < 0.55
            ax.text(j, i, text, ha="center", va="center", fontsize=10, fontweight="bold",
                    color="white" if dark else "black")
    ax.set_xticks(range(n_cols), [f"member {j + 1}" for j in range(n_cols)])
    ax.set_yticks(range(n_rows), [f"member {i + 1}" for i in range(n_rows)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _png(fig)


COHERENCE_BIN = 0.05  # histogram bin width on the coherence axis [-1, 1]


def coherence_histogram_figure(series: Sequence[tuple[str, Sequence[float]]], *, title: str) -> bytes:
    """Per-example coherence (max pairwise cosine of the members' input gradients, GAL paper eq. 7)
    as the % of examples per 0.05 bin on [-1, 1]: one step line per (label, values) series, so
    several runs overlay as in the paper's Figure 4. Values outside [-1, 1] (rounding) are clipped.
    """
    import numpy as np

    edges = np.linspace(-1.0, 1.0, round(2 / COHERENCE_BIN) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = _new_figure(7.0, 4.2)
    ax = fig.subplots()
    single = len(series) == 1
    for (label, values), (ls, mk) in zip(series, cycle(_STYLES)):
        counts, _ = np.histogram(np.clip(np.asarray(values, dtype=float), -1.0, 1.0), bins=edges)
        pct = 100.0 * counts / max(len(values), 1)
        if single:
            ax.bar(centers, pct, width=COHERENCE_BIN, color="0.75", edgecolor="black", linewidth=0.8,
                   label=f"{label} (n = {len(values)})")
        else:
            shown = pct > 0  # markers only where there are examples, so empty bins stay quiet
            ax.step(centers, pct, where="mid", linestyle=ls, linewidth=1.8, marker=mk, markersize=5,
                    markevery=list(np.flatnonzero(shown)), label=f"{label} (n = {len(values)})")
    ax.set_xlim(-1.0, 1.0)
    ax.set_ylim(bottom=0)
    ax.set_xticks(np.linspace(-1.0, 1.0, 9))
    ax.set_xlabel("coherence = max pairwise cosine of members' input gradients")
    ax.set_ylabel(f"examples (%) per bin of {COHERENCE_BIN:g}")
    ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def gaas_figure(results: Sequence[Mapping], *, title: str) -> bytes:
    """GAAS (GAL paper Figure 5): P(all k gradient-aligned orthogonal directions are adversarial) in %
    against k, one line per eps labelled in the papers' pixel scale (x/255)."""
    by_eps: dict[float, dict[int, float]] = {}
    for r in results:
        by_eps.setdefault(float(r["eps"]), {})[int(r["k"])] = float(r["p_all"])
    fig = _new_figure(7.0, 4.2)
    ax = fig.subplots()
    for (eps, pts), (ls, mk) in zip(sorted(by_eps.items()), cycle(_STYLES)):
        ks = sorted(pts)
        ax.plot(ks, [100 * pts[k] for k in ks], linestyle=ls, marker=mk, linewidth=2.0, markersize=6.5,
                label=f"ε = {eps_label(eps)}")
    ax.set_xticks(sorted({int(r["k"]) for r in results}))
    top = max((100 * float(r["p_all"]) for r in results), default=0.0)
    ax.set_ylim(bottom=-0.02 * max(10.0, top), top=min(102.0, max(10.0, 1.15 * top)))  # small p stay visible
    ax.set_xlabel("k (number of orthogonal gradient-aligned directions)")
    ax.set_ylabel("P(all k directions adversarial) (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="L∞ radius (pixel scale)", title_fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    return _png(fig)
