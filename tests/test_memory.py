"""trl_arcopo.memory: the estimate of every phase against a measurement of the trainer at three reduced sizes of the real
architectures (Wan blocks of head_dim 128, the Wan VAE's structure at base_dim 8), the static KV cache's terms, the
distributed strategies, and `trl-arcopo estimate-memory`."""

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from diffusers import AutoencoderKLWan

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, CausalWanPipeline
from trl_arcopo.memory import GeneratorSpec, GiB, RewardSpec, RunSettings, estimate_memory, largest_fitting
from trl_arcopo.models.self_forcing import cast_transformer
from trl_arcopo.rollout import generate_group
from trl_arcopo.scripts import estimate_memory as estimate_memory_script
from trl_arcopo.testing import record_training_phases, tiny_causal_wan_pipeline, tiny_components

# (transformer overrides, pipeline config, dtype, training settings): global attention; a window with a sink, branches
# in batches, gradient checkpointing; bfloat16 weights with pivot 0.
WIDE = {"num_attention_heads": 2, "attention_head_dim": 128, "ffn_dim": 1024, "num_layers": 2}
SIZES = {
    "global": (WIDE, {}, torch.float32, {"num_frames": 21, "height": 64, "width": 64, "num_generations": 4,
                                          "num_anchors": 2, "pivot_index": 1}),
    "window": (WIDE, {"local_attn_size": 6, "sink_size": 3}, torch.float32,
               {"num_frames": 33, "height": 64, "width": 96, "num_generations": 6, "num_anchors": 2,
                "rollout_batch_size": 3, "transformer_gradient_checkpointing": True, "pivot_index": 2}),
    "bfloat16": ({**WIDE, "num_layers": 3}, {}, torch.bfloat16,
                 {"num_frames": 21, "height": 64, "width": 64, "num_generations": 4, "num_anchors": 2,
                  "transformer_gradient_checkpointing": True, "pivot_index": 0}),
}  # fmt: skip


def _pipeline(transformer: dict, pipeline: dict, dtype: torch.dtype) -> CausalWanPipeline:
    components = tiny_components(**transformer)
    torch.manual_seed(0)
    components["vae"] = AutoencoderKLWan(base_dim=8).eval()  # the Wan2.1 VAE's structure, 12x narrower
    cast_transformer(components["transformer"], dtype)
    return CausalWanPipeline(**components, max_sequence_length=32, **pipeline)


@pytest.mark.parametrize("size", list(SIZES))
def test_every_phase_is_estimated_within_15_percent_of_the_measured_peak(size, tmp_path):
    transformer, pipeline, dtype, settings = SIZES[size]
    pipe = _pipeline(transformer, pipeline, dtype)
    args = ARCoPOConfig(
        output_dir=str(tmp_path),
        pivot_strategy="fixed",
        lora_r=16,
        lora_alpha=16,
        max_steps=2,  # one group, two updates
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        overlap_rewards=False,  # the tracker sees the calling thread only
        **settings,
    )
    trainer = ARCoPOTrainer(pipe, "brightness", args=args, train_dataset=Dataset.from_dict({"prompt": ["a cat"]}))
    estimate = estimate_memory(
        args, GeneratorSpec.from_pipeline(pipe), [RewardSpec.for_reward(f) for f in trainer.reward_funcs]
    )
    with record_training_phases(trainer) as phases:
        trainer.train()

    # The tracker counts the tensors allocated after it started: not the weights nor the LoRA, and AdamW's moments
    # only from the first optimizer step (in `update`) on.
    resident = estimate.phases["rollout"]
    weights = sum(resident.get(k, 0) for k in ("transformer weights", "text encoder", "VAE", "reward models"))
    lora = resident["LoRA + AdamW state"] // 3
    for phase in ("rollout", "decode", "reward", "update"):
        predicted = estimate.total(phase) - weights - lora - (0 if phase == "update" else 2 * lora)
        measured = phases.peak_bytes[phase]
        assert abs(predicted / measured - 1) <= 0.15, (phase, predicted, measured, estimate.phases[phase])


@pytest.mark.parametrize("pipeline", [{}, {"local_attn_size": 6, "sink_size": 3}])
def test_kv_cache_terms_are_the_levels_the_rollout_allocates(pipeline):
    pipe = tiny_causal_wan_pipeline(**pipeline)
    latent_shape = pipe.latent_shape(45, 32, 32)  # 12 latent frames, 4 chunks
    group = generate_group(
        pipe, torch.randn(1, 16, 32), num_generations=3, latent_shape=latent_shape, pivot=2, decode=False
    )
    prefix = group.context.cache.own
    measured = sum(t.numel() * t.element_size() for t in (*prefix.keys.values(), *prefix.values.values()))
    spec = GeneratorSpec.from_pipeline(pipe)
    run = RunSettings(num_frames=45, height=32, width=32, num_generations=3, pivots=(2,))
    estimate = estimate_memory(run, spec)
    cross = group.context.cross_cache
    cross_bytes = sum(t.numel() * t.element_size() for t in (cross.text, *cross.keys.values(), *cross.values.values()))
    assert estimate.phases["reward"]["KV cache"] == measured + cross_bytes


