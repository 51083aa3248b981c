"""Saving sample videos and sending them to wandb, trackio and TensorBoard."""

import logging
import sys
import types

import pytest
import torch

from trl_arcopo.utils.videos import log_videos, save_video


def test_save_video_writes_mp4_or_png(tmp_path):
    video = torch.rand(9, 3, 16, 24)
    path = save_video(video, tmp_path / "clip", fps=16)
    assert path.stem == "clip" and path.suffix in (".mp4", ".png") and path.stat().st_size > 0


def _fake_tracker(logged: list) -> types.SimpleNamespace:
    """The part of the wandb / trackio API that `log_videos` uses: `Video`, `Image` and `log(data, step=None)`."""

    class Media:
        def __init__(self, path, caption=None):
            self.path, self.caption = path, caption

    return types.SimpleNamespace(
        Video=type("Video", (Media,), {}),
        Image=type("Image", (Media,), {}),
        log=lambda data, step=None: logged.append((data, step)),
    )


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_log_videos_sends_one_media_per_file(tmp_path, monkeypatch, tracker):
    logged = []
    monkeypatch.setitem(sys.modules, tracker, _fake_tracker(logged))
    paths = log_videos(torch.rand(2, 9, 3, 16, 16), "a cat", step=7, output_dir=str(tmp_path), report_to=[tracker])
    assert [p.parent.name for p in paths] == ["step-7", "step-7"]
    ((data, step),) = logged
    # The Trainer's step goes in as the metric transformers' callbacks plot against, not as the tracker's `step=`.
    assert step is None and data.pop("train/global_step") == 7 and sorted(data) == ["samples/0", "samples/1"]
    assert [data[f"samples/{i}"].path for i in range(2)] == [str(p) for p in paths]
    assert {media.caption for media in data.values()} == {"a cat"}
    # An mp4 is a video; without the `video` extra the file is a PNG contact sheet, logged as an image.
    assert {type(media).__name__ for media in data.values()} == {"Video" if paths[0].suffix == ".mp4" else "Image"}


def test_log_videos_sends_the_frames_to_tensorboard(tmp_path):
    class Writer:
        def __init__(self):
            self.images, self.texts = [], []

        def add_images(self, tag, images, step, dataformats):
            self.images.append((tag, images, step, dataformats))

        def add_text(self, tag, text, step):
            self.texts.append((tag, text, step))

    videos = torch.rand(2, 9, 3, 16, 24) * 1.2  # decoders can overshoot [0, 1]
    writer = Writer()
    log_videos(videos, "a dog", step=3, output_dir=str(tmp_path), report_to=["tensorboard"], tensorboard_writer=writer)
    assert [(tag, step, fmt) for tag, _, step, fmt in writer.images] == [
        ("samples/0", 3, "NCHW"),
        ("samples/1", 3, "NCHW"),
    ]
    for (_, images, _, _), video in zip(writer.images, videos, strict=True):
        assert torch.equal(images, video.clamp(0, 1))  # every frame, [F, 3, H, W] in [0, 1]
    assert writer.texts == [("samples/prompt", "a dog", 3)]


def test_trackers_that_cannot_receive_videos_are_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    logged = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_tracker(logged))
    monkeypatch.setitem(sys.modules, "trackio", None)  # not installed: `import trackio` raises ImportError
    with caplog.at_level(logging.WARNING, logger="trl_arcopo.utils.videos"):
        paths = log_videos(
            torch.rand(1, 9, 3, 16, 16),
            "a dog",
            step=8,
            output_dir=str(tmp_path),
            report_to=["trackio", "tensorboard", "none"],
        )
    assert logged == []  # wandb is installed but not a tracker of this run
    assert "trackio but it is not installed" in caplog.text and "no `tensorboard_writer`" in caplog.text
    assert paths[0].is_file() and paths[0].parent == tmp_path / "samples" / "step-8"


def test_wandb_offline_keeps_videos_logged_after_the_trainers_metrics(tmp_path, monkeypatch):
    """wandb's own step counter runs ahead of the Trainer's step (every `log` call moves it): media logged with an
    explicit `step=` below it are dropped. Logged as transformers' WandbCallback logs, they are kept."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="arcopo-test", dir=str(tmp_path))
    try:
        wandb.define_metric("train/global_step")  # what WandbCallback.setup does
        wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
        for step in range(1, 6):  # WandbCallback.on_log
            wandb.log({"train/loss": 1.0 / step, "train/global_step": step})
        log_videos(torch.rand(1, 9, 3, 16, 16), "a cat", step=3, output_dir=str(tmp_path), report_to=["wandb"])
        assert "samples/0" in run.summary.keys() and run.summary["train/global_step"] == 3
    finally:
        run.finish()


def test_trackio_local_logs_the_videos_at_the_trainers_step(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    trackio = pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    trackio.init(project="arcopo-test", name="run", embed=False)
    try:
        for step in range(1, 6):  # TrackioCallback.on_log
            trackio.log({"train/loss": 1.0 / step, "train/global_step": step})
        log_videos(torch.rand(1, 9, 3, 16, 16), "a cat", step=3, output_dir=str(tmp_path), report_to=["trackio"])
    finally:
        trackio.finish()
    (row,) = [row for row in SQLiteStorage.get_logs("arcopo-test", "run") if "samples/0" in row]
    assert row["train/global_step"] == 3
