"""Rewards on the toy world of moving shapes (:mod:`trl_arcopo.toy.world`), read from the frames by
:mod:`trl_arcopo.toy.detect`.

They follow the reward protocol of :mod:`trl_arcopo.rewards.protocol` (``reward(prompts, videos, **kwargs)``, videos
``[B, F, 3, H, W]`` in ``[0, 1]``) and are registered as ``toy_adherence``, ``toy_color``, ``toy_size``,
``toy_position`` and ``toy_smoothness`` (``load_reward("toy_color", color="blue")``).

``toy_color``, ``toy_size``, ``toy_position`` and ``toy_smoothness`` are **differentiable in the videos**: they return
a float tensor ``[B]`` (float32, or float64 for float64 videos) that carries gradients when ``videos`` requires them (``compute_rewards`` detaches it). They
see the objects through :func:`~trl_arcopo.toy.detect.soft_foreground`, a soft coverage from each pixel's distance to
the background, so every object on screen counts, weighted by its area. ``toy_adherence`` reads the caption and runs the
detector: it returns Python floats and has no gradient.

Like the built-in rewards, the differentiable ones are easy to game when optimised alone (a static video is the
smoothest; a frame-filling blob the largest); they are meant to show learning, not to judge videos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..toy.detect import ATTRIBUTES, adherence_checks, detect, perceptual_color, soft_foreground
from ..toy.world import COLORS, parse
from .protocol import _validate_inputs

__all__ = [
    "ToyAdherenceReward",
    "ToyColorReward",
    "ToyPositionReward",
    "ToySizeReward",
    "ToySmoothnessReward",
]


def _frames(prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
    """The videos in float32, or float64 when given (finite-difference checks of the gradients)."""
    _validate_inputs(prompts, videos)
    return videos.to(torch.promote_types(videos.dtype, torch.float32))


def _centroids(mask: torch.Tensor) -> torch.Tensor:
    """Centroids ``[B, F, 2]`` (x, y as fractions of the frame) of soft masks ``[B, F, H, W]``."""
    height, width = mask.shape[-2:]
    rows = (torch.arange(height, device=mask.device, dtype=mask.dtype) + 0.5) / height
    cols = (torch.arange(width, device=mask.device, dtype=mask.dtype) + 0.5) / width
    total = mask.sum((-1, -2)).clamp_min(1e-6)
    x = (mask.sum(-2) * cols).sum(-1) / total
    y = (mask.sum(-1) * rows).sum(-1) / total
    return torch.stack([x, y], dim=-1)


class ToyAdherenceReward:
    """The fraction of the attributes a caption states that the video shows, in ``[0, 1]`` (not differentiable).

    Each prompt is parsed with :func:`~trl_arcopo.toy.world.parse`; each video is read with
    :func:`~trl_arcopo.toy.detect.detect`; :func:`~trl_arcopo.toy.detect.adherence_checks` lists the checks (the
    number of objects, and per object its colour, shape, size, motion, direction, speed and final colour when stated,
    and the background). A video showing everything its caption says scores 1.

    Args:
        attributes: count only these attributes (names of :data:`~trl_arcopo.toy.detect.ATTRIBUTES`); a caption
            stating none of them scores None. Default: all.
    """

    name = "toy_adherence"

    def __init__(self, attributes: Sequence[str] | None = None) -> None:
        if isinstance(attributes, str):
            raise ValueError(f"`attributes` must be a list of attribute names, got the string {attributes!r}.")
        if attributes is not None:
            unknown = sorted(set(attributes) - set(ATTRIBUTES))
            if unknown or not attributes:
                raise ValueError(f"`attributes` must be a non-empty subset of {list(ATTRIBUTES)}, got {attributes}.")
        self.attributes = None if attributes is None else tuple(attributes)

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> list[float | None]:
        _validate_inputs(prompts, videos)
        scenes = [parse(prompt) for prompt in prompts]  # a caption outside the toy world's grammar raises here
        scores: list[float | None] = []
        for scene, detection in zip(scenes, detect(videos), strict=True):
            checks = [ok for name, ok in adherence_checks(scene, detection) if self._counts(name)]
            scores.append(sum(checks) / len(checks) if checks else None)
        return scores

    def _counts(self, attribute: str) -> bool:
        return self.attributes is None or attribute in self.attributes

    def __repr__(self) -> str:
        return f"ToyAdherenceReward(attributes={self.attributes})"


class ToySizeReward:
    """The fraction of the frame the objects cover, averaged over frames, in ``[0, 1]``; differentiable.

    The area is the mean of :func:`~trl_arcopo.toy.detect.soft_foreground`: a small object of the world covers about
    0.06, a large one about 0.16.
    """

    name = "toy_size"

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return soft_foreground(_frames(prompts, videos)).mean((1, 2, 3))

    def __repr__(self) -> str:
        return "ToySizeReward()"


class ToyColorReward:
    """How much the objects have a target colour, in ``[0, 1]``; differentiable.

    The mean, over the foreground (weighted by :func:`~trl_arcopo.toy.detect.soft_foreground`) of all frames, of a
    Gaussian kernel ``exp(-ΔE² / (2·sigma²))`` of each pixel's distance to the target in
    :func:`~trl_arcopo.toy.detect.perceptual_color` space (CIELAB, lightness halved). An object of exactly the target colour scores about
    0.9 (its anti-aliased rim counts less), one of another named colour at most 0.11 (cyan vs white, the closest
    pair) and mostly near 0. With several objects the larger ones weigh more.

    Args:
        color: a name of :data:`~trl_arcopo.toy.world.COLORS`, or None for the colour each prompt states first (a
            prompt stating no colour scores None).
        sigma: width of the kernel in ΔE units (named colours are 43–198 apart).
    """

    name = "toy_color"

    def __init__(self, color: str | None = "red", sigma: float = 20.0) -> None:
        if color is not None and color not in COLORS:
            raise ValueError(f"`color` must be one of {list(COLORS)} or None (the prompt's colour), got {color!r}.")
        if not sigma > 0:
            raise ValueError(f"`sigma` must be > 0 (ΔE units), got {sigma}.")
        self.color = color
        self.sigma = float(sigma)

    def _targets(self, prompts: Sequence[str]) -> list[str | None]:
        if self.color is not None:
            return [self.color] * len(prompts)
        return [next((o.color for o in parse(p).objects if o.color is not None), None) for p in prompts]

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        frames = _frames(prompts, videos)
        targets = self._targets(prompts)
        known = [t if t is not None else next(iter(COLORS)) for t in targets]
        target_rgb = frames.new_tensor([COLORS[t] for t in known])  # [B, 3]
        color = perceptual_color(frames.movedim(2, -1))  # [B, F, H, W, 3]
        target = perceptual_color(target_rgb)[:, None, None, None]
        similarity = torch.exp(-(color - target).square().sum(-1) / (2 * self.sigma**2))  # [B, F, H, W]
        mask = soft_foreground(frames)
        score = (mask * similarity).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1e-6)
        missing = torch.tensor([t is None for t in targets], device=score.device)
        return torch.where(missing, torch.full_like(score, math.nan), score)

    def __repr__(self) -> str:
        return f"ToyColorReward(color={self.color!r}, sigma={self.sigma})"


class ToyPositionReward:
    """How close the objects' centroid stays to a target point: ``1 - mean over frames of distance / √2``, in
    ``[0, 1]`` (1 on the target); differentiable.

    The centroid is that of :func:`~trl_arcopo.toy.detect.soft_foreground` (with several objects, their joint
    centroid). Coordinates are fractions of the frame, ``x`` from the left, ``y`` from the top.

    Args:
        x, y: the target point, in ``[0, 1]``.
    """

    name = "toy_position"

    def __init__(self, x: float = 0.5, y: float = 0.5) -> None:
        for key, value in (("x", x), ("y", y)):
            if not 0 <= value <= 1:
                raise ValueError(f"`{key}` must be in [0, 1] (a fraction of the frame), got {value}.")
        self.x, self.y = float(x), float(y)

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        centroids = _centroids(soft_foreground(_frames(prompts, videos)))  # [B, F, 2]
        target = centroids.new_tensor([self.x, self.y])
        distance = (centroids - target).square().sum(-1).add(1e-12).sqrt()
        return 1 - distance.mean(1) / math.sqrt(2)

    def __repr__(self) -> str:
        return f"ToyPositionReward(x={self.x}, y={self.y})"


class ToySmoothnessReward:
    """Motion smoothness: minus the mean size of the second temporal difference of the objects' centroid, in percent
    of the frame per frame² (0 for uniform motion or none, more negative for jerky motion); differentiable.

    The centroid is that of :func:`~trl_arcopo.toy.detect.soft_foreground` in each frame. Videos of fewer than 3
    frames score 0. In 12-frame videos, objects of the world moving straight score about -0.1, bouncing ones -3 to -5
    (fewer frames, larger steps); optimised alone it favours still videos.
    """

    name = "toy_smoothness"

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        frames = _frames(prompts, videos)
        if frames.shape[1] < 3:
            return frames.new_zeros(frames.shape[0])
        centroids = _centroids(soft_foreground(frames))
        acceleration = centroids[:, 2:] - 2 * centroids[:, 1:-1] + centroids[:, :-2]  # [B, F - 2, 2]
        return -100 * acceleration.square().sum(-1).add(1e-12).sqrt().mean(1)

    def __repr__(self) -> str:
        return "ToySmoothnessReward()"
