"""A procedural video world of moving shapes, its captions and their parser.

A scene is one or two objects (a circle, square or triangle in one of seven colours) over a plain or gradient
background. Each object moves in a direction (``left``/``right``/``up``/``down``, slowly or quickly) or bounces in
place, and may turn into another colour. A caption states some of these attributes ("a small red circle moving left
quickly and a blue square bouncing on a gray background"); whatever it leaves out (the size, speed, position, background,
even the colour or the motion) is drawn from the video's seed, so a text-to-video model trained on this world has to
let its initial noise decide it: the regime of few-step distilled generators.

Coordinates are fractions of the frame: ``x`` from left to right, ``y`` from top to bottom (so "up" decreases ``y``).
Motion is defined over the video's duration (a speed is the distance travelled over the video). :func:`render` draws ``[B, F, 3, H, W]`` videos in
``[0, 1]`` with anti-aliased edges; :func:`parse` turns a caption back into a :class:`ToyScene`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DIRECTIONS",
    "HELD_OUT_PAIRS",
    "SHAPES",
    "SIZES",
    "SPEEDS",
    "ObjectLayout",
    "SceneLayout",
    "ToyObject",
    "ToyScene",
    "caption",
    "coverage",
    "layout",
    "parse",
    "render",
    "sample_captions",
    "sample_scene",
    "travel_directions",
    "vocabulary",
]

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.1, 0.1),
    "yellow": (0.97, 0.9, 0.1),
    "green": (0.1, 0.8, 0.15),
    "cyan": (0.1, 0.85, 0.95),
    "blue": (0.15, 0.3, 1.0),
    "magenta": (0.95, 0.2, 0.85),
    "white": (0.96, 0.96, 0.96),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
# Radius ranges (fraction of the frame's smaller side) and speed ranges (distance travelled over the whole video, as a
# fraction of the frame: motion is defined over the video's duration, whatever its number of frames).
SIZES: dict[str, tuple[float, float]] = {"small": (0.13, 0.16), "large": (0.2, 0.24)}
SPEEDS: dict[str, tuple[float, float]] = {"slowly": (0.2, 0.3), "quickly": (0.4, 0.5)}
# Plain backgrounds are dark and unsaturated so that every object colour stands out; "gradient" is a vertical blend of
# two such tones drawn from the seed.
BACKGROUNDS: dict[str, tuple[float, float, float] | None] = {
    "black": (0.03, 0.03, 0.04),
    "gray": (0.3, 0.3, 0.32),
    "navy": (0.04, 0.07, 0.24),
    "gradient": None,
}
# Colour/shape pairs that `sample_scene` never produces by default: prompts with them test generalisation.
HELD_OUT_PAIRS = frozenset({("magenta", "triangle"), ("cyan", "square"), ("green", "circle")})

_MOTIONS = ("moving", "bouncing")
_SIZE_RANGE = (SIZES["small"][0], SIZES["large"][1])
_SPEED_RANGE = (SPEEDS["slowly"][0], SPEEDS["quickly"][1])


@dataclass(frozen=True)
class ToyObject:
    """What a caption can say about one object; ``None`` means unspecified (drawn from the seed when rendering).

    Attributes:
        shape: one of :data:`SHAPES` (always stated).
        color: one of :data:`COLORS`, or None.
        size: ``"small"``, ``"large"`` or None.
        motion: ``"moving"``, ``"bouncing"`` or None.
        direction: one of :data:`DIRECTIONS` when ``motion == "moving"`` (None: drawn from the seed).
        speed: ``"slowly"``, ``"quickly"`` or None (for ``"moving"`` objects).
        turns_into: the colour the object changes into over the video, or None.
    """

    shape: str
    color: str | None = None
    size: str | None = None
    motion: str | None = None
    direction: str | None = None
    speed: str | None = None
    turns_into: str | None = None

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        for name, choices in (("color", COLORS), ("size", SIZES), ("motion", _MOTIONS), ("direction", DIRECTIONS)):
            if getattr(self, name) is not None:
                _check_choice(name, getattr(self, name), choices)
        if self.speed is not None:
            _check_choice("speed", self.speed, SPEEDS)
        if self.turns_into is not None:
            _check_choice("turns_into", self.turns_into, COLORS)
        if self.motion == "bouncing" and (self.direction is not None or self.speed is not None):
            raise ValueError("A bouncing object has no `direction` or `speed` (it hops in place).")


@dataclass(frozen=True)
class ToyScene:
    """One or two objects and, optionally, the background (one of :data:`BACKGROUNDS`)."""

    objects: tuple[ToyObject, ...]
    background: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"A toy scene has 1 or 2 objects, got {len(self.objects)}.")
        if self.background is not None:
            _check_choice("background", self.background, BACKGROUNDS)


@dataclass(frozen=True)
class ObjectLayout:
    """One object as rendered: every attribute resolved, positions per frame.

    Attributes:
        shape, color, turns_into: as in :class:`ToyObject` (``color`` resolved).
        radius: fraction of the frame's smaller side (shapes of one radius have the same area).
        x, y: ``[F]`` centre positions (fractions of the frame).
        direction: the direction of travel for moving objects, None for bouncing ones.
        speed: distance travelled over the video, as a fraction of the frame (0 for bouncing objects).
    """

    shape: str
    color: str
    radius: float
    x: np.ndarray
    y: np.ndarray
    direction: str | None
    speed: float
    turns_into: str | None = None


@dataclass(frozen=True)
class SceneLayout:
    """A scene with everything resolved: the objects' layouts and the background's top and bottom colours."""

    objects: tuple[ObjectLayout, ...]
    background: str
    background_top: tuple[float, float, float]
    background_bottom: tuple[float, float, float]
    num_frames: int = field(default=0)


def _check_choice(name: str, value: object, choices) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {sorted(choices)}.")


# ----------------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------------


def _object_phrase(obj: ToyObject) -> str:
    words = [w for w in (obj.size, obj.color) if w is not None]
    words.append(obj.shape)
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    if obj.motion == "moving":
        words.append("moving")
        words += [w for w in (obj.direction, obj.speed) if w is not None]
    elif obj.motion == "bouncing":
        words.append("bouncing")
    if obj.turns_into is not None:
        words += ["turning", obj.turns_into]
    return " ".join(words)


def caption(scene: ToyScene) -> str:
    """The caption of a scene, e.g. ``"a small red circle moving left quickly and a blue square bouncing on a gray
    background"``; :func:`parse` inverts it."""
    text = " and ".join(_object_phrase(obj) for obj in scene.objects)
    if scene.background is not None:
        text += f" on a {scene.background} background"
    return text


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the toy tokenizer's vocabulary)."""
    words = ["a", "an", "and", "on", "background", "moving", "bouncing", "turning"]
    words += [*SIZES, *COLORS, *SHAPES, *DIRECTIONS, *SPEEDS, *BACKGROUNDS]
    return list(dict.fromkeys(words))


