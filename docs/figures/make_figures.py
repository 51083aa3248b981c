"""Draw the figures of the documentation: `python docs/figures/make_figures.py` rewrites `docs/figures/*.svg`.

The SVG files are deterministic (fixed hash salt, no date, text kept as text), so re-running this script on an
unchanged figure leaves them byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams.update({"svg.hashsalt": "trl_arcopo", "svg.fonttype": "none", "font.size": 11})

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

FIGURES = Path(__file__).resolve().parent
BRANCH_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759")


def _box(axes, x, y, width, height, text, face, edge="#555555", color="black", size=11):
    axes.add_patch(
        FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0,rounding_size=0.12", fc=face, ec=edge, lw=1.5)
    )
    axes.text(x + width / 2, y + height / 2, text, ha="center", va="center", color=color, fontsize=size)


def _arrow(axes, start, end, curve=0.0):
    axes.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops={"arrowstyle": "-|>", "color": "#555555", "lw": 1.3, "connectionstyle": f"arc3,rad={curve}"},
    )


def forking_figure() -> Figure:
    """One rollout group: a shared prefix, G branches forked at the pivot chunk, shared continuation, rewards and
    group advantages, and the contrastive update below."""
    figure = Figure(figsize=(12, 6.2))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, 24)
    axes.set_ylim(0, 12.4)
    axes.set_axis_off()
    axes.text(
        12,
        11.8,
        "One rollout group: fork the noise of one chunk, keep everything else shared",
        ha="center",
        fontsize=14,
        weight="bold",
    )

    # Prefix, generated once.
    axes.text(2.3, 7.9, "prefix: chunks 1 … p−1\ngenerated once,\nKV cache shared", ha="center", fontsize=10)
    _box(axes, 0.3, 6.3, 1.8, 1.1, "chunk 1", "#d9d9d9")
    _box(axes, 2.4, 6.3, 1.8, 1.1, "… p−1", "#d9d9d9")
    axes.plot([4.2, 4.7], [6.85, 6.85], color="#555555", lw=1.5)
    axes.plot([4.8], [6.85], "o", color="#555555", ms=8)
    axes.text(4.8, 5.9, "fork(G)", ha="center", fontsize=10)

    for title, x in (("pivot chunk p", 6.9), ("chunks p+1 … L", 10.9), ("decode, score", 15.3), ("advantages", 20.9)):
        axes.text(x, 10.7, title, ha="center", weight="bold")
    rows = (9.3, 7.5, 5.7, 2.9)
    labels = ("1", "2", "3", "G")
    for y, label, color in zip(rows, labels, BRANCH_COLORS, strict=True):
        _arrow(axes, (4.9, 6.85), (5.5, y + 0.55), curve=0.0)
        _box(axes, 5.5, y, 2.8, 1.1, f"$\\epsilon_p^{{({label})}}$", color, edge=color, color="white", size=13)
        _arrow(axes, (8.3, y + 0.55), (9.0, y + 0.55))
        _box(axes, 9.0, y, 3.8, 1.1, "shared $\\epsilon^*_c$, $\\eta_{c,s}$", "#f2f2f2", edge=color)
        _arrow(axes, (12.8, y + 0.55), (13.6, y + 0.55))
        _box(axes, 13.6, y, 3.4, 1.1, f"video {label} → $r_{{{label}}}$", "#fff8e1", edge="#b8860b")
        _arrow(axes, (17.0, y + 0.55), (18.7, 6.85), curve=0.0)
    axes.text(6.9, 4.55, "⋮", ha="center", fontsize=18)
    axes.text(10.9, 4.55, "⋮", ha="center", fontsize=18)
    _box(
        axes,
        18.7,
        6.0,
        4.6,
        1.7,
        "$A_i = \\dfrac{r_i - \\mathrm{mean}(r)}{\\mathrm{std}(r) + 10^{-4}}$",
        "#eef5ee",
        edge="#59a14f",
        size=12,
    )

    axes.text(
        6.9,
        2.35,
        "$\\epsilon_p^{(i)} = \\sqrt{1-\\sigma^2}\\,\\epsilon^*_p + \\sigma\\,\\delta^{(i)}$,"
        "  $\\delta^{(i)} \\sim \\mathcal{N}(0, I)$",
        ha="center",
        va="center",
        fontsize=11,
    )
    axes.text(15.3, 2.35, "the G videos differ only through chunk p", ha="center", va="center", fontsize=11)

    _box(axes, 0.3, 0.1, 23.4, 1.75, "", "#f4f0fa", edge="#8e6bbf")
    update = (
        "Update, on the pivot chunk only (prefix context recomputed without grad): for B anchors k and every sampler "
        "step s,",
        "the policy's $\\hat{x}_0^\\theta(x_s^{(k)})$ is compared with the G recorded candidates "
        "$\\hat{x}_{0,s}^{(i)}$:  $\\log\\pi(i\\,|\\,a) = \\mathrm{log\\_softmax}_i(-d_i(a)/\\tau)$,",
        "$\\rho_i = \\pi_\\theta(i|a)/\\pi_{old}(i|a)$ clipped to $[1-\\epsilon, 1+\\epsilon]$,   "
        "loss $= -\\mathrm{mean}_i\\,\\min(\\rho_i A_i,\\ \\mathrm{clip}(\\rho_i)\\,A_i)$",
    )
    for line, y in zip(update, (1.5, 0.98, 0.42), strict=True):
        axes.text(0.6, y, line, fontsize=10.5, va="center")
    return figure


def main() -> None:
    forking_figure().savefig(FIGURES / "forking.svg", metadata={"Date": None})


if __name__ == "__main__":
    main()
