"""The static KV cache: exact merged attention, ring slots, forks that share without copying, text-context reuse
tied to the weights, RoPE tables, gradient checkpointing."""

import pytest
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from trl_arcopo.models.kv_cache import (
    CacheLevel,
    OffsetWanRotaryPosEmbed,
    _fold,
    _merge_attention,
    _unfold,
    attention_with_lse,
)
from trl_arcopo.testing import tiny_causal_wan_pipeline


def _explicit_attention(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), scores.logsumexp(-1).transpose(1, 2)


def test_attention_with_lse_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 5, 3, 8, generator=g),
        torch.randn(2, 7, 3, 8, generator=g),
        torch.randn(2, 7, 3, 8, generator=g),
    )
    out, lse = attention_with_lse(q, k, v)
    expected_out, expected_lse = _explicit_attention(q, k, v)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=0)


def test_attention_over_shared_and_own_keys_merges_exactly():
    """Branch rows attend to a prefix stored once (queries folded) plus their own keys: same as one attention over
    the prefix expanded to every row and concatenated with the own keys."""
    g = torch.Generator().manual_seed(0)
    rows, repeat = 6, 3
    q = torch.randn(rows, 4, 2, 8, generator=g)
    prefix_k, prefix_v = (
        torch.randn(rows // repeat, 9, 2, 8, generator=g),
        torch.randn(rows // repeat, 9, 2, 8, generator=g),
    )
    own_k, own_v = torch.randn(rows, 4, 2, 8, generator=g), torch.randn(rows, 4, 2, 8, generator=g)
    out, lse = attention_with_lse(_fold(q, repeat), prefix_k, prefix_v)
    merged = _merge_attention([(_unfold(out, repeat), _unfold(lse, repeat)), attention_with_lse(q, own_k, own_v)])
    keys = torch.cat([prefix_k.repeat_interleave(repeat, 0), own_k], dim=1)
    values = torch.cat([prefix_v.repeat_interleave(repeat, 0), own_v], dim=1)
    torch.testing.assert_close(merged, dispatch_attention_fn(q, keys, values), atol=1e-6, rtol=0)


def test_ring_slots_keep_the_sink():
    level = CacheLevel(rows=1, frame_start=0, capacity=12, sink_slots=3, tokens=4, device=torch.device("cpu"))
    assert [level.slot(f) for f in range(12)] == list(range(12))
    assert [level.slot(f) for f in range(12, 24)] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 4, 5]
    child = CacheLevel(rows=5, frame_start=6, capacity=9, sink_slots=0, tokens=4, device=torch.device("cpu"))
    assert [child.slot(f) for f in range(6, 18)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]


def _stream(pipe, embeds, noise, step_noise, *, fork_at=None, branches=1, num_frames=None, advance_parent=False):
    """Generate with the streaming API, forking into identical branches before chunk `fork_at`."""
    state = pipe.init_state(embeds, num_frames=num_frames)
    for c in range(noise.shape[2] // 3):
        if c == fork_at:
            parent, state = state, pipe.fork(state, branches)
            if advance_parent:  # the parent moves on (overwriting its ring) before the branches continue
                for _ in range(3):
                    pipe.commit_chunk(parent, pipe.denoise_chunk(parent, torch.randn_like(noise[:, :, :3])).latents)
        rows = state.batch_size // noise.shape[0]
        draws = [step_noise[(c, s)].repeat_interleave(rows, 0) for s in range(3)]
        record = pipe.denoise_chunk(state, noise[:, :, 3 * c : 3 * c + 3].repeat_interleave(rows, 0), step_noise=draws)
        pipe.commit_chunk(state, record.latents)
    return state.latents


def _inputs(batch=2, chunks=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, 16, 32, generator=g)
    noise = torch.randn(batch, 16, 3 * chunks, 4, 4, generator=g)
    step_noise = {(c, s): torch.randn(batch, 16, 3, 4, 4, generator=g) for c in range(chunks) for s in range(3)}
    return embeds, noise, step_noise


@pytest.mark.parametrize(("local_attn_size", "sink_size"), [(6, 3), (7, 1), (12, 3)])
def test_windowed_forks_and_growth_reproduce_the_unforked_run(local_attn_size, sink_size):
    """Windows evict the parent's frames from the branches' reads (sliced or gathered), rings wrap inside a chunk
    for (7, 1), and a parent that keeps generating after the fork copies its level before overwriting it."""
    pipe = tiny_causal_wan_pipeline(local_attn_size=local_attn_size, sink_size=sink_size)
    embeds, noise, step_noise = _inputs()
    reference = pipe(prompt_embeds=embeds, latents=noise, step_noise=step_noise, output_type="latent").frames
    for kwargs in ({"fork_at": 2, "branches": 2}, {"fork_at": 3, "branches": 3, "advance_parent": True}, {}):
        latents = _stream(pipe, embeds, noise, step_noise, **kwargs)
        rows = kwargs.get("branches", 1)
        torch.testing.assert_close(latents, reference.repeat_interleave(rows, 0), atol=1e-5, rtol=0)


def test_global_cache_grows_without_a_frame_count():
    pipe = tiny_causal_wan_pipeline()
    embeds, noise, step_noise = _inputs(chunks=5)
    reference = _stream(pipe, embeds, noise, step_noise, num_frames=15)
    grown = _stream(pipe, embeds, noise, step_noise, fork_at=1, branches=2)
    torch.testing.assert_close(grown, reference.repeat_interleave(2, 0), atol=1e-5, rtol=0)


def test_branches_do_not_copy_the_prefix():
    """A pass of 12 branches over a long shared prefix allocates less than half of one copy of the prefix per branch
    (the per-call concatenation this cache replaced allocated a whole copy for the keys and one for the values)."""
    pipe = tiny_causal_wan_pipeline(num_layers=1, num_frame_per_block=1)
    state = pipe.init_state(torch.randn(1, 16, 32), num_frames=30)
    for _ in range(29):
        pipe.commit_chunk(state, pipe.denoise_chunk(state, torch.randn(1, 16, 1, 8, 8)).latents)
    branches = pipe.fork(state, 12)
    prefix = state.cache.own.keys[0]
    expanded_prefix = 2 * prefix.numel() * prefix.element_size() * 12  # keys and values for 12 rows
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with profile as prof, torch.no_grad():
        pipe.predict_x0(branches, torch.randn(12, 16, 1, 8, 8), 0)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    assert branches.cache.views[0].level is state.cache.own
    assert tuple(branches.cache.own.keys[0].shape) == (12, 16, 2, 12)  # the branches store their own frame only
    assert peak < expanded_prefix / 2


def _add_lora(pipe, target_modules):
    from peft import LoraConfig

    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False), adapter_name="policy"
    )


