"""Score a pipeline: generate one video per prompt with fixed seeds and collect every reward into a table.

The same prompts and seed always give the same noise (initial latents and re-noise draws) per prompt, whatever the
batch size and whatever adapters are active, so two evaluations differ only by the model: this is how adapters and
merge scales are compared (:mod:`trl_arcopo.sweep`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from .adapters import merge_adapters
from .rewards import RewardFunctionError, RewardOutputError, compute_rewards, load_reward, reward_names

logger = logging.getLogger(__name__)

__all__ = ["EvaluationResult", "evaluate_pipeline", "markdown_table", "resolve_rewards"]

RewardFunc = Callable[..., Any] | str
# Arguments of the pipeline call that `evaluate_pipeline` sets itself.
_RESERVED_GENERATION_KWARGS = ("prompt", "prompt_embeds", "latents", "generator", "output_type", "return_dict")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are written with 4 significant digits."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class EvaluationResult:
    """Per-prompt scores of one evaluation.

    Attributes:
        table: one row per prompt: ``prompt``, ``seed`` and one float column per reward or reward head, named as
            :func:`~trl_arcopo.rewards.compute_rewards` names them (``name`` or ``name:head``); NaN where a reward
            returned no score.
        means: ``{column: mean over the prompts}`` of every reward column, ignoring NaN (NaN if a column has no score).
    """

    table: Dataset
    means: dict[str, float]

    @property
    def reward_columns(self) -> list[str]:
        return list(self.means)

    def to_markdown(self) -> str:
        """The per-prompt table followed by a ``mean`` row."""
        columns = self.reward_columns
        rows = [[row["prompt"], row["seed"], *(row[c] for c in columns)] for row in self.table]
        rows.append(["**mean**", "", *(self.means[c] for c in columns)])
        return markdown_table(["prompt", "seed", *columns], rows)

    def __str__(self) -> str:
        return self.to_markdown()


def resolve_rewards(reward_funcs: RewardFunc | Sequence[RewardFunc]) -> list[Callable[..., Any]]:
    """The reward callables of one reward or a list of them; strings are built with
    :func:`~trl_arcopo.rewards.load_reward` (registered names, Hub ids, reward-server URLs)."""
    rewards = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    for reward in rewards:
        if not isinstance(reward, str) and not callable(reward):
            raise TypeError(f"A reward must be a callable or a reward name, got {type(reward).__name__}: {reward!r}.")
    return [load_reward(reward) if isinstance(reward, str) else reward for reward in rewards]


@contextlib.contextmanager
def _quiet(pipe: DiffusionPipeline) -> Iterator[None]:
    """Silence the pipeline's per-call progress bar (one bar over the batches instead), then restore its config."""
    previous = dict(getattr(pipe, "_progress_bar_config", {}))  # diffusers keeps it as a private attribute
    pipe.set_progress_bar_config(**{**previous, "disable": True})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**previous)


def _check_arguments(prompts: Sequence[str], batch_size: int, generation_kwargs: Mapping[str, Any]) -> None:
    if not prompts:
        raise ValueError("`prompts` is empty: pass at least one prompt.")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"`prompts` must be strings; entries {bad[:5]} are not (e.g. {prompts[bad[0]]!r}).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    reserved = [key for key in _RESERVED_GENERATION_KWARGS if key in generation_kwargs]
    if reserved:
        raise ValueError(f"`evaluate_pipeline` sets {reserved} itself; remove them from the generation arguments.")


