"""`trl-arcopo collect`: a replay buffer of rollout groups from the reference policy, for semi-on-policy training.

    trl-arcopo collect --preset tiny                       # offline, a few seconds: outputs/replay-tiny
    trl-arcopo collect --preset self-forcing --prompt_file prompts.txt --output_dir replay-self-forcing \\
        --push_to_hub --hub_dataset_id me/self-forcing-replay
    accelerate launch -m trl_arcopo.scripts.collect --preset self-forcing --prompt_file prompts.txt

Group `i` is determined by the settings alone: prompt `i mod len(prompts)`, noise and pivot from the seed `seed + i`.
So the collection is split across processes without coordination (process `r` of `n` collects the missing groups
`r, r + n, ...`) and resumes exactly: every finished group is written at once to `output_dir/shards/`, and a rerun
with the same arguments collects only the missing groups. When all groups are there, the main process merges them
into `output_dir` (a `save_to_disk` dataset, loaded by `trl_arcopo.replay.load_replay_buffer`) and pushes it to the
Hub with `--push_to_hub`. Train on it with `--training_mode semi_on_policy --replay_dataset <output_dir>`.

A collection holds the lock `output_dir/.collect.lock` until it ends: a second `collect` into the same folder exits
at once, naming the process that holds it. A rerun repairs what a killed run left (a partial shard, shards that a
merge had already copied into the buffer).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl_arcopo.presets import TINY_TRAINING_ARGS
from trl_arcopo.scripts.train import PRESETS as TRAIN_PRESETS
from trl_arcopo.scripts.train import ScriptArguments, load_prompts
from trl_arcopo.scripts.utils import (
    PRESET_GEOMETRY,
    ScriptParser,
    check_reward_names,
    check_video_size,
    fail,
    load_generator,
    parse_with_preset,
    read_prompt_file,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from trl_arcopo import CausalWanPipeline

SHARDS_DIR = "shards"
LOCK_FILE, LOCK_OWNER_FILE = ".collect.lock", ".collect.owner"
# The generation settings of each preset: those of the `trl-arcopo train` preset of the same name, so that its
# semi-on-policy run accepts the buffer (YAML keys and flags override them).
PRESETS: dict[str, dict[str, Any]] = {
    "toy": {
        **{key: TRAIN_PRESETS["toy"][key] for key in ("num_frames", "height", "width", "num_generations")},
        "output_dir": "outputs/replay-toy",
        "num_groups": 16,
        "reward_funcs": TRAIN_PRESETS["toy"]["reward_funcs"],
    },
    "tiny": {
        **{key: TINY_TRAINING_ARGS[key] for key in ("num_frames", "height", "width", "num_generations")},
        "output_dir": "outputs/replay-tiny",
        "num_groups": 8,
        "reward_funcs": ["brightness"],
    },
    "self-forcing": {
        "output_dir": "outputs/replay-self-forcing",
        "num_groups": 100,  # the paper's buffer
        "dtype": "bfloat16",
        "reward_funcs": ["videoalign"],
    },
}


@dataclass
class CollectArguments(ScriptArguments):
    """What to collect and where (the model, prompt and reward options are those of `trl-arcopo train`)."""

    output_dir: str = field(
        default="outputs/replay-tiny",
        metadata={"help": "Folder of the buffer (`save_to_disk` format); its `shards/` subfolder holds the groups."},
    )
    num_groups: int = field(default=8, metadata={"help": "Number of rollout groups in the buffer (paper: 100)."})
    num_generations: int = field(default=12, metadata={"help": "Group size G (ARCoPOConfig.num_generations)."})
    noise_sigma: float = field(default=0.5, metadata={"help": "Exploration radius sigma of the noise forking."})
    num_frames: int = field(default=81, metadata={"help": "Pixel frames per video."})
    height: int = field(default=480, metadata={"help": "Video height in pixels."})
    width: int = field(default=832, metadata={"help": "Video width in pixels."})
    exploration: str = field(
        default="fork",
        metadata={"help": "'fork' (AR-CoPO) or 'sde' (the SDE-GRPO baseline).", "choices": ["fork", "sde"]},
    )
    pivot_strategy: str = field(
        default="uniform",
        metadata={"help": "How pivot chunks are drawn.", "choices": ["uniform", "fixed", "weighted"]},
    )
    pivot_index: int | None = field(default=None, metadata={"help": "Pivot chunk of `pivot_strategy='fixed'`."})
    pivot_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per chunk for `pivot_strategy='weighted'`."}
    )
    rollout_batch_size: int | None = field(
        default=None, metadata={"help": "Branches denoised per batched forward (default: all G)."}
    )
    seed: int = field(default=0, metadata={"help": "Group i is rolled out with the seed `seed + i`."})
    storage_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the stored tensors: 'float32' (exact) or 'bfloat16' (half the size, rounded).",
            "choices": ["float32", "bfloat16"],
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the merged buffer as a Hub dataset repo."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repo id for `--push_to_hub`."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repo as private."})


def make_parser() -> ScriptParser:
    """The parser of `CollectArguments` (reads `--config file.yaml`), without preset defaults."""
    return ScriptParser((CollectArguments,), prog="trl-arcopo collect")


def check_args(argv: list[str] | None = None) -> CollectArguments:
    """`parse`, leaving the options it does not know to another parser (`trl-arcopo collect` checks the arguments
    this way before it splits off the `accelerate launch` options)."""
    (args,) = parse_with_preset(make_parser(), PRESETS, argv, partial=True)
    _check(args)
    return args


def parse(argv: list[str] | None = None) -> CollectArguments:
    """Parse flags and `--config` on top of the requested preset's defaults and check them (before anything heavy
    is imported, so before the model loads); bad input exits with code 2."""
    (args,) = parse_with_preset(make_parser(), PRESETS, argv)
    _check(args)
    return args


def _check(args: CollectArguments) -> None:
    if args.num_groups < 1:
        fail(f"--num_groups must be >= 1, got {args.num_groups}")
    if args.num_generations < 2:
        fail(f"--num_generations must be >= 2 (a group compares its candidates), got {args.num_generations}")
    if not 0 < args.noise_sigma <= 1:
        fail(f"--noise_sigma must be in (0, 1] (the paper uses 0.5), got {args.noise_sigma}")
    if args.rollout_batch_size is not None and args.rollout_batch_size < 1:
        fail(f"--rollout_batch_size must be >= 1, got {args.rollout_batch_size}")
    geometry = None if args.model else PRESET_GEOMETRY[args.preset]
    check_video_size(args.num_frames, args.height, args.width, geometry=geometry)
    check_reward_names(args.reward_funcs, "--reward_funcs")
    if args.prompt_file:
        read_prompt_file(args.prompt_file)
    if args.push_to_hub and not args.hub_dataset_id:
        fail("--push_to_hub needs --hub_dataset_id (e.g. me/self-forcing-replay)")


@contextlib.contextmanager
def collection_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of the collection in ``output_dir`` (created if needed) for the ``with`` block; if another
    process holds it, exit with one line naming the folder and that process."""
    from filelock import FileLock, Timeout

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    owner = output_dir / LOCK_OWNER_FILE
    lock = FileLock(output_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else "another process"
        fail(
            f"{output_dir} is already being collected into by {holder}: wait until it ends, or pass another "
            "--output_dir"
        )
    try:
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _shard_dirs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / SHARDS_DIR).glob("group-*"))


