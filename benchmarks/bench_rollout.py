"""One AR-CoPO rollout group (prefix once + G batched branches) vs G independent full rollouts, in one run.

Both paths get the same noise (``GroupNoise.branch``) and must give the same latent videos. The ratio
time(group) / time(G independent) is printed per pivot and averaged; without batching the expected ratio is
``(p + G·(L - p)) / (G·L)`` for a 0-based pivot ``p`` (about 0.57 averaged over pivots for L = 7, G = 12), and batching
the branches only makes the group cheaper.

    python benchmarks/bench_rollout.py                      # tiny + medium on CPU, float32, G = 12
    python benchmarks/bench_rollout.py --sizes full --device cuda --dtype bfloat16 --skip-independent

Decoding is excluded from both paths (it is the same work either way).
"""

from __future__ import annotations

import argparse
import functools
import platform

import torch
from bench_pipeline import SIZES, build, timed  # the sibling script (benchmarks/ is on sys.path)

from trl_arcopo.rollout import GroupNoise, generate_group


def independent(pipe, embeds, noise: GroupNoise, num_generations: int) -> torch.Tensor:
    """Each branch as its own full batch-1 generation."""
    videos = []
    for i in range(num_generations):
        latents, step_noise = noise.branch(i)
        videos.append(pipe(prompt_embeds=embeds, latents=latents, step_noise=step_noise, output_type="latent").frames)
    return torch.cat(videos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    parser.add_argument("--num-generations", type=int, default=12)
    parser.add_argument("--rollout-batch-size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-independent", action="store_true", help="only time the group (absolute figures)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    g = args.num_generations
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device={args.device}, "
        f"dtype={args.dtype}, threads={torch.get_num_threads()}, G={g}, rollout_batch_size={args.rollout_batch_size}"
    )
    print("size    pivot  group_s  independent_s  group/independent  expected_unbatched  max_abs_diff  peak_GiB")
    for size in args.sizes:
        pipe, (frames, height, width, text_tokens) = build(size, args.device, dtype)
        pipe.set_progress_bar_config(disable=True)
        num_chunks = frames // pipe.config.num_frame_per_block
        latent_shape = (pipe.transformer.config.in_channels, frames, height, width)
        embeds = torch.randn(
            1, text_tokens, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(0)
        )
        embeds = embeds.to(args.device, dtype)
        ratios = []
        for pivot in range(num_chunks):
            noise = GroupNoise.draw(
                num_generations=g,
                latent_shape=latent_shape,
                chunk_frames=pipe.config.num_frame_per_block,
                num_steps=len(pipe.timesteps),
                pivot=pivot,
                generator=torch.Generator().manual_seed(pivot),
                device=args.device,
            )
            group_fn = functools.partial(
                generate_group,
                pipe,
                embeds,
                num_generations=g,
                latent_shape=latent_shape,
                pivot=pivot,
                noise=noise,
                rollout_batch_size=args.rollout_batch_size,
                decode=False,
            )
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t_group, group = timed(group_fn, args.device, args.repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
            expected = (pivot + g * (num_chunks - pivot)) / (g * num_chunks)
            line = f"{size:7s} {pivot:5d}  {t_group:7.3f}"
            if args.skip_independent:
                line += f"  {'-':>13s}  {'-':>17s}  {expected:18.3f}  {'-':>12s}"
            else:
                t_ind, videos = timed(
                    functools.partial(independent, pipe, embeds, noise, g), args.device, args.repeats
                )
                diff = (group.latents - videos).abs().max().item()
                assert diff <= (1e-4 if dtype == torch.float32 else 0.25), f"group and independent differ by {diff}"
                ratios.append(t_group / t_ind)
                line += f"  {t_ind:13.3f}  {t_group / t_ind:17.3f}  {expected:18.3f}  {diff:12.2e}"
            print(line + f"  {peak:8.2f}", flush=True)
        if ratios:
            expected_mean = sum((p + g * (num_chunks - p)) / (g * num_chunks) for p in range(num_chunks)) / num_chunks
            print(
                f"{size:7s} mean   group/independent = {sum(ratios) / len(ratios):.3f} "
                f"(expected without batching {expected_mean:.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
