"""Which frame counts a chunk-wise generator can make: arithmetic shared by the pipeline's input check, the memory model
and the scripts' early checks (which run before torch is imported)."""

from __future__ import annotations

__all__ = ["nearest_valid", "whole_chunk_frames"]


def whole_chunk_frames(temporal_stride: int, chunk_frames: int) -> tuple[int, int]:
    """``(first, step)``: the pixel frame counts whose latent frames split into whole chunks are ``first + step·k``
    (``k >= 0``). The VAE packs ``temporal_stride`` pixel frames into one latent frame (the first frame alone) and a
    chunk holds ``chunk_frames`` latent frames: ``(9, 12)`` on Wan2.1, ``(3, 3)`` with a per-frame VAE."""
    return temporal_stride * (chunk_frames - 1) + 1, temporal_stride * chunk_frames


def nearest_valid(value: int, first: int, step: int) -> str:
    """The values ``first + step·k`` (``k >= 0``) on either side of ``value``, e.g. ``"9 or 21"``."""
    if value < first:
        return str(first)
    lower = first + (value - first) // step * step
    return f"{lower} or {lower + step}"
