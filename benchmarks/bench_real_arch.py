"""One AR-CoPO training iteration of the `self-forcing` preset on the real architectures (random weights), on CPU.

The models are built with random weights through the loaders' own paths:

- the 1.3B Self-Forcing generator: a random original-layout checkpoint (`generator_ema` in
  `checkpoints/self_forcing_dmd.pt`, as `gdhe17/Self-Forcing` ships it) and a `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`
  folder (the real transformer config, the real `AutoencoderKLWan()` with random weights) installed in a local Hub
  cache and loaded by `CausalWanPipeline.from_self_forcing` with `HF_HUB_OFFLINE=1`;
- prompt embeddings of the real shape `[1, 512, 4096]`, from a 1-layer text encoder of umT5-XXL's width (umT5-XXL itself
  is reported from its config, not run);
- VideoAlign: Qwen2-VL-2B's released config with random weights and the reward head, scoring through the port's
  processor with the test fixture's tokenizer (its own vocabulary: the scoring text has ~1200 tokens, not ~900).

It then trains with the preset's configuration at a reduced resolution and group size (both printed): one rollout with
forking, decoding, VideoAlign scoring, two updates with `transformer_gradient_checkpointing`, a checkpoint after each,
and a resume from the first checkpoint whose second update must give the same LoRA. It prints the time split, the
tensor memory of each phase next to `trl_arcopo.memory`'s estimate, and the process's peak RSS. On CPU the weights are
float32 by default: this CPU's bfloat16 matmuls are ~13x slower than its float32 ones (`--dtype bfloat16` runs the
preset's dtype). Run it alone: it needs ~20 GiB.

    python benchmarks/bench_real_arch.py                                   # 81 frames at 32x32, G = 2, float32
    python benchmarks/bench_real_arch.py --device cuda --dtype bfloat16 --height 480 --width 832 --num-generations 12
    python benchmarks/bench_real_arch.py --quick     # the same path at reduced widths, 21 frames (a test runs it)

`--quick` narrows every model (2 Wan blocks of width 64, the Wan VAE's structure at base_dim 8, a 64-wide text encoder,
the test fixture's VideoAlign) so that the script itself is checked in seconds: the Hub cache, the loaders, training,
checkpointing and resuming.
"""

# ruff: noqa: E402 (HF_HUB_OFFLINE is read when huggingface_hub is imported)
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import time by huggingface_hub

import torch
import transformers
from accelerate import init_empty_weights
from datasets import Dataset
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import Qwen2VLConfig, Qwen2VLModel, UMT5Config, UMT5EncoderModel

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, CausalWanPipeline
from trl_arcopo.memory import (
    QWEN2_VL_2B,
    UMT5_XXL_ENCODER,
    GeneratorSpec,
    GiB,
    RewardSpec,
    estimate_memory,
)
from trl_arcopo.models.self_forcing import WAN_1_3B_CONFIG
from trl_arcopo.rewards.videoalign import VideoAlignReward
from trl_arcopo.scripts.train import PRESETS
from trl_arcopo.testing import populate_hub_cache, record_training_phases, tiny_tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "videoalign_tiny" / "checkpoint"
PHASES = ("rollout", "decode", "reward", "update", "save", "resume")

