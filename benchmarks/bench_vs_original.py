"""Our pipeline (eager and compiled) vs the original Self-Forcing sampler on the same weights, measured in one run.

Three implementations generate the same videos (same converted weights, same noise):

- ``original``: Self-Forcing's own ``CausalInferencePipeline.inference`` and ``CausalWanModel`` imported from a local
  checkout (``--original PATH``; https://github.com/guandeh17/Self-Forcing, not a dependency). On CPU its attention
  runs in float32 through its own SDPA fallback (``attention(..., dtype=torch.float32)``; its default casts to
  bfloat16 and its cross-attention needs flash-attn on CUDA).
- ``baseline``: our small equivalent of that sampler loop on the stock ``WanTransformer3DModel`` (attention processors
  below): a preallocated KV buffer per layer written in place, attention over its filled prefix, cached
  cross-attention keys/values, a final cache refresh after the last chunk. Checked against ``original`` (1e-5) when
  the checkout is given, so it stands in for it without one.
- ``ours`` (and ``ours+compile`` with ``--compile``): ``CausalWanPipeline``.

Reported: time per video at each batch size (interleaved runs, median, median of the per-run ratios), a G = 12
rollout group (``generate_group``) vs 12 videos at batch 12 per pivot, peak memory of each in a separate process, and
aten calls per generated video (``torch.profiler``).

    python benchmarks/bench_vs_original.py --original /path/to/Self-Forcing            # medium, CPU, float32
    python benchmarks/bench_vs_original.py --original ../Self-Forcing --compile --device cuda --dtype bfloat16 \\
        --size full --batch-sizes 1 4 --pivots 0 3 6                                    # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch
from bench_pipeline import SIZES  # the sibling script (benchmarks/ is on sys.path)
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from trl_arcopo import CausalWanPipeline
from trl_arcopo.models.self_forcing import WAN_1_3B_CONFIG, cast_transformer, convert_self_forcing_state_dict
from trl_arcopo.pipelines.sampler import predict_x0, renoise
from trl_arcopo.rollout import GroupNoise, generate_group

CHUNK = 3


# ---------------------------------------------------------------------------------------------------- the original


def load_original(path: Path) -> types.SimpleNamespace:
    """Import the original sampler, model and scheduler from a checkout without running its package ``__init__``s
    (they import the T5 encoder, the VAE and CUDA-only helpers, which the sampler loop does not use)."""

    def module(name: str, folder: Path | None = None, **attributes) -> None:
        mod = types.ModuleType(name)
        if folder is not None:
            mod.__path__ = [str(folder)]
        mod.__dict__.update(attributes)
        sys.modules[name] = mod

    for name in ("wan", "wan/modules", "utils", "pipeline", "demo_utils"):
        module(name.replace("/", "."), path / name)
    module("wan.modules.t5", umt5_xxl=None)
    module("wan.modules.vae", _video_vae=None)
    module("wan.modules.tokenizers", HuggingfaceTokenizer=None)
    module("demo_utils.memory", **dict.fromkeys(["gpu", "get_cuda_free_memory_gb", "DynamicSwapInstaller"]))
    sys.modules["demo_utils.memory"].move_model_to_device_with_memory_preservation = None
    if importlib.util.find_spec("einops") is None:
        module("einops", repeat=None)  # imported by the original's GAN head only
    import pipeline.causal_inference as causal_inference
    import utils.scheduler as scheduler
    import utils.wan_wrapper as wan_wrapper
    import wan.modules.attention as attention
    import wan.modules.causal_model as causal_model
    import wan.modules.model as model

    def float32_attention(q, k, v, k_lens=None, **_):
        return attention.attention(q, k, v, dtype=torch.float32)

    if not torch.cuda.is_available():
        causal_model.attention = float32_attention
        model.flash_attention = float32_attention
    return types.SimpleNamespace(
        CausalWanModel=causal_model.CausalWanModel,
        CausalInferencePipeline=causal_inference.CausalInferencePipeline,
        WanDiffusionWrapper=wan_wrapper.WanDiffusionWrapper,
        FlowMatchScheduler=scheduler.FlowMatchScheduler,
    )


class OriginalSampler:
    """The original ``CausalInferencePipeline`` around a ``CausalWanModel``, with KV caches sized for the video."""

    def __init__(self, original, model: torch.nn.Module, frames: int, tokens: int, text_tokens: int) -> None:
        wrapper = original.WanDiffusionWrapper.__new__(original.WanDiffusionWrapper)
        torch.nn.Module.__init__(wrapper)
        wrapper.model, wrapper.uniform_timestep, wrapper.seq_len = model, False, frames * tokens
        wrapper.scheduler = original.FlowMatchScheduler(shift=5.0, sigma_min=0.0, extra_one_step=True)
        wrapper.scheduler.set_timesteps(1000, training=True)
        wrapper.post_init()
        args = types.SimpleNamespace(
            denoising_step_list=[1000, 750, 500, 250],
            warp_denoising_step=True,
            num_frame_per_block=CHUNK,
            independent_first_frame=False,
            context_noise=0,
        )
        self.embeds: torch.Tensor | None = None
        with contextlib.redirect_stdout(io.StringIO()):
            self.pipe = original.CausalInferencePipeline(
                args, model.patch_embedding.weight.device, generator=wrapper, text_encoder=self._encode, vae=self
            )
        self.pipe.num_transformer_blocks, self.pipe.frame_seq_length = len(model.blocks), tokens
        self.model, self.cache_tokens, self.text_tokens = model, frames * tokens, text_tokens

    def _encode(self, text_prompts):
        return {"prompt_embeds": self.embeds}

    @staticmethod
    def decode_to_pixel(latents, use_cache=False):  # the VAE is not benchmarked
        return latents

    def _allocate(self, batch: int, dtype: torch.dtype, device) -> None:
        # The original's `_initialize_kv_cache` / `_initialize_crossattn_cache` with the 1.3B sizes replaced.
        heads, head_dim = self.model.num_heads, self.model.dim // self.model.num_heads

        def zeros(tokens):
            return torch.zeros(batch, tokens, heads, head_dim, dtype=dtype, device=device)

        index = functools.partial(torch.tensor, [0], dtype=torch.long, device=device)
        self.pipe.kv_cache1 = [
            {
                "k": zeros(self.cache_tokens),
                "v": zeros(self.cache_tokens),
                "global_end_index": index(),
                "local_end_index": index(),
            }
            for _ in self.model.blocks
        ]
        self.pipe.crossattn_cache = [
            {"k": zeros(self.text_tokens), "v": zeros(self.text_tokens), "is_init": False} for _ in self.model.blocks
        ]

    @torch.no_grad()
    def __call__(self, prompt_embeds: torch.Tensor, noise: torch.Tensor, seed: int) -> torch.Tensor:
        """Latents ``[B, C, F, H, W]`` from channel-major ``noise``; re-noise draws from ``torch.manual_seed(seed)``.

        The caches are allocated by every call (the original allocates them on its first call and reuses them),
        as ours are: memory and time then count the same work."""
        self._allocate(noise.shape[0], prompt_embeds.dtype, noise.device)
        self.embeds = prompt_embeds
        torch.manual_seed(seed)
        with contextlib.redirect_stdout(io.StringIO()):  # the original prints every timestep
            _, latents = self.pipe.inference(
                noise.permute(0, 2, 1, 3, 4), text_prompts=[""] * noise.shape[0], return_latents=True
            )
        return latents.permute(0, 2, 1, 3, 4)


def original_config(config: dict, text_tokens: int) -> dict:
    """``CausalWanModel`` arguments of a ``WanTransformer3DModel`` config (inverse of ``wan_config_from_original``)."""
    return {
        "model_type": "t2v",
        "patch_size": tuple(config["patch_size"]),
        "text_len": text_tokens,
        "in_dim": config["in_channels"],
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "ffn_dim": config["ffn_dim"],
        "freq_dim": config["freq_dim"],
        "text_dim": config["text_dim"],
        "out_dim": config["out_channels"],
        "num_heads": config["num_attention_heads"],
        "num_layers": config["num_layers"],
        "qk_norm": config["qk_norm"] is not None,
        "cross_attn_norm": config["cross_attn_norm"],
        "eps": config["eps"],
    }


# ---------------------------------------------------------------------------------------------------- the baseline


class _BaselineState:
    def __init__(self) -> None:
        self.start, self.end, self.rotary = 0, 0, None
        self.keys, self.values, self.cross = {}, {}, {}


class _BaselineSelfAttention:
    """What the original's ``CausalWanSelfAttention`` does with a KV cache: write this call's keys/values into the
    preallocated buffer at the chunk's tokens, attend to the buffer's filled prefix."""

    def __init__(self, state: _BaselineState, layer: int) -> None:
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        state = self.state
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        cos, sin = state.rotary
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        state.keys[self.layer][:, state.start : state.end] = key
        state.values[self.layer][:, state.start : state.end] = value
        out = dispatch_attention_fn(
            query, state.keys[self.layer][:, : state.end], state.values[self.layer][:, : state.end]
        )
        return attn.to_out[0](out.flatten(2, 3).type_as(query))


class _BaselineCrossAttention:
    """Cross-attention with the original's per-layer key/value cache (filled by the first call of a video)."""

    def __init__(self, state: _BaselineState, layer: int) -> None:
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        if self.layer not in self.state.cross:
            key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
            self.state.cross[self.layer] = (key, attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
        out = dispatch_attention_fn(query, *self.state.cross[self.layer])
        return attn.to_out[0](out.flatten(2, 3).type_as(query))


def _rotate(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class BaselineSampler:
    """The original sampler loop on a stock ``WanTransformer3DModel`` through the two processors above."""

    def __init__(self, transformer: WanTransformer3DModel, schedule: tuple[list[float], list[float]]) -> None:
        self.transformer, (self.timesteps, self.sigmas) = transformer, schedule
        self.state = _BaselineState()
        for layer, block in enumerate(transformer.blocks):
            block.attn1.set_processor(_BaselineSelfAttention(self.state, layer))
            block.attn2.set_processor(_BaselineCrossAttention(self.state, layer))

    @torch.no_grad()
    def __call__(self, prompt_embeds: torch.Tensor, noise: torch.Tensor, step_noise: dict) -> torch.Tensor:
        batch, _, frames, height, width = noise.shape
        transformer, state = self.transformer, self.state
        config = transformer.config
        tokens = (height // config.patch_size[1]) * (width // config.patch_size[2])
        shape = (batch, frames * tokens, config.num_attention_heads, config.attention_head_dim)
        state.keys = {i: noise.new_zeros(shape, dtype=prompt_embeds.dtype) for i in range(config.num_layers)}
        state.values = {i: noise.new_zeros(shape, dtype=prompt_embeds.dtype) for i in range(config.num_layers)}
        state.cross = {}
        cos, sin = transformer.rope(noise)  # absolute positions of the whole video, sliced per chunk
        output = torch.zeros_like(noise)

        def call(x, t):
            timestep = torch.full((batch,), float(t), device=x.device)
            return transformer(x.to(prompt_embeds.dtype), timestep, prompt_embeds, return_dict=False)[0].to(x.dtype)

        for c in range(frames // CHUNK):
            state.start, state.end = c * CHUNK * tokens, (c + 1) * CHUNK * tokens
            state.rotary = (cos[:, state.start : state.end], sin[:, state.start : state.end])
            x = noise[:, :, c * CHUNK : (c + 1) * CHUNK]
            for s, t in enumerate(self.timesteps):
                x0 = predict_x0(x, call(x, t), self.sigmas[s])
                if s < len(self.timesteps) - 1:
                    x = renoise(x0, step_noise[(c, s)], self.sigmas[s + 1])
            output[:, :, c * CHUNK : (c + 1) * CHUNK] = x0
            call(x0, 0.0)  # the original refreshes the cache after every chunk, the last one included
        return output


# ---------------------------------------------------------------------------------------------------- setup


def build(args) -> tuple[types.SimpleNamespace, dict]:
    overrides, frames, height, width, text_tokens = SIZES[args.size]
    config = {**WAN_1_3B_CONFIG, **overrides}
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    torch.manual_seed(0)
    implementations = {}
    if args.original:
        original = load_original(Path(args.original))
        model = original.CausalWanModel(**original_config(config, text_tokens))
        with torch.no_grad():  # the original zero-initialises its output head; perturb every vector too
            torch.nn.init.xavier_uniform_(model.head.head.weight)
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        state_dict = convert_self_forcing_state_dict(model.state_dict())
        model = model.to(device, dtype).eval().requires_grad_(False)
        tokens = (height // 2) * (width // 2)
        implementations["original"] = OriginalSampler(original, model, frames, tokens, text_tokens)
    else:
        state_dict = WanTransformer3DModel(**config).state_dict()

    def transformer():
        model = WanTransformer3DModel(**config)
        model.load_state_dict(state_dict)
        return cast_transformer(model, dtype).to(device).eval().requires_grad_(False)

    pipe = CausalWanPipeline(None, None, None, transformer())
    pipe.set_progress_bar_config(disable=True)
    implementations["baseline"] = BaselineSampler(transformer(), (pipe.timesteps, pipe.sigmas))
    implementations["ours"] = pipe
    if args.compile:
        compiled = CausalWanPipeline(None, None, None, transformer())
        compiled.set_progress_bar_config(disable=True)
        compiled.compile()
        implementations["ours+compile"] = compiled
    shape = {"frames": frames, "height": height, "width": width, "text_tokens": text_tokens, "config": config}
    return types.SimpleNamespace(**implementations), shape


def inputs(shape: dict, batch: int, args, seed: int = 0):
    """Prompt embeddings, channel-major noise and the re-noise draws in the order the original consumes them."""
    g = torch.Generator().manual_seed(seed)
    config, frames, height, width = shape["config"], shape["frames"], shape["height"], shape["width"]
    embeds = torch.randn(batch, shape["text_tokens"], config["text_dim"], generator=g)
    noise = torch.randn(batch, config["in_channels"], frames, height, width, generator=g)
    draws = torch.Generator().manual_seed(seed)  # = torch.manual_seed(seed) before the original's randn_like calls
    step_noise = {
        (c, s): torch.randn(batch * CHUNK, config["in_channels"], height, width, generator=draws)
        .unflatten(0, (batch, CHUNK))
        .permute(0, 2, 1, 3, 4)
        for c in range(frames // CHUNK)
        for s in range(3)
    }
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    return embeds.to(device, dtype), noise.to(device), {k: v.to(device) for k, v in step_noise.items()}


def video_runner(impls, name: str, embeds, noise, step_noise, seed: int = 0):
    impl = getattr(impls, name)
    if name == "original":
        return functools.partial(impl, embeds, noise, seed)
    if name == "baseline":
        return functools.partial(impl, embeds, noise, step_noise)
    return lambda: impl(prompt_embeds=embeds, latents=noise, step_noise=step_noise, output_type="latent").frames


def group_runner(impls, name: str, shape: dict, pivot: int, args, num_generations: int = 12):
    pipe = getattr(impls, name)
    config = shape["config"]
    latent_shape = (config["in_channels"], shape["frames"], shape["height"], shape["width"])
    embeds, _, _ = inputs(shape, 1, args)
    noise = GroupNoise.draw(
        num_generations=num_generations,
        latent_shape=latent_shape,
        chunk_frames=CHUNK,
        num_steps=len(pipe.timesteps),
        pivot=pivot,
        generator=torch.Generator().manual_seed(pivot),
        device=args.device,
    )
    return lambda: (
        generate_group(
            pipe,
            embeds,
            num_generations=num_generations,
            latent_shape=latent_shape,
            pivot=pivot,
            noise=noise,
            decode=False,
        ).latents
    )


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(runs: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Time every runner once per round, rounds repeated: slow phases of a noisy machine hit all of them alike."""
    for fn in runs.values():  # warm-up (and compilation)
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return times


def ratio_line(times: dict[str, list[float]], reference: str, divisor: float = 1.0) -> str:
    parts = []
    for name, values in times.items():
        per_pair = [r / v for r, v in zip(times[reference], values, strict=True)]
        parts.append(
            f"{name}: {statistics.median(values) / divisor:.3f} s/video, speed vs {reference} "
            f"{statistics.median(times[reference]) / statistics.median(values):.3f} "
            f"(per-run median {statistics.median(per_pair):.3f}, min {min(per_pair):.3f}, max {max(per_pair):.3f})"
        )
    return "\n  ".join(parts)


# ---------------------------------------------------------------------------------------------------- memory, profile


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_during(fn) -> int:
    """Peak resident memory while ``fn()`` runs above the memory before it (sampled every 0.5 ms)."""
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    fn()
    done.set()
    thread.join()
    return peak - base


def _peak_tensor_bytes_during(fn) -> int:
    """Peak bytes of tensors allocated by ``fn()`` and alive at once (the profiler's allocation events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_child(args) -> None:
    """(Child process) the memory one run needs on top of the built model: the peak of resident memory over a first
    (cold) run, and the peak of live tensor bytes over a second run (allocator-independent; GPU: CUDA peak)."""
    impls, shape = build(args)
    name, what = args.memory_child
    if what.startswith("group"):
        run = group_runner(impls, name, shape, int(what[len("group") :]), args)
    else:
        run = video_runner(impls, name, *inputs(shape, int(what), args))
    if args.device.startswith("cuda"):
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
        print(json.dumps({"rss_mib": float("nan"), "tensor_mib": peak / 2**20}))
        return
    rss = _peak_rss_during(run) if "compile" not in name else float("nan")  # a first compiled run compiles
    print(json.dumps({"rss_mib": rss / 2**20, "tensor_mib": _peak_tensor_bytes_during(run) / 2**20}))


def peak_memory(args, name: str, what: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--memory-child", name, what, *args.forward]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def aten_calls(fn) -> int:
    """aten operator calls (nested ones included) recorded by ``torch.profiler`` during ``fn()``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", help="path to a checkout of https://github.com/guandeh17/Self-Forcing")
    parser.add_argument("--size", default="medium", choices=sorted(SIZES))
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 4], help="none: skip")
    parser.add_argument("--pivots", nargs="*", type=int, default=[0, 3, 6], help="G = 12 groups (none: skip)")
    parser.add_argument("--memory-batches", nargs="*", type=int, default=[1, 4, 12])
    parser.add_argument("--memory-pivots", nargs="*", type=int, help="groups measured for memory (default: --pivots)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time CausalWanPipeline.compile()")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.forward = [f"--size={args.size}", f"--device={args.device}", f"--dtype={args.dtype}"]
    args.forward += [f"--threads={args.threads}"] + ([f"--original={args.original}"] if args.original else [])
    args.forward += ["--compile"] if args.compile else []
    if args.memory_child:
        peak_memory_child(args)
        return

    impls, shape = build(args)
    names = [n for n in ("original", "baseline", "ours", "ours+compile") if hasattr(impls, n)]
    group_names = [n for n in names if n.startswith("ours")]
    reference = names[0]
    print(
        f"# {time.strftime('%Y-%m-%d')} torch {torch.__version__}, {platform.machine()}, device={args.device}, "
        f"dtype={args.dtype}, threads={torch.get_num_threads()}, size={args.size}, repeats={args.repeats}"
    )
    if not args.original:
        print("# no --original checkout given: the original sampler is skipped, `baseline` is the reference")

    # Same outputs: the baseline matches the original, ours matches both.
    embeds, noise, step_noise = inputs(shape, 2, args)
    outputs = {n: video_runner(impls, n, embeds, noise, step_noise)() for n in names}
    exact = args.dtype == "float32" and args.device == "cpu"  # the original draws its noise on the CUDA RNG
    for name in names[1:]:
        diff = (outputs[name] - outputs[reference]).abs().max().item()
        print(f"max |{name} - {reference}| = {diff:.2e}")
        # The baseline repeats the original's computation; ours differs by float rounding (parity test: 1e-4).
        limit = 1e-5 if name == "baseline" else 1e-4
        assert diff <= limit or not exact, f"{name} differs from {reference} by {diff:.2e} (limit {limit})"

    for batch in args.batch_sizes:
        embeds, noise, step_noise = inputs(shape, batch, args)
        runs = {n: video_runner(impls, n, embeds, noise, step_noise) for n in names}
        times = interleaved(runs, args.repeats, args.device)
        print(f"batch {batch}:\n  {ratio_line(times, reference, divisor=batch)}", flush=True)

    embeds, noise, step_noise = inputs(shape, 1, args)
    counts = {}
    for name in names:
        run = video_runner(impls, name, embeds, noise, step_noise)
        run()  # compiled code and caches are warm
        counts[name] = aten_calls(run)
    print(
        "aten calls per batch-1 video: "
        + ", ".join(f"{n} {c} ({counts[reference] / c:.1f}x fewer than {reference})" for n, c in counts.items())
    )

    print("peak memory above the built model, separate processes (resident over a cold run / live tensors):")
    memory_pivots = args.pivots if args.memory_pivots is None else args.memory_pivots
    for what in [str(b) for b in args.memory_batches] + [f"group{p}" for p in memory_pivots]:
        if what.startswith("group"):
            label = f"G = 12 group, pivot {what[5:]} (vs 12 videos)"
            peaks = {reference: peak_memory(args, reference, "12")}
            peaks.update({n: peak_memory(args, n, what) for n in group_names})
        else:
            label, peaks = f"batch {what}", {n: peak_memory(args, n, what) for n in names}
        print(
            f"  {label}: "
            + ", ".join(f"{n} {m['rss_mib']:.0f} / {m['tensor_mib']:.0f} MiB" for n, m in peaks.items()),
            flush=True,
        )

    mean_ratio = {n: [] for n in group_names}
    for pivot in args.pivots:
        embeds, noise, step_noise = inputs(shape, 12, args)
        runs = {reference: video_runner(impls, reference, embeds, noise, step_noise)}
        runs.update({n: group_runner(impls, n, shape, pivot, args) for n in group_names})
        times = interleaved(runs, args.repeats, args.device)
        for n in group_names:
            mean_ratio[n].append(statistics.median(times[n]) / statistics.median(times[reference]))
        line = ", ".join(f"{n} {statistics.median(times[n]):.2f} s = {mean_ratio[n][-1]:.3f} x" for n in group_names)
        print(
            f"G = 12 group, pivot {pivot}: 12 {reference} videos {statistics.median(times[reference]):.2f} s; {line}",
            flush=True,
        )
    if args.pivots:
        print(
            "G = 12 group / 12 videos, mean over pivots: "
            + ", ".join(f"{n} {statistics.mean(r):.3f}" for n, r in mean_ratio.items())
        )


if __name__ == "__main__":
    main()
