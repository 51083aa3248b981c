"""Training curves of an AR-CoPO run, drawn from the trainer's log history."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["plot_training_curves", "training_curves_figure"]

# One panel per group of metrics: (title, y label, log scale, which keys).
_PANELS = (
    ("Reward", "weighted sum", False, lambda key: key == "reward"),
    ("Rewards per function / head", "mean", False, lambda key: key.startswith("rewards/") and key.endswith("/mean")),
    ("Clipped fraction", "fraction of ratios", False, lambda key: key.startswith("clip_ratio/")),
    ("Policy ratio", "ratio", True, lambda key: key.startswith("ratio/")),
    ("KL to the reference", "KL", False, lambda key: key == "kl"),
)


def _series(log_history: Sequence[Mapping[str, object]]) -> dict[str, tuple[list[float], list[float]]]:
    """`{key: (steps, values)}` of every finite number logged (eval keys without their `eval_` prefix get a separate
    series named `eval:<key>`)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, entry in enumerate(log_history):
        step = entry.get("step", index)
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            name = f"eval:{key.removeprefix('eval_')}" if key.startswith("eval_") else key
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def training_curves_figure(log_history: Sequence[Mapping[str, object]]) -> Figure:
    """A figure with one panel per metric group found in `log_history` (`trainer.state.log_history`): the total
    reward, each reward column (`rewards/<name>/mean`, `<name>:<head>` for multi-head rewards), the clipped fractions
    (`clip_ratio/*`), the policy ratio statistics (`ratio/*`) and the KL. Evaluation logs (`eval_reward`,
    `eval_rewards/...`) are drawn as markers on the panel of their training metric; missing keys and `None` values
    are skipped, and a history without any of these metrics gives a single panel saying so."""
    series = _series(log_history)
    panels = []
    for title, ylabel, log_scale, accepts in _PANELS:
        keys = sorted(name for name in series if accepts(name.removeprefix("eval:")))
        if keys:
            panels.append((title, ylabel, log_scale, keys))
    figure = Figure(figsize=(6.4, 2.6 * max(len(panels), 1)), layout="constrained")
    if not panels:
        axes = figure.add_subplot()
        axes.text(0.5, 0.5, "no reward or ratio metrics logged yet", ha="center", va="center")
        axes.set_axis_off()
        return figure
    for row, (title, ylabel, log_scale, keys) in enumerate(panels, start=1):
        axes = figure.add_subplot(len(panels), 1, row)
        for name in keys:
            steps, values = series[name]
            key = name.removeprefix("eval:")
            column = key.removeprefix("rewards/").removesuffix("/mean") if key.startswith("rewards/") else key
            label = name.removesuffix(key) + column
            axes.plot(steps, values, "o" if name.startswith("eval:") else "-", label=label)
        if log_scale:
            axes.set_yscale("log")
        axes.set_title(title)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    axes.set_xlabel("step")
    return figure


def plot_training_curves(log_history: Sequence[Mapping[str, object]], path: str | os.PathLike) -> Path:
    """Draw [`training_curves_figure`] of `log_history` (e.g. `trainer.state.log_history`) into the image file
    `path` (format from its suffix, e.g. `.png`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training_curves_figure(log_history).savefig(path, dpi=100)
    return path
