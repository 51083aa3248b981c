"""Choose the merge scale ``s`` of ``W = W0 + ΔW_semi + s·ΔW_on`` with the dual-benchmark rule (docs/method.md §8).

The base model and every scale are evaluated on the same prompts and seeds with an in-domain reward (the one that
was optimized) and an independent out-of-domain metric; the selected scale is the largest one that improves BOTH
over the base: it keeps as much of the reward gain as possible without paying for it out of domain.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from diffusers import DiffusionPipeline

from .adapters import merge_adapters
from .evaluation import EvaluationResult, RewardFunc, evaluate_pipeline, markdown_table, resolve_rewards
from .rewards import is_column_of, reward_names

__all__ = ["SweepPoint", "SweepResult", "select_merge_scale", "sweep_merge_scale"]

DEFAULT_SCALES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def select_merge_scale(base: tuple[float, float], results: Mapping[float, tuple[float, float]]) -> float | None:
    """The largest scale whose ``(in_domain, out_of_domain)`` are both strictly above the base's, else ``None``.

    Args:
        base: ``(in_domain, out_of_domain)`` of the base model.
        results: ``{scale: (in_domain, out_of_domain)}``. NaN never counts as an improvement.
    """
    improving = [scale for scale, (ind, ood) in results.items() if ind > base[0] and ood > base[1]]
    return max(improving, default=None)


@dataclass
class SweepPoint:
    """One evaluated model: the base (``scale=None``) or the combination at ``scale``.

    Attributes:
        scale: the swept adapter's scale, ``None`` for the base model.
        in_domain / out_of_domain: the two metrics (sum of the means of each side's reward columns).
        evaluation: the full per-prompt evaluation.
    """

    scale: float | None
    in_domain: float
    out_of_domain: float
    evaluation: EvaluationResult = field(repr=False)


@dataclass
class SweepResult:
    """What :func:`sweep_merge_scale` measured and chose.

    Attributes:
        swept / fixed: the swept adapter's name and the fixed ``{adapter: scale}`` it was combined with.
        base: the base model (adapters disabled).
        points: one :class:`SweepPoint` per scale, in the order of the sweep.
        selected_scale: the largest scale improving both metrics over the base, or ``None``.
        in_domain_columns / out_of_domain_columns: the reward columns summed into each metric.
        plot_path: where the plot was saved, if it was.
    """

    swept: str
    fixed: dict[str, float]
    base: SweepPoint
    points: list[SweepPoint]
    selected_scale: float | None
    in_domain_columns: list[str]
    out_of_domain_columns: list[str]
    plot_path: Path | None = None

    @property
    def selected_adapters(self) -> dict[str, float] | None:
        """The selected ``{adapter: scale}`` combination, or ``None``."""
        return None if self.selected_scale is None else {**self.fixed, self.swept: self.selected_scale}

    def summary(self) -> str:
        if self.selected_scale is None:
            return (
                f"No scale of '{self.swept}' improves both the in-domain reward and the out-of-domain metric over the "
                "base model: keep the base model, or train/evaluate with other settings."
            )
        return (
            f"Selected scale {self.selected_scale:g}: the largest that improves both metrics over the base "
            f"(adapters {self.selected_adapters})."
        )

    def to_markdown(self) -> str:
        rows = [["base", self.base.in_domain, self.base.out_of_domain, ""]]
        for point in self.points:
            mark = "yes" if point.scale == self.selected_scale else ""
            rows.append([f"{point.scale:g}", point.in_domain, point.out_of_domain, mark])
        header = [
            f"{self.swept} scale",
            f"in-domain ({' + '.join(self.in_domain_columns)})",
            f"out-of-domain ({' + '.join(self.out_of_domain_columns)})",
            "selected",
        ]
        return f"{markdown_table(header, rows)}\n\n{self.summary()}"

    def __str__(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict[str, Any]:
        """The metrics and the choice as plain JSON-serialisable values (no per-prompt tables)."""
        return {
            "swept": self.swept,
            "fixed": self.fixed,
            "in_domain_columns": self.in_domain_columns,
            "out_of_domain_columns": self.out_of_domain_columns,
            "base": {"in_domain": self.base.in_domain, "out_of_domain": self.base.out_of_domain},
            "points": [
                {"scale": p.scale, "in_domain": p.in_domain, "out_of_domain": p.out_of_domain} for p in self.points
            ],
            "selected_scale": self.selected_scale,
        }


def _check_sweep(scales: Sequence[float], fixed: Mapping[str, float], swept: str) -> list[float]:
    scales = list(scales)
    if not scales:
        raise ValueError("`scales` is empty: pass the scales to try, e.g. (0, 0.2, 0.4, 0.6, 0.8, 1.0).")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"`scales` must be finite numbers >= 0, got {scale!r}.")
    if swept in fixed:
        raise ValueError(f"The swept adapter {swept!r} is also in `fixed` ({dict(fixed)}); remove it from `fixed`.")
    return sorted({float(s) for s in scales})


def _columns_of(evaluation: EvaluationResult, names: list[str]) -> list[str]:
    """The reward columns of the rewards called ``names`` (``name`` or its heads ``name:head``)."""
    return [c for c in evaluation.reward_columns if any(is_column_of(c, n) for n in names)]


def _metric(evaluation: EvaluationResult, columns: list[str]) -> float:
    return sum(evaluation.means[c] for c in columns)


def _plot(result: SweepResult, path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state, renders with Agg

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    scales = [p.scale for p in result.points]
    for ax, attribute, columns, title in (
        (axes[0], "in_domain", result.in_domain_columns, "in-domain reward"),
        (axes[1], "out_of_domain", result.out_of_domain_columns, "out-of-domain metric"),
    ):
        ax.plot(scales, [getattr(p, attribute) for p in result.points], marker="o", label="merged")
        ax.axhline(getattr(result.base, attribute), color="gray", linestyle="--", label="base")
        if result.selected_scale is not None:
            ax.axvline(
                result.selected_scale, color="green", linestyle=":", label=f"selected s={result.selected_scale:g}"
            )
        ax.set_xlabel(f"scale of '{result.swept}'")
        ax.set_ylabel(" + ".join(columns))
        ax.set_title(title)
        ax.legend()
    fixed = ", ".join(f"{name}={scale:g}" for name, scale in result.fixed.items())
    figure.suptitle(f"Merge-scale sweep ({fixed or 'no fixed adapters'})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def sweep_merge_scale(
    pipe: DiffusionPipeline,
    prompts: Sequence[str] | Dataset,
    *,
    in_domain: RewardFunc | Sequence[RewardFunc],
    out_of_domain: RewardFunc | Sequence[RewardFunc],
    scales: Sequence[float] = DEFAULT_SCALES,
    fixed: Mapping[str, float] | None = None,
    swept: str = "on_policy",
    plot_path: str | os.PathLike | None = None,
    **eval_kwargs: Any,
) -> SweepResult:
    """Evaluate the base model and ``{**fixed, swept: s}`` for every ``s``; pick the largest ``s`` improving both.

    Every model sees the same videos' noise (:func:`~trl_arcopo.evaluation.evaluate_pipeline` seeds each prompt), and
    the in-domain and out-of-domain rewards score the same videos. A side given several rewards, or a reward with
    several heads, is measured by the sum of the column means (e.g. VideoAlign's Overall = VQ + MQ + TA).

    Args:
        pipe: pipeline with the ``fixed`` and ``swept`` adapters loaded.
        prompts: evaluation prompts (or a ``Dataset`` with a ``prompt`` column).
        in_domain: the reward(s) that were optimized (callables or built-in names).
        out_of_domain: an independent metric (callables or built-in names).
        scales: scales of the swept adapter to try (evaluated in increasing order, duplicates dropped).
        fixed: adapters kept at a fixed scale, default ``{"semi": 1.0}``.
        swept: the adapter whose scale is swept.
        plot_path: where to save a PNG of both metrics against the scale, with the base as a horizontal line.
        eval_kwargs: ``num_frames``, ``height``, ``width``, ``batch_size``, ``seed``, ``progress_bar`` and
            generation arguments of :func:`~trl_arcopo.evaluation.evaluate_pipeline`.

    Returns:
        A :class:`SweepResult` (also printed as a table with the selection). On return the pipeline runs the selected
        combination, or the base model (LoRA disabled) when no scale is selected.

    Raises:
        ValueError: empty or negative scales, ``swept`` also in ``fixed``, unknown adapters or rewards.
    """
    fixed = {"semi": 1.0} if fixed is None else dict(fixed)
    scales = _check_sweep(scales, fixed, swept)
    in_funcs, out_funcs = resolve_rewards(in_domain), resolve_rewards(out_of_domain)
    if not in_funcs or not out_funcs:
        raise ValueError("`in_domain` and `out_of_domain` each need at least one reward.")
    merge_adapters(pipe, {**fixed, swept: scales[0]})  # check every adapter name before the first generation
    funcs = in_funcs + out_funcs
    names = reward_names(funcs)

    def evaluate(adapters: dict[str, float]) -> EvaluationResult:
        return evaluate_pipeline(pipe, prompts, funcs, adapters=adapters, **eval_kwargs)

    base_evaluation = evaluate({})
    in_cols = _columns_of(base_evaluation, names[: len(in_funcs)])
    out_cols = _columns_of(base_evaluation, names[len(in_funcs) :])

    def point(scale: float | None, evaluation: EvaluationResult) -> SweepPoint:
        return SweepPoint(scale, _metric(evaluation, in_cols), _metric(evaluation, out_cols), evaluation)

    base = point(None, base_evaluation)
    points = [point(scale, evaluate({**fixed, swept: scale})) for scale in scales]
    selected = select_merge_scale(
        (base.in_domain, base.out_of_domain), {p.scale: (p.in_domain, p.out_of_domain) for p in points}
    )
    result = SweepResult(
        swept=swept,
        fixed=fixed,
        base=base,
        points=points,
        selected_scale=selected,
        in_domain_columns=in_cols,
        out_of_domain_columns=out_cols,
    )
    if plot_path is not None:
        _plot(result, plot_path)
        result.plot_path = Path(plot_path)
    if result.selected_adapters is None:
        pipe.disable_lora()
    else:
        merge_adapters(pipe, result.selected_adapters)
    print(result)
    return result
