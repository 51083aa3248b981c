"""Block-causal attention with a static KV cache on the stock ``diffusers.WanTransformer3DModel``.

Nothing here adds weights: :func:`enable_causal_attention` swaps the attention processors of every block, the RoPE
module and the text projection for versions that read a shared :class:`CausalAttentionRuntime`. The pipeline hands
the runtime an :class:`AttentionPlan` before each transformer call (which cache to read and write, at which absolute
frame). With no plan the model computes exactly what the stock model computes.

Cache layout: a :class:`KVCache` owns at most one :class:`CacheLevel`, per-layer key/value buffers
``[rows, capacity * tokens_per_frame, heads, head_dim]`` preallocated for the frames the state can still attend to
(the rest of the video, or the window). Every pass writes its keys/values (after ``norm_k`` and RoPE, at absolute
frame positions) in place into the slots of its chunk and attends to the filled slots; committing a chunk only marks
its slots as part of the context. With a window the slots after the sink form a ring, so the buffer never grows.
Forking never copies a level: the forked cache reads its parent's level as a read-only :class:`LevelView` with a
``repeat`` (row ``i`` of the state reads stored row ``i // repeat``) and writes later chunks into a level of its own.
Attention over several levels is computed per level, the shared prefix once for all branches (the branch rows fold
into the query length), and the parts are merged with their log-sum-exp (exact, as in cascade attention).

The attention over the cache runs eagerly (``torch.compiler.disable``): its key length changes from chunk to chunk,
while everything else in a block keeps static shapes, so a compiled block never recompiles across chunks, steps,
pivots or branch counts.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import PixArtAlphaTextProjection
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = [
    "AttentionPlan",
    "CacheLevel",
    "CausalAttentionRuntime",
    "CausalWanCrossAttnProcessor",
    "CausalWanSelfAttnProcessor",
    "CausalWanTextProjection",
    "CrossAttentionCache",
    "KVCache",
    "LevelView",
    "OffsetWanRotaryPosEmbed",
    "attended_frames",
    "attention_with_lse",
    "block_causal_mask",
    "cross_attention_weights_version",
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


# ---------------------------------------------------------------------------------------------------- attention


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``[B, Sq, H, D]`` and the natural log-sum-exp ``[B, Sq, H]`` (float32) of its scaled scores.

    Uses the fused kernels' own log-sum-exp output (CPU flash attention; CUDA flash attention for half precision,
    memory-efficient attention otherwise) and the explicit formula on other devices. Not differentiable in the
    log-sum-exp: only no-grad passes merge attention parts.
    """
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    elif q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = scores.logsumexp(-1)
        out = ((scores - lse.unsqueeze(-1)).exp() @ v.float()).to(q.dtype)
    # The memory-efficient kernel pads the log-sum-exp to a multiple of 32 queries.
    return out.transpose(1, 2), lse[..., : q.shape[2]].transpose(1, 2).float()


