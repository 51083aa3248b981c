"""The GPU measurements of benchmarks/gpu_suite.sh (run that script: it prepares the environment), written to one JSON.

1. `pipeline`: generation at batch 1 and 4 (1.3B transformer, random weights, bf16, 81 frames at 480x832, no VAE or
   text encoder, as the recorded original Self-Forcing figures): seconds per video and peak memory, next to the
   original's (2.81 s/video and 8.7 GiB at batch 1, 10.1 s per batch of 4).
2. `group`: one G = 12 rollout group (prefix once, 12 branches batched) at pivots 0, 3 and 6, next to 12 original
   videos at batch 12 (29.8 s, 74 GiB).
3. `training`: one training iteration of the self-forcing preset (real architectures with random weights: the 1.3B
   transformer, the Wan VAE, VideoAlign on Qwen2-VL-2B, prompts [1, 512, 4096]; G = 12, 4 anchors, 2 updates with
   transformer_gradient_checkpointing): seconds and peak memory of each phase next to `trl_arcopo.memory`'s estimate.

`--tiny` runs the same code at tiny sizes on CPU (tests/test_gpu_suite.py), so the script cannot rot. `--compile`
runs everything with the compiled pipeline (`CausalWanPipeline.compile()`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, CausalWanPipeline
from trl_arcopo.memory import QWEN2_VL_2B, GeneratorSpec, GiB, RewardSpec, estimate_memory
from trl_arcopo.models.self_forcing import WAN_1_3B_CONFIG, cast_transformer
from trl_arcopo.rewards.videoalign import VideoAlignReward
from trl_arcopo.rollout import GroupNoise, generate_group
from trl_arcopo.testing import record_training_phases, tiny_components, tiny_transformer_config

ORIGINAL = {  # original Self-Forcing, one H200, bf16, SDPA, random weights, no VAE / text encoder
    "batch_1": {"seconds_per_video": 2.81, "peak_gib": 8.7},
    "batch_4": {"seconds_per_batch": 10.1, "peak_gib": 26.5},
    "group_12": {"seconds": 29.8, "peak_gib": 74.0},
}
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "videoalign_tiny" / "checkpoint"


def sizes(tiny: bool) -> dict:
    if tiny:
        return {"frames": 21, "height": 32, "width": 32, "text": (16, 32), "generations": 4, "pivots": [0, 1]}
    return {"frames": 81, "height": 480, "width": 832, "text": (512, 4096), "generations": 12, "pivots": [0, 3, 6]}


def generator(tiny: bool, device: str, dtype: torch.dtype, compile_pipeline: bool) -> CausalWanPipeline:
    """The generator alone (no VAE, no text encoder), random weights."""
    torch.manual_seed(0)
    config = tiny_transformer_config() if tiny else WAN_1_3B_CONFIG
    transformer = cast_transformer(WanTransformer3DModel(**config), dtype).eval()
    return prepare(CausalWanPipeline(None, None, None, transformer).to(device), compile_pipeline)


def prepare(pipe: CausalWanPipeline, compile_pipeline: bool) -> CausalWanPipeline:
    """The hook of `--compile`: the compiled pipeline path (regional compilation of the transformer's blocks; the
    warm-up call of each measurement compiles)."""
    pipe.set_progress_bar_config(disable=True)
    if compile_pipeline:
        pipe.compile()
    return pipe


def timed(fn, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of `repeats` calls after a warm-up, and the peak memory of those calls in GiB (CUDA)."""
    fn()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")