# Diffusers name -> original `CausalWanModel` name (the inverse of trl_arcopo.models.self_forcing's conversion).
_ORIGINAL_NAMES = [
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
    (".attn1.to_out.0.", ".self_attn.o."),
    (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."),
    (".attn2.to_", ".cross_attn."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
]


def original_name(name: str) -> str:
    if name == "scale_shift_table":
        return "head.modulation"
    if name.endswith(".scale_shift_table"):
        return name.replace(".scale_shift_table", ".modulation")
    for diffusers_name, original in _ORIGINAL_NAMES:
        if diffusers_name in name:
            return name.replace(diffusers_name, original)
    return name


# The models of each mode: transformer config, AutoencoderKLWan config, text encoder width.
MODELS = {
    "real": {"transformer": WAN_1_3B_CONFIG, "vae": {}, "text_dim": UMT5_XXL_ENCODER["d_model"]},
    "quick": {
        "transformer": {**WAN_1_3B_CONFIG, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32,
                        "ffn_dim": 128, "text_dim": 64},
        "vae": {"base_dim": 8},
        "text_dim": 64,
    },
}  # fmt: skip


def stand_in_text_encoder(d_model: int = UMT5_XXL_ENCODER["d_model"]) -> UMT5EncoderModel:
    """One umT5 layer of umT5-XXL's width (or ``d_model``) on the tiny tokenizer's vocabulary: prompt embeddings
    [B, 512, d_model]."""
    torch.manual_seed(0)
    config = {
        **UMT5_XXL_ENCODER,
        "vocab_size": len(tiny_tokenizer()),
        "d_model": d_model,
        "num_layers": 1,
        "num_heads": 1,
        "d_ff": 64,
    }
    return UMT5EncoderModel(UMT5Config(**config)).eval()


def write_hub_cache(cache: Path, dtype: torch.dtype, models: dict) -> None:
    """`gdhe17/Self-Forcing` (a random original-layout checkpoint of `models`' transformer) and
    `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (its transformer config, a random VAE, a 1-layer text encoder of the prompt
    embeddings' width) in the Hub cache `cache`."""
    staging = cache.parent / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    transformer_config = models["transformer"]
    with init_empty_weights(include_buffers=False):
        shapes = {n: p.shape for n, p in WanTransformer3DModel(**transformer_config).named_parameters()}
    generator = torch.Generator().manual_seed(0)
    drawn, state = {}, {}
    for name, shape in shapes.items():
        # Every block gets the first block's random weights, copied (drawing 1.3B normals took ~10 s for no test).
        key = re.sub(r"^blocks\.\d+\.", "blocks.", name)
        if key not in drawn:
            tensor = torch.ones(shape) if ".norm" in name else torch.randn(shape, generator=generator) * 0.02
            drawn[key] = tensor.to(dtype)
        state[f"model.{original_name(name)}"] = drawn[key].clone()
    repo = staging / "self_forcing"
    (repo / "checkpoints").mkdir(parents=True)
    torch.save({"generator_ema": state}, repo / "checkpoints" / "self_forcing_dmd.pt")
    del state
    populate_hub_cache("gdhe17/Self-Forcing", repo, cache_dir=cache, move=True)

    tiny_transformer = WanTransformer3DModel(**{**transformer_config, "num_layers": 1, "ffn_dim": 8})
    base = staging / "wan"
    WanPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=stand_in_text_encoder(models["text_dim"]),
        vae=AutoencoderKLWan(**models["vae"]),
        transformer=tiny_transformer,  # replaced below: only its config is read by from_self_forcing
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    ).save_pretrained(base)
    for weights in (base / "transformer").glob("*.safetensors"):
        weights.unlink()
    config = json.loads((base / "transformer" / "config.json").read_text())
    config.update({k: list(v) if isinstance(v, tuple) else v for k, v in transformer_config.items()})
    (base / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    populate_hub_cache("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", base, cache_dir=cache, move=True)
    shutil.rmtree(staging)


def videoalign_reward(dtype: torch.dtype, quick: bool = False) -> VideoAlignReward:
    """VideoAlign on Qwen2-VL-2B's config, random weights, with the fixture's processor and normalisation (`quick`: the
    fixture itself)."""
    fixture = VideoAlignReward.from_pretrained(FIXTURE, dtype=torch.float32)
    if quick:
        return fixture.to(dtype)
    # Special-token ids that transformers 5 keeps on the text config (bos/eos) or on the top-level one (vision ids).
    configs = (fixture.model.config, fixture.model.config.get_text_config())
    tokens = {
        k: next(getattr(c, k) for c in configs if getattr(c, k, None) is not None)
        for k in QWEN2_VL_2B
        if k.endswith("token_id")
    }
    torch.manual_seed(0)
    model = Qwen2VLModel(Qwen2VLConfig.from_dict({**QWEN2_VL_2B, **tokens})).eval()
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1, bias=False)
    return VideoAlignReward(model, head, fixture.processor, fixture.normalization).to(dtype)


def lora(trainer: ARCoPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced widths and 21 frames: checks the script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--num-anchors", type=int, default=None, help="default: the preset's 4, at most G")
    parser.add_argument("--cache-dir", default="outputs/bench_real_arch", help="the random checkpoints are kept here")
    parser.add_argument("--skip-resume", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_frames = min(args.num_frames, 21)
    models = MODELS["quick" if args.quick else "real"]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    transformers.logging.set_verbosity_error()
    root = Path(args.cache_dir) / ("quick" if args.quick else "real")
    hub, output = root / "hub", root / "run"
    seconds = {}
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device={args.device}, "
        f"dtype={dtype}, threads={torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    t5 = UMT5_XXL_ENCODER
    layer = 4 * t5["d_model"] * t5["num_heads"] * t5["d_kv"] + 3 * t5["d_model"] * t5["d_ff"]  # attention, gated FFN
    print(
        f"# umT5-XXL text encoder (not run): {t5['num_layers'] * layer / 1e9:.2f} B parameters besides the "
        f"embeddings, {2 * t5['num_layers'] * layer * 512 / 1e12:.1f} TFLOP per prompt (512 tokens, once per prompt), "
        f"{GeneratorSpec.self_forcing().text_encoder_bytes / GiB:.1f} GiB in bfloat16"
    )

    start = time.perf_counter()
    if not (hub / "models--gdhe17--Self-Forcing").is_dir():
        write_hub_cache(hub, torch.bfloat16, models)
    seconds["build"] = time.perf_counter() - start
    start = time.perf_counter()
    pipe = CausalWanPipeline.from_self_forcing(cache_dir=hub, dtype=dtype).to(args.device)
    reward = videoalign_reward(dtype, quick=args.quick).to(args.device)
    seconds["load"] = time.perf_counter() - start

    preset = PRESETS["self-forcing"]
    settings = {
        "num_frames": args.num_frames,
        "height": args.height,
        "width": args.width,
        "num_generations": args.num_generations,
        "num_anchors": min(args.num_anchors or 4, args.num_generations),
        "lora_r": 64,
        "lora_alpha": 128,
        "learning_rate": 1e-5,
        "transformer_gradient_checkpointing": preset["transformer_gradient_checkpointing"],
        "reward_weights": preset["reward_weights"],
        "max_steps": 2,  # one rollout, num_iterations = 2 updates
        "save_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "overlap_rewards": False,  # memory is tracked in the main thread
    }
    print(f"# preset self-forcing with {json.dumps({k: settings[k] for k in list(settings)[:5]})}")
    prompts = Dataset.from_dict({"prompt": ["a corgi surfing a wave at sunset"]})
    shutil.rmtree(output, ignore_errors=True)
    config = ARCoPOConfig(output_dir=str(output), **settings)
    trainer = ARCoPOTrainer(pipe, reward, args=config, train_dataset=prompts)
    estimate = estimate_memory(config, GeneratorSpec.from_pipeline(pipe), [RewardSpec.for_reward(reward)])
    with record_training_phases(trainer) as phases:
        trainer.train()
    trained = lora(trainer)
    resumed_diff = None
    if not args.skip_resume:
        pipe.transformer.delete_adapters(config.adapter_name)
        del trainer
        gc.collect()
        resumer = ARCoPOTrainer(pipe, reward, args=config, train_dataset=prompts)
        with record_training_phases(resumer, track_memory=False) as resume_phases:
            resumer.train(resume_from_checkpoint=str(output / "checkpoint-1"))
        resumed = lora(resumer)
        resumed_diff = max((resumed[n] - trained[n]).abs().max().item() for n in trained)
        phases.seconds["resume"] = resume_phases.seconds["resume"]
    weights = sum(
        estimate.phases["rollout"].get(k, 0) for k in ("transformer weights", "text encoder", "VAE", "reward models")
    )
    lora_bytes = estimate.phases["rollout"]["LoRA + AdamW state"] // 3
    # On CPU the tracker sees the tensors allocated during training (not the weights, the LoRA, nor AdamW's moments
    # before the first step); on CUDA the allocator's peak counts everything.
    above = "all allocated memory" if phases.cuda else "tensor memory above the weights and the LoRA"
    print(f"\nphase     seconds   measured GiB   estimated GiB   ({above})")
    for name in ("build", "load"):
        print(f"{name:8s} {seconds[name]:8.1f}")
    for name in PHASES:
        measured = phases.peak_bytes.get(name)
        line = f"{name:8s} {phases.seconds.get(name, 0.0):8.1f}"
        if name in estimate.phases and measured is not None:
            predicted = estimate.total(name)
            if not phases.cuda:
                predicted -= weights + lora_bytes + (0 if name == "update" else 2 * lora_bytes)
            line += f"   {measured / GiB:12.3f}   {predicted / GiB:13.3f}"
        print(line)
    print(f"\ntotal training (rollout .. save): {sum(phases.seconds.values()):.1f} s")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"estimated peak on one GPU at this size: {estimate.peak / GiB:.2f} GiB ({estimate.peak_phase})")
    if resumed_diff is not None:
        print(f"resumed from checkpoint-1: max |LoRA - uninterrupted LoRA| = {resumed_diff:.2e}")


if __name__ == "__main__":
    main()