def _merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact attention over the union of key sets from per-set outputs ``[B, S, H, D]`` and log-sum-exps ``[B, S, H]``."""
    lse = torch.stack([p[1] for p in parts])
    weights = torch.softmax(lse, dim=0).unsqueeze(-1)  # each set's share of the total softmax mass
    out = sum(w * o.float() for w, (o, _) in zip(weights, parts, strict=True))
    return out.to(parts[0][0].dtype)


def _fold(tensor: torch.Tensor, repeat: int) -> torch.Tensor:
    """``[b * repeat, S, ...] -> [b, repeat * S, ...]``: rows that share keys become one longer query (a view)."""
    return tensor if repeat == 1 else tensor.unflatten(0, (-1, repeat)).flatten(1, 2)


def _unfold(tensor: torch.Tensor, repeat: int) -> torch.Tensor:
    """Inverse of :func:`_fold`."""
    return tensor if repeat == 1 else tensor.unflatten(1, (repeat, -1)).flatten(0, 1)


# ---------------------------------------------------------------------------------------------------- cache


def _token_index(slots: list[int], tokens: int, device: torch.device) -> slice | torch.Tensor:
    """Token positions of frame ``slots`` (``tokens`` per frame): a slice when contiguous, else an index tensor."""
    slots = sorted(slots)
    if slots == list(range(slots[0], slots[-1] + 1)):
        return slice(slots[0] * tokens, (slots[-1] + 1) * tokens)
    return (torch.tensor(slots, device=device)[:, None] * tokens + torch.arange(tokens, device=device)).flatten()


def _take(tensor: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    return tensor[:, index] if isinstance(index, slice) else tensor.index_select(1, index)


def _span(start: int, count: int) -> range:
    return range(start, start + count)


class CacheLevel:
    """Keys/values of ``rows`` videos for up to ``capacity`` latent frames from ``frame_start``, written in place.

    Frame ``f`` lives in slot ``f - frame_start`` for the first ``sink_slots`` frames and in a ring of the remaining
    slots after them, so a windowed cache overwrites exactly the frames its window has left. Buffers are allocated
    by the first write of each layer: ``[rows, capacity * tokens, heads, head_dim]`` (``tokens`` per frame).

    Attributes:
        slot_frames: the frame whose keys/values each slot holds (-1: empty).
        committed_end: frames ``< committed_end`` are committed context; other filled slots belong to a chunk that
            was denoised but not committed, and are overwritten by the next pass.
        shared: a fork reads this level; its owner copies it before overwriting committed frames.
    """

    def __init__(
        self, rows: int, frame_start: int, capacity: int, sink_slots: int, tokens: int, device: torch.device
    ) -> None:
        self.rows, self.frame_start, self.capacity = rows, frame_start, capacity
        self.sink_slots, self.tokens, self.device = sink_slots, tokens, device
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slot_frames = [-1] * capacity
        self.committed_end = frame_start
        self.shared = False

    def slot(self, frame: int) -> int:
        offset = frame - self.frame_start
        if offset < self.sink_slots:
            return offset
        return self.sink_slots + (offset - self.sink_slots) % (self.capacity - self.sink_slots)

    def committed_frames(self) -> list[int]:
        return sorted(f for f in self.slot_frames if 0 <= f < self.committed_end)

    def token_index(self, frames: list[int]) -> slice | torch.Tensor:
        return _token_index([self.slot(f) for f in frames], self.tokens, self.device)

    def write(self, layer: int, index: slice | torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``key``/``value`` ``[rows, tokens, heads, head_dim]`` of ``layer`` at token ``index``."""
        if layer not in self.keys:
            shape = (self.rows, self.capacity * self.tokens, *key.shape[2:])
            self.keys[layer], self.values[layer] = key.new_empty(shape), value.new_empty(shape)
        if isinstance(index, slice):
            self.keys[layer][:, index] = key
            self.values[layer][:, index] = value
        else:
            self.keys[layer].index_copy_(1, index, key)
            self.values[layer].index_copy_(1, index, value)

    def resized(self, capacity: int) -> CacheLevel:
        """A new level with ``capacity`` slots holding this level's committed frames (this level is unchanged)."""
        new = CacheLevel(
            self.rows, self.frame_start, capacity, min(self.sink_slots, capacity), self.tokens, self.device
        )
        for frame in self.committed_frames():
            source, target = self.token_index([frame]), new.token_index([frame])
            for layer in self.keys:
                new.write(layer, target, self.keys[layer][:, source], self.values[layer][:, source])
            new.slot_frames[new.slot(frame)] = frame
        new.committed_end = self.committed_end
        return new


@dataclass(frozen=True)
class LevelView:
    """Read-only access of a forked cache to an ancestor's level: its ``frames`` committed at fork time, each stored
    row serving ``repeat`` consecutive rows of the state."""

    level: CacheLevel
    frames: tuple[int, ...]
    repeat: int


@dataclass(frozen=True)
class _Read:
    level: CacheLevel
    index: slice | torch.Tensor
    repeat: int


@dataclass(frozen=True)
class AttentionPlan:
    """What the causal processors do during one transformer call (built by the pipeline, read by every layer).

    Attributes:
        frame_offset: absolute latent frame of the input's first frame (RoPE positions).
        reads: cache levels to attend to, each with the token index of its attended slots and its ``repeat``.
        write: the level and token index that the input's own keys/values are written to (no-grad passes); None
            keeps them out of the cache (differentiable passes attend to them directly).
        cross: per-prompt text context reused across calls (no-grad passes only).
        attention_mask: dense boolean self-attention mask ``[S, S]`` of a full block-causal forward (no cache).
    """

    frame_offset: int = 0
    reads: tuple[_Read, ...] = ()
    write: tuple[CacheLevel, slice | torch.Tensor] | None = None
    cross: CrossAttentionCache | None = None
    attention_mask: torch.Tensor | None = None


