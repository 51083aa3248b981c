"""Block-causal attention with a KV cache on the stock ``diffusers.WanTransformer3DModel``.

Nothing here adds weights: :func:`enable_causal_attention` swaps the self-attention processors of every block, the
cross-attention processors and the RoPE module for versions that read a shared :class:`CausalAttentionRuntime`. The
pipeline configures that runtime before each transformer call (which cache to read, at which absolute frame, whether
to record the pass' keys/values). With the runtime idle the model computes exactly what the stock model computes.

Cache layout: a :class:`KVCache` is an immutable tuple of :class:`CacheSegment`, one per committed chunk, each holding
per-layer keys (after ``norm_k`` and RoPE, at absolute frame positions) and values ``[b, tokens, heads, head_dim]``.
Forking never copies a segment: it multiplies the segment's ``repeat`` (row ``i`` of the state batch reads stored row
``i // repeat``), and branch batches are only materialised transiently when attention reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.utils.checkpoint
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch import nn

__all__ = [
    "CacheSegment",
    "CausalAttentionRuntime",
    "CausalWanCrossAttnProcessor",
    "CausalWanSelfAttnProcessor",
    "CrossAttentionCache",
    "KVCache",
    "OffsetWanRotaryPosEmbed",
    "attended_frames",
    "block_causal_mask",
    "enable_causal_attention",
    "tokens_per_frame",
]


def attended_frames(
    chunk_start: int,
    chunk_frames: int,
    *,
    local_attn_size: int = -1,
    sink_size: int = 0,
) -> list[int]:
    """Absolute latent frames that a chunk ``[chunk_start, chunk_start + chunk_frames)`` attends to (itself included).

    Global attention (``local_attn_size == -1``) sees every earlier frame. With a window, the chunk sees the first
    ``sink_size`` frames plus the last ``local_attn_size - sink_size`` frames ending with itself (LongLive rule).
    """
    end = chunk_start + chunk_frames
    if local_attn_size == -1:
        return list(range(end))
    recent_start = max(end - (local_attn_size - sink_size), 0)
    return sorted(set(range(min(sink_size, end))) | set(range(recent_start, end)))


def block_causal_mask(
    num_frames: int,
    frames_per_block: int,
    tokens_per_frame: int,
    *,
    local_attn_size: int = -1,
    sink_size: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense boolean self-attention mask ``[S, S]`` (True = attend) of a chunk-wise causal video of ``num_frames``.

    A query token in chunk ``c`` attends to every key whose frame is in :func:`attended_frames` of chunk ``c``; tokens
    are in the transformer's frame-major order, so ``S = num_frames * tokens_per_frame``.
    """
    frame_allowed = torch.zeros(num_frames, num_frames, dtype=torch.bool, device=device)
    for start in range(0, num_frames, frames_per_block):
        n = min(frames_per_block, num_frames - start)
        keys = attended_frames(start, n, local_attn_size=local_attn_size, sink_size=sink_size)
        frame_allowed[start : start + n, keys] = True
    return frame_allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def tokens_per_frame(transformer: nn.Module, latent_height: int, latent_width: int) -> int:
    """Tokens of one latent frame ``H x W`` after the transformer's spatial patchification."""
    _, p_h, p_w = transformer.config.patch_size
    return (latent_height // p_h) * (latent_width // p_w)


def _expand_rows(tensor: torch.Tensor, repeat: int) -> torch.Tensor:
    """Rows ``[b, ...] -> [b * repeat, ...]`` with row ``i`` taken from ``i // repeat`` (a view when ``b == 1``)."""
    if repeat == 1:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(repeat, *tensor.shape[1:])
    return tensor.repeat_interleave(repeat, dim=0)


@dataclass(frozen=True)
class CacheSegment:
    """Keys and values of ``num_frames`` consecutive latent frames written by one context (commit) pass.

    Attributes:
        keys / values: one tensor per transformer block, ``[b, num_frames * tokens_per_frame, heads, head_dim]``.
            Never modified in place; forks and windows share them.
        frame_start: absolute index of the first latent frame.
        num_frames: number of latent frames.
        repeat: each stored row serves ``repeat`` consecutive rows of the batch that reads the cache.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    frame_start: int
    num_frames: int
    repeat: int = 1

    @property
    def frame_end(self) -> int:
        return self.frame_start + self.num_frames

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] * self.repeat

    def frames(self, start: int, end: int) -> CacheSegment:
        """The sub-segment of absolute frames ``[start, end)`` as views of the same storage."""
        tpf = self.keys[0].shape[1] // self.num_frames
        lo, hi = (start - self.frame_start) * tpf, (end - self.frame_start) * tpf
        return replace(
            self,
            keys=tuple(k[:, lo:hi] for k in self.keys),
            values=tuple(v[:, lo:hi] for v in self.values),
            frame_start=start,
            num_frames=end - start,
        )


@dataclass(frozen=True)
class KVCache:
    """Immutable self-attention cache of the committed chunks of a (batch of) video(s).

    Attributes:
        segments: committed segments in frame order.
        local_attn_size: attention window in latent frames including the current chunk (-1: global).
        sink_size: first latent frames that are never evicted.
    """

    segments: tuple[CacheSegment, ...] = ()
    local_attn_size: int = -1
    sink_size: int = 0

    @property
    def num_frames(self) -> int:
        return sum(s.num_frames for s in self.segments)

    @property
    def frame_indices(self) -> list[int]:
        return [f for s in self.segments for f in range(s.frame_start, s.frame_end)]

    def window(self, chunk_start: int, chunk_frames: int) -> KVCache:
        """The part of the cache a chunk starting at ``chunk_start`` attends to (views; nothing is copied)."""
        if self.local_attn_size == -1:
            return self
        keep = set(
            attended_frames(
                chunk_start,
                chunk_frames,
                local_attn_size=self.local_attn_size,
                sink_size=self.sink_size,
            )
        )
        kept: list[CacheSegment] = []
        for segment in self.segments:
            run_start = None
            for f in range(segment.frame_start, segment.frame_end + 1):
                inside = f < segment.frame_end and f in keep
                if inside and run_start is None:
                    run_start = f
                elif not inside and run_start is not None:
                    kept.append(
                        segment
                        if (run_start, f) == (segment.frame_start, segment.frame_end)
                        else segment.frames(run_start, f)
                    )
                    run_start = None
        return replace(self, segments=tuple(kept))

    def append(self, segment: CacheSegment) -> KVCache:
        return replace(self, segments=(*self.segments, segment))

    def fork(self, n: int) -> KVCache:
        """The cache of a batch in which every row is repeated ``n`` times (row ``i`` -> rows ``i*n .. i*n+n-1``)."""
        return replace(self, segments=tuple(replace(s, repeat=s.repeat * n) for s in self.segments))

    def assemble(
        self, layer: int, own_key: torch.Tensor, own_value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[B, S_cache + S_own, heads, head_dim]`` = cached segments (expanded to the batch) + own."""
        if not self.segments:
            return own_key, own_value
        batch = own_key.shape[0]
        out = []
        for own, stored in (
            (own_key, [s.keys[layer] for s in self.segments]),
            (own_value, [s.values[layer] for s in self.segments]),
        ):
            length = sum(t.shape[1] for t in stored) + own.shape[1]
            buffer = own.new_empty(batch, length, *own.shape[2:])
            pos = 0
            for segment, tensor in zip(self.segments, stored, strict=True):
                if segment.batch_size != batch:
                    raise ValueError(
                        f"KV cache segment of frames [{segment.frame_start}, {segment.frame_end}) serves a batch of "
                        f"{segment.batch_size} rows but the transformer input has {batch}; fork the state instead "
                        "of changing the batch size."
                    )
                rows = buffer[:, pos : pos + tensor.shape[1]].unflatten(0, (tensor.shape[0], segment.repeat))
                rows.copy_(tensor.unsqueeze(1))
                pos += tensor.shape[1]
            buffer[:, pos:] = own
            out.append(buffer)
        return out[0], out[1]


@dataclass
class CrossAttentionCache:
    """Per-block cross-attention keys/values ``[b, text_tokens, heads, head_dim]`` of a fixed prompt batch.

    Filled lazily by the first no-grad transformer call that uses it. It is tied to the weights at that time: after
    an optimizer step or an adapter change build a new one.
    """

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    repeat: int = 1

    def fork(self, n: int) -> CrossAttentionCache:
        return CrossAttentionCache(dict(self.keys), dict(self.values), self.repeat * n)


# What a transformer call reads from the runtime (see `CausalAttentionRuntime.checkpoint`).
_RUNTIME_SETTINGS = ("mode", "frame_offset", "cache", "record", "attention_mask", "cross_cache")


class CausalAttentionRuntime:
    """Shared, per-transformer state that the causal processors and the offset RoPE read during a forward.

    Modes:
        ``"off"``: stock behaviour (full bidirectional attention, frame positions from 0).
        ``"cached"``: attend to ``cache`` (windowed by the caller) plus the input's own tokens, RoPE at
            ``frame_offset``; with ``record=True`` the per-layer keys/values of the input are kept in
            :attr:`recorded` (that is the commit pass).
        ``"masked"``: full self-attention over the input under the boolean ``attention_mask`` ``[S, S]``.
    """

    def __init__(self) -> None:
        self.mode = "off"
        self.frame_offset = 0
        self.cache: KVCache | None = None
        self.record = False
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attention_mask: torch.Tensor | None = None
        self.cross_cache: CrossAttentionCache | None = None

    @contextlib.contextmanager
    def cached(
        self,
        cache: KVCache,
        frame_offset: int,
        *,
        record: bool = False,
        cross_cache: CrossAttentionCache | None = None,
    ) -> Iterator[CausalAttentionRuntime]:
        """Run transformer calls inside as chunk passes at absolute ``frame_offset`` reading ``cache``."""
        self._enter(
            mode="cached",
            cache=cache,
            frame_offset=frame_offset,
            record=record,
            cross_cache=cross_cache,
        )
        try:
            yield self
        finally:
            self._reset()

    @contextlib.contextmanager
    def masked(self, attention_mask: torch.Tensor) -> Iterator[CausalAttentionRuntime]:
        """Run transformer calls inside as full forwards under a dense self-attention mask ``[S, S]``."""
        self._enter(mode="masked", attention_mask=attention_mask)
        try:
            yield self
        finally:
            self._reset()

    def pop_recorded(self, frame_start: int, num_frames: int) -> CacheSegment:
        """The keys/values recorded by the last ``record=True`` pass as a cache segment."""
        layers = sorted(self.recorded)
        segment = CacheSegment(
            keys=tuple(self.recorded[i][0] for i in layers),
            values=tuple(self.recorded[i][1] for i in layers),
            frame_start=frame_start,
            num_frames=num_frames,
        )
        self.recorded = {}
        return segment

    def checkpoint(self, function: Callable, *args):
        """``function(*args)`` under ``torch.utils.checkpoint``, recomputed (during backward, after the pass that set
        the runtime has ended) under the settings of its forward: the cache, frame offset and mask it read.

        The transformer's gradient checkpointing must use it, ``transformer.enable_gradient_checkpointing(
        runtime.checkpoint)``: the stock function would recompute a cached pass without its cache (a shape mismatch,
        or silently different values for a chunk at frame 0).
        """
        settings = self._settings()
        return torch.utils.checkpoint.checkpoint(
            function,
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), self._restored(settings)),
        )

    def _settings(self) -> dict:
        return {name: getattr(self, name) for name in _RUNTIME_SETTINGS}

    @contextlib.contextmanager
    def _restored(self, settings: dict) -> Iterator[None]:
        previous = self._settings()
        for name, value in settings.items():
            setattr(self, name, value)
        try:
            yield
        finally:
            for name, value in previous.items():
                setattr(self, name, value)

    def _enter(self, **settings) -> None:
        if self.mode != "off":
            raise RuntimeError("A causal attention pass is already active on this transformer (no nesting).")
        for name, value in settings.items():
            setattr(self, name, value)

    def _reset(self) -> None:
        self.mode, self.frame_offset, self.cache, self.record = "off", 0, None, False
        self.attention_mask = self.cross_cache = None