def _shard_index(path: Path) -> int:
    return int(path.name.removeprefix("group-"))


def _merged(output_dir: Path) -> Dataset | None:
    """The merged buffer of `output_dir`, if there is one (its `state.json` is written last: see `merge_shards`)."""
    from datasets import load_from_disk

    return load_from_disk(str(output_dir)) if (output_dir / "state.json").is_file() else None


def _collected(output_dir: Path) -> list[Dataset]:
    """The buffers already written: the merged one in `output_dir` and the finished shards."""
    from datasets import load_from_disk

    merged = _merged(output_dir)
    return ([merged] if merged is not None else []) + [load_from_disk(str(path)) for path in _shard_dirs(output_dir)]


def _check_resumable(parts: Sequence[Dataset], settings: dict[str, Any], prompts: Sequence[str]) -> None:
    """Refuse to extend a collection made with other settings or prompts: the groups would not fit together."""
    from trl_arcopo.replay import buffer_settings

    expected = json.loads(json.dumps(settings))
    for part in parts:
        for stored in buffer_settings(part):
            differences = [f"{k} {stored.get(k)!r} (now {v!r})" for k, v in expected.items() if stored.get(k) != v]
            if differences:
                raise ValueError(
                    f"The groups already collected have other settings: {', '.join(differences)}. Rerun with the "
                    "same arguments, or collect into another folder."
                )
        for index, prompt in zip(part["group_index"], part["prompt"], strict=True):
            if prompts[index % len(prompts)] != prompt:
                raise ValueError(
                    f"Collected group {index} has the prompt {prompt!r}, but these prompts give it "
                    f"{prompts[index % len(prompts)]!r}. Rerun with the same prompts, or collect into another folder."
                )