def parse(text: str) -> ToyScene:
    """The scene a caption describes (the inverse of :func:`caption`).

    Raises:
        ValueError: naming the first word that does not fit the caption grammar.
    """
    words = re.sub(r"[^a-z ]", " ", text.lower()).split()
    background = None
    if len(words) >= 4 and words[-4:-2] == ["on", "a"] and words[-1] == "background":
        background = words[-2]
        _check_choice("background", background, BACKGROUNDS)
        words = words[:-4]
    objects, current = [], []
    for word in [*words, "and"]:
        if word == "and":
            if not current:
                raise ValueError(f"Cannot parse caption {text!r}: an object phrase is empty.")
            objects.append(_parse_object(current, text))
            current = []
        else:
            current.append(word)
    return ToyScene(objects=tuple(objects), background=background)


def _parse_object(words: list[str], text: str) -> ToyObject:
    def fail(word: str) -> ValueError:
        return ValueError(f"Cannot parse caption {text!r}: unexpected word {word!r} in {' '.join(words)!r}.")

    words = list(words)
    if words[0] in ("a", "an"):
        words.pop(0)
    attrs: dict[str, str] = {}
    if words and words[0] in SIZES:
        attrs["size"] = words.pop(0)
    if words and words[0] in COLORS:
        attrs["color"] = words.pop(0)
    if not words or words[0] not in SHAPES:
        raise fail(words[0] if words else "<end>")
    attrs["shape"] = words.pop(0)
    if words and words[0] == "moving":
        attrs["motion"] = words.pop(0)
        if words and words[0] in DIRECTIONS:
            attrs["direction"] = words.pop(0)
        if words and words[0] in SPEEDS:
            attrs["speed"] = words.pop(0)
    elif words and words[0] == "bouncing":
        attrs["motion"] = words.pop(0)
    if words and words[0] == "turning":
        words.pop(0)
        if not words or words[0] not in COLORS:
            raise fail(words[0] if words else "<end>")
        attrs["turns_into"] = words.pop(0)
    if words:
        raise fail(words[0])
    return ToyObject(**attrs)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling scenes and resolving layouts
