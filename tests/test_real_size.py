"""The released generator at its real width and depth (the 1.3B Self-Forcing transformer, 30 blocks of 1536), loaded
from a bfloat16 checkpoint in a local Hub cache through `CausalWanPipeline.from_self_forcing` and trained one AR-CoPO
step at the smallest video the models take (9 frames of 16x16: one chunk, one token per latent frame), so that a
config or shape error that only the real configuration has fails here, not on a user's cluster. It computes in
float32: this CPU's bfloat16 matmuls are ~13x slower (the same step in bfloat16 took 572 s); the bfloat16 training
path is checked at tiny size below. VideoAlign's real-size model is built (on the meta device) in
`test_videoalign_2b_builds_from_the_released_config`; scoring with it at real size takes minutes on CPU
(`benchmarks/bench_real_arch.py`, docs/benchmarks.md)."""

import pytest
import torch


@pytest.mark.slow
def test_self_forcing_1_3b_trains_one_step(bench_real_arch, tmp_path):
    from trl_arcopo import CausalWanPipeline

    hub = tmp_path / "hub"
    bench_real_arch.write_hub_cache(hub, torch.bfloat16, bench_real_arch.MODELS["real"])
    pipe = CausalWanPipeline.from_self_forcing(cache_dir=hub, dtype=torch.float32)
    transformer = pipe.transformer
    assert len(transformer.blocks) == 30
    assert 1.2e9 < sum(p.numel() for p in transformer.parameters()) < 1.5e9
    assert pipe.config.max_sequence_length == 512
    # Prompts of 32 tokens instead of 512: the sequence length is no weight's shape, and projecting 512 padded tokens
    # for every cross-attention was two thirds of the step's time.
    pipe.register_to_config(max_sequence_length=32)

    trainer = _train_one_step(pipe, tmp_path, lora_r=64, lora_alpha=128, transformer_gradient_checkpointing=True)
    assert trainer.state.global_step == 1


def _train_one_step(pipe, tmp_path, **settings):
    """One AR-CoPO step (G = 2) on 9 frames of 16x16 with the `brightness` reward; checks the LoRA moved, finitely."""
    from datasets import Dataset

    from trl_arcopo import ARCoPOConfig, ARCoPOTrainer

    defaults = {
        "num_frames": 9,
        "height": 16,
        "width": 16,
        "num_generations": 2,
        "num_anchors": 2,
        "learning_rate": 1e-3,
        "max_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "overlap_rewards": False,
    }
    config = ARCoPOConfig(output_dir=str(tmp_path / "run"), **{**defaults, **settings})
    prompts = Dataset.from_dict({"prompt": ["a corgi surfing a wave at sunset"]})
    trainer = ARCoPOTrainer(pipe, "brightness", args=config, train_dataset=prompts)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())  # trainable LoRA in float32 over bf16
    trainer.train()
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["grad_norm"] > 0
    trained = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(p).all() for p in trained.values())
    assert any(not torch.equal(lora[n], trained[n]) for n in lora)
    return trainer


def test_a_bfloat16_generator_trains_one_step_with_float32_lora(tmp_path):
    from trl_arcopo.models.self_forcing import cast_transformer
    from trl_arcopo.testing import tiny_causal_wan_pipeline

    pipe = tiny_causal_wan_pipeline()
    pipe.transformer = cast_transformer(pipe.transformer, torch.bfloat16)
    trainer = _train_one_step(pipe, tmp_path, height=32, width=32)
    base = [p for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert base and {p.dtype for p in base} <= {torch.bfloat16, torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in base)


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")
def test_videoalign_2b_builds_from_the_released_config(bench_real_arch):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # the config and module path only: weights on the meta device
        reward = bench_real_arch.videoalign_reward(torch.bfloat16)
    config = reward.model.config
    assert config.get_text_config().hidden_size == 1536 and config.get_text_config().num_hidden_layers == 28
    assert config.vision_config.depth == 32
    assert 2.0e9 < sum(p.numel() for p in reward.model.parameters()) < 2.4e9
    assert {p.dtype for p in reward.parameters()} == {torch.bfloat16}
