"""Read the toy world back from pixels: the background, the objects (colour, shape, size, motion) and how well a video
follows its caption.

The detector judges frames ``[B, F, 3, H, W]`` in ``[0, 1]`` as a person would, without knowing how they were made
(perfect renders, blurred, noisy or colour-shifted ones, a generator's output):

1. **Background** (:func:`estimate_background`): the world's backgrounds are static plain colours or vertical
   gradients; per video, a line in the row index fitted to the row medians of the per-pixel median over frames.
2. **Foreground and blobs** (:func:`detect_blobs`): pixels farther than 0.2 (RGB) from the background, labelled by the
   named colour that best explains them as a blend with the background (anti-aliased rims and blurred edges keep their
   object's colour); connected regions of one label, joined when touching regions have the same colour. Overlapping
   objects of different colours stay apart; an object whose colour lies between two names stays whole.
3. **Per blob**: its core colour (pixels weighted by their distance to the background, so the centre of a blurred
   blob rather than its rim) named in a perceptual space (:func:`perceptual_color`); its coverage ``α`` (the
   projection of each pixel onto the blob's colour, which undoes anti-aliasing and blur) giving area and centroid; its
   shape: triangles (the world's point up) by the vertical skewness of ``α`` (blur does not change the third
   cumulant), then squares and circles by how much more of ``α`` an axis-aligned square than a disc of the blob's
   area holds, both centred on its centroid (a sum over the blob, which a ragged outline barely moves).
4. **Tracks** (:func:`detect`): blobs linked over frames by nearest predicted centroid and colour, through frames where
   an object is hidden; per track, the colour over the first and the last quarter, the shape by majority over frames
   where it is whole, the equivalent radius, and the motion of the path: ``"bouncing"`` when the vertical path is much
   longer than the vertical range (hops in place), else ``"moving"`` in the direction of the net displacement when it
   exceeds 6 % of the frame, else ``"still"``.

:func:`adherence` compares a caption's :func:`~trl_arcopo.toy.world.parse` with a detection, attribute by attribute
(every stated object must be found); :func:`largest_object_adherence` is the lenient reading of the largest object only;
:func:`soft_foreground` is the differentiable coverage the toy rewards (:mod:`trl_arcopo.rewards.toy`) are built on.
Accuracy on renders of the world is measured by ``tests/test_toy_world.py`` and ``benchmarks/bench_toy_world.py``.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .world import BACKGROUNDS, COLORS, SHAPES, SIZES, SPEEDS, ToyObject, ToyScene, parse

__all__ = [
    "ATTRIBUTES",
    "Blobs",
    "DetectedObject",
    "VideoDetection",
    "adherence",
    "adherence_checks",
    "detect",
    "detect_blobs",
    "estimate_background",
    "largest_object_adherence",
    "name_colors",
    "perceptual_color",
    "soft_foreground",
]

# The attributes :func:`adherence` checks, in order.
ATTRIBUTES = ("count", "color", "shape", "size", "motion", "direction", "speed", "turns_into", "background")

# Foreground: RGB distance to the background. The closest object colour to a background tone (green on gray) is 0.52
# away, so 0.2 keeps the anti-aliased rims of every object and stays clear of pixel noise.
FOREGROUND_THRESHOLD = 0.2
# Soft coverage (:func:`soft_foreground`): distance floor, smallest contrast, radius of the local contrast window.
_SOFT_FLOOR = 0.08
_SOFT_CONTRAST = 0.3
_SOFT_RADIUS = 3
# Background fit: rows farther than this (summed over RGB) from a line are treated as covered by objects.
_ROW_OUTLIER = 0.06
# Touching regions whose core colours are this close (RGB) are one object.
_SAME_COLOR_DISTANCE = 0.15
# Blobs smaller than this fraction of the frame are noise or slivers where objects overlap (the blended rim of a red
# object over a blue one reads as magenta); the smallest object of the world covers 5.3 %.
MIN_BLOB_AREA = 0.02
MAX_BLOBS = 4
# Shape: triangles by their vertical skewness (-0.57 pointing up, 0 for the others), then circles and squares by
# `_squareness`: on renders about -0.05 and +0.04, blurred by σ = 1.2 px (as the tests degrade them) -0.025 and
# +0.008 (medians); the threshold lies midway between the blurred ones.
_SKEW_TRIANGLE = -0.15
_SQUARENESS_CIRCLE_SQUARE = -0.01
# The lightness of CIELAB weighs half as much as the chroma when comparing colours.
_LIGHTNESS_WEIGHT = 0.5
# Tracking: the largest jump of a centroid between consecutive frames, as a fraction of the frame, is the larger of
# these: per frame, and over the whole video (the world's fastest motion, a high double hop, travels about 1.9 over a
# video: 0.17 per frame at 12 frames).
_MAX_JUMP = 0.15
_MAX_JUMP_PER_VIDEO = 2.4
# Motion: net displacements below this fraction of the frame are "still"; a vertical path this many times longer than
# the vertical range is "bouncing".
_MIN_DISPLACEMENT = 0.06
_BOUNCE_PATH_RATIO = 2.0
# Named sizes and speeds: midpoints between the world's ranges.
_RADIUS_SMALL_LARGE = (SIZES["small"][1] + SIZES["large"][0]) / 2
_SPEED_SLOW_QUICK = (SPEEDS["slowly"][1] + SPEEDS["quickly"][0]) / 2
# Backgrounds whose top and bottom colours differ by more than this are gradients.
_GRADIENT_CONTRAST = 0.08

_PLAIN_BACKGROUNDS = {name: rgb for name, rgb in BACKGROUNDS.items() if rgb is not None}


# ----------------------------------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------------------------------


def _rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in ``[0, 1]`` ``[..., 3]`` → CIELAB (D65) ``[..., 3]`` (``L`` in 0–100); differentiable everywhere."""
    rgb = rgb.clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))
    matrix = rgb.new_tensor(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    ) / rgb.new_tensor([0.95047, 1.0, 1.08883]).view(3, 1)
    xyz = linear @ matrix.T
    delta = 6 / 29
    # The cube root's linear segment near 0 keeps the gradient finite.
    f = torch.where(xyz > delta**3, xyz.clamp_min(delta**3).pow(1 / 3), xyz / (3 * delta**2) + 4 / 29)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-1)