# ----------------------------------------------------------------------------------------------------------------------


def sample_scene(
    rng: np.random.Generator,
    *,
    held_out: frozenset[tuple[str, str]] = HELD_OUT_PAIRS,
    mention: dict[str, float] | None = None,
) -> ToyScene:
    """A random scene and how much of it the caption states (training captions).

    Args:
        rng: numpy random generator.
        held_out: ``(color, shape)`` pairs never produced (the default keeps :data:`HELD_OUT_PAIRS` for evaluation).
        mention: probability that each optional attribute is stated: keys ``color``, ``size``, ``motion``,
            ``direction``, ``speed``, ``background``, ``turn`` (an object changes colour), ``second`` (a second object).
    """
    p = {
        "color": 0.92,
        "size": 0.5,
        "motion": 0.92,
        "direction": 1.0,
        "speed": 0.4,
        "background": 0.3,
        "turn": 0.12,
        "second": 0.3,
    }
    p.update(mention or {})
    num_objects = 2 if rng.random() < p["second"] else 1
    objects = []
    for _ in range(num_objects):
        while True:
            color = str(rng.choice(list(COLORS)))
            shape = str(rng.choice(SHAPES))
            if (color, shape) not in held_out:
                break
        motion = "moving" if rng.random() < 0.8 else "bouncing"
        obj = ToyObject(
            shape=shape,
            color=color if rng.random() < p["color"] else None,
            size=str(rng.choice(list(SIZES))) if rng.random() < p["size"] else None,
            motion=motion if rng.random() < p["motion"] else None,
        )
        if obj.motion == "moving":
            obj = replace(
                obj,
                direction=str(rng.choice(list(DIRECTIONS))) if rng.random() < p["direction"] else None,
                speed=str(rng.choice(list(SPEEDS))) if rng.random() < p["speed"] else None,
            )
        if obj.color is not None and rng.random() < p["turn"]:
            obj = replace(obj, turns_into=str(rng.choice([c for c in COLORS if c != obj.color])))
        objects.append(obj)
    background = str(rng.choice(list(BACKGROUNDS))) if rng.random() < p["background"] else None
    return ToyScene(objects=tuple(objects), background=background)


