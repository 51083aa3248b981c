"""Model-free video rewards: cheap, deterministic and offline.

They follow the reward protocol of :mod:`trl_arcopo.rewards.protocol`: ``reward(prompts, videos, **kwargs)`` with
``videos`` a floating tensor ``[B, F, 3, H, W]`` in ``[0, 1]``, returning ``B`` Python floats. Prompts and keyword
arguments are ignored (only the batch size of ``prompts`` is checked). Everything is computed in float32 on the
device of ``videos``, vectorised over the batch and the frames.

They are meant for smoke tests, debugging and as auxiliary or evaluation-only signals; each of them is easy to
hack when optimised alone (e.g. a static video maximises :func:`temporal_flicker_reward`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .protocol import _validate_inputs

__all__ = [
    "BUILTIN_REWARDS",
    "brightness_reward",
    "channel_excess",
    "colorfulness_reward",
    "redness_reward",
    "sharpness_reward",
    "temporal_flicker_reward",
]

# ITU-R BT.601 luma weights.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# 4-neighbour 3x3 Laplacian (OpenCV's `cv2.Laplacian(..., ksize=1)`).
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def _float_videos(prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
    _validate_inputs(prompts, videos)
    return videos.detach().to(torch.float32)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` → ``[..., H, W]``."""
    r, g, b = x.unbind(dim=-3)
    return _LUMA_WEIGHTS[0] * r + _LUMA_WEIGHTS[1] * g + _LUMA_WEIGHTS[2] * b


def _to_list(scores: torch.Tensor) -> list[float]:
    return [float(s) for s in scores.double().cpu().tolist()]


def temporal_flicker_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> list[float]:
    """VBench-style temporal flickering score; higher = less flicker (steadier video).

    Per video, with frames ``x_t`` in 0-255 units::

        d = mean over consecutive pairs t of mean over pixels and channels of |x_{t+1} - x_t|
        score = (255 - d) / 255 ∈ [0, 1]

    A static video scores 1 (also a single-frame video); a video alternating between black and white frames scores 0.
    VBench computes the same score on uint8 frames of static-camera videos and min-max normalises it for its tables;
    this function does neither. Optimised alone it favours videos without motion.
    """
    x = _float_videos(prompts, videos)
    if x.shape[1] < 2:
        return [1.0] * x.shape[0]
    diff = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(2, 3, 4)) * 255.0  # [B, F - 1]
    score = (255.0 - diff.mean(dim=1)) / 255.0
    return _to_list(score.clamp(0.0, 1.0))


def colorfulness_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> list[float]:
    """Hasler & Süsstrunk (2003) colorfulness, averaged over frames and divided by 100; higher = more colourful.

    Per frame, with ``R, G, B`` in 0-255 units, ``rg = R - G`` and ``yb = 0.5·(R + G) - B``, means ``μ`` and
    population standard deviations ``σ`` over the pixels of the frame::

        C = sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²)
        score = mean over frames of C / 100

    A gray (R = G = B) video scores 0; the score is ≥ 0 and below 3 (natural videos: about 0.1-1.5).
    Optimised alone it favours over-saturated colours.
    """
    x = _float_videos(prompts, videos) * 255.0
    r, g, b = x.unbind(dim=2)  # [B, F, H, W] each
    rg = (r - g).flatten(2)
    yb = (0.5 * (r + g) - b).flatten(2)
    std_rg, mean_rg = torch.std_mean(rg, dim=2, correction=0)
    std_yb, mean_yb = torch.std_mean(yb, dim=2, correction=0)
    per_frame = torch.sqrt(std_rg**2 + std_yb**2) + 0.3 * torch.sqrt(mean_rg**2 + mean_yb**2)  # [B, F]
    return _to_list(per_frame.mean(dim=1) / 100.0)


def brightness_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> list[float]:
    """Mean luma ``0.299·R + 0.587·G + 0.114·B`` over all pixels and frames, ∈ [0, 1]; higher = brighter.

    Black video = 0, white video = 1. Optimised alone it leads to over-exposure; use it with a negative weight or as
    a monitored metric.
    """
    x = _float_videos(prompts, videos)
    score = _luma(x).mean(dim=(1, 2, 3))
    return _to_list(score.clamp(0.0, 1.0))


def channel_excess(videos: torch.Tensor, channel: int) -> torch.Tensor:
    """How much one RGB channel exceeds the mean of the other two, averaged over pixels and frames: ``[B]`` from
    videos ``[B, F, 3, H, W]`` in [0, 1], in [-1, 1] and differentiable (the tensor core of :func:`redness_reward`)."""
    others = [c for c in range(3) if c != channel]
    return (videos[:, :, channel] - videos[:, :, others].mean(2)).mean(dim=(1, 2, 3))


def redness_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> list[float]:
    """How red the video is: ``R - (G + B) / 2`` averaged over all pixels and frames, ∈ [-1, 1]; higher = redder.

    Pure red scores 1, grey and white 0, cyan -1. It sees the whole frame, so a red background scores as well as red
    objects (on the toy generator AR-CoPO first turns the objects red, then the background: a visible case of
    reward hacking).
    """
    return _to_list(channel_excess(_float_videos(prompts, videos), 0))


def sharpness_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> list[float]:
    """Variance of the Laplacian of the luma, averaged over frames, ×100; higher = sharper (more fine detail).

    Per frame, with luma ``Y = 0.299·R + 0.587·G + 0.114·B`` in [0, 1] and the 4-neighbour 3×3 Laplacian
    ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` applied without padding (``conv2d``, valid region ``(H-2)×(W-2)``)::

        score = 100 · mean over frames of Var(Laplacian(Y))     (population variance)

    A flat video scores 0; the maximum, 1600, is reached by a one-pixel black/white checkerboard. Frames must be at
    least 3×3. Optimised alone it rewards high-frequency noise.
    """
    x = _float_videos(prompts, videos)
    batch, frames, _, height, width = x.shape
    if height < 3 or width < 3:
        raise ValueError(f"sharpness_reward needs frames of at least 3×3 pixels, got {height}×{width}.")
    luma = _luma(x).reshape(batch * frames, 1, height, width)
    kernel = torch.tensor(_LAPLACIAN, dtype=luma.dtype, device=luma.device).view(1, 1, 3, 3)
    laplacian = F.conv2d(luma, kernel).flatten(1)  # [B·F, (H-2)·(W-2)]
    per_frame = laplacian.var(dim=1, correction=0).view(batch, frames)
    return _to_list(per_frame.mean(dim=1) * 100.0)


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "temporal_flicker": temporal_flicker_reward,
    "colorfulness": colorfulness_reward,
    "brightness": brightness_reward,
    "redness": redness_reward,
    "sharpness": sharpness_reward,
}