def _project_qkv(attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor):
    if getattr(attn, "fused_projections", False):
        if attn.is_cross_attention:
            return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` ``[B, S, H, D]`` by the angles whose cos/sin are ``[1, S, 1, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def _attention(attn: nn.Module, query, key, value, attention_mask=None) -> torch.Tensor:
    out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


class _RuntimeProcessor:
    """An attention processor of block ``layer`` that reads the shared :class:`CausalAttentionRuntime`."""

    def __init__(self, runtime: CausalAttentionRuntime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer


class CausalWanSelfAttnProcessor(_RuntimeProcessor):
    """Self-attention processor of ``blocks[layer].attn1`` that reads/writes the runtime's KV cache."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        query, key, value = _project_qkv(attn, hidden_states, hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = (
                _apply_rotary(query, *rotary_emb),
                _apply_rotary(key, *rotary_emb),
            )

        runtime = self.runtime
        if runtime.mode == "cached":
            if runtime.record:
                runtime.recorded[self.layer] = (key.detach(), value.detach())
            key, value = runtime.cache.assemble(self.layer, key, value)
        elif runtime.mode == "masked":
            attention_mask = runtime.attention_mask
        return _attention(attn, query, key, value, attention_mask)


class CausalWanCrossAttnProcessor(_RuntimeProcessor):
    """Cross-attention processor of ``blocks[layer].attn2`` that can reuse per-video text keys/values."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attn.add_k_proj is not None:
            raise NotImplementedError("Image-conditioned (I2V) Wan transformers are not supported by the causal port.")
        cache = self.runtime.cross_cache if not torch.is_grad_enabled() else None
        if cache is not None and self.layer in cache.keys:
            query = attn.to_q(hidden_states)
            key = _expand_rows(cache.keys[self.layer], cache.repeat)
            value = _expand_rows(cache.values[self.layer], cache.repeat)
        else:
            query, key, value = _project_qkv(attn, hidden_states, encoder_hidden_states)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            if cache is not None:
                # Rows come in runs of `repeat` identical prompts (forked branches): keep one row per run.
                cache.keys[self.layer] = key[:: cache.repeat]
                cache.values[self.layer] = value[:: cache.repeat]
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        return _attention(attn, query, key, value, attention_mask)


class OffsetWanRotaryPosEmbed(WanRotaryPosEmbed):
    """``WanRotaryPosEmbed`` whose temporal positions start at the runtime's absolute ``frame_offset``."""

    def __init__(self, rope: WanRotaryPosEmbed, runtime: CausalAttentionRuntime) -> None:
        nn.Module.__init__(self)
        self.attention_head_dim = rope.attention_head_dim
        self.patch_size = rope.patch_size
        self.max_seq_len = rope.max_seq_len
        self.t_dim, self.h_dim, self.w_dim = rope.t_dim, rope.h_dim, rope.w_dim
        self.register_buffer("freqs_cos", rope.freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", rope.freqs_sin, persistent=False)
        self.runtime = runtime

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        f0 = self.runtime.frame_offset
        if f0 + ppf > self.max_seq_len:
            raise ValueError(
                f"Frame positions up to {f0 + ppf} exceed the transformer's rope_max_seq_len={self.max_seq_len}; "
                "generate fewer latent frames."
            )
        split = [self.t_dim, self.h_dim, self.w_dim]
        out = []
        for table in (self.freqs_cos, self.freqs_sin):
            t, h, w = table.split(split, dim=1)
            grid = torch.cat(
                [
                    t[f0 : f0 + ppf].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                    h[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                    w[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1),
                ],
                dim=-1,
            )
            out.append(grid.reshape(1, ppf * pph * ppw, 1, -1))
        return out[0], out[1]


def enable_causal_attention(transformer: nn.Module) -> CausalAttentionRuntime:
    """Install the causal processors and the offset RoPE on a ``WanTransformer3DModel`` (idempotent).

    Returns the runtime shared by them. The state dict is unchanged; call again after reloading weights into a new
    module. Custom processors survive PEFT/LoRA injection because PEFT wraps the projections in place.
    """
    runtime = getattr(transformer, "causal_runtime", None)
    if isinstance(runtime, CausalAttentionRuntime):
        return runtime
    runtime = CausalAttentionRuntime()
    for layer, block in enumerate(transformer.blocks):
        block.attn1.set_processor(CausalWanSelfAttnProcessor(runtime, layer))
        block.attn2.set_processor(CausalWanCrossAttnProcessor(runtime, layer))
    transformer.rope = OffsetWanRotaryPosEmbed(transformer.rope, runtime)
    transformer.causal_runtime = runtime
    return runtime
