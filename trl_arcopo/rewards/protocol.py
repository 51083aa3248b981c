"""The reward protocol: how AR-CoPO calls video rewards and how their outputs are checked and collected.

A reward is any callable (plain function, object with ``__call__``, ``nn.Module``)::

    reward(prompts: list[str], videos: torch.Tensor, **kwargs) -> list[float | None] | dict[str, list[float | None]]

- ``prompts`` has one prompt per video; ``videos`` is a floating tensor ``[B, F, 3, H, W]`` with values in ``[0, 1]``
  and ``B == len(prompts)``. Both are passed positionally, so the parameter names are free.
- Extra dataset columns (lists of length ``B``) and trainer-provided values arrive as keyword arguments: a reward
  must accept ``**kwargs`` and ignore what it does not use.
- The return value is one score per video (``None`` = "no score for this video", becomes NaN), as a list, tuple,
  1-D tensor or 1-D array, or a dict of named heads ``{head: scores}`` (e.g. VideoAlign's ``VQ``/``MQ``/``TA``).
- ``async def`` rewards are supported by :func:`compute_rewards`: they are awaited concurrently.

:func:`compute_rewards` calls a list of rewards and returns one float64 column per reward (``name``) or head
(``name:head``), NaN where a reward returned ``None`` or a non-finite number.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "RewardFunctionError",
    "RewardOutputError",
    "compute_rewards",
    "normalize_reward_output",
    "reward_name",
    "reward_names",
    "validate_videos",
]

# Values may exceed [0, 1] by this much (decoders and float round-off overshoot slightly).
_RANGE_TOLERANCE = 1e-3
# Keyword arguments that would collide with the positional `prompts` / `videos`.
_RESERVED_KWARGS = ("prompts", "videos")


class RewardOutputError(ValueError):
    """A reward returned something that is not one score per video (wrong type, length or non-numeric entries)."""


class RewardFunctionError(RuntimeError):
    """A reward raised; the original exception is ``__cause__``, the reward's column name is ``reward_name``."""

    def __init__(self, message: str, *, reward_name: str):
        super().__init__(message)
        self.reward_name = reward_name


# --------------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------------


def validate_videos(videos: Any) -> None:
    """Check that ``videos`` is a non-empty floating tensor ``[B, F, 3, H, W]`` with values in ``[0, 1]``.

    Values may exceed the range by ``1e-3``; NaN values are rejected. Reading the range costs one pass over the tensor
    (and a device synchronisation on accelerators).

    Raises:
        ValueError: naming ``videos``, what was expected and what was got.
    """
    expected = "a floating torch.Tensor [B, F, 3, H, W] with values in [0, 1]"
    if not isinstance(videos, torch.Tensor):
        raise ValueError(f"`videos` must be {expected}, got {type(videos).__name__}.")
    if videos.ndim != 5:
        raise ValueError(
            f"`videos` must be {expected}, got a tensor of rank {videos.ndim} with shape {tuple(videos.shape)}."
        )
    if videos.shape[2] != 3:
        raise ValueError(
            f"`videos` must be {expected} (3 RGB channels at dim 2), got shape {tuple(videos.shape)} "
            f"with {videos.shape[2]} channels at dim 2."
        )
    if not videos.is_floating_point():
        raise ValueError(
            f"`videos` must be {expected}, got dtype {videos.dtype} (convert uint8 frames with `frames / 255`)."
        )
    if videos.shape[0] == 0:
        raise ValueError(f"`videos` must be {expected} with B >= 1, got an empty batch (shape {tuple(videos.shape)}).")
    if videos.numel() == 0:
        raise ValueError(f"`videos` must be {expected} with F, H, W >= 1, got shape {tuple(videos.shape)}.")
    vmin, vmax = (float(v) for v in torch.aminmax(videos.detach()))
    if math.isnan(vmin) or math.isnan(vmax):
        raise ValueError(f"`videos` must be {expected}, got NaN values.")
    if vmin < -_RANGE_TOLERANCE or vmax > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"`videos` must be {expected}, got values in [{vmin:.4g}, {vmax:.4g}] "
            "(videos in [-1, 1] need `(videos + 1) / 2`)."
        )


