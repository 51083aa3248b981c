"""One AR-CoPO rollout group: shared randomness, the prefix generated once, ``G`` branches forked at the pivot chunk.

The rollout knows the pipeline's streaming API and nothing of the optimizer: it returns a :class:`RolloutGroup`, the
record both the on-policy loss and (later) replay buffers read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .copo import fork_noise
from .pipelines.causal_wan import CausalGenerationState, CausalWanPipeline

__all__ = ["RolloutGroup", "generate_group", "rebuild_context", "sample_pivot"]

EXPLORATIONS = ("fork", "sde")


@dataclass
class RolloutGroup:
    """The record of one rollout group (one prompt, ``G`` candidates differing only in the pivot chunk).

    Attributes:
        prompt_embeds: ``[1, text_tokens, text_dim]``.
        pivot: index of the forked chunk.
        prefix_latents: ``[1, C, pivot·f, H, W]`` clean latents of the chunks before the pivot (shared).
        inputs: ``[T, G, C, f, H, W]`` the pivot chunk's step inputs ``x_{t_s}^(i)`` (``inputs[0]`` = ``ε_p^(i)``).
        predictions: ``[T, G, C, f, H, W]`` the old policy's x̂0 of every step and candidate.
        noise: ``[T-1, G, C, f, H, W]`` the re-noise draws of the pivot chunk (identical across candidates for
            ``"fork"``, independent for ``"sde"``).
        latents: ``[G, C, F, H, W]`` every branch's final clean latent video.
        videos: ``[G, num_frames, 3, height, width]`` decoded in [0, 1] (None when not decoded).
        exploration: ``"fork"`` or ``"sde"``.
    """

    prompt_embeds: torch.Tensor
    pivot: int
    prefix_latents: torch.Tensor
    inputs: torch.Tensor
    predictions: torch.Tensor
    noise: torch.Tensor
    latents: torch.Tensor
    videos: torch.Tensor | None
    exploration: str = "fork"

    @property
    def num_generations(self) -> int:
        return self.inputs.shape[1]


def sample_pivot(
    num_chunks: int,
    strategy: str = "uniform",
    *,
    index: int | None = None,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """The chunk to fork: uniform over ``0 .. num_chunks-1``, a ``"fixed"`` index, or ``"weighted"`` by ``weights``."""
    if strategy == "uniform":
        return int(torch.randint(num_chunks, (1,), generator=generator))
    if strategy == "fixed":
        if index is None or not 0 <= index < num_chunks:
            raise ValueError(f"`pivot_index`={index} is not a chunk index of a {num_chunks}-chunk video.")
        return index
    if strategy == "weighted":
        if weights is None or len(weights) != num_chunks:
            raise ValueError(f"`pivot_weights` must give one weight per chunk ({num_chunks}), got {weights}.")
        return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator))
    raise ValueError(f"Unknown `pivot_strategy` {strategy!r}: use 'uniform', 'fixed' or 'weighted'.")


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Drawn on the generator's device (CPU by default) so a seed gives the same noise on every machine.
    return torch.randn(*shape, generator=generator).to(device)


@torch.no_grad()
def rebuild_context(
    pipeline: CausalWanPipeline, prompt_embeds: torch.Tensor, prefix_latents: torch.Tensor
) -> CausalGenerationState:
    """The KV context ``h_{p-1}`` of committed clean ``prefix_latents`` ``[B, C, p·f, H, W]``, recomputed by the
    pipeline's current weights (no grad): the context of a loss evaluation after the policy has moved."""
    state = pipeline.init_state(prompt_embeds)
    chunk = pipeline.config.num_frame_per_block
    for start in range(0, prefix_latents.shape[2], chunk):
        pipeline.commit_chunk(state, prefix_latents[:, :, start : start + chunk])
    return state


