"""The toy world: a procedural video world of moving shapes, and a small trained few-step causal generator of it.

``render`` / ``parse`` / ``caption`` (``trl_arcopo.toy.world``) need only torch and numpy; ``load_toy_pipeline`` is
imported on first access (it imports diffusers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..presets import TOY_TRAINING_ARGS
from .world import (
    HELD_OUT_PAIRS,
    ToyObject,
    ToyScene,
    caption,
    coverage,
    layout,
    parse,
    render,
    sample_captions,
    sample_scene,
)

if TYPE_CHECKING:
    from .pipeline import TOY_PIPELINE_DIR, load_toy_pipeline

_LAZY_EXPORTS = {
    "TOY_PIPELINE_DIR": ".pipeline",
    "load_toy_pipeline": ".pipeline",
}

__all__ = sorted(
    [
        "HELD_OUT_PAIRS",
        "TOY_TRAINING_ARGS",
        "ToyObject",
        "ToyScene",
        "caption",
        "coverage",
        "layout",
        "parse",
        "render",
        "sample_captions",
        "sample_scene",
        *_LAZY_EXPORTS,
    ]
)


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'trl_arcopo.toy' has no attribute {name!r}")