def sample_captions(num: int, seed: int = 0, **kwargs: Any) -> list[str]:
    """``num`` captions of random scenes (:func:`sample_scene` with ``kwargs``), deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng, **kwargs)) for _ in range(num)]


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _object_layout(obj: ToyObject, num_frames: int, rng: np.random.Generator) -> ObjectLayout:
    color = obj.color or str(rng.choice(list(COLORS)))
    radius = _uniform(rng, SIZES[obj.size] if obj.size else _SIZE_RANGE)
    motion = obj.motion or ("moving" if rng.random() < 0.8 else "bouncing")
    u = np.linspace(0.0, 1.0, num_frames)  # time as a fraction of the video
    if motion == "moving":
        direction = obj.direction or str(rng.choice(list(DIRECTIONS)))
        travel = min(_uniform(rng, SPEEDS[obj.speed] if obj.speed else _SPEED_RANGE), 1 - 2 * radius)
        dx, dy = DIRECTIONS[direction]
        along = _uniform(rng, (radius, 1 - radius - travel))  # start coordinate along the direction of travel
        across = _uniform(rng, (radius, 1 - radius))
        start = along if (dx + dy) > 0 else 1 - along
        path = start + (dx + dy) * travel * u
        x, y = (path, np.full_like(u, across)) if dx else (np.full_like(u, across), path)
        speed = travel
    else:
        direction, speed = None, 0.0
        x = np.full_like(u, _uniform(rng, (radius, 1 - radius)))
        floor = _uniform(rng, (max(0.6, 3 * radius), 1 - radius))
        height = _uniform(rng, (0.15, 0.3)) * min(1.0, (floor - radius) / 0.3)
        bounces = _uniform(rng, (1.2, 2.0))  # hops over the video
        phase = _uniform(rng, (0.0, 1.0))
        y = floor - height * np.abs(np.sin(math.pi * (bounces * u + phase)))
    return ObjectLayout(
        shape=obj.shape,
        color=color,
        radius=radius,
        x=x,
        y=y,
        direction=direction,
        speed=speed,
        turns_into=obj.turns_into,
    )


def layout(scene: ToyScene | str, num_frames: int, seed: int | np.random.Generator) -> SceneLayout:
    """Resolve everything a scene (or caption) leaves unspecified, deterministically from ``seed``."""
    scene = parse(scene) if isinstance(scene, str) else scene
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    objects = tuple(_object_layout(obj, num_frames, rng) for obj in scene.objects)
    background = scene.background or str(rng.choice(list(BACKGROUNDS)))
    if background == "gradient":
        tones = [c for name, c in BACKGROUNDS.items() if c is not None]
        top, bottom = (tones[i] for i in rng.choice(len(tones), size=2, replace=False))
    else:
        top = bottom = BACKGROUNDS[background]
    return SceneLayout(objects, background, top, bottom, num_frames)


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) to a shape of the circle's area centred at the origin."""
    if shape == "circle":
        return torch.sqrt(dx.square() + dy.square()) - radius
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - radius * (math.sqrt(math.pi) / 2)
    # Equilateral triangle pointing up (y grows downwards), centroid at the origin: the max over its three edges'
    # half-plane distances (exact along the edges, which is all anti-aliasing needs).
    inradius = radius * math.sqrt(4 * math.pi / math.sqrt(3)) / (2 * math.sqrt(3))
    distances = [
        nx * dx + ny * dy - inradius
        for nx, ny in ((0.0, 1.0), (math.sin(2 * math.pi / 3), -0.5), (-math.sin(2 * math.pi / 3), -0.5))
    ]
    return torch.maximum(torch.maximum(distances[0], distances[1]), distances[2])


def _color_over_time(obj: ObjectLayout, num_frames: int) -> torch.Tensor:
    """``[F, 3]``: the object's colour, turning into ``turns_into`` over the middle half of the video."""
    start = torch.tensor(COLORS[obj.color], dtype=torch.float32)
    if obj.turns_into is None:
        return start.expand(num_frames, 3)
    end = torch.tensor(COLORS[obj.turns_into], dtype=torch.float32)
    u = torch.linspace(0, 1, num_frames)
    w = ((u - 0.25) / 0.5).clamp(0, 1)
    w = w * w * (3 - 2 * w)  # smoothstep
    return start + (end - start) * w[:, None]


def _object_alphas(scene: SceneLayout, height: int, width: int):
    """Yield each object with its anti-aliased coverage ``[F, 1, H, W]`` in [0, 1] (one pixel of anti-aliasing)."""
    num_frames = scene.num_frames
    rows = (torch.arange(height, dtype=torch.float32) + 0.5).view(1, height, 1)
    cols = (torch.arange(width, dtype=torch.float32) + 0.5).view(1, 1, width)
    scale = min(height, width)
    for obj in scene.objects:
        cx = torch.as_tensor(obj.x, dtype=torch.float32).view(num_frames, 1, 1) * width
        cy = torch.as_tensor(obj.y, dtype=torch.float32).view(num_frames, 1, 1) * height
        sdf = _signed_distance(obj.shape, cols - cx, rows - cy, torch.tensor(obj.radius * scale))
        yield obj, (0.5 - sdf).clamp(0, 1).unsqueeze(1)


def _composite(
    scene: SceneLayout, height: int, width: int, base: torch.Tensor, value: Callable[[ObjectLayout], torch.Tensor]
) -> torch.Tensor:
    """``base`` ``[F, C, H, W]`` with each object's ``value(obj)`` (``[F or 1, C, 1, 1]``) painted over it by its
    coverage, in drawing order: what :func:`render` shows, and what :func:`travel_directions` reads, per pixel."""
    for obj, alpha in _object_alphas(scene, height, width):
        base = base * (1 - alpha) + value(obj) * alpha
    return base


def _render_one(scene: SceneLayout, height: int, width: int) -> torch.Tensor:
    num_frames = scene.num_frames
    top = torch.tensor(scene.background_top).view(3, 1, 1)
    bottom = torch.tensor(scene.background_bottom).view(3, 1, 1)
    blend = ((torch.arange(height, dtype=torch.float32) + 0.5) / height).view(1, height, 1)
    background = (top + (bottom - top) * blend).expand(num_frames, 3, height, width)
    return _composite(
        scene, height, width, background, lambda obj: _color_over_time(obj, num_frames).view(num_frames, 3, 1, 1)
    )


