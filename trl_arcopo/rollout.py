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

__all__ = ["GroupNoise", "RolloutGroup", "generate_group", "rebuild_context", "sample_pivot"]

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
        latents: ``[G, C, F, H, W]`` every branch's final clean latent video; None for groups replayed from a buffer
            (only the pivot chunk is stored).
        videos: ``[G, num_frames, 3, height, width]`` decoded in [0, 1] (None when not decoded).
        exploration: ``"fork"`` or ``"sde"``.
        context: the pivot chunk's context (the KV cache of the prefix) as the rollout's weights computed it: what
            :func:`rebuild_context` returns while those weights are unchanged (None for replayed groups).
        weights_version: a tag of the weights that rolled the group out (set by the trainer; ``context`` is valid
            while the policy still has these weights).
    """

    prompt_embeds: torch.Tensor
    pivot: int
    prefix_latents: torch.Tensor
    inputs: torch.Tensor
    predictions: torch.Tensor
    noise: torch.Tensor
    latents: torch.Tensor | None
    videos: torch.Tensor | None
    exploration: str = "fork"
    context: CausalGenerationState | None = None
    weights_version: int | None = None

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


@dataclass
class GroupNoise:
    """All randomness of one rollout group (docs/method.md §3, steps 1 and 4).

    Attributes:
        initial: ``[1, C, F, H, W]`` shared initial noise ``ε*`` of every chunk.
        draws: ``[L, T-1, 1, C, f, H, W]`` shared re-noise draws ``η_{c,s}``.
        pivot_initial: ``[G, C, f, H, W]`` each branch's pivot-chunk noise (``sqrt(1-σ²)·ε*_p + σ·δ`` for
            ``"fork"``, ``ε*_p`` for ``"sde"``).
        pivot_draws: ``[T-1, G, C, f, H, W]`` each branch's re-noise draws of the pivot chunk (shared for ``"fork"``,
            independent for ``"sde"``).
        pivot: the forked chunk.
    """

    initial: torch.Tensor
    draws: torch.Tensor
    pivot_initial: torch.Tensor
    pivot_draws: torch.Tensor
    pivot: int

    @classmethod
    def draw(
        cls,
        *,
        num_generations: int,
        latent_shape: tuple[int, int, int, int],
        chunk_frames: int,
        num_steps: int,
        pivot: int,
        noise_sigma: float = 0.5,
        exploration: str = "fork",
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> GroupNoise:
        """Draw the group's noise from ``generator`` in a fixed order (shared noise, shared draws, branch noise)."""
        if exploration not in EXPLORATIONS:
            raise ValueError(f"Unknown `exploration` {exploration!r}: use one of {EXPLORATIONS}.")
        channels, frames, height, width = latent_shape
        num_chunks = frames // chunk_frames
        if frames % chunk_frames or not 0 <= pivot < num_chunks:
            raise ValueError(f"`pivot`={pivot} must index one of the {num_chunks} chunks of {frames} latent frames.")
        chunk_shape = (channels, chunk_frames, height, width)
        initial = _randn((1, channels, frames, height, width), generator, device)
        draws = _randn((num_chunks, num_steps - 1, 1, *chunk_shape), generator, device)
        base = initial[:, :, pivot * chunk_frames : (pivot + 1) * chunk_frames]
        if exploration == "fork":
            pivot_initial = fork_noise(base, _randn((num_generations, *chunk_shape), generator, device), noise_sigma)
            pivot_draws = draws[pivot].expand(-1, num_generations, -1, -1, -1, -1)
        else:
            pivot_initial = base.expand(num_generations, -1, -1, -1, -1)
            pivot_draws = _randn((num_steps - 1, num_generations, *chunk_shape), generator, device)
        return cls(initial, draws, pivot_initial, pivot_draws, pivot)

    def branch(self, index: int) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
        """Branch ``index`` as the inputs of one independent pipeline call: ``(latents [1, C, F, H, W],
        step_noise {(chunk, step): η})``. Generating it alone gives the same video as inside the group."""
        chunk = self.pivot_initial.shape[2]
        latents = self.initial.clone()
        latents[:, :, self.pivot * chunk : (self.pivot + 1) * chunk] = self.pivot_initial[index : index + 1]
        step_noise = {(c, s): self.draws[c, s] for c in range(self.draws.shape[0]) for s in range(self.draws.shape[1])}
        step_noise.update(
            {(self.pivot, s): self.pivot_draws[s, index : index + 1] for s in range(self.draws.shape[1])}
        )
        return latents, step_noise