def _validate_video_batch(videos: Any) -> int:
    """Check a tensor ``[B, F, 3, H, W]`` (:func:`validate_videos`) or a non-empty list of tensors ``[F, 3, H, W]``
    (videos that may differ in size) with values in ``[0, 1]``; return ``B``."""
    if isinstance(videos, torch.Tensor):
        validate_videos(videos)
        return videos.shape[0]
    if not isinstance(videos, (list, tuple)) or not videos:
        got = "an empty list" if isinstance(videos, (list, tuple)) else type(videos).__name__
        raise ValueError(
            "`videos` must be a floating tensor [B, F, 3, H, W] or a non-empty list of floating tensors [F, 3, H, W] "
            f"with values in [0, 1], got {got}."
        )
    for i, video in enumerate(videos):
        if not isinstance(video, torch.Tensor) or video.ndim != 4:
            shape = f"shape {tuple(video.shape)}" if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"`videos[{i}]` must be a floating tensor [F, 3, H, W], got {shape}.")
        try:
            validate_videos(video.unsqueeze(0))
        except ValueError as error:
            raise ValueError(f"`videos[{i}]` (as a batch of one): {error}") from None
    return len(videos)


def _check_prompts(prompts: Any, batch_size: int) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"`prompts` must be a list of {batch_size} strings, got {type(prompts).__name__}.")
    if len(prompts) != batch_size:
        raise ValueError(
            f"`prompts` and `videos` must have the same batch size, got {len(prompts)} prompts "
            f"for {batch_size} videos."
        )


def _validate_inputs(prompts: Any, videos: Any) -> None:
    """`validate_videos` plus ``len(prompts) == B`` (shared by :func:`compute_rewards` and the built-in rewards)."""
    validate_videos(videos)
    _check_prompts(prompts, videos.shape[0])


# --------------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------------


def _config_name(config: Any) -> str | None:
    if isinstance(config, Mapping):
        path = config.get("_name_or_path")
    else:
        path = getattr(config, "_name_or_path", None)
    if isinstance(path, str) and path.strip("/"):
        return path.rstrip("/").split("/")[-1]
    return None


def reward_name(func: Any) -> str:
    """The name under which a reward is logged (``rewards/{name}/mean``) and its column is stored.

    In order of precedence, after unwrapping ``functools.partial``:

    1. a string ``name`` attribute (lets any reward choose its name);
    2. ``config._name_or_path.split("/")[-1]`` for objects with a (transformers/diffusers style) config, as TRL names
       reward models;
    3. ``__name__`` for functions (and other objects that have one, e.g. bound methods);
    4. the class name for other objects and ``nn.Module`` instances.
    """
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "name", None)
    if isinstance(name, str) and name:
        return name
    config = getattr(func, "config", None)
    if config is not None:
        name = _config_name(config)
        if name is not None:
            return name
    name = getattr(func, "__name__", None)
    if isinstance(name, str) and name:
        return name
    return type(func).__name__


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    i = 1
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


def reward_names(reward_funcs: Any) -> list[str]:
    """:func:`reward_name` of each reward, duplicates made unique with suffixes ``_1``, ``_2``, ... (in order).

    These are the names :func:`compute_rewards` uses (a reward returning heads yields columns ``name:head``).
    """
    taken: set[str] = set()
    names = []
    for func in _as_list(reward_funcs):
        name = _unique(reward_name(func), taken)
        taken.add(name)
        names.append(name)
    return names


def is_column_of(column: str, name: str) -> bool:
    """Whether reward column ``column`` (``name`` or ``name:head``, as :func:`compute_rewards` names them) comes from
    the reward named ``name``."""
    return column == name or column.startswith(f"{name}:")


def reward_column_weights(
    columns: Sequence[str], names: Sequence[str], weights: Sequence[float] | Mapping[str, float] | None
) -> list[float]:
    """One weight per reward column (``name`` or ``name:head``, as :func:`compute_rewards` names them).

    Args:
        columns: the reward columns, in order.
        names: the reward names (:func:`reward_names`) the columns come from.
        weights: ``None`` (every column weighs 1); a list with one weight per column, or one per reward (a reward's
            weight then applies to each of its heads); or a dict keyed by column or by reward name (a reward name
            covers all its heads; a column key wins over its reward's key). Columns a dict does not cover weigh 0.

    Raises:
        ValueError: a list of another length, or a dict key that is neither a column nor a reward name.
    """
    owner = {}
    for column in columns:
        matches = [n for n in names if is_column_of(column, n)]
        owner[column] = max(matches, key=len) if matches else column
    if weights is None:
        return [1.0] * len(columns)
    if isinstance(weights, Mapping):
        unknown = [key for key in weights if key not in owner and key not in names]
        if unknown:
            raise ValueError(
                f"`reward_weights` keys {unknown} are neither reward columns {list(columns)} nor reward names "
                f"{list(names)}; key the dict by column (e.g. 'videoalign:VQ') or by reward name."
            )
        return [float(weights.get(column, weights.get(owner[column], 0.0))) for column in columns]
    weights = [float(w) for w in weights]
    if len(weights) == len(columns):
        return weights
    if len(weights) == len(names):
        by_name = dict(zip(names, weights, strict=True))
        return [by_name[owner[column]] for column in columns]
    raise ValueError(
        f"`reward_weights` has {len(weights)} entries, but there are {len(names)} rewards {list(names)} and "
        f"{len(columns)} reward columns {list(columns)}: give one weight per reward or per column, or a dict keyed by "
        "column."
    )


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