class KVCache:
    """Self-attention cache of the committed chunks of a state's videos (see the module docstring).

    Args:
        local_attn_size: attention window in latent frames including the current chunk (-1: global).
        sink_size: first latent frames that are never evicted.
        num_frames: latent frames of the whole video, if known: a global cache then allocates its level once for
            them (otherwise the level grows by doubling).
    """

    def __init__(
        self,
        local_attn_size: int = -1,
        sink_size: int = 0,
        num_frames: int | None = None,
        *,
        views: tuple[LevelView, ...] = (),
        end: int = 0,
    ) -> None:
        self.local_attn_size, self.sink_size, self.max_frames = local_attn_size, sink_size, num_frames
        self.views = views
        self.own: CacheLevel | None = None
        self.end = end  # first frame after the committed context

    # ------------------------------------------------------------------ what the cache holds

    def _retained(self, frame: int) -> bool:
        """Whether the window of the next chunk still reaches ``frame``."""
        if self.local_attn_size == -1:
            return True
        return frame < self.sink_size or frame >= self.end - (self.local_attn_size - self.sink_size)

    @property
    def frame_indices(self) -> list[int]:
        """Committed frames that the next chunk can still attend to, ascending."""
        frames = [f for view in self.views for f in view.frames]
        if self.own is not None:
            frames += self.own.committed_frames()
        return sorted(f for f in frames if self._retained(f))

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    def attended(self, chunk_start: int, chunk_frames: int) -> list[int]:
        """The cached frames that a chunk starting at ``chunk_start`` attends to."""
        window = set(self._window(chunk_start, chunk_frames))
        return [f for f in self.frame_indices if f in window]

    def _window(self, chunk_start: int, chunk_frames: int) -> list[int]:
        return attended_frames(
            chunk_start, chunk_frames, local_attn_size=self.local_attn_size, sink_size=self.sink_size
        )

    # ------------------------------------------------------------------ forking and committing

    def fork(self, n: int) -> KVCache:
        """The cache of a batch in which every row is repeated ``n`` times (row ``i`` -> rows ``i*n .. i*n+n-1``).

        The levels are shared, not copied; the new cache writes later chunks into a level of its own."""
        views = tuple(replace(v, repeat=v.repeat * n) for v in self.views)
        if self.own is not None and self.own.committed_frames():
            self.own.shared = True
            views += (LevelView(self.own, tuple(self.own.committed_frames()), n),)
        return KVCache(self.local_attn_size, self.sink_size, self.max_frames, views=views, end=self.end)

    def commit(self, frame_start: int, num_frames: int) -> None:
        """Make the chunk ``[frame_start, frame_start + num_frames)`` written by the last pass part of the context."""
        own = self.own
        if own is None or any(own.slot_frames[own.slot(f)] != f for f in _span(frame_start, num_frames)):
            raise RuntimeError(f"No pass wrote frames [{frame_start}, {frame_start + num_frames}) into this cache.")
        own.committed_end = self.end = frame_start + num_frames

    # ------------------------------------------------------------------ planning a pass

    def plan(
        self, frame_offset: int, num_frames: int, tokens: int, rows: int, device: torch.device, *, write: bool
    ) -> AttentionPlan:
        """The reads (and, with ``write``, the in-place write) of one pass over the frames
        ``[frame_offset, frame_offset + num_frames)`` of ``rows`` videos with ``tokens`` tokens per frame."""
        window = set(self._window(frame_offset, num_frames))
        reads = []
        for view in self.views:
            self._check_rows(view.level.rows * view.repeat, rows)
            frames = [f for f in view.frames if f in window]
            if frames:
                reads.append(_Read(view.level, view.level.token_index(frames), view.repeat))
        own_frames = [f for f in self.own.committed_frames() if f in window] if self.own is not None else []
        target = None
        if write:
            level = self._writable_level(frame_offset, num_frames, tokens, rows, device)
            for frame in _span(frame_offset, num_frames):
                level.slot_frames[level.slot(frame)] = frame
            target = (level, level.token_index(list(_span(frame_offset, num_frames))))
            own_frames += _span(frame_offset, num_frames)
        if own_frames:
            self._check_rows(self.own.rows, rows)
            reads.append(_Read(self.own, self.own.token_index(own_frames), 1))
        return AttentionPlan(frame_offset=frame_offset, reads=tuple(reads), write=target)

    @staticmethod
    def _check_rows(cache_rows: int, rows: int) -> None:
        if cache_rows != rows:
            raise ValueError(
                f"The KV cache serves a batch of {cache_rows} rows but the transformer input has {rows}; fork the "
                "state instead of changing the batch size."
            )

    def _writable_level(
        self, frame_offset: int, num_frames: int, tokens: int, rows: int, device: torch.device
    ) -> CacheLevel:
        """The own level, created, grown or copied (copy-on-write) so that the chunk can be written into it."""
        level = self.own
        start = level.frame_start if level is not None else frame_offset
        end = frame_offset + num_frames
        # `full`: the slots for the rest of the video (global) or the window, fewer for a video known to be shorter.
        video = max(end, self.max_frames) - start if self.max_frames is not None else None
        if self.local_attn_size == -1:
            sink_slots, needed = 0, end - start
            full = video if video is not None else needed
        else:
            sink_slots = max(0, self.sink_size - start)
            window = sink_slots + self.local_attn_size - self.sink_size
            needed, full = min(end - start, window), min(video, window) if video is not None else window
        if level is None:
            level = CacheLevel(rows, start, full, min(sink_slots, full), tokens, device)
        elif level.capacity < needed:  # the video outgrew the `num_frames` the level was allocated for
            grown = 2 * level.capacity if self.local_attn_size == -1 else 0
            level = level.resized(max(needed, full, grown))
        elif level.shared and any(
            0 <= level.slot_frames[level.slot(f)] < level.committed_end for f in _span(frame_offset, num_frames)
        ):
            level = level.resized(level.capacity)
        self.own = level
        return level