@torch.no_grad()
def rebuild_context(
    pipeline: CausalWanPipeline, prompt_embeds: torch.Tensor, prefix_latents: torch.Tensor
) -> CausalGenerationState:
    """The KV context ``h_{p-1}`` of committed clean ``prefix_latents`` ``[B, C, p·f, H, W]``, recomputed by the
    pipeline's current weights (no grad): the context of a loss evaluation after the policy has moved."""
    state = pipeline.init_state(prompt_embeds, num_frames=prefix_latents.shape[2])
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
    noise: GroupNoise | None = None,
    decode: bool = True,
) -> RolloutGroup:
    """Roll out one group of ``num_generations`` videos for one prompt (docs/method.md §3).

    One set of shared randomness (:class:`GroupNoise`, drawn from ``generator`` unless ``noise`` is given) holds the
    initial noise ``ε*_c`` of every chunk and every re-noise draw ``η_{c,s}``. Chunks before ``pivot`` are generated
    once; the state is then forked into branches whose pivot chunk starts from ``sqrt(1-σ²)·ε*_p + σ·δ^(i)``
    (``"fork"``), or from ``ε*_p`` with independent re-noise draws of the pivot chunk (``"sde"``, the SDE-GRPO
    baseline). Later chunks reuse the shared noise, so branches differ only through the pivot chunk. Branches run
    ``rollout_batch_size`` at a time (all at once by default).

    Args:
        prompt_embeds: ``[1, text_tokens, text_dim]``.
        latent_shape: ``(C, F, H, W)`` of one latent video; ``F`` a multiple of the chunk size.
    """
    if prompt_embeds.shape[0] != 1:
        raise ValueError(
            f"A rollout group is one prompt: `prompt_embeds` must have batch 1, got {prompt_embeds.shape[0]}."
        )
    chunk = pipeline.config.num_frame_per_block
    if noise is None:
        noise = GroupNoise.draw(
            num_generations=num_generations,
            latent_shape=latent_shape,
            chunk_frames=chunk,
            num_steps=len(pipeline.timesteps),
            pivot=pivot,
            noise_sigma=noise_sigma,
            exploration=exploration,
            generator=generator,
            device=pipeline._execution_device,
        )
    num_chunks = latent_shape[1] // chunk

    prefix = pipeline.init_state(prompt_embeds, num_frames=latent_shape[1])
    for c in range(pivot):
        clean = pipeline.sample_chunk(
            prefix, noise.initial[:, :, c * chunk : (c + 1) * chunk], step_noise=noise.draws[c]
        )
        pipeline.commit_chunk(prefix, clean)

    batch = rollout_batch_size or num_generations
    records, latents = [], []
    for start in range(0, num_generations, batch):
        rows = slice(start, min(start + batch, num_generations))
        n = rows.stop - rows.start
        state = pipeline.fork(prefix, n)
        record = pipeline.denoise_chunk(state, noise.pivot_initial[rows], step_noise=noise.pivot_draws[:, rows])
        records.append(record)
        pipeline.commit_chunk(state, record.latents, update_cache=pivot < num_chunks - 1)
        for c in range(pivot + 1, num_chunks):
            initial = noise.initial[:, :, c * chunk : (c + 1) * chunk].expand(n, -1, -1, -1, -1)
            clean = pipeline.sample_chunk(state, initial, step_noise=noise.draws[c].expand(-1, n, -1, -1, -1, -1))
            pipeline.commit_chunk(state, clean, update_cache=c < num_chunks - 1)
        latents.append(state.latents)
    del state  # the last batch's KV cache level (rows x frames, the largest tensors of a rollout) before decoding

    latents = torch.cat(latents)
    videos = None
    if decode:
        videos = torch.cat(
            [pipeline.decode(latents[i : i + batch], output_type="pt") for i in range(0, len(latents), batch)]
        )
    return RolloutGroup(
        prompt_embeds=prompt_embeds,
        pivot=pivot,
        prefix_latents=prefix.latents if pivot > 0 else noise.initial[:, :, :0],
        inputs=torch.cat([r.inputs for r in records], dim=1),
        predictions=torch.cat([r.predictions for r in records], dim=1),
        noise=torch.cat([r.noise for r in records], dim=1),
        latents=latents,
        videos=videos,
        exploration=exploration,
        context=prefix,
    )