@torch.no_grad()
def evaluate_pipeline(
    pipe: DiffusionPipeline,
    prompts: Sequence[str] | Dataset,
    reward_funcs: RewardFunc | Sequence[RewardFunc],
    *,
    num_frames: int,
    height: int,
    width: int,
    batch_size: int = 1,
    seed: int = 0,
    adapters: Mapping[str, float] | None = None,
    progress_bar: bool = True,
    reward_error: str = "raise",
    **generation_kwargs: Any,
) -> EvaluationResult:
    """Generate one video per prompt and score it with every reward.

    Prompt ``i`` is generated from CPU generators seeded with ``seed + i`` (initial noise and re-noise draws), so its
    video does not depend on the batch size, the device's random number generator or the adapters.

    Args:
        pipe: a text-to-video pipeline called as ``pipe(prompt=[...], num_frames=..., height=..., width=...,
            generator=[...], output_type="pt")`` that returns ``frames`` ``[B, F, 3, H, W]`` in ``[0, 1]`` (e.g.
            :class:`~trl_arcopo.CausalWanPipeline`).
        prompts: the prompts, or a ``datasets.Dataset`` with a ``prompt`` column whose other columns are passed to
            the rewards as keyword arguments (lists for the batch), as in training.
        reward_funcs: one reward or several: callables following :mod:`trl_arcopo.rewards.protocol`, or names for
            :func:`~trl_arcopo.rewards.load_reward` (``"brightness"``, ``"videoalign"``, Hub ids, server URLs).
        num_frames, height, width: video size (pixel frames, pixels).
        batch_size: prompts per pipeline call.
        seed: base seed; prompt ``i`` uses ``seed + i``.
        adapters: ``None``: the pipeline as it is; ``{}``: the base model (LoRA layers disabled); otherwise the
            combination ``{adapter_name: scale}`` activated with :func:`~trl_arcopo.adapters.merge_adapters`. The
            setting stays in effect after the call.
        progress_bar: show a progress bar over the batches (the pipeline's own bar is silenced meanwhile).
        reward_error: when a reward raises or returns malformed scores: ``"raise"`` (a ``RuntimeError``) or
            ``"nan"`` (log a warning and give the batch's prompts NaN scores).
        generation_kwargs: other arguments of the pipeline call.

    Returns:
        An :class:`EvaluationResult` with the per-prompt table and the mean of each reward column.

    Raises:
        ValueError: empty or non-string prompts, a ``Dataset`` without a ``prompt`` column, a bad ``batch_size``,
            generation arguments this function sets itself, unknown reward names or adapters.
        RuntimeError: with ``reward_error="raise"``, a reward raised or returned malformed scores; the message names
            the reward and the prompts.
    """
    if reward_error not in ("raise", "nan"):
        raise ValueError(f"`reward_error` must be 'raise' or 'nan', got {reward_error!r}.")
    funcs = resolve_rewards(reward_funcs)
    if not funcs:
        raise ValueError("`reward_funcs` is empty: pass at least one reward.")
    if isinstance(prompts, Dataset):
        if "prompt" not in prompts.column_names:
            raise ValueError(f"The prompts dataset needs a 'prompt' column; it has {prompts.column_names}.")
        extra_columns = {name: list(prompts[name]) for name in prompts.column_names if name != "prompt"}
        prompts = list(prompts["prompt"])
    elif isinstance(prompts, str):
        raise ValueError(f"`prompts` must be a list of prompts, got the string {prompts!r}; wrap it in a list.")
    else:
        extra_columns = {}
        prompts = list(prompts)
    _check_arguments(prompts, batch_size, generation_kwargs)
    if adapters is not None:
        if adapters:
            merge_adapters(pipe, adapters)
        else:
            pipe.disable_lora()

    batch_scores: list[dict[str, torch.Tensor] | None] = []
    starts = range(0, len(prompts), batch_size)
    with _quiet(pipe):
        for start in tqdm(starts, desc="Evaluating", unit="batch", disable=not progress_bar):
            batch = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
            videos = pipe(
                prompt=batch,
                num_frames=num_frames,
                height=height,
                width=width,
                generator=generators,
                output_type="pt",
                **generation_kwargs,
            ).frames
            reward_kwargs = {name: values[start : start + batch_size] for name, values in extra_columns.items()}
            try:
                batch_scores.append(compute_rewards(funcs, batch, videos, reward_kwargs=reward_kwargs))
            except (RewardFunctionError, RewardOutputError) as error:
                message = (
                    f"Evaluation failed on prompts {start}..{start + len(batch) - 1} ({batch[0]!r}, ...): {error}"
                )
                if reward_error == "raise":
                    raise RuntimeError(message) from error
                logger.warning("%s Their scores are NaN.", message)
                batch_scores.append(None)

    names = next((list(scores) for scores in batch_scores if scores is not None), reward_names(funcs))
    columns: dict[str, list[float]] = {name: [] for name in names}
    for start, scores in zip(starts, batch_scores, strict=True):
        size = min(batch_size, len(prompts) - start)
        for name in names:
            columns[name].extend(scores[name].tolist() if scores is not None else [math.nan] * size)

    means = {}
    for name, values in columns.items():
        finite = [v for v in values if not math.isnan(v)]
        means[name] = sum(finite) / len(finite) if finite else math.nan
    table = Dataset.from_dict({"prompt": prompts, "seed": [seed + i for i in range(len(prompts))], **columns})
    return EvaluationResult(table=table, means=means)