# ---------------------------------------------------------------------------------------------------- cross-attention


def cross_attention_weights_version(transformer: nn.Module) -> tuple:
    """A value that changes whenever the text projection or the cross-attention keys/values could change: the
    identity and in-place version of every parameter they use and the adapter state (enabled, active, merged, scale)
    of any PEFT layer among them. Optimizer steps, ``load_state_dict``, LoRA injection and adapter toggles all move
    it, so a :class:`CrossAttentionCache` is never read with other weights than those that filled it."""
    modules = [transformer.condition_embedder.text_embedder]
    for block in transformer.blocks:
        attn = block.attn2
        modules += [attn.norm_k, *(getattr(attn, name) for name in ("to_k", "to_v", "to_kv") if hasattr(attn, name))]
    version = []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, BaseTunerLayer):
                version.append(
                    (sub.disable_adapters, tuple(sub.active_adapters), sub.merged, tuple(sorted(sub.scaling.items())))
                )
            version += [(p.data_ptr(), p._version) for p in sub.parameters(recurse=False)]
    return tuple(version)


@dataclass
class CrossAttentionCache:
    """Text context of a fixed prompt batch: the text projection ``[b, text_tokens, dim]`` and per-block
    cross-attention keys/values ``[b, text_tokens, heads, head_dim]``, one stored row per ``repeat`` rows.

    Filled by the first no-grad transformer call that uses it and tied to the weights at that time
    (``weights_version``): the pipeline starts a new one when :func:`cross_attention_weights_version` moves.
    """

    weights_version: tuple | None = None
    text: torch.Tensor | None = None
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    repeat: int = 1

    def fork(self, n: int) -> CrossAttentionCache:
        """The same stored context read by ``n`` rows per stored row (the tensors are shared)."""
        return replace(self, keys=dict(self.keys), values=dict(self.values), repeat=self.repeat * n)


# ---------------------------------------------------------------------------------------------------- runtime


