"""Training curves of an AR-CoPO run, drawn from the trainer's log history."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["plot_training_curves", "training_curves_figure"]

# One panel per group of metrics: (title, y label, log scale, running mean, which keys).
_PANELS = (
    ("Reward", "weighted sum", False, True, lambda key: key == "reward"),
    (
        "Rewards per function / head",
        "mean",
        False,
        True,
        lambda key: key.startswith("rewards/") and key.endswith("/mean"),
    ),
    ("Clipped fraction", "fraction of ratios", False, False, lambda key: key.startswith("clip_ratio/")),
    ("Policy ratio", "ratio", True, False, lambda key: key.startswith("ratio/")),
    ("KL to the reference", "KL", False, False, lambda key: key == "kl"),
)
# A rollout's reward swings with its group's prompt; from this many points on, the reward panels add a running mean
# over the last sixth of them, so that the trend shows.
_RUNNING_MEAN_FROM = 12


def _running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / min(i + 1, window) for i in range(len(values))]


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
    (`clip_ratio/*`), the policy ratio statistics (`ratio/*`) and the KL. From 12 logged rewards on, a reward panel
    draws each reward faint with its running mean over the last sixth of them on top. Evaluation logs (`eval_reward`,
    `eval_rewards/...`) are drawn as markers on the panel of their training metric; missing keys and `None` values
    are skipped, and a history without any of these metrics gives a single panel saying so."""
    series = _series(log_history)
    panels = []
    for title, ylabel, log_scale, smooth, accepts in _PANELS:
        keys = sorted(name for name in series if accepts(name.removeprefix("eval:")))
        if keys:
            panels.append((title, ylabel, log_scale, smooth, keys))
    figure = Figure(figsize=(6.4, 2.6 * max(len(panels), 1)), layout="constrained")
    if not panels:
        axes = figure.add_subplot()
        axes.text(0.5, 0.5, "no reward or ratio metrics logged yet", ha="center", va="center")
        axes.set_axis_off()
        return figure
    for row, (title, ylabel, log_scale, smooth, keys) in enumerate(panels, start=1):
        axes = figure.add_subplot(len(panels), 1, row)
        for name in keys:
            steps, values = series[name]
            key = name.removeprefix("eval:")
            column = key.removeprefix("rewards/").removesuffix("/mean") if key.startswith("rewards/") else key
            label = name.removesuffix(key) + column
            if name.startswith("eval:"):
                axes.plot(steps, values, "o", label=label)
            elif smooth and len(values) >= _RUNNING_MEAN_FROM:
                (raw,) = axes.plot(steps, values, "-", alpha=0.35, linewidth=1, label=label)
                window = len(values) // 6
                mean = _running_mean(values, window)
                axes.plot(
                    steps, mean, "-", color=raw.get_color(), linewidth=2, label=f"{label}, mean of last {window}"
                )
            else:
                axes.plot(steps, values, "-", label=label)
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
