"""Writing and logging generated videos."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.utils import export_to_video
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["log_videos", "save_video"]


def _to_pil(video: torch.Tensor) -> list[Image.Image]:
    """``[F, 3, H, W]`` in [0, 1] -> PIL frames."""
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(frame) for frame in frames]


def save_video(video: torch.Tensor | Sequence[Image.Image], path: str | Path, fps: int = 16) -> Path:
    """Write one video (``[F, 3, H, W]`` in [0, 1] or PIL frames) as ``path.mp4`` when imageio is installed (the
    ``video`` extra), else as a PNG contact sheet ``path.png``. Returns the written path."""
    frames = _to_pil(video) if isinstance(video, torch.Tensor) else list(video)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(export_to_video(frames, str(path.with_suffix(".mp4")), fps=fps))
    except ImportError:
        width, height = frames[0].size
        columns = min(len(frames), 8)
        rows = -(-len(frames) // columns)
        sheet = Image.new("RGB", (columns * width, rows * height))
        for i, frame in enumerate(frames):
            sheet.paste(frame, ((i % columns) * width, (i // columns) * height))
        sheet.save(path.with_suffix(".png"))
        return path.with_suffix(".png")


def log_videos(
    videos: torch.Tensor, prompt: str, *, step: int, output_dir: str, report_to: Sequence[str], fps: int = 16
) -> list[Path]:
    """Save sample videos ``[N, F, 3, H, W]`` under ``output_dir/samples/step-{step}/`` and send them to the
    trackers of ``report_to`` that can show videos (wandb)."""
    paths = [
        save_video(video, Path(output_dir) / "samples" / f"step-{step}" / f"sample-{i}", fps=fps)
        for i, video in enumerate(videos)
    ]
    if "wandb" in report_to:
        try:
            import wandb
        except ImportError:
            logger.warning("report_to includes wandb but wandb is not installed: videos were only saved to disk.")
        else:
            if wandb.run is not None:
                wandb.log({"samples": [wandb.Video(str(p), caption=prompt) for p in paths]}, step=step)
    return paths