def _entry_to_float(value: Any, index: int, name: str, head: str | None) -> float:
    where = f"reward '{name}'" + (f" head '{head}'" if head is not None else "")
    if value is None:
        return math.nan
    if isinstance(value, numbers.Real):  # includes bool, int and numpy float/int scalars
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.item())  # 0-d (or single-element) tensors
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1 and value.dtype.kind in "biuf":
        return float(value.item())  # numpy bools and single-element arrays
    raise RewardOutputError(
        f"{where} returned a non-numeric value at index {index}: {value!r} ({type(value).__name__}); "
        "expected a float or None per video."
    )


def _scores_to_tensor(scores: Any, batch_size: int, name: str, head: str | None) -> torch.Tensor:
    where = f"reward '{name}'" + (f" head '{head}'" if head is not None else "")
    expected = f"expected one score per video ({batch_size} values: a list of float | None, a 1-D tensor or array)"
    if isinstance(scores, torch.Tensor):
        if scores.ndim != 1:
            raise RewardOutputError(f"{where} returned a tensor of shape {tuple(scores.shape)}; {expected}.")
        if scores.is_complex():
            raise RewardOutputError(f"{where} returned a non-numeric tensor of dtype {scores.dtype}; {expected}.")
        values = scores.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(scores, np.ndarray):
        if scores.ndim != 1:
            raise RewardOutputError(f"{where} returned an array of shape {scores.shape}; {expected}.")
        if scores.dtype.kind in "biuf":
            values = torch.from_numpy(scores.astype(np.float64))
        else:  # object arrays may hold None
            values = torch.tensor(
                [_entry_to_float(v, i, name, head) for i, v in enumerate(scores.tolist())], dtype=torch.float64
            )
    elif isinstance(scores, (list, tuple)):
        values = torch.tensor([_entry_to_float(v, i, name, head) for i, v in enumerate(scores)], dtype=torch.float64)
    else:
        raise RewardOutputError(f"{where} returned {type(scores).__name__}; {expected}.")
    if values.shape[0] != batch_size:
        raise RewardOutputError(
            f"{where} returned {values.shape[0]} values for a batch of {batch_size} videos (expected {batch_size})."
        )
    return torch.where(torch.isfinite(values), values, torch.full_like(values, math.nan))


def normalize_reward_output(output: Any, batch_size: int, name: str) -> dict[str, torch.Tensor]:
    """Turn what reward ``name`` returned into ``{head: float64 CPU tensor [batch_size]}``.

    - one score per video (list, tuple, 1-D tensor or 1-D ndarray of floats, ints, bools, 0-d tensors or ``None``)
      → ``{"": scores}``;
    - a dict of heads ``{head: scores}`` → ``{head: scores}`` (heads are non-empty strings).

    ``None`` becomes NaN. **Non-finite values (±inf, NaN) are not an error here: they also become NaN**, so the caller
    can count and report them (and the advantage computation ignores them like missing scores).

    Raises:
        RewardOutputError: naming the reward (and head) for a wrong type, a wrong length (the message says the
            expected ``batch_size``) or non-numeric entries.
    """
    if isinstance(output, Mapping):
        if not output:
            raise RewardOutputError(f"reward '{name}' returned an empty dict; expected at least one head.")
        heads = {}
        for head, scores in output.items():
            if not isinstance(head, str) or not head:
                raise RewardOutputError(
                    f"reward '{name}' returned a dict with head name {head!r}; head names must be non-empty strings."
                )
            if isinstance(scores, Mapping):
                raise RewardOutputError(
                    f"reward '{name}' head '{head}' is a dict; expected one score per video ({batch_size} values)."
                )
            heads[head] = _scores_to_tensor(scores, batch_size, name, head)
        return heads
    if isinstance(output, (str, bytes)):
        raise RewardOutputError(
            f"reward '{name}' returned {type(output).__name__}; expected one score per video ({batch_size} values)."
        )
    return {"": _scores_to_tensor(output, batch_size, name, None)}