def perceptual_color(rgb: torch.Tensor) -> torch.Tensor:
    """Where the detector and ``toy_color`` compare colours: sRGB ``[..., 3]`` in ``[0, 1]`` → CIELAB (D65) with the
    lightness halved, ``[..., 3]``; Euclidean distances there are ΔE units (lightness counting half, since blur and
    dim generators change it most). Differentiable everywhere."""
    lab = _rgb_to_lab(rgb)
    return lab * lab.new_tensor([_LIGHTNESS_WEIGHT, 1.0, 1.0])


_COLOR_NAMES = tuple(COLORS)
_NAMED = perceptual_color(torch.tensor(list(COLORS.values())))


def name_colors(rgb: torch.Tensor) -> torch.Tensor:
    """Index into :data:`~trl_arcopo.toy.world.COLORS` of the nearest named colour of each ``[..., 3]`` RGB colour
    (in :func:`perceptual_color` space), as a ``[...]`` long tensor."""
    color = perceptual_color(rgb.float())
    return torch.cdist(color.reshape(-1, 3), _NAMED.to(color.device)).argmin(-1).view(rgb.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------------
# Background and foreground
# ----------------------------------------------------------------------------------------------------------------------


def _check_videos(videos: torch.Tensor) -> None:
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"`videos` must be a float tensor [B, F, 3, H, W] in [0, 1], got {shape}.")


