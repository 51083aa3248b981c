"""The time split of one AR-CoPO training iteration (rollout, decode, reward, update), before and after reusing the
rollout's context for the first update of each group, measured in one run.

"Before" recomputes the pivot chunk's context (the KV cache of the prefix) for every update, as the trainer did; "after"
takes the rollout's own for the first update of a group (the policy has not stepped since), so only the second of the
`num_iterations = 2` updates recomputes it. One iteration = one rollout group, its decoding and scoring, two updates.
Runs alternate (before, after, before, ...); the medians and the after/before ratios are printed per phase.

    python benchmarks/bench_iteration.py                            # medium and the reduced real architecture
    python benchmarks/bench_iteration.py --sizes medium --repeats 5

Sizes: `medium` is the transformer of bench_pipeline.py (4 layers, 4x64 heads; the tiny text encoder: prompts
[1, 64, 32]) with a small VAE, 81 frames at 128x208, G = 12, 4 anchors; `real` is the 1.3B transformer, the real Wan
VAE and prompts [1, 512, 4096] (bench_real_arch.py's stand-in text encoder), random weights, at 32x32, G = 4, 4 anchors,
with transformer_gradient_checkpointing. The reward is `brightness` (VideoAlign's cost: bench_real_arch.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import transformers
from bench_real_arch import stand_in_text_encoder  # the sibling script (benchmarks/ is on sys.path)
from datasets import Dataset
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, CausalWanPipeline
from trl_arcopo.models.self_forcing import WAN_1_3B_CONFIG
from trl_arcopo.testing import record_training_phases, tiny_components

PHASES = ("rollout", "decode", "reward", "update")
MEDIUM = {"num_attention_heads": 4, "attention_head_dim": 64, "text_dim": 32, "ffn_dim": 1024, "num_layers": 4}
SIZES = {
    # transformer overrides, VAE config, training settings
    "medium": (MEDIUM, {"base_dim": 8}, {"height": 128, "width": 208, "num_generations": 12}),
    "real": ({}, {}, {"height": 32, "width": 32, "num_generations": 4, "transformer_gradient_checkpointing": True}),
}


def build(size: str) -> CausalWanPipeline:
    transformer_overrides, vae_config, _ = SIZES[size]
    components = tiny_components()
    if size == "real":
        components["text_encoder"] = stand_in_text_encoder()
    torch.manual_seed(0)
    components["transformer"] = WanTransformer3DModel(**{**WAN_1_3B_CONFIG, **transformer_overrides}).eval()
    components["vae"] = AutoencoderKLWan(**vae_config).eval()
    return CausalWanPipeline(**components, max_sequence_length=512 if size == "real" else 64)


def iteration(pipe: CausalWanPipeline, size: str, *, reuse: bool) -> dict[str, float]:
    """Seconds of each phase of one training iteration (one group, two updates)."""
    args = ARCoPOConfig(
        output_dir="outputs/bench_iteration",
        num_frames=81,
        num_anchors=4,
        lora_r=64,
        lora_alpha=128,
        max_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        overlap_rewards=False,
        **SIZES[size][2],
    )
    trainer = ARCoPOTrainer(pipe, "brightness", args=args, train_dataset=Dataset.from_dict({"prompt": ["a cat"]}))
    if not reuse:  # "before": no rollout context, every update recomputes it
        rollout = trainer._rollout_group

        def rollout_without_context(row):
            group = rollout(row)
            group.context = None
            return group

        trainer._rollout_group = rollout_without_context
    with record_training_phases(trainer, track_memory=False) as phases:
        trainer.train()
    pipe.transformer.delete_adapters(args.adapter_name)
    return {name: phases.seconds[name] for name in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["medium", "real"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, float32, "
        f"threads={torch.get_num_threads()}, {args.repeats} interleaved runs each (median)"
    )
    print("size    variant  " + "  ".join(f"{p:>8s}" for p in PHASES) + "     total")
    for size in args.sizes:
        pipe = build(size)
        runs = {"before": [], "after": []}
        for _ in range(args.repeats):
            for variant in runs:
                runs[variant].append(iteration(pipe, size, reuse=variant == "after"))
        medians = {
            variant: {p: statistics.median(r[p] for r in results) for p in PHASES} for variant, results in runs.items()
        }
        for variant, split in medians.items():
            cells = "  ".join(f"{split[p]:8.2f}" for p in PHASES)
            print(f"{size:7s} {variant:7s}  {cells}  {sum(split.values()):8.2f}")
        ratios = {p: medians["after"][p] / medians["before"][p] for p in PHASES}
        total = sum(medians["after"].values()) / sum(medians["before"].values())
        print(f"{size:7s} {'ratio':7s}  " + "  ".join(f"{ratios[p]:8.3f}" for p in PHASES) + f"  {total:8.3f}")


if __name__ == "__main__":
    main()
