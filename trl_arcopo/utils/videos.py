"""Writing and logging generated videos."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils import export_to_video
from PIL import Image

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)

__all__ = ["comparison_video", "contact_sheet", "log_videos", "save_video", "to_pil_frames"]


def to_pil_frames(video: torch.Tensor) -> list[Image.Image]:
    """``[F, 3, H, W]`` in [0, 1] -> PIL frames."""
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(frame) for frame in frames]


def save_video(video: torch.Tensor | Sequence[Image.Image], path: str | Path, fps: int = 16) -> Path:
    """Write one video (``[F, 3, H, W]`` in [0, 1] or PIL frames) as ``path.mp4`` when imageio is installed (the
    ``video`` extra), else as a PNG contact sheet ``path.png``. Returns the written path."""
    frames = to_pil_frames(video) if isinstance(video, torch.Tensor) else list(video)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(export_to_video(frames, str(path.with_suffix(".mp4")), fps=fps))
    except ImportError:
        contact_sheet(frames).save(path.with_suffix(".png"))
        return path.with_suffix(".png")


def contact_sheet(frames: Sequence[Image.Image], columns: int = 8) -> Image.Image:
    """The frames of a video side by side, ``columns`` per row."""
    width, height = frames[0].size
    columns = min(len(frames), columns)
    rows = -(-len(frames) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, frame in enumerate(frames):
        sheet.paste(frame, ((i % columns) * width, (i // columns) * height))
    return sheet


def comparison_video(columns: Sequence[torch.Tensor], *, scale: int = 1, gap: int = 2) -> torch.Tensor:
    """Videos compared side by side: ``columns`` are batches ``[N, F, 3, H, W]`` (e.g. the base model's and the
    trained one's, same prompts and noises); row ``i`` shows video ``i`` of every column, left to right.

    Args:
        scale: nearest-neighbour upscaling, for small videos.
        gap: white pixels between the videos (before upscaling).

    Returns:
        One video ``[F, 3, N * (H + gap) - gap, len(columns) * (W + gap) - gap] * scale`` in [0, 1].
    """
    num, frames, _, height, width = columns[0].shape
    if any(c.shape != columns[0].shape for c in columns):
        raise ValueError(f"The columns must have one shape, got {[tuple(c.shape) for c in columns]}.")
    grid = torch.ones(frames, 3, num * (height + gap) - gap, len(columns) * (width + gap) - gap)
    for j, column in enumerate(columns):
        for i, video in enumerate(column.float().cpu().clamp(0, 1)):
            top, left = i * (height + gap), j * (width + gap)
            grid[:, :, top : top + height, left : left + width] = video
    return grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _tracker_media(tracker: ModuleType, paths: Sequence[Path], caption: str) -> dict[str, Any]:
    """One ``samples/{i}`` entry per file: ``tracker.Video`` for an mp4, ``tracker.Image`` for a PNG contact sheet
    (wandb and trackio share these constructors)."""
    return {
        f"samples/{i}": (tracker.Video if path.suffix == ".mp4" else tracker.Image)(str(path), caption=caption)
        for i, path in enumerate(paths)
    }


def log_videos(
    videos: torch.Tensor,
    prompt: str,
    *,
    step: int,
    output_dir: str,
    report_to: Sequence[str],
    fps: int = 16,
    tensorboard_writer: SummaryWriter | None = None,
) -> list[Path]:
    """Save sample videos and send them to the trackers of ``report_to`` that show media.

    Args:
        videos: ``[N, F, 3, H, W]`` in [0, 1], written to ``output_dir/samples/step-{step}/sample-{i}`` (see
            [`save_video`]).
        prompt: the prompt of the videos (their caption).
        step: the training step they are logged at.
        report_to: tracker names; ``"wandb"`` and ``"trackio"`` get one ``samples/{i}`` video per file (an image when
            the file is a PNG contact sheet) with ``train/global_step`` = ``step``, as transformers' callbacks log
            (the run must be started, as the Trainer's callbacks do); ``"tensorboard"`` gets the frames of each video
            as an image grid
            ``samples/{i}`` plus the prompt as text (TensorBoard's own ``add_video`` needs moviepy).
        tensorboard_writer: the ``SummaryWriter`` TensorBoard logs go to, e.g. the ``tb_writer`` of the trainer's
            ``transformers.integrations.TensorBoardCallback``; without it nothing is sent to TensorBoard.

    Returns:
        The written files.
    """
    paths = [
        save_video(video, Path(output_dir) / "samples" / f"step-{step}" / f"sample-{i}", fps=fps)
        for i, video in enumerate(videos)
    ]
    for name in ("wandb", "trackio"):
        if name in report_to:
            try:
                tracker = importlib.import_module(name)
            except ImportError:
                logger.warning("report_to includes %s but it is not installed: videos were only saved to disk.", name)
            else:
                # As transformers' WandbCallback / TrackioCallback log: the Trainer's step is a metric
                # ("train/global_step", the x-axis they define), never the tracker's own `step=` (wandb drops data
                # logged at a step below its counter, which the Trainer's own logs have already moved on).
                tracker.log({**_tracker_media(tracker, paths, prompt), "train/global_step": step})
    if "tensorboard" in report_to:
        if tensorboard_writer is None:
            logger.warning(
                "report_to includes tensorboard but no `tensorboard_writer` was given: videos were only saved to disk."
            )
        else:
            for i, video in enumerate(videos):
                tensorboard_writer.add_images(f"samples/{i}", video.clamp(0, 1).cpu(), step, dataformats="NCHW")
            tensorboard_writer.add_text("samples/prompt", prompt, step)
    return paths