def collect_shards(
    pipeline: CausalWanPipeline,
    prompts: Sequence[str],
    reward_funcs: Sequence[Callable],
    output_dir: str | os.PathLike,
    *,
    num_groups: int,
    rollout_batch_size: int | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    progress_bar: bool = True,
    **generation: Any,
) -> list[int]:
    """Collect this process's share of the groups missing from ``output_dir`` (those whose index is
    ``process_index`` modulo ``num_processes``), one shard per group.

    A shard is written to a temporary folder and renamed when complete, so an interruption loses at most the group
    in progress. ``generation`` holds the keyword arguments of :func:`~trl_arcopo.replay.generation_settings` (they
    determine the groups); groups already in ``output_dir`` must have been collected with the same ones.

    Returns:
        The indices of the groups collected by this call.
    """
    from tqdm.auto import tqdm

    from trl_arcopo.replay import collect_replay_buffer, generation_settings

    output_dir = Path(output_dir)
    collected = _collected(output_dir)
    _check_resumable(collected, generation_settings(pipeline, **generation), prompts)
    done = {index for part in collected for index in part["group_index"]}
    # Owned by index, not by position among the missing groups: processes may list the shards at different times.
    mine = [i for i in range(num_groups) if i % num_processes == process_index and i not in done]
    shards = output_dir / SHARDS_DIR
    if mine:
        shards.mkdir(parents=True, exist_ok=True)
    for index in tqdm(mine, desc=f"Collecting groups (process {process_index})", disable=not progress_bar):
        buffer = collect_replay_buffer(
            pipeline,
            prompts,
            reward_funcs,
            num_groups=1,
            first_group_index=index,
            rollout_batch_size=rollout_batch_size,
            progress_bar=False,
            **generation,
        )
        partial = shards / f".group-{index:06d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        buffer.save_to_disk(str(partial))
        partial.rename(shards / f"group-{index:06d}")
    return mine


def merge_shards(output_dir: str | os.PathLike) -> Dataset:
    """Merge the merged buffer of ``output_dir`` (if any) and its shards into ``output_dir``, sorted by group index,
    then delete the shards. Without shards, the merged buffer is returned as it is (not rewritten).

    Safe to interrupt: the merged buffer exists exactly when its ``state.json`` does, which is deleted first when an
    old buffer is replaced and written last when the new one is moved in. A crash while the old buffer is replaced
    costs re-collecting its groups (a rerun reproduces them identically); shards left by a crash while they were
    deleted, whose groups the merged buffer already holds, are deleted by the next merge.
    """
    from datasets import concatenate_datasets, load_from_disk

    output_dir = Path(output_dir)
    merged = _merged(output_dir)
    if merged is not None:
        already = set(merged["group_index"])
        for path in _shard_dirs(output_dir):
            if _shard_index(path) in already:  # left by a merge killed while it deleted its shards
                shutil.rmtree(path)
        if not _shard_dirs(output_dir):
            shutil.rmtree(output_dir / SHARDS_DIR, ignore_errors=True)
            return merged
    parts = _collected(output_dir)
    if not parts:
        raise ValueError(f"{output_dir} holds no collected group.")
    merged = concatenate_datasets(parts).sort("group_index")
    staging = output_dir / ".merging"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_to_disk(str(staging))
    for pattern in ("state.json", "data-*.arrow", "dataset_info.json"):  # the previous merge, state.json first
        for path in output_dir.glob(pattern):
            path.unlink()
    for path in sorted(staging.iterdir(), key=lambda path: path.name == "state.json"):  # state.json last
        path.rename(output_dir / path.name)
    staging.rmdir()
    shutil.rmtree(output_dir / SHARDS_DIR, ignore_errors=True)
    return load_from_disk(str(output_dir))


def main(argv: list[str] | None = None) -> Dataset | None:
    """Collect (resuming), merge on the main process and push if asked. Returns the merged buffer on the main
    process (None on the others)."""
    args = parse(argv)
    import torch  # the heavy imports, once the arguments are known to be good
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from trl_arcopo.rewards import load_reward

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as `Accelerator` reads `launch --cpu`
    with collection_lock(args.output_dir) if state.is_main_process else contextlib.nullcontext():
        state.wait_for_everyone()  # the other processes start once the main one holds the lock
        prompts = list(load_prompts(args)["prompt"])
        try:
            reward_funcs = [load_reward(name) for name in args.reward_funcs]
        except (OSError, ValueError) as error:  # a reward that cannot be loaded
            fail(error)
        pipeline = load_generator(args, device=state.device)
        pipeline.set_progress_bar_config(disable=True)
        try:
            collect_shards(
                pipeline,
                prompts,
                reward_funcs,
                args.output_dir,
                num_groups=args.num_groups,
                rollout_batch_size=args.rollout_batch_size,
                process_index=state.process_index,
                num_processes=state.num_processes,
                progress_bar=state.is_local_main_process,
                num_generations=args.num_generations,
                noise_sigma=args.noise_sigma,
                num_frames=args.num_frames,
                height=args.height,
                width=args.width,
                exploration=args.exploration,
                pivot_strategy=args.pivot_strategy,
                pivot_index=args.pivot_index,
                pivot_weights=args.pivot_weights,
                seed=args.seed,
                storage_dtype=getattr(torch, args.storage_dtype),
                revision=args.model_revision,
            )
        except ValueError as error:  # a collection in `output_dir` with other settings, sizes the model rejects
            fail(error)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        buffer = merge_shards(args.output_dir)
        print(f"{len(buffer)} rollout groups in {args.output_dir}")
        if args.push_to_hub:
            buffer.push_to_hub(args.hub_dataset_id, private=args.hub_private_repo)
            print(f"pushed to the Hub dataset repo {args.hub_dataset_id}")
    return buffer


if __name__ == "__main__":
    main()