class CausalAttentionRuntime:
    """Shared, per-transformer state that the causal processors, the offset RoPE and the text projection read.

    ``plan`` is None outside :meth:`active` (stock behaviour: full bidirectional attention, frame positions from 0).
    """

    def __init__(self, transformer: nn.Module | None = None) -> None:
        self.plan: AttentionPlan | None = None
        self._transformer = weakref.ref(transformer) if transformer is not None else None

    @contextlib.contextmanager
    def active(self, plan: AttentionPlan) -> Iterator[CausalAttentionRuntime]:
        """Run the transformer calls inside under ``plan``.

        With gradient checkpointing, blocks recomputed during the backward pass run under the same plan."""
        if self.plan is not None:
            raise RuntimeError("A causal attention pass is already active on this transformer (no nesting).")
        transformer = self._transformer() if self._transformer is not None else None
        checkpointing = transformer is not None and getattr(transformer, "gradient_checkpointing", False)
        if checkpointing:
            checkpoint = transformer._gradient_checkpointing_func
            transformer._gradient_checkpointing_func = functools.partial(self._checkpoint, checkpoint, plan)
        self.plan = plan
        try:
            yield self
        finally:
            self.plan = None
            if checkpointing:
                transformer._gradient_checkpointing_func = checkpoint

    def _checkpoint(self, checkpoint, plan: AttentionPlan, block: nn.Module, *args):
        return checkpoint(functools.partial(self._run_under, plan, block), *args)

    def _run_under(self, plan: AttentionPlan, block: nn.Module, *args):
        if self.plan is plan:
            return block(*args)
        previous, self.plan = self.plan, plan  # recomputation during backward, after the pass has ended
        try:
            return block(*args)
        finally:
            self.plan = previous