def _layouts(scenes, num_frames: int, height: int, width: int, seed: int | Sequence[int]) -> list[SceneLayout]:
    """The checked video size's layouts of :func:`render`'s / :func:`coverage`'s ``scenes`` (``seed`` as there)."""
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height and width must be >= 1, got {num_frames}, {height}, {width}.")
    if isinstance(scenes, (str, ToyScene, SceneLayout)):
        scenes = [scenes]
    seeds = [seed + i for i in range(len(scenes))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(scenes):
        raise ValueError(f"Got {len(seeds)} seeds for {len(scenes)} scenes.")
    layouts = [
        scene if isinstance(scene, SceneLayout) else layout(scene, num_frames, s)
        for scene, s in zip(scenes, seeds, strict=True)
    ]
    for resolved in layouts:
        if resolved.num_frames != num_frames:
            raise ValueError(f"A layout of {resolved.num_frames} frames cannot be rendered with {num_frames} frames.")
    return layouts


def render(
    scenes: Sequence[ToyScene | str | SceneLayout] | ToyScene | str,
    num_frames: int = 33,
    height: int = 64,
    width: int = 64,
    seed: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Draw videos of scenes, captions or resolved layouts.

    Args:
        scenes: one or several :class:`ToyScene`, captions or :class:`SceneLayout` (layouts ignore ``seed`` and must
            have ``num_frames`` frames).
        num_frames, height, width: video size in pixels.
        seed: one seed per video, or one int: video ``i`` then uses ``seed + i``. The seed decides whatever a scene
            leaves unspecified (:func:`layout`).

    Returns:
        ``[B, F, 3, H, W]`` float32 in ``[0, 1]``.
    """
    layouts = _layouts(scenes, num_frames, height, width, seed)
    return torch.stack([_render_one(scene, height, width) for scene in layouts]).clamp(0, 1)


def coverage(
    scenes: Sequence[ToyScene | str | SceneLayout] | ToyScene | str,
    num_frames: int = 33,
    height: int = 64,
    width: int = 64,
    seed: int | Sequence[int] = 0,
    per_shape: bool = False,
) -> torch.Tensor:
    """How much of each pixel the objects of :func:`render`'s videos cover (same arguments, same layouts).

    Args:
        per_shape: one coverage map per shape of :data:`SHAPES` (that shape's objects only).

    Returns:
        ``[B, F, H, W]`` (``per_shape``: ``[B, F, len(SHAPES), H, W]``) float32 in ``[0, 1]``: 0 on the background,
        1 inside an object, fractional on the anti-aliased edges.
    """
    masks = []
    for scene in _layouts(scenes, num_frames, height, width, seed):
        covered = torch.zeros(num_frames, len(SHAPES), height, width)
        for obj, alpha in _object_alphas(scene, height, width):
            k = SHAPES.index(obj.shape)
            covered[:, k : k + 1] = torch.maximum(covered[:, k : k + 1], alpha)
        masks.append(covered if per_shape else covered.amax(1))
    return torch.stack(masks)


def travel_directions(
    scenes: Sequence[ToyScene | str | SceneLayout] | ToyScene | str,
    num_frames: int = 33,
    height: int = 64,
    width: int = 64,
    seed: int | Sequence[int] = 0,
) -> torch.Tensor:
    """The direction of travel (the ``(dx, dy)`` of :data:`DIRECTIONS`) of the object on each pixel of :func:`render`'s
    videos (same arguments, same layouts), weighted by its coverage, later objects over earlier ones as drawn.

    Returns:
        ``[B, F, 2, H, W]`` float32 in ``[-1, 1]``: 0 on the background and on bouncing objects.
    """

    def travel(obj: ObjectLayout) -> torch.Tensor:
        return torch.tensor(DIRECTIONS[obj.direction] if obj.direction else (0.0, 0.0)).view(1, 2, 1, 1)

    empty = torch.zeros(num_frames, 2, height, width)
    return torch.stack(
        [
            _composite(scene, height, width, empty, travel)
            for scene in _layouts(scenes, num_frames, height, width, seed)
        ]
    )