def measure_pipeline(pipe, size: dict, device: str, repeats: int) -> dict:
    results = {}
    tokens, text_dim = size["text"]
    for batch in (1, 4):
        embeds = torch.randn(batch, tokens, text_dim, generator=torch.Generator().manual_seed(0)).to(device)

        def run(embeds=embeds):
            return pipe(prompt_embeds=embeds, num_frames=size["frames"], height=size["height"], width=size["width"],
                        generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip

        seconds, peak = timed(run, device, repeats)
        results[f"batch_{batch}"] = {
            "seconds_per_batch": seconds,
            "seconds_per_video": seconds / batch,
            "peak_gib": peak,
        }
    return results


def measure_group(pipe, size: dict, device: str) -> dict:
    tokens, text_dim = size["text"]
    embeds = torch.randn(1, tokens, text_dim, generator=torch.Generator().manual_seed(0)).to(device)
    latent_shape = pipe.latent_shape(size["frames"], size["height"], size["width"])
    results = {}
    for pivot in size["pivots"]:
        noise = GroupNoise.draw(
            num_generations=size["generations"],
            latent_shape=latent_shape,
            chunk_frames=pipe.config.num_frame_per_block,
            num_steps=len(pipe.timesteps),
            pivot=pivot,
            generator=torch.Generator().manual_seed(pivot),
            device=device,
        )

        def run(noise=noise, pivot=pivot):
            return generate_group(pipe, embeds, num_generations=size["generations"], latent_shape=latent_shape,
                                  pivot=pivot, noise=noise, decode=False)  # fmt: skip

        seconds, peak = timed(run, device, repeats=1)
        results[f"pivot_{pivot}"] = {"seconds": seconds, "peak_gib": peak}
    results["mean_seconds"] = statistics.mean(r["seconds"] for r in results.values())
    return results


def measure_training(tiny: bool, size: dict, device: str, dtype: torch.dtype, compile_pipeline: bool) -> dict:
    """One iteration (one group, its decoding and scoring, two updates) of the self-forcing preset's settings."""
    components = tiny_components()
    fixture = VideoAlignReward.from_pretrained(FIXTURE, dtype=torch.float32)
    if tiny:
        reward = fixture
    else:
        from bench_real_arch import stand_in_text_encoder  # the sibling script (benchmarks/ is on sys.path)
        from transformers import Qwen2VLConfig, Qwen2VLModel

        torch.manual_seed(0)
        components["text_encoder"] = stand_in_text_encoder()
        components["vae"] = AutoencoderKLWan()
        components["transformer"] = WanTransformer3DModel(**WAN_1_3B_CONFIG)
        tokens = {k: getattr(fixture.model.config, k) for k in QWEN2_VL_2B if k.endswith("token_id")}
        model = Qwen2VLModel(Qwen2VLConfig.from_dict({**QWEN2_VL_2B, **tokens})).eval()
        head = torch.nn.Linear(model.config.text_config.hidden_size, 1, bias=False)
        reward = VideoAlignReward(model, head, fixture.processor, fixture.normalization)
    cast_transformer(components["transformer"], dtype)
    components["vae"].to(dtype)
    components["text_encoder"].to(dtype)
    pipe = CausalWanPipeline(**components, max_sequence_length=size["text"][0])
    pipe = prepare(pipe.to(device), compile_pipeline)
    reward = reward.to(device=device, dtype=dtype)
    args = ARCoPOConfig(
        output_dir="outputs/gpu_suite",
        num_frames=size["frames"],
        height=size["height"],
        width=size["width"],
        num_generations=size["generations"],
        transformer_gradient_checkpointing=True,
        reward_weights={"videoalign:VQ": 1.0, "videoalign:MQ": 1.0, "videoalign:TA": 1.0},
        max_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        overlap_rewards=False,
    )
    trainer = ARCoPOTrainer(pipe, reward, args=args, train_dataset=Dataset.from_dict({"prompt": ["a corgi surfing"]}))
    estimate = estimate_memory(args, GeneratorSpec.from_pipeline(pipe), [RewardSpec.for_reward(reward)])
    with record_training_phases(trainer) as phases:
        trainer.train()
    return {
        phase: {
            "seconds": phases.seconds.get(phase, 0.0),
            "peak_gib": phases.peak_bytes.get(phase, 0) / GiB,
            "estimated_gib": estimate.total(phase) / GiB,
        }
        for phase in estimate.phases
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU check of the script itself")
    parser.add_argument("--compile", action="store_true", help="generate with the compiled pipeline")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = sizes(args.tiny)
    report = {
        "environment": {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype),
            "compile": args.compile,
            "tiny": args.tiny,
            "size": size,
            # CUDA: the allocator's peak, weights included, comparable to the estimate. CPU (--tiny): the tensors
            # allocated during the phase only (the weights came before), so below the estimate.
            "peak_memory": "torch.cuda.max_memory_allocated" if device == "cuda" else "tensors allocated in the phase",
        },
        "original": ORIGINAL,
    }
    start = time.perf_counter()
    pipe = generator(args.tiny, device, dtype, args.compile)
    report["pipeline"] = measure_pipeline(pipe, size, device, args.repeats)
    report["group"] = measure_group(pipe, size, device)
    del pipe
    report["training"] = measure_training(args.tiny, size, device, dtype, args.compile)
    report["seconds"] = time.perf_counter() - start
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