# --------------------------------------------------------------------------------------------------------------------
# Calling rewards
# --------------------------------------------------------------------------------------------------------------------


def _as_list(reward_funcs: Any) -> list[Callable]:
    if callable(reward_funcs):
        return [reward_funcs]
    funcs = list(reward_funcs)
    for func in funcs:
        if not callable(func):
            raise TypeError(f"every reward must be callable, got {type(func).__name__}: {func!r}.")
    return funcs


def _wrap(name: str, error: Exception) -> RewardFunctionError:
    return RewardFunctionError(f"reward '{name}' raised {type(error).__name__}: {error}", reward_name=name)


async def _gather(awaitables: list) -> list:
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _run_concurrently(awaitables: list) -> list:
    """Await ``awaitables`` concurrently; exceptions are returned, not raised. Works inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_gather(awaitables))
    # A loop already runs in this thread (notebooks, async callers): use a private loop in a helper thread.
    results: list = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.extend(asyncio.run(_gather(awaitables)))
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)

    thread = threading.Thread(target=target, name="trl_arcopo-rewards")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results


def compute_rewards(
    reward_funcs: Callable | Sequence[Callable],
    prompts: Sequence[str],
    videos: torch.Tensor,
    *,
    reward_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Score a batch of videos with every reward and collect one column per reward (or reward head).

    Each reward is called as ``func(prompts, videos, **reward_kwargs)`` under ``torch.no_grad()``; ``async def``
    rewards (or rewards returning an awaitable) are awaited concurrently after the synchronous ones ran.

    Args:
        reward_funcs: one reward or a sequence of rewards following the call convention of this module.
        prompts: ``B`` prompts.
        videos: ``[B, F, 3, H, W]`` floating tensor in ``[0, 1]`` (checked with :func:`validate_videos`).
        reward_kwargs: extra keyword arguments for every reward (dataset columns, trainer hooks). Must not contain
            ``prompts`` or ``videos``.

    Returns:
        An insertion-ordered dict ``{column: float64 CPU tensor [B]}`` in the order of ``reward_funcs``. A reward
        returning scores gives the column :func:`reward_name` (made unique with ``_1``, ``_2``, ... as in
        :func:`reward_names`); one returning heads gives ``name:head`` per head. Missing (``None``) and non-finite
        scores are NaN.

    Raises:
        ValueError: bad ``videos``, ``len(prompts) != B`` or reserved keys in ``reward_kwargs``.
        RewardOutputError: a reward returned something malformed (see :func:`normalize_reward_output`).
        RewardFunctionError: a reward raised; the message names the reward, the original exception is
            ``__cause__``. With several failing rewards, the first one (in ``reward_funcs`` order) is reported.
    """
    funcs = _as_list(reward_funcs)
    _validate_inputs(prompts, videos)
    kwargs = dict(reward_kwargs or {})
    reserved = [key for key in _RESERVED_KWARGS if key in kwargs]
    if reserved:
        raise ValueError(f"`reward_kwargs` must not contain {reserved}: they are passed positionally.")
    batch_size = videos.shape[0]
    names = reward_names(funcs)

    outputs: list[Any] = [None] * len(funcs)
    pending: dict[int, Any] = {}
    try:
        with torch.no_grad():
            for i, (func, name) in enumerate(zip(funcs, names, strict=True)):
                try:
                    output = func(prompts, videos, **kwargs)
                except Exception as error:
                    raise _wrap(name, error) from error
                if inspect.isawaitable(output):
                    pending[i] = output
                else:
                    outputs[i] = output
    except BaseException:
        for awaitable in pending.values():  # avoid "coroutine was never awaited" warnings
            if inspect.iscoroutine(awaitable):
                awaitable.close()
        raise
    if pending:
        for i, result in zip(pending, _run_concurrently(list(pending.values())), strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                raise _wrap(names[i], result) from result
            outputs[i] = result

    columns: dict[str, torch.Tensor] = {}
    for name, output in zip(names, outputs, strict=True):
        for head, values in normalize_reward_output(output, batch_size, name).items():
            column = _unique(name if head == "" else f"{name}:{head}", set(columns))
            columns[column] = values
    return columns
