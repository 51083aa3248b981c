"""Checkpoints of :class:`~trl_arcopo.ARCoPOTrainer`: written atomically, with the AR-CoPO state of every process.

A checkpoint is written into ``output_dir/.staging/checkpoint-N``, flushed to disk (every file and folder is
fsynced), then renamed to ``output_dir/checkpoint-N``: a run killed while saving (or a machine that loses power)
leaves the previous checkpoint as the last one, complete, and never a partial ``checkpoint-N`` that
``transformers.trainer_utils.get_last_checkpoint`` would resume from. Next to the Trainer's files, each process adds
what an exact resume needs: its rollout generator, its step counters and the rollout groups it was still training on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .rollout import RolloutGroup

__all__ = ["STAGING_DIR", "load_process_state", "publish", "save_process_state", "staged_checkpoint"]

STAGING_DIR = ".staging"
_STATE_FILE = "arcopo_state.json"
_TENSORS_FILE = "arcopo_state.safetensors"
# The RolloutGroup tensors a checkpoint keeps (replayed groups have no `latents`).
_GROUP_TENSORS = ("prompt_embeds", "prefix_latents", "inputs", "predictions", "noise", "latents")


def _fsync(path: str | os.PathLike, *, directory: bool = False) -> None:
    if directory and os.name != "posix":  # only POSIX can open (and sync) a folder
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the finished folder ``staged`` durable and rename it to ``final`` (replacing an older ``final``).

    Every file and sub-folder of ``staged`` and ``staged`` itself are fsynced before the rename, and the parent of
    ``final`` after it: once this returns, ``final`` is complete on disk, and a crash before leaves no ``final``
    (or the previous one).
    """
    for root, _, files in os.walk(staged, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root, directory=True)
    if os.path.isdir(final):  # the same step saved again (e.g. the last step after a reward failure)
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync(os.path.dirname(os.path.abspath(final)), directory=True)


@contextlib.contextmanager
def staged_checkpoint(run_dir: str, name: str, accelerator: Accelerator) -> Iterator[str]:
    """Write a checkpoint inside the block into the yielded folder ``run_dir/.staging/name``; when the block ends
    (on every process), :func:`publish` moves it to ``run_dir/name``.

    The main process publishes; then the local main process of every node whose file system does not show the main
    node's result publishes its own copy. A staged folder left by a crashed save is removed first. An exception
    inside the block publishes nothing: the partial folder stays in ``.staging`` until the next save of that step.
    """
    staging_dir = os.path.join(run_dir, STAGING_DIR)
    staged, final = os.path.join(staging_dir, name), os.path.join(run_dir, name)
    if accelerator.is_local_main_process and os.path.isdir(staged):
        # Nodes sharing one file system remove it at the same time: whichever gets there second finds it gone.
        shutil.rmtree(staged, ignore_errors=True)
    accelerator.wait_for_everyone()
    yield staged
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish(staged, final)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process and os.path.isdir(staged):
        publish(staged, final)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        with contextlib.suppress(OSError):  # not empty (another save's staging), or removed by another node
            os.rmdir(staging_dir)


def save_process_state(
    checkpoint: str,
    rank: int,
    *,
    rollout_generator: torch.Generator,
    counters: dict[str, int],
    buffered: list[list[dict]] | None,
) -> None:
    """Write ``rank{rank}_arcopo_state.{safetensors,json}`` into ``checkpoint`` (safetensors and JSON only).

    Args:
        rollout_generator: the process's rollout generator (its state is saved).
        counters: the trainer's step counters (JSON numbers), returned as they are by :func:`load_process_state`.
        buffered: the rollout groups of the current generation batch, one list per microbatch, each item
            ``{"group": RolloutGroup, "advantages": [G], "rewards": [G]}`` (the videos are not kept).
    """
    tensors = {"rollout_generator": rollout_generator.get_state()}
    groups = []
    for i, microbatch in enumerate(buffered or []):
        for j, item in enumerate(microbatch):
            group: RolloutGroup = item["group"]
            key = f"{i}.{j}"
            for field_name in _GROUP_TENSORS:
                if getattr(group, field_name) is not None:
                    tensors[f"{key}.{field_name}"] = getattr(group, field_name).detach().cpu().contiguous()
            tensors[f"{key}.advantages"] = item["advantages"].cpu()
            tensors[f"{key}.rewards"] = item["rewards"].cpu()
            groups.append({"key": key, "pivot": group.pivot, "exploration": group.exploration})
    meta = {**counters, "groups": groups, "microbatches": len(buffered or [])}
    os.makedirs(checkpoint, exist_ok=True)
    save_file(tensors, os.path.join(checkpoint, f"rank{rank}_{_TENSORS_FILE}"))
    Path(checkpoint, f"rank{rank}_{_STATE_FILE}").write_text(json.dumps(meta))


def load_process_state(
    checkpoint: str, rank: int, device: torch.device
) -> tuple[torch.Tensor, dict[str, Any], list[list[dict]] | None] | None:
    """What :func:`save_process_state` wrote for ``rank``: ``(generator state, counters, buffered groups)`` with the
    group tensors on ``device``, or None when the checkpoint has no AR-CoPO state for this process."""
    meta_file = Path(checkpoint, f"rank{rank}_{_STATE_FILE}")
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    tensors = load_file(os.path.join(checkpoint, f"rank{rank}_{_TENSORS_FILE}"))
    buffered = [[] for _ in range(meta.pop("microbatches"))]
    for entry in meta.pop("groups"):
        key = entry["key"]
        fields = {f: tensors[f"{key}.{f}"].to(device) if f"{key}.{f}" in tensors else None for f in _GROUP_TENSORS}
        group = RolloutGroup(**fields, pivot=entry["pivot"], videos=None, exploration=entry["exploration"])
        item = {"group": group, "advantages": tensors[f"{key}.advantages"], "rewards": tensors[f"{key}.rewards"]}
        buffered[int(key.split(".")[0])].append(item)
    return tensors["rollout_generator"], meta, buffered or None