@torch.no_grad()
def generate_group(
    pipeline: CausalWanPipeline,
    prompt_embeds: torch.Tensor,
    *,
    num_generations: int,
    latent_shape: tuple[int, int, int, int],
    pivot: int,
    noise_sigma: float = 0.5,
    exploration: str = "fork",
    rollout_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    decode: bool = True,
) -> RolloutGroup:
    """Roll out one group of ``num_generations`` videos for one prompt (METHOD.md §3).

    One set of shared randomness is drawn: the initial noise ``ε*_c`` of every chunk and every re-noise draw
    ``η_{c,s}``. Chunks before ``pivot`` are generated once; the state is then forked into branches whose pivot chunk
    starts from ``sqrt(1-σ²)·ε*_p + σ·δ^(i)`` (``"fork"``), or from ``ε*_p`` with independent re-noise draws of the
    pivot chunk (``"sde"``, the SDE-GRPO baseline). Later chunks reuse the shared noise, so branches differ only
    through the pivot chunk. Branches run ``rollout_batch_size`` at a time (all at once by default).

    Args:
        prompt_embeds: ``[1, text_tokens, text_dim]``.
        latent_shape: ``(C, F, H, W)`` of one latent video; ``F`` a multiple of the chunk size.
    """
    if exploration not in EXPLORATIONS:
        raise ValueError(f"Unknown `exploration` {exploration!r}: use one of {EXPLORATIONS}.")
    if prompt_embeds.shape[0] != 1:
        raise ValueError(
            f"A rollout group is one prompt: `prompt_embeds` must have batch 1, got {prompt_embeds.shape[0]}."
        )
    channels, frames, height, width = latent_shape
    chunk = pipeline.config.num_frame_per_block
    num_chunks, num_draws = frames // chunk, len(pipeline.timesteps) - 1
    if frames % chunk or not 0 <= pivot < num_chunks:
        raise ValueError(f"`pivot`={pivot} must index one of the {num_chunks} chunks of {frames} latent frames.")
    device = pipeline._execution_device
    chunk_shape = (1, channels, chunk, height, width)
    shared_noise = _randn((1, channels, frames, height, width), generator, device)
    shared_draws = [[_randn(chunk_shape, generator, device) for _ in range(num_draws)] for _ in range(num_chunks)]
    if exploration == "fork":
        delta = _randn((num_generations, *chunk_shape[1:]), generator, device)
        pivot_noise = fork_noise(shared_noise[:, :, pivot * chunk : (pivot + 1) * chunk], delta, noise_sigma)
        pivot_draws = [d.expand(num_generations, -1, -1, -1, -1) for d in shared_draws[pivot]]
    else:
        pivot_noise = shared_noise[:, :, pivot * chunk : (pivot + 1) * chunk].expand(num_generations, -1, -1, -1, -1)
        pivot_draws = [_randn((num_generations, *chunk_shape[1:]), generator, device) for _ in range(num_draws)]

    prefix = pipeline.init_state(prompt_embeds)
    for c in range(pivot):
        record = pipeline.denoise_chunk(
            prefix, shared_noise[:, :, c * chunk : (c + 1) * chunk], step_noise=shared_draws[c]
        )
        pipeline.commit_chunk(prefix, record.latents)

    batch = rollout_batch_size or num_generations
    records, latents = [], []
    for start in range(0, num_generations, batch):
        rows = slice(start, min(start + batch, num_generations))
        n = rows.stop - rows.start
        state = pipeline.fork(prefix, n)
        record = pipeline.denoise_chunk(state, pivot_noise[rows], step_noise=[d[rows] for d in pivot_draws])
        records.append(record)
        pipeline.commit_chunk(state, record.latents, update_cache=pivot < num_chunks - 1)
        for c in range(pivot + 1, num_chunks):
            noise = shared_noise[:, :, c * chunk : (c + 1) * chunk].expand(n, -1, -1, -1, -1)
            draws = [d.expand(n, -1, -1, -1, -1) for d in shared_draws[c]]
            done = pipeline.denoise_chunk(state, noise, step_noise=draws)
            pipeline.commit_chunk(state, done.latents, update_cache=c < num_chunks - 1)
        latents.append(state.latents)

    latents = torch.cat(latents)
    videos = None
    if decode:
        videos = torch.cat(
            [pipeline.decode(latents[i : i + batch], output_type="pt") for i in range(0, len(latents), batch)]
        )
    return RolloutGroup(
        prompt_embeds=prompt_embeds,
        pivot=pivot,
        prefix_latents=prefix.latents if pivot > 0 else shared_noise[:, :, :0],
        inputs=torch.cat([r.inputs for r in records], dim=1),
        predictions=torch.cat([r.predictions for r in records], dim=1),
        noise=torch.cat([r.noise for r in records], dim=1),
        latents=latents,
        videos=videos,
        exploration=exploration,
    )