def test_estimate_refuses_sizes_and_pivots_the_generator_cannot_run():
    spec = GeneratorSpec.self_forcing()  # 81 frames: 21 latent frames, 7 chunks
    assert estimate_memory(RunSettings(num_frames=81, pivots=(6,)), spec).peak > 0
    with pytest.raises(ValueError, match=r"`pivot_index` \(or `pivot_weights`\) to chunks 0 \.\. 6"):
        estimate_memory(RunSettings(num_frames=81, pivots=(7,)), spec)
    with pytest.raises(
        ValueError, match=r"`num_frames` \(85\) does not split into whole chunks .*: use 81 or 93 frames"
    ):
        estimate_memory(RunSettings(num_frames=85), spec)


def test_fsdp2_shards_the_transformer_and_ddp_keeps_gradient_buckets():
    spec, run = GeneratorSpec.self_forcing(), RunSettings(num_generations=12, num_anchors=4)
    single = estimate_memory(run, spec)
    ddp = estimate_memory(run, spec, num_processes=8, strategy="ddp")
    fsdp = estimate_memory(run, spec, num_processes=8, strategy="fsdp2")
    weights = single.phases["update"]["transformer weights"]
    assert fsdp.phases["update"]["transformer weights"] == weights // 8
    assert fsdp.phases["update"]["all-gathered blocks"] > 0 and fsdp.peak < single.peak
    assert ddp.phases["update"]["DDP gradient buckets"] == single.phases["update"]["LoRA + AdamW state"] // 3
    with pytest.raises(ValueError, match="strategy"):
        estimate_memory(run, spec, strategy="zero3")


def test_gradient_checkpointing_and_fewer_anchors_lower_the_update_peak():
    spec = GeneratorSpec.self_forcing()
    base = estimate_memory(RunSettings(num_anchors=4), spec).total("update")
    assert estimate_memory(RunSettings(num_anchors=4, gradient_checkpointing=True), spec).total("update") < base / 2
    assert estimate_memory(RunSettings(num_anchors=2), spec).total("update") < base


def test_largest_fitting_settings_fit_and_one_more_does_not():
    spec, run = GeneratorSpec.self_forcing(), RunSettings(gradient_checkpointing=True)
    budget = 60 * GiB
    best = largest_fitting(run, spec, memory_bytes=budget)
    batch, anchors = best["rollout_batch_size"], best["num_anchors"]
    assert 1 <= batch < run.num_generations and anchors >= 1
    assert estimate_memory(replace(run, rollout_batch_size=batch), spec).peak <= budget
    assert estimate_memory(replace(run, rollout_batch_size=batch + 1), spec).peak > budget
    chosen = replace(run, rollout_batch_size=batch, num_anchors=anchors, num_generations=best["num_generations"])
    assert estimate_memory(chosen, spec).peak <= budget
    assert largest_fitting(run, spec, memory_bytes=GiB) == dict.fromkeys(best)  # not even the weights fit


def test_trainer_logs_the_estimate_and_warns_when_the_device_cannot_hold_it(tmp_path, monkeypatch, caplog):
    from trl_arcopo import memory

    pipe = tiny_causal_wan_pipeline()
    args = ARCoPOConfig(output_dir=str(tmp_path), num_frames=21, height=32, width=32, report_to="none")
    trainer = ARCoPOTrainer(pipe, "brightness", args=args, train_dataset=Dataset.from_dict({"prompt": ["a cat"]}))
    monkeypatch.setattr(memory, "device_memory", lambda device: 1024)
    with caplog.at_level(logging.INFO, logger="trl_arcopo"):
        trainer._log_memory_estimate()
    assert "Estimated peak memory per process" in caplog.text and "| **total** |" in caplog.text
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "exceeds the 0.0 GiB of cpu" in warning.getMessage() and "peak is mostly" in warning.getMessage()


def test_estimate_memory_command_prints_the_table_and_what_fits(capsys):
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "self_forcing_on_policy.yaml"
    estimate_memory_script.main(
        f"--config {config} --accelerate_config fsdp2 --num_processes 8 --gpu_memory 79.2".split()
    )
    out = capsys.readouterr().out
    assert "(8 processes, FSDP2), 81 frames at 480x832" in out
    assert "| **total** |" in out and "all-gathered blocks" in out
    assert "This run fits in 79.2 GiB" in out or "does NOT fit in 79.2 GiB" in out
    assert "rollout_batch_size:" in out and "num_generations:" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_processes", "0"], "--num_processes must be >= 1, got 0"),
        (["--gpu_memory", "-3"], "--gpu_memory must be a positive number of GiB, got -3.0"),
        (["--accelerate_config", "no_such_config"], "no_such_config"),
        (["--model", "/no/such/folder"], "cannot read the generator's configs"),
    ],
)
def test_estimate_memory_command_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        estimate_memory_script.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_estimate_memory_refuses_a_deepspeed_config_file(tmp_path, capsys):
    config = tmp_path / "zero2.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n"
        "mixed_precision: bf16\nnum_processes: 8\n"
    )
    test_estimate_memory_command_errors_are_one_line(
        ["--accelerate_config", str(config)], "distributed_type DEEPSPEED is not modeled (use DDP or FSDP2)", capsys
    )