def test_text_context_follows_weight_changes():
    """The reused text projection and cross-attention keys/values never outlive the weights that made them: adapter
    toggles and optimizer steps give what a state without the cache gives."""
    pipe = tiny_causal_wan_pipeline()
    _add_lora(pipe, ["to_k", "to_v", "linear_1"])  # attn1/attn2 keys and values, the text projection
    embeds, noise, _ = _inputs(batch=1, chunks=2)
    state = pipe.init_state(embeds)
    pipe.commit_chunk(state, noise[:, :, :3])
    rows = pipe.fork(state, 2)

    def predict(state):
        fresh = pipe.fork(state, 1)
        fresh.cross_cache = None  # recompute the text context
        return pipe.predict_x0(state, noise[:, :, 3:].expand(2, -1, -1, -1, -1), 0), pipe.predict_x0(
            fresh, noise[:, :, 3:].expand(2, -1, -1, -1, -1), 0
        )

    cached, fresh = predict(rows)
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=0)
    with pipe.adapters_disabled():
        cached_base, fresh_base = predict(rows)
    torch.testing.assert_close(cached_base, fresh_base, atol=1e-6, rtol=0)
    assert (cached_base - cached).abs().max() > 1e-3
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "attn2.to_k.lora_B" in name or "linear_1.lora_B" in name:
                p.add_(0.5)  # what an optimizer step does: in place
    cached, fresh = predict(rows)
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=0)


def test_text_context_and_rope_tables_are_computed_once_per_state():
    pipe = tiny_causal_wan_pipeline()
    text_calls, key_calls = [], []
    pipe.transformer.condition_embedder.text_embedder.linear_1.register_forward_hook(lambda *a: text_calls.append(1))
    pipe.transformer.blocks[0].attn2.to_k.register_forward_hook(lambda *a: key_calls.append(1))
    tables = []
    original = OffsetWanRotaryPosEmbed._table
    pipe.transformer.rope._table = lambda *args: tables.append(args) or original(pipe.transformer.rope, *args)
    embeds, noise, step_noise = _inputs(batch=1, chunks=4)
    pipe(prompt_embeds=embeds, latents=noise, step_noise=step_noise, output_type="latent")
    assert len(text_calls) == len(key_calls) == 1  # 4 chunks x (4 steps + refresh) - 1 calls reused them
    assert [t[0] for t in tables] == [0, 3, 6, 9]
    pipe(prompt_embeds=embeds, latents=noise, step_noise=step_noise, output_type="latent")
    assert len(text_calls) == len(key_calls) == 2 and len(tables) == 4


def _grads(pipe, rows, x):
    pipe.transformer.zero_grad()
    pipe.predict_x0(rows, x, [0, 1, 2, 3]).square().sum().backward()
    return {n: p.grad.clone() for n, p in pipe.transformer.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_recomputes_blocks_under_the_same_cache():
    pipe = tiny_causal_wan_pipeline()
    _add_lora(pipe, ["to_q", "to_k", "to_v", "to_out.0"])
    embeds, noise, _ = _inputs(batch=1, chunks=3)
    state = pipe.init_state(embeds)
    for c in range(2):
        pipe.commit_chunk(state, noise[:, :, 3 * c : 3 * c + 3])
    rows = pipe.fork(state, 4)
    x = noise[:, :, 6:].expand(4, -1, -1, -1, -1)
    with torch.no_grad():
        no_grad = pipe.predict_x0(rows, x, [0, 1, 2, 3])
    plain = _grads(pipe, rows, x)
    torch.testing.assert_close(pipe.predict_x0(rows, x, [0, 1, 2, 3]), no_grad, atol=1e-6, rtol=0)
    pipe.transformer.enable_gradient_checkpointing()
    checkpointed = _grads(pipe, rows, x)
    assert plain.keys() == checkpointed.keys() and all(g.abs().max() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
