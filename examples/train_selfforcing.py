"""Align a causal video generator with AR-CoPO.

    python examples/train_selfforcing.py --preset tiny                    # offline, a few minutes on 2 CPU cores
    accelerate launch examples/train_selfforcing.py --preset self-forcing --prompt_file prompts.txt \\
        --output_dir self-forcing-arcopo --push_to_hub
    python examples/train_selfforcing.py --config examples/configs/tiny.yaml

Every `ARCoPOConfig` field is a flag (`--num_generations 12`, `--learning_rate 1e-5`, ...); a preset only changes
defaults, and flags or `--config` YAML keys override it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from trl import TrlParser

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, CausalWanPipeline
from trl_arcopo.testing import TINY_TRAINING_ARGS, tiny_causal_wan_pipeline

TINY_PROMPTS = [
    "a red car driving on a road at night",
    "a cat sitting on a wooden table",
    "waves on the sea at sunset",
    "a dog running in the park",
    "a city street in the rain",
    "a bird flying over the mountains",
]

# Defaults of each preset (flags and YAML keys override them).
PRESETS: dict[str, dict] = {
    "tiny": {
        **TINY_TRAINING_ARGS,
        "output_dir": "outputs/arcopo-tiny",
        "max_steps": 60,
        "save_steps": 20,
        "log_videos_steps": 30,
        "reward_funcs": ["brightness"],
    },
    "self-forcing": {
        "output_dir": "outputs/self-forcing-arcopo",
        "num_frames": 81,
        "height": 480,
        "width": 832,
        "num_generations": 12,
        "num_anchors": 4,
        "noise_sigma": 0.5,
        "learning_rate": 1e-5,
        "max_steps": 200,
        "save_steps": 25,
        "transformer_gradient_checkpointing": True,
        "model_init_kwargs": {"dtype": "bfloat16"},
        "reward_funcs": ["temporal_flicker", "colorfulness"],
    },
}


@dataclass
class ScriptArguments:
    """What to train and on which prompts (the AR-CoPO settings are in `ARCoPOConfig`)."""

    preset: str = field(default="tiny", metadata={"help": "Defaults to start from: 'tiny' or 'self-forcing'."})
    model: str | None = field(
        default=None,
        metadata={"help": "A saved CausalWanPipeline (Hub id or folder). Default: the preset's generator."},
    )
    self_forcing_checkpoint: str = field(
        default="gdhe17/Self-Forcing", metadata={"help": "Original Self-Forcing checkpoint (Hub id or file)."}
    )
    base_model: str = field(
        default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", metadata={"help": "Wan2.1 pipeline giving tokenizer/umT5/VAE."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["brightness"],
        metadata={"help": "Reward names: temporal_flicker, colorfulness, brightness, sharpness."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (or local path) with a 'prompt' column."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset_name`."})
    prompt_file: str | None = field(default=None, metadata={"help": "Text file with one prompt per line."})


def _fail(message: str) -> None:
    """One clear line on stderr and exit code 2 (argparse's convention), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, ARCoPOConfig))


def parse(argv: list[str] | None = None) -> tuple[ScriptArguments, ARCoPOConfig]:
    argv = sys.argv[1:] if argv is None else argv
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset", default="tiny")
    preset = early.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        _fail(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    parser = make_parser()
    parser.set_defaults(**PRESETS[preset])
    script_args, config = parser.parse_args_and_config(argv)
    return script_args, config


def load_prompts(script_args: ScriptArguments) -> Dataset:
    if script_args.prompt_file:
        path = Path(script_args.prompt_file)
        if not path.is_file():
            _fail(f"--prompt_file {path} is not a readable file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            _fail(f"--prompt_file {path} has no prompts")
        return Dataset.from_dict({"prompt": prompts})
    if script_args.dataset_name:
        return load_dataset(script_args.dataset_name, split=script_args.dataset_split)
    if script_args.preset == "tiny":
        return Dataset.from_dict({"prompt": TINY_PROMPTS})
    _fail("the self-forcing preset needs prompts: pass --prompt_file or --dataset_name")


def load_model(script_args: ScriptArguments, config: ARCoPOConfig) -> CausalWanPipeline | str:
    if script_args.model:
        return script_args.model
    if script_args.preset == "tiny":
        return tiny_causal_wan_pipeline()
    dtype = getattr(torch, (config.model_init_kwargs or {}).get("dtype", "bfloat16"))
    return CausalWanPipeline.from_self_forcing(
        script_args.self_forcing_checkpoint, script_args.base_model, dtype=dtype
    )


def main(argv: list[str] | None = None) -> ARCoPOTrainer:
    script_args, config = parse(argv)
    prompts = load_prompts(script_args)
    trainer = ARCoPOTrainer(
        load_model(script_args, config), script_args.reward_funcs, args=config, train_dataset=prompts
    )
    trainer.train()
    trainer.save_model()
    if trainer.accelerator.is_main_process:
        from trl_arcopo.utils.videos import save_video

        video = trainer.pipeline(
            "a red car driving on a road at night" if script_args.preset == "tiny" else prompts[0]["prompt"],
            num_frames=config.num_frames,
            height=config.height,
            width=config.width,
            generator=torch.Generator().manual_seed(config.seed),
            output_type="pt",
        ).frames[0]
        path = save_video(video, Path(config.output_dir) / "sample", fps=config.video_fps)
        print(f"LoRA, model card and a sample video ({path.name}) written to {config.output_dir}")
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    main()