def _project_kv(attn: nn.Module, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    return attn.norm_k(key).unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` ``[B, S, H, D]`` by the angles whose cos/sin are ``[1, S, 1, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def _attention(query, key, value, attention_mask=None) -> torch.Tensor:
    return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)


def _output(attn: nn.Module, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(dtype)))


def _fresh(out: torch.Tensor) -> torch.Tensor:
    """``out`` as a tensor that is not a view, whatever the attention path: the graph after an eager call then sees
    the same kind of input every time (a view would be guarded on its base)."""
    return out if out._base is None else out.clone(memory_format=torch.contiguous_format)


# The processors below run the projections, norms, RoPE and output projection in traced code and call an eager
# `attend` (excluded from torch.compile) for the attention over the cache; its result is the only tensor that crosses
# the graph break, so the graphs around it see the same inputs whatever the cache holds.


class _RuntimeProcessor:
    """An attention processor of block ``layer`` that reads the shared :class:`CausalAttentionRuntime`."""

    def __init__(self, runtime: CausalAttentionRuntime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer


class CausalWanSelfAttnProcessor(_RuntimeProcessor):
    """Self-attention processor of ``blocks[layer].attn1`` that writes/reads the runtime plan's KV cache."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _apply_rotary(query, *rotary_emb), _apply_rotary(key, *rotary_emb)
        return _output(attn, self.attend(query, key, value, attention_mask), query.dtype)

    @torch.compiler.disable
    def attend(self, query, key, value, attention_mask=None) -> torch.Tensor:
        """Attention ``[B, S, H, D]`` of the input's tokens over the plan's cache and themselves."""
        return _fresh(self._attention(query, key, value, attention_mask))

    def _attention(self, query, key, value, attention_mask) -> torch.Tensor:
        plan = self.runtime.plan
        if plan is None:
            return _attention(query, key, value, attention_mask)
        if plan.attention_mask is not None:
            return _attention(query, key, value, plan.attention_mask)
        if plan.write is not None:
            level, index = plan.write
            level.write(self.layer, index, key, value)
        parts = [
            (_take(r.level.keys[self.layer], r.index), _take(r.level.values[self.layer], r.index), r.repeat)
            for r in plan.reads
        ]
        if plan.write is None:
            # Differentiable pass: the input's keys/values stay out of the cache and keep their graph.
            keys = [_expand_rows(k, n) for k, _, n in parts] + [key]
            values = [_expand_rows(v, n) for _, v, n in parts] + [value]
            return _attention(query, torch.cat(keys, dim=1), torch.cat(values, dim=1))
        if len(parts) == 1 and parts[0][2] == 1:
            return _attention(query, parts[0][0], parts[0][1])
        outputs = []
        for k, v, repeat in parts:  # the rows that share a level's keys attend to them as one longer query
            out, lse = attention_with_lse(_fold(query, repeat), k, v)
            outputs.append((_unfold(out, repeat), _unfold(lse, repeat)))
        return _merge_attention(outputs)


class CausalWanCrossAttnProcessor(_RuntimeProcessor):
    """Cross-attention processor of ``blocks[layer].attn2`` that reuses the plan's per-prompt text keys/values."""

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
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        return _output(attn, self.attend(attn, query, encoder_hidden_states, attention_mask), query.dtype)

    @torch.compiler.disable
    def attend(self, attn, query, context, attention_mask=None) -> torch.Tensor:
        """Attention ``[B, S, H, D]`` of the input's tokens over the text ``context``."""
        plan = self.runtime.plan
        cache = plan.cross if plan is not None else None
        if cache is None:
            return _fresh(_attention(query, *_project_kv(attn, context), attention_mask))
        # `context` is the cached text projection: one row per `repeat` rows of the query.
        if self.layer not in cache.keys:
            cache.keys[self.layer], cache.values[self.layer] = _project_kv(attn, context)
        key, value = cache.keys[self.layer], cache.values[self.layer]
        return _fresh(_unfold(_attention(_fold(query, cache.repeat), key, value, attention_mask), cache.repeat))


class CausalWanTextProjection(PixArtAlphaTextProjection):
    """The condition embedder's text projection (same submodules and weights) that, under a plan with a
    :class:`CrossAttentionCache`, projects the prompts once per cache and returns the stored projection."""

    def __init__(self, projection: PixArtAlphaTextProjection, runtime: CausalAttentionRuntime) -> None:
        nn.Module.__init__(self)
        self.linear_1, self.act_1, self.linear_2 = projection.linear_1, projection.act_1, projection.linear_2
        self.runtime = runtime

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        plan = self.runtime.plan
        cache = plan.cross if plan is not None else None
        if cache is None:
            return super().forward(caption)
        if cache.text is None:
            cache.text = super().forward(caption[:: cache.repeat])
        return cache.text


class OffsetWanRotaryPosEmbed(WanRotaryPosEmbed):
    """``WanRotaryPosEmbed`` whose temporal positions start at the plan's absolute ``frame_offset``; the tables of
    each (offset, grid) are computed once and reused (a bounded number are kept)."""

    _max_tables = 64

    def __init__(self, rope: WanRotaryPosEmbed, runtime: CausalAttentionRuntime) -> None:
        nn.Module.__init__(self)
        self.attention_head_dim = rope.attention_head_dim
        self.patch_size = rope.patch_size
        self.max_seq_len = rope.max_seq_len
        self.t_dim, self.h_dim, self.w_dim = rope.t_dim, rope.h_dim, rope.w_dim
        self.register_buffer("freqs_cos", rope.freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", rope.freqs_sin, persistent=False)
        self.runtime = runtime
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        f0 = self.runtime.plan.frame_offset if self.runtime.plan is not None else 0
        if f0 + ppf > self.max_seq_len:
            raise ValueError(
                f"Frame positions up to {f0 + ppf} exceed the transformer's rope_max_seq_len={self.max_seq_len}; "
                "generate fewer latent frames."
            )
        key = (f0, ppf, pph, ppw, self.freqs_cos.device, self.freqs_cos.dtype)
        if key not in self._tables:
            if len(self._tables) >= self._max_tables:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = self._table(f0, ppf, pph, ppw)
        return self._tables[key]

    def _table(self, f0: int, ppf: int, pph: int, ppw: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _apply(self, fn, recurse=True):
        self._tables.clear()  # device or dtype moves
        return super()._apply(fn, recurse)


def enable_causal_attention(transformer: nn.Module) -> CausalAttentionRuntime:
    """Install the causal processors, the offset RoPE and the caching text projection on a
    ``WanTransformer3DModel`` (idempotent).

    Returns the runtime shared by them. The state dict is unchanged; call again after reloading weights into a new
    module. Custom processors survive PEFT/LoRA injection because PEFT wraps the projections in place.
    """
    runtime = getattr(transformer, "causal_runtime", None)
    if isinstance(runtime, CausalAttentionRuntime):
        return runtime
    runtime = CausalAttentionRuntime(transformer)
    for layer, block in enumerate(transformer.blocks):
        block.attn1.set_processor(CausalWanSelfAttnProcessor(runtime, layer))
        block.attn2.set_processor(CausalWanCrossAttnProcessor(runtime, layer))
    transformer.rope = OffsetWanRotaryPosEmbed(transformer.rope, runtime)
    embedder = transformer.condition_embedder
    embedder.text_embedder = CausalWanTextProjection(embedder.text_embedder, runtime)
    transformer.causal_runtime = runtime
    return runtime
