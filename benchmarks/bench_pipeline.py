"""Cached chunk-wise generation vs the naive way (recompute the whole prefix at every step), measured in one run.

The naive path runs, for every step of every chunk, one full block-causal forward over all frames so far (clean
prefix at t=0 + the noisy chunk), which is what a sampler without a KV cache has to do. Both paths get the same noise;
the script checks that they produce the same video and prints time(cached) / time(naive).

    python benchmarks/bench_pipeline.py                       # tiny + medium on CPU, float32
    python benchmarks/bench_pipeline.py --sizes full --device cuda --dtype bfloat16 --batch-sizes 1 4 --skip-naive
    python benchmarks/bench_pipeline.py --sizes medium --attention-shapes   # the KV cache's attention shapes

``--attention-shapes`` times the self-attention of every pass of a video two ways: over the filled part of the
preallocated cache (one key length per chunk, what the pipeline does) and over the whole buffer with the empty slots
masked (one key length for all chunks, what a CUDA graph of the full transformer step would need).

On a GPU the script also prints seconds per video, generated frames per second and peak memory (absolute figures are
only meaningful there; record them in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from trl_arcopo import CausalWanPipeline
from trl_arcopo.models.self_forcing import WAN_1_3B_CONFIG, cast_transformer
from trl_arcopo.pipelines.sampler import predict_x0, renoise

# name: (transformer overrides of the 1.3B config, latent frames, latent height, latent width, text tokens)
SIZES = {
    "tiny": (
        {"num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 32, "ffn_dim": 32, "num_layers": 2},
        21,
        4,
        4,
        16,
    ),
    "medium": (
        {"num_attention_heads": 4, "attention_head_dim": 64, "text_dim": 256, "ffn_dim": 1024, "num_layers": 4},
        21,
        16,
        26,
        64,
    ),
    "full": ({}, 21, 60, 104, 512),
}


def build(size: str, device: str, dtype: torch.dtype) -> tuple[CausalWanPipeline, tuple[int, int, int, int]]:
    overrides, frames, height, width, text_tokens = SIZES[size]
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**{**WAN_1_3B_CONFIG, **overrides})
    cast_transformer(transformer, dtype)
    pipe = CausalWanPipeline(None, None, None, transformer.eval()).to(device)
    return pipe, (frames, height, width, text_tokens)


@torch.no_grad()
def naive_generate(pipe: CausalWanPipeline, prompt_embeds, noise, step_noise) -> torch.Tensor:
    """Chunk-wise sampling without a cache: every step re-runs the transformer over the whole clean prefix."""
    chunk = pipe.config.num_frame_per_block
    clean = noise[:, :, :0]
    for c in range(noise.shape[2] // chunk):
        x = noise[:, :, c * chunk : (c + 1) * chunk]
        for s, (t, sigma) in enumerate(zip(pipe.timesteps, pipe.sigmas, strict=True)):
            frame_t = torch.tensor([0.0] * clean.shape[2] + [t] * chunk, device=x.device).expand(x.shape[0], -1)
            flow = pipe.forward_block_causal(torch.cat([clean, x], dim=2), frame_t, prompt_embeds)[:, :, -chunk:]
            x0 = predict_x0(x, flow, sigma)
            if s < len(pipe.timesteps) - 1:
                x = renoise(x0, step_noise[(c, s)], pipe.sigmas[s + 1])
        clean = torch.cat([clean, x0], dim=2)
    return clean


def timed(fn, device: str, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def attention_shapes(pipe: CausalWanPipeline, size: str, batch: int, device: str, dtype, repeats: int) -> None:
    """Self-attention time of one video: keys of the filled cache prefix vs the whole buffer with a mask."""
    _, frames, height, width, _ = SIZES[size]
    config = pipe.transformer.config
    chunk, tokens = pipe.config.num_frame_per_block, (height // 2) * (width // 2)
    passes = len(pipe.timesteps) + 1  # the steps and the cache refresh of each chunk
    shape = (batch, frames * tokens, config.num_attention_heads, config.attention_head_dim)
    keys, values = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    query = torch.randn(batch, chunk * tokens, *shape[2:], device=device, dtype=dtype)
    slots = torch.arange(frames * tokens, device=device)

    def run(masked: bool) -> None:
        for end in range(chunk * tokens, frames * tokens + 1, chunk * tokens):
            if masked:
                mask = torch.zeros(frames * tokens, device=device, dtype=dtype).masked_fill(
                    slots >= end, float("-inf")
                )
                args = (keys, values, mask.expand(batch, -1))
            else:
                args = (keys[:, :end], values[:, :end])
            for _ in range(passes):
                dispatch_attention_fn(query, *args[:2], attn_mask=args[2] if masked else None)

    run(False), run(True)  # warm-up
    sliced = statistics.median(timed(functools.partial(run, False), device, 1)[0] for _ in range(repeats))
    masked = statistics.median(timed(functools.partial(run, True), device, 1)[0] for _ in range(repeats))
    print(
        f"{size:7s} {batch:5d}  attention per video: filled prefix {sliced:.3f} s, whole buffer + mask {masked:.3f} s "
        f"(masked / sliced = {masked / sliced:.2f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true", help="only time the cached path (absolute figures)")
    parser.add_argument("--attention-shapes", action="store_true", help="time the cache attention's two shapes")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device={args.device}, "
        f"dtype={args.dtype}, threads={torch.get_num_threads()}, repeats={args.repeats} (median)"
    )
    if args.attention_shapes:
        for size in args.sizes:
            pipe, _ = build(size, args.device, dtype)
            for batch in args.batch_sizes:
                attention_shapes(pipe, size, batch, args.device, dtype, args.repeats)
        return
    print("size    batch  frames  tokens/frame  cached_s  naive_s  cached/naive  max_abs_diff  s/video  fps  peak_GiB")
    for size in args.sizes:
        pipe, (frames, height, width, text_tokens) = build(size, args.device, dtype)
        pipe.set_progress_bar_config(disable=True)
        tpf = (height // 2) * (width // 2)
        for batch in args.batch_sizes:
            g = torch.Generator(device="cpu").manual_seed(0)
            channels = pipe.transformer.config.in_channels
            prompt_embeds = torch.randn(batch, text_tokens, pipe.transformer.config.text_dim, generator=g)
            prompt_embeds = prompt_embeds.to(args.device, dtype)
            noise = torch.randn(batch, channels, frames, height, width, generator=g).to(args.device)
            step_noise = {
                (c, s): torch.randn(batch, channels, 3, height, width, generator=g).to(args.device)
                for c in range(frames // 3)
                for s in range(len(pipe.timesteps) - 1)
            }

            cached = functools.partial(
                pipe, prompt_embeds=prompt_embeds, latents=noise, step_noise=step_noise, output_type="latent"
            )
            cached() if args.repeats > 1 else None  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t_cached, out = timed(cached, args.device, args.repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
            pixel_frames = 1 + 4 * (frames - 1)
            line = f"{size:7s} {batch:5d}  {frames:6d}  {tpf:12d}  {t_cached:8.3f}"
            if args.skip_naive:
                line += f"  {'-':>7s}  {'-':>12s}  {'-':>12s}"
            else:
                naive = functools.partial(naive_generate, pipe, prompt_embeds, noise, step_noise)
                t_naive, reference = timed(naive, args.device, args.repeats)
                diff = (out.frames - reference).abs().max().item()
                tolerance = 1e-3 if dtype == torch.float32 else 0.25
                assert diff <= tolerance, f"cached and naive generation differ by {diff}"
                line += f"  {t_naive:7.3f}  {t_cached / t_naive:12.3f}  {diff:12.2e}"
            line += f"  {t_cached / batch:7.3f}  {batch * pixel_frames / t_cached:4.1f}  {peak:8.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
