"""Reward throughput (videos per second) and the cost of scoring through the reward server, in one run.

Every reward scores the same batch ``[num_videos, frames, 3, height, width]``; the remote rows score it again through
`trl-arcopo-reward-server` (in a thread of this process, on loopback) with `RemoteReward`, and print
time(remote) / time(in-process) and the largest score difference (float16 payloads round the pixels).

    python benchmarks/bench_rewards.py                 # CPU: built-ins, tiny CLIP rewards, tiny VideoAlign
    python benchmarks/bench_rewards.py --models real --device cuda --dtype bfloat16   # real checkpoints (HF cache)

With ``--models tiny`` the model-backed rewards are tiny random stand-ins installed into a temporary Hub cache
(`trl_arcopo.testing.cache_tiny_clip_rewards`; VideoAlign from the parity fixture), so the CPU figures measure the
pre-processing and plumbing, not the real networks.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

BUILTINS = ["temporal_flicker", "colorfulness", "brightness", "sharpness"]
MODELS = ["pickscore", "clipscore", "aesthetic", "videoalign"]
FIXTURE_VIDEOALIGN = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "videoalign_tiny" / "checkpoint"
)


def timed(reward: Callable, prompts: list[str], videos: torch.Tensor, repeats: int) -> tuple[float, dict]:
    """Mean seconds per call after one warm-up call, and the scores as ``{head: float64 tensor [B]}``."""
    from trl_arcopo.rewards import normalize_reward_output, reward_name

    output = reward(prompts, videos)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        reward(prompts, videos)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, normalize_reward_output(output, len(prompts), reward_name(reward))


def load(name: str, args: argparse.Namespace, cache_dir: str | None) -> Callable:
    from trl_arcopo.rewards import load_reward

    if name in BUILTINS:
        return load_reward(name)
    kwargs = {"device": args.device, "dtype": getattr(torch, args.dtype)}
    if name == "videoalign" and args.models == "tiny":
        return load_reward("videoalign", path_or_repo_id=str(FIXTURE_VIDEOALIGN.resolve()), **kwargs)
    return load_reward(name, cache_dir=cache_dir, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewards", nargs="+", default=BUILTINS + MODELS, choices=BUILTINS + MODELS)
    parser.add_argument("--remote", nargs="+", default=["brightness", "pickscore"], choices=BUILTINS + MODELS)
    parser.add_argument("--models", default="tiny", choices=["tiny", "real"])
    parser.add_argument("--num-videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=416)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--payload-dtype", default="float16", choices=["float32", "float16", "uint8"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.models == "tiny":
        # The tiny stand-ins live in a temporary Hub cache; huggingface_hub reads this flag when it is imported.
        os.environ["HF_HUB_OFFLINE"] = "1"
    from trl_arcopo.rewards import RemoteReward
    from trl_arcopo.rewards.server import create_app, serve_in_background
    from trl_arcopo.testing import cache_tiny_clip_rewards

    videos = torch.rand(
        args.num_videos, args.frames, 3, args.height, args.width, generator=torch.Generator().manual_seed(0)
    )
    prompts = [f"a video of a red car number {i}" for i in range(args.num_videos)]
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device={args.device}, "
        f"dtype={args.dtype}, threads={torch.get_num_threads()}, models={args.models}, "
        f"videos [{args.num_videos}, {args.frames}, 3, {args.height}, {args.width}], payload={args.payload_dtype}"
    )
    with tempfile.TemporaryDirectory() as cache_dir:
        if args.models == "tiny":
            cache_tiny_clip_rewards(cache_dir)
        hub_cache = cache_dir if args.models == "tiny" else None
        rewards = {name: load(name, args, hub_cache) for name in args.rewards}

        print("reward            seconds/call  videos/s")
        measured = {}  # name -> (seconds per call, scores)
        for name, reward in rewards.items():
            measured[name] = timed(reward, prompts, videos, args.repeats)
            print(f"{name:<16}  {measured[name][0]:12.4f}  {args.num_videos / measured[name][0]:8.2f}")

        print("remote            in_process_s  remote_s  remote/in_process  max_abs_score_diff")
        token = secrets.token_urlsafe(32)
        for name in args.remote:
            reward = rewards.get(name) or load(name, args, hub_cache)
            local_s, local = measured.get(name) or timed(reward, prompts, videos, args.repeats)
            with serve_in_background(create_app(reward, token=token)) as url:
                remote = RemoteReward(url, token, payload_dtype=getattr(torch, args.payload_dtype))
                remote_s, scores = timed(remote, prompts, videos, args.repeats)
            diff = max((scores[head] - local[head]).abs().max().item() for head in local)
            print(f"{name:<16}  {local_s:12.4f}  {remote_s:8.4f}  {remote_s / local_s:17.2f}  {diff:18.2e}")


if __name__ == "__main__":
    main()
