"""Saving and logging sample videos."""

import sys
import types

import torch

from trl_arcopo.utils.videos import log_videos, save_video


def test_save_video_writes_mp4_or_png(tmp_path):
    video = torch.rand(9, 3, 16, 24)
    path = save_video(video, tmp_path / "clip", fps=16)
    assert path.stem == "clip" and path.suffix in (".mp4", ".png") and path.stat().st_size > 0


def test_log_videos_sends_to_wandb_when_it_is_a_tracker(tmp_path, monkeypatch):
    logged = []

    class Video:
        def __init__(self, path, caption=None):
            self.path, self.caption = path, caption

    fake = types.SimpleNamespace(run=object(), Video=Video, log=lambda data, step: logged.append((data, step)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    paths = log_videos(torch.rand(2, 9, 3, 16, 16), "a cat", step=7, output_dir=str(tmp_path), report_to=["wandb"])
    assert [p.parent.name for p in paths] == ["step-7", "step-7"]
    ((data, step),) = logged
    assert step == 7 and [v.caption for v in data["samples"]] == ["a cat", "a cat"]
    assert [v.path for v in data["samples"]] == [str(p) for p in paths]

    logged.clear()
    log_videos(torch.rand(1, 9, 3, 16, 16), "a dog", step=8, output_dir=str(tmp_path), report_to=["tensorboard"])
    assert logged == []  # only trackers that show videos get them; the files are on disk either way
    assert (tmp_path / "samples" / "step-8").is_dir()