def estimate_background(videos: torch.Tensor) -> torch.Tensor:
    """The background colour of every row of every frame, ``[B, F, 3, H, 1]``; differentiable in ``videos``.

    The world's backgrounds are static, plain or vertical gradients. Per video, the per-pixel median over frames
    (objects move away from most pixels), then its per-row medians; the line in the row index that most of them lie on
    (the best of the lines through pairs of rows, then least squares over the rows it fits), so rows that objects
    dominate do not pull it. Per frame, the median difference between the frame and that line is added (a background
    that brightens or dims over the video).
    """
    _check_videos(videos)
    height = videos.shape[-2]
    rows = videos.median(dim=1).values.median(dim=-1).values  # [B, 3, H]
    v = (torch.arange(height, device=videos.device, dtype=videos.dtype) + 0.5) / height
    step = max(1, height // 16)
    pairs = [(i, j) for i in range(0, height, step) for j in range(i + max(1, height // 4), height, step)] or [(0, 0)]
    first, second = (torch.tensor(p, device=videos.device) for p in zip(*pairs, strict=True))
    slope = (rows[..., second] - rows[..., first]) / (v[second] - v[first]).clamp_min(1e-6)  # [B, 3, P]
    candidates = rows[..., first, None] + slope[..., None] * (v - v[first, None])  # [B, 3, P, H]
    inliers = ((candidates - rows.unsqueeze(2)).abs().sum(1) < _ROW_OUTLIER).to(rows.dtype)  # [B, P, H]
    weights = inliers.gather(1, inliers.sum(-1).argmax(1)[:, None, None].expand(-1, 1, height))  # [B, 1, H]
    total = weights.sum(-1, keepdim=True).clamp_min(1e-6)
    v_mean = (weights * v).sum(-1, keepdim=True) / total
    r_mean = (weights * rows).sum(-1, keepdim=True) / total
    dv = v - v_mean
    slope = (weights * dv * (rows - r_mean)).sum(-1, keepdim=True) / (weights * dv.square()).sum(
        -1, keepdim=True
    ).clamp_min(1e-6)
    line = (r_mean + slope * dv)[:, None, :, :, None]  # [B, 1, 3, H, 1]
    offset = (videos - line).flatten(3).median(-1).values  # [B, F, 3]
    return line + offset[..., None, None]


def _box_blur(frames: torch.Tensor) -> torch.Tensor:
    """3×3 average of ``[..., 3, H, W]`` frames (edges replicated)."""
    flat = frames.flatten(0, -4)
    return F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, stride=1).view_as(frames)


def soft_foreground(videos: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
    """A differentiable foreground coverage ``[B, F, H, W]`` in ``[0, 1]``.

    Each pixel's RGB distance ``d`` to the background (:func:`estimate_background` unless given), on the 3×3-averaged
    frames (pixel noise), is divided by the largest distance within 3 pixels (the contrast of the object nearby, at
    least 0.3) after subtracting a floor of 0.08: ``clamp((d - 0.08) / (max(d_local, 0.3) - 0.08), 0, 1)``. An
    anti-aliased or blurred rim then counts in proportion to how much of it the object covers, so areas and centroids
    move smoothly with sub-pixel motion.
    """
    background = estimate_background(videos) if background is None else background
    distance = (_box_blur(videos) - background).square().sum(2).add(1e-12).sqrt()  # [B, F, H, W]
    window = 2 * _SOFT_RADIUS + 1
    flat = distance.flatten(0, 1).unsqueeze(1)
    local = F.max_pool2d(flat, (1, window), stride=1, padding=(0, _SOFT_RADIUS))
    local = F.max_pool2d(local, (window, 1), stride=1, padding=(_SOFT_RADIUS, 0)).view_as(distance)
    return ((distance - _SOFT_FLOOR) / (local.clamp_min(_SOFT_CONTRAST) - _SOFT_FLOOR)).clamp(0, 1)


_SHIFTS = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]


def _neighbours(t: torch.Tensor, fill: float) -> list[torch.Tensor]:
    """The 8 neighbours of every pixel of ``t`` ``[..., H, W]`` (``fill`` outside the frame), as 8 shifted views."""
    height, width = t.shape[-2:]
    padded = F.pad(t, (1, 1, 1, 1), value=fill)
    return [padded[..., dy : dy + height, dx : dx + width] for dy, dx in _SHIFTS]


def _propagate(labels: torch.Tensor, links: list[torch.Tensor]) -> torch.Tensor:
    """Connected components: ``labels`` ``[N, H, W]`` (int32, 0 off the foreground, else 1 + the flat index of a pixel
    of the same component) spread along ``links`` (8 bool ``[N, H, W]``, one per neighbour of :func:`_neighbours`)
    until every component holds 1 + the flat index of its last pixel.

    Each pass takes the max over the linked neighbours, then jumps along the pixels labels point to (pointer jumping),
    so few passes are needed even for large blobs.
    """
    n, height, width = labels.shape
    foreground = (labels > 0).flatten(1)
    while True:
        grown = labels
        for neighbour, link in zip(_neighbours(labels, 0), links, strict=True):
            grown = torch.maximum(grown, neighbour * link)
        flat = grown.flatten(1)
        grown = torch.maximum(flat, flat.gather(1, (flat.long() - 1).clamp_min(0)) * foreground).view(n, height, width)
        if torch.equal(grown, labels):
            return labels
        labels = grown


# ----------------------------------------------------------------------------------------------------------------------
# Blobs per frame
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Blobs:
    """The largest blobs of every frame (``K = 4`` slots, largest first; ``valid`` marks the used ones).

    Attributes:
        valid: ``[B, F, K]`` bool.
        area: ``[B, F, K]`` coverage ``Σα`` as a fraction of the frame.
        x, y: ``[B, F, K]`` centroids (fractions of the width / height).
        color: ``[B, F, K, 3]`` RGB core colour; ``color_index``: ``[B, F, K]`` its named colour (index into
            :data:`~trl_arcopo.toy.world.COLORS`).
        squareness: ``[B, F, K]`` how much more of it a square holds than a disc of its area and centroid (as a
            fraction of its area: about +0.04 for a rendered square, -0.05 for a circle).
        skew: ``[B, F, K]`` skewness of the coverage along the vertical (the world's triangles point up: -0.57).
        shape_index: ``[B, F, K]`` the shape these imply (index into :data:`~trl_arcopo.toy.world.SHAPES`).
        touching: ``[B, F, K]`` whether the blob touches another (one may hide part of the other).
        background: ``[B, F, 3, H, 1]`` as :func:`estimate_background`.
    """

    valid: torch.Tensor
    area: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    color: torch.Tensor
    color_index: torch.Tensor
    squareness: torch.Tensor
    skew: torch.Tensor
    shape_index: torch.Tensor
    touching: torch.Tensor
    background: torch.Tensor


def _pixel_classes(diff: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The named colour ``[N, H, W]`` that best explains each pixel as a blend ``background + α·(colour - background)``
    (``α`` in [0, 1]): blending does not change it, so anti-aliased rims and blurred edges keep their object's colour.

    Args:
        diff: ``[N, 3, H, W]`` pixel minus background.
        background: ``[N, 3, H, 1]`` background of every row.
    """
    best = torch.full_like(diff[:, 0], math.inf)
    classes = torch.zeros(best.shape, dtype=torch.long, device=diff.device)
    for j, rgb in enumerate(COLORS.values()):
        toward = diff.new_tensor(rgb).view(1, 3, 1, 1) - background  # [N, 3, H, 1]
        dot = (diff * toward).sum(1)  # [N, H, W]
        length = toward.square().sum(1)  # [N, H, 1]
        alpha = (dot / length).clamp(0, 1)
        residual = alpha * (alpha * length - 2 * dot)  # |diff - α·toward|² - |diff|²
        classes = torch.where(residual < best, j, classes)
        best = torch.minimum(best, residual)
    return classes


def _segment(diff: torch.Tensor, background: torch.Tensor, foreground: torch.Tensor, min_size: float) -> torch.Tensor:
    """Label the objects of frames: ``[N, H, W]`` long, 0 off ``foreground``, one label per object.

    First the connected regions of pixels explained by the same named colour (:func:`_pixel_classes`); then touching
    regions of at least ``min_size`` pixels whose core colours are within 0.15 (RGB) are joined, so an object whose
    colour lies between two named ones stays whole, while overlapping objects of different colours stay apart.

    Args:
        diff: ``[N, 3, H, W]`` pixels minus background; background: ``[N, 3, H, 1]``; foreground: ``[N, H, W]``.
    """
    n, _, height, width = diff.shape
    index = torch.arange(1, height * width + 1, device=diff.device, dtype=torch.int32).view(1, height, width)
    classes = torch.where(foreground, _pixel_classes(diff, background), -1)
    labels = _propagate(index * foreground, [(c == classes) & foreground for c in _neighbours(classes, -1)])
    # Per region: pixel count and core colour (pixels weighted by |diff|⁴, the centre rather than the rim).
    flat = labels.long().flatten(1)  # [N, H·W]
    weight = diff.square().sum(1).square().flatten(1)
    stats = torch.cat(
        [diff.flatten(2).mT * weight[..., None], weight[..., None], torch.ones_like(weight)[..., None]], -1
    )
    table = torch.zeros(n, height * width + 1, 5, device=diff.device).scatter_add_(
        1, flat[..., None].expand(-1, -1, 5), stats
    )
    per_pixel = table.gather(1, flat[..., None].expand(-1, -1, 5))  # [N, H·W, 5]
    core = (per_pixel[..., :3] / per_pixel[..., 3:4].clamp_min(1e-12)).mT.reshape(n, 3, height, width)
    large = (per_pixel[..., 4] >= min_size).view(n, height, width)
    links = [
        (neighbour == labels)
        | (large & large_neighbour & ((core_neighbour - core).square().sum(1) < _SAME_COLOR_DISTANCE**2))
        for neighbour, large_neighbour, core_neighbour in zip(
            _neighbours(labels, 0), _neighbours(large, False), _neighbours(core, 0.0), strict=True
        )
    ]
    return _propagate(labels, [link & foreground for link in links]).long()


@torch.no_grad()
def detect_blobs(videos: torch.Tensor) -> Blobs:
    """Find and measure the largest blobs of every frame of ``videos`` ``[B, F, 3, H, W]`` in ``[0, 1]``.

    A blob is a connected region of foreground pixels explained by the same named colour, so overlapping objects of
    different colours stay apart.
    """
    _check_videos(videos)
    videos = videos.float()
    batch, frames, _, height, width = videos.shape
    background = estimate_background(videos)
    pixels = videos.flatten(0, 1)  # [N, 3, H, W]
    bg = background.flatten(0, 1)  # [N, 3, H, 1]
    # Blobs are found on a 3×3 average (robust to pixel noise), measured on the frames themselves.
    smooth = _box_blur(pixels) - bg
    foreground = smooth.square().sum(1) >= FOREGROUND_THRESHOLD**2
    labels = _segment(smooth, bg, foreground, max(4.0, MIN_BLOB_AREA * height * width))
    n = labels.shape[0]
    counts = torch.zeros(n, height * width + 1, device=videos.device)
    counts.scatter_add_(1, labels.flatten(1), torch.ones_like(labels.flatten(1), dtype=counts.dtype))
    counts[:, 0] = 0
    sizes, top = counts.topk(min(MAX_BLOBS, height * width), dim=1)  # [N, K]
    valid = sizes >= max(4.0, MIN_BLOB_AREA * height * width)
    masks = (labels.unsqueeze(1) == top[:, :, None, None]) & valid[:, :, None, None]  # [N, K, H, W]
    # One pixel of margin for the soft rims, but not into the other blobs.
    others = masks.sum(1, keepdim=True) - masks.float()
    grown = F.max_pool2d(masks.float(), 3, stride=1, padding=1)
    region = grown * (1 - others)
    touching = (grown * others).flatten(2).amax(-1) > 0  # [N, K]

    diff = pixels - bg  # [N, 3, H, W]
    # Core colour: pixels weighted by distance⁴ (the centre of a blurred blob, not its rim).
    w = region * diff.square().sum(1, keepdim=True).square()  # [N, K, H, W]
    w_sum = w.sum((-1, -2)).clamp_min(1e-12).unsqueeze(-1)  # [N, K, 1]
    core = torch.einsum("nkhw,nchw->nkc", w, pixels) / w_sum  # [N, K, 3]
    contrast = torch.einsum("nkhw,nchw->nkc", w, diff) / w_sum
    alpha = torch.einsum("nchw,nkc->nkhw", diff, contrast) / contrast.square().sum(-1)[..., None, None].clamp_min(
        1e-12
    )
    alpha = alpha.clamp(0, 1) * region  # [N, K, H, W]
    area = alpha.sum((-1, -2)).clamp_min(1e-12)
    rows = (torch.arange(height, device=videos.device) + 0.5) / height
    cols = (torch.arange(width, device=videos.device) + 0.5) / width
    profile = alpha.sum(-1)  # [N, K, H]: coverage per row
    y = (profile * rows).sum(-1) / area
    x = (alpha.sum(-2) * cols).sum(-1) / area
    # Vertical skewness: about -0.57 for the world's upward triangles, 0 for circles and squares; blur leaves the third
    # cumulant unchanged and only adds to the variance.
    dy = rows - y.unsqueeze(-1)
    variance = (profile * dy.square()).sum(-1) / area
    skew = (profile * dy.pow(3)).sum(-1) / area / variance.clamp_min(1e-12).pow(1.5)
    squareness = _squareness(alpha, area, x * width, y * height)
    shape_index = torch.where(skew < _SKEW_TRIANGLE, 2, torch.where(squareness > _SQUARENESS_CIRCLE_SQUARE, 1, 0))

    def video_major(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, frames, *t.shape[1:])

    return Blobs(
        valid=video_major(valid & (alpha >= 0.5).flatten(-2).any(-1)),
        area=video_major(area / (height * width)),
        x=video_major(x),
        y=video_major(y),
        color=video_major(core),
        color_index=video_major(name_colors(core)),
        squareness=video_major(squareness),
        skew=video_major(skew),
        shape_index=video_major(shape_index),
        touching=video_major(touching),
        background=background,
    )


def _squareness(alpha: torch.Tensor, area: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How much more of each blob's coverage ``alpha`` ``[N, K, H, W]`` an axis-aligned square holds than a disc, both
    of the blob's area ``[N, K]`` (pixels) and centred on its centroid ``(x, y)`` ``[N, K]`` (pixels), as a fraction of
    the area (rendered circles about -0.05, squares +0.04). It sums over the whole blob, so a pixel or two out of
    place on a generator's ragged outline moves it little, where the bounding box of the outline would grow by a row."""
    height, width = alpha.shape[-2:]
    dx = (torch.arange(width, device=alpha.device) + 0.5 - x.unsqueeze(-1)).abs().unsqueeze(-2)  # [N, K, 1, W]
    dy = (torch.arange(height, device=alpha.device) + 0.5 - y.unsqueeze(-1)).abs().unsqueeze(-1)  # [N, K, H, 1]
    side, radius = area.sqrt().unsqueeze(-1).unsqueeze(-1), (area / math.pi).sqrt().unsqueeze(-1).unsqueeze(-1)
    in_square = (side / 2 - torch.maximum(dx, dy) + 0.5).clamp(0, 1)  # one pixel of anti-aliasing, as rendered
    in_disc = (radius - torch.hypot(dx, dy) + 0.5).clamp(0, 1)
    return (alpha * (in_square - in_disc)).sum((-1, -2)) / area


# ----------------------------------------------------------------------------------------------------------------------
# Tracks and per-video detections
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """One tracked object.

    Attributes:
        color: the named colour over the first quarter of the video (or of the frames it was seen in).
        final_color: the named colour over the last quarter.
        shape: one of :data:`~trl_arcopo.toy.world.SHAPES`, by majority over the frames.
        radius: the radius of a circle of the same (median) area, as a fraction of the frame's smaller side (the
            unit of :data:`~trl_arcopo.toy.world.SIZES`); ``size`` names it (``"small"`` / ``"large"``).
        x, y: ``[F]`` centroids, NaN in frames where the object was not seen.
        motion: ``"moving"``, ``"bouncing"`` or ``"still"``.
        direction: for moving objects, the direction of the net displacement; else None.
        speed: travel over the whole video (fraction of the frame, the unit of :data:`~trl_arcopo.toy.world.SPEEDS`);
            ``speed_name`` names it for moving objects.
        coverage: fraction of the frames in which the object was seen apart from other blobs.
    """

    color: str
    final_color: str
    shape: str
    radius: float
    x: np.ndarray
    y: np.ndarray
    motion: str
    direction: str | None
    speed: float
    coverage: float

    @property
    def size(self) -> str:
        return "small" if self.radius < _RADIUS_SMALL_LARGE else "large"

    @property
    def speed_name(self) -> str | None:
        if self.motion != "moving":
            return None
        return "slowly" if self.speed < _SPEED_SLOW_QUICK else "quickly"


@dataclass(frozen=True)
class VideoDetection:
    """What :func:`detect` sees in one video: the background's name and the tracked objects (largest first)."""

    background: str
    objects: tuple[DetectedObject, ...]


def _link(blobs: dict[str, np.ndarray]) -> list[dict[int, int]]:
    """Tracks as ``{frame: blob slot}``.

    In each frame, blobs go to tracks by increasing cost: the distance of the blob's centroid to where the track is
    heading (its last velocity), plus the RGB distance between their colours, plus half the log-ratio of their areas
    (objects crossing each other differ in colour or size). A blob is a candidate when it lies within a jump of where
    the track is heading or of where it was (a bounce turns back); the jump grows with the frames the track missed
    (objects hidden by others). Blobs left over start new tracks.
    """
    frames = blobs["valid"].shape[0]
    max_jump = max(_MAX_JUMP, _MAX_JUMP_PER_VIDEO / max(1, frames - 1))
    position = np.stack([blobs["x"], blobs["y"]], -1)  # [F, K, 2]
    tracks: list[dict[int, int]] = []
    for t in range(frames):
        slots = np.flatnonzero(blobs["valid"][t])
        costs = []
        for i, track in enumerate(tracks):
            seen = list(track)  # frames in increasing order (dicts keep insertion order)
            last = seen[-1]
            # Where the track is heading, or where it was (an object turning back, a bounce, is nearer the latter).
            predicted = [position[last, track[last]]]
            if len(seen) >= 2:
                velocity = (predicted[0] - position[seen[-2], track[seen[-2]]]) / (last - seen[-2])
                predicted.append(predicted[0] + velocity * (t - last))
            limit = max_jump * (1 + 0.5 * (t - last - 1))
            for k in slots:
                jumps = [np.linalg.norm(position[t, k] - p) for p in predicted]
                if min(jumps) < limit:
                    color = np.linalg.norm(blobs["color"][t, k] - blobs["color"][last, track[last]])
                    area = abs(np.log(blobs["area"][t, k] / blobs["area"][last, track[last]]))
                    costs.append((jumps[-1] + color + 0.5 * area, i, int(k)))
        taken_tracks, taken_slots = set(), set()
        for _, i, k in sorted(costs):
            if i not in taken_tracks and k not in taken_slots:
                tracks[i][t] = k
                taken_tracks.add(i)
                taken_slots.add(k)
        tracks += [{t: int(k)} for k in slots if k not in taken_slots]
    return tracks


def _majority(values: Sequence) -> object:
    return Counter(values).most_common(1)[0][0]


def _motion(x: np.ndarray, y: np.ndarray, num_frames: int) -> tuple[str, str | None, float]:
    """``(motion, direction, speed)`` from a track's centroids ``[T]`` (consecutive frames, hidden ones interpolated)
    in a video of ``num_frames`` frames; the speed is the travel over the whole video (the world's unit), from the
    least-squares slope of the path."""
    if len(x) < 3:
        return "still", None, 0.0
    kernel = np.ones(3) / 3
    xs, ys = (np.convolve(np.pad(c, 1, mode="edge"), kernel, mode="valid") for c in (x, y))
    net = np.array([xs[-1] - xs[0], ys[-1] - ys[0]])
    time = np.arange(len(x))
    travel = np.array([np.polyfit(time, c, 1)[0] for c in (x, y)]) * (num_frames - 1)
    path_y = np.abs(np.diff(ys)).sum()
    range_y = ys.max() - ys.min()
    if range_y > _MIN_DISPLACEMENT and path_y > _BOUNCE_PATH_RATIO * max(range_y, abs(net[1])):
        return "bouncing", None, 0.0
    if np.abs(net).max() < _MIN_DISPLACEMENT:
        return "still", None, float(np.linalg.norm(travel))
    axis = int(np.argmax(np.abs(net)))
    direction = {(0, True): "right", (0, False): "left", (1, True): "down", (1, False): "up"}[(axis, net[axis] > 0)]
    return "moving", direction, float(abs(travel[axis]))


def _describe_track(track: dict[int, int], blobs: dict[str, np.ndarray], height: int, width: int) -> DetectedObject:
    frames = blobs["valid"].shape[0]
    seen = np.array(sorted(track))
    slots = np.array([track[t] for t in seen])
    take = {key: blobs[key][seen, slots] for key in ("x", "y", "area", "color_index", "shape_index", "touching")}
    # Its shape and size are read from the frames where it touches no other blob, else from those where its area is
    # near its largest (partly hidden: smaller; merged with another: larger).
    full_area = np.percentile(take["area"], 90)
    whole = np.abs(take["area"] / full_area - 1) <= 0.15
    whole = next(m for m in (~take["touching"], whole, np.ones_like(whole)) if m.any())
    quarter = max(1, math.ceil(frames / 4))
    first = take["color_index"][seen < quarter]
    last = take["color_index"][seen >= frames - quarter]
    first = first if len(first) else take["color_index"][: max(1, len(seen) // 4)]
    last = last if len(last) else take["color_index"][-max(1, len(seen) // 4) :]
    # Interpolate the frames where the object was hidden or merged, so the path has one point per frame.
    span = np.arange(seen[0], seen[-1] + 1)
    path_x, path_y = (np.interp(span, seen, take[c]) for c in ("x", "y"))
    motion, direction, speed = _motion(path_x, path_y, frames)
    x = np.full(frames, np.nan)
    y = np.full(frames, np.nan)
    x[seen], y[seen] = take["x"], take["y"]
    area_px = float(np.median(take["area"][whole])) * height * width
    return DetectedObject(
        color=_COLOR_NAMES[int(_majority(first.tolist()))],
        final_color=_COLOR_NAMES[int(_majority(last.tolist()))],
        shape=SHAPES[int(_majority(take["shape_index"][whole].tolist()))],
        radius=math.sqrt(area_px / math.pi) / min(height, width),
        x=x,
        y=y,
        motion=motion,
        direction=direction,
        speed=speed,
        coverage=len(seen) / frames,
    )


def _name_background(background: torch.Tensor) -> str:
    """``"gradient"`` or the nearest plain background tone of one video's ``[F, 3, H, 1]`` background estimate."""
    top, bottom = background[:, :, 0, 0].mean(0), background[:, :, -1, 0].mean(0)
    if (top - bottom).norm() > _GRADIENT_CONTRAST:
        return "gradient"
    middle = (top + bottom) / 2
    return min(
        _PLAIN_BACKGROUNDS, key=lambda name: float((middle - middle.new_tensor(_PLAIN_BACKGROUNDS[name])).norm())
    )


@torch.no_grad()
def detect(videos: torch.Tensor, *, min_coverage: float = 0.25, batch_size: int = 8) -> list[VideoDetection]:
    """Detect the background and the objects of each video.

    Args:
        videos: ``[B, F, 3, H, W]`` in ``[0, 1]`` (any float dtype, any device).
        min_coverage: tracks seen in fewer than this fraction of the frames are dropped (noise, brief splits).
        batch_size: videos measured at once (bounds the memory of :func:`detect_blobs`).

    Returns:
        One :class:`VideoDetection` per video.
    """
    _check_videos(videos)
    height, width = videos.shape[-2:]
    detections = []
    for start in range(0, videos.shape[0], batch_size):
        blobs = detect_blobs(videos[start : start + batch_size])
        arrays = {
            key: getattr(blobs, key).cpu().numpy()
            for key in ("valid", "area", "x", "y", "color", "color_index", "shape_index", "touching")
        }
        for b in range(blobs.valid.shape[0]):
            video = {key: value[b] for key, value in arrays.items()}
            tracks = [t for t in _link(video) if len(t) >= min_coverage * video["valid"].shape[0]]
            objects = sorted(
                (_describe_track(t, video, height, width) for t in tracks), key=lambda o: o.radius, reverse=True
            )
            detections.append(VideoDetection(_name_background(blobs.background[b]), tuple(objects)))
    return detections


# ----------------------------------------------------------------------------------------------------------------------
# Adherence to the caption
# ----------------------------------------------------------------------------------------------------------------------


def _object_checks(stated: ToyObject, seen: DetectedObject | None) -> dict[str, bool]:
    """Each attribute the caption states for one object → whether the detected object has it."""
    expected = {
        "color": stated.color,
        "shape": stated.shape,
        "size": stated.size,
        "motion": stated.motion,
        "direction": stated.direction,
        "speed": stated.speed,
        "turns_into": stated.turns_into,
    }
    if seen is None:
        return {key: False for key, value in expected.items() if value is not None}
    got = {
        "color": seen.color,
        "shape": seen.shape,
        "size": seen.size,
        "motion": seen.motion,
        "direction": seen.direction,
        "speed": seen.speed_name,
        "turns_into": seen.final_color,
    }
    return {key: got[key] == value for key, value in expected.items() if value is not None}


def adherence_checks(prompt: str | ToyScene, detection: VideoDetection) -> list[tuple[str, bool]]:
    """Every attribute a caption states, checked against a detection: ``[(attribute, satisfied), ...]``.

    The caption's objects are matched to distinct detected objects (among the ``n + 1`` largest) so that the most
    attributes hold; an object without a match fails all its attributes. ``count`` (as many objects as the caption
    names) and ``background`` (when stated) are checked once per video. Names as in :data:`ATTRIBUTES`.
    """
    scene = parse(prompt) if isinstance(prompt, str) else prompt
    candidates = detection.objects[: len(scene.objects) + 1]
    best: list[tuple[str, bool]] | None = None
    slots: list[DetectedObject | None] = [*candidates, *([None] * len(scene.objects))]
    for chosen in itertools.permutations(range(len(slots)), len(scene.objects)):
        checks = [
            item
            for obj, i in zip(scene.objects, chosen, strict=True)
            for item in _object_checks(obj, slots[i]).items()
        ]
        if best is None or sum(ok for _, ok in checks) > sum(ok for _, ok in best):
            best = checks
    checks = [("count", len(detection.objects) == len(scene.objects)), *best]
    if scene.background is not None:
        checks.append(("background", detection.background == scene.background))
    return checks


def largest_object_adherence(prompt: str | ToyScene, detection: VideoDetection) -> dict[str, bool | None]:
    """A lenient reading of :func:`adherence`: whether the largest detected object has each attribute as some object
    of the caption states it (``{attribute: bool | None}``, None where no object states it; ``count`` and
    ``background`` always None). A video of two named objects passes when one of them is drawn right and largest."""
    scene = parse(prompt) if isinstance(prompt, str) else prompt
    largest = detection.objects[0] if detection.objects else None
    result: dict[str, bool | None] = dict.fromkeys(ATTRIBUTES)
    for obj in scene.objects:
        for name, ok in _object_checks(obj, largest).items():
            result[name] = bool(result[name]) or ok
    return result


def adherence(prompt: str | ToyScene, video: torch.Tensor | VideoDetection) -> dict[str, bool | None]:
    """How a video follows its caption, attribute by attribute.

    Args:
        prompt: a caption of the toy world (or its parsed :class:`~trl_arcopo.toy.world.ToyScene`).
        video: ``[F, 3, H, W]`` in ``[0, 1]``, or its :class:`VideoDetection`.

    Returns:
        ``{attribute: bool | None}`` for every name of :data:`ATTRIBUTES`: None when the caption does not state the
        attribute, else whether every object it is stated for has it in the video (``count``: as many objects as
        named; ``color``: the colour at the start; ``turns_into``: the colour at the end; ``motion``: moving or
        bouncing; ``direction`` and ``speed``: of moving objects).

    Raises:
        ValueError: a caption :func:`~trl_arcopo.toy.world.parse` cannot read, or a video of the wrong shape.
    """
    if isinstance(video, torch.Tensor):
        if video.ndim != 4:
            raise ValueError(
                f"`video` must be one video [F, 3, H, W] (or its VideoDetection), got {tuple(video.shape)}."
            )
        video = detect(video.unsqueeze(0))[0]
    result: dict[str, bool | None] = dict.fromkeys(ATTRIBUTES)
    for name, ok in adherence_checks(prompt, video):
        result[name] = ok if result[name] is None else result[name] and ok
    return result
