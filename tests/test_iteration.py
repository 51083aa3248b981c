"""The cost of a training iteration: gradient checkpointing through cached passes, the rollout's context reused by
the first update."""

import torch
import transformers
from datasets import Dataset
from peft import LoraConfig

import trl_arcopo.arcopo_trainer
from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.rollout import generate_group, rebuild_context
from trl_arcopo.testing import TINY_TRAINING_ARGS, tiny_causal_wan_pipeline

transformers.logging.set_verbosity_error()
PROMPTS = Dataset.from_dict({"prompt": ["a red car", "a blue sea"]})


def _lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    """LoRA gradients of one differentiable pass over a forked 2-chunk context (pivot 2: the cache is read)."""
    pipe = tiny_causal_wan_pipeline()
    transformer = pipe.transformer
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    transformer.add_adapter(lora)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    generator = torch.Generator().manual_seed(0)
    context = rebuild_context(
        pipe, torch.randn(1, 8, 32, generator=generator), torch.randn(1, 16, 6, 4, 4, generator=generator)
    )
    rows = pipe.fork(context, 2)
    x_t = torch.randn(2, 16, 3, 4, 4, generator=generator)
    pipe.predict_x0(rows, x_t, [0, 1]).square().sum().backward()
    return {name: p.grad for name, p in transformer.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_recomputes_blocks_under_the_cached_pass():
    """diffusers' own `enable_gradient_checkpointing()`: blocks recomputed during backward, after the cached pass
    ended, still read its KV cache (the runtime keeps the pass' plan for them)."""
    expected = _lora_grads(False)
    got = _lora_grads(True)
    assert expected.keys() == got.keys() and len(got) == 32
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], atol=0, rtol=0, msg=name)


def _trained_lora(tmp_path, **overrides) -> dict[str, torch.Tensor]:
    args = ARCoPOConfig(
        output_dir=str(tmp_path),
        **{**TINY_TRAINING_ARGS, "max_steps": 2, "save_strategy": "no", "disable_tqdm": True, **overrides},
        overlap_rewards=False,
    )
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=args, train_dataset=PROMPTS)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_trainer_with_gradient_checkpointing_trains_like_without(tmp_path):
    # Pivot 1 of 2 chunks: the update reads a non-empty context (the preset's configuration crashed here).
    settings = {"pivot_strategy": "fixed", "pivot_index": 1}
    expected = _trained_lora(tmp_path / "plain", **settings)
    got = _trained_lora(tmp_path / "checkpointed", transformer_gradient_checkpointing=True, **settings)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)


def test_rollout_context_is_the_rebuilt_context():
    pipe = tiny_causal_wan_pipeline()
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    group = generate_group(
        pipe, embeds, num_generations=3, latent_shape=(16, 9, 4, 4), pivot=2, generator=torch.Generator(), decode=False
    )
    rebuilt = rebuild_context(pipe, group.prompt_embeds, group.prefix_latents)
    assert group.context.frame_offset == rebuilt.frame_offset == 6
    assert group.context.cache.frame_indices == rebuilt.cache.frame_indices == list(range(6))
    # The same keys/values: a step read from either context predicts the same x̂0.
    x_t = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = pipe.predict_x0(pipe.fork(group.context, 2), x_t, [0, 1])
    theirs = pipe.predict_x0(pipe.fork(rebuilt, 2), x_t, [0, 1])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_first_update_of_a_group_reuses_the_rollout_context(tmp_path, monkeypatch):
    rebuilt = []
    original = trl_arcopo.arcopo_trainer.rebuild_context

    def counting_rebuild(*args, **kwargs):
        rebuilt.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trl_arcopo.arcopo_trainer, "rebuild_context", counting_rebuild)
    # 2 rollouts x num_iterations=2 updates; pivot 1 of 2: every update reads a context.
    settings = {"pivot_strategy": "fixed", "pivot_index": 1, "max_steps": 4}
    reused = _trained_lora(tmp_path / "reused", **settings)
    assert len(rebuilt) == 2  # only the second update of each group recomputes it (the policy has stepped)

    rollout = ARCoPOTrainer._rollout_group

    def rollout_without_context(self, row):
        group = rollout(self, row)
        group.context = None
        return group

    monkeypatch.setattr(ARCoPOTrainer, "_rollout_group", rollout_without_context)
    recomputed = _trained_lora(tmp_path / "recomputed", **settings)
    assert len(rebuilt) == 2 + 4
    for name, value in reused.items():
        torch.testing.assert_close(value, recomputed[name], atol=0, rtol=0, msg=name)
