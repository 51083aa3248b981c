"""`trl-arcopo train`: align a causal video generator with AR-CoPO.

    trl-arcopo train --preset tiny                         # offline, about a minute on 2 CPU cores
    trl-arcopo train --config examples/configs/self_forcing_on_policy.yaml --prompt_file prompts.txt
    trl-arcopo train --accelerate_config multi_gpu --num_processes 8 --preset self-forcing \\
        --dataset_name <hub dataset with a prompt column> --push_to_hub
    accelerate launch -m trl_arcopo.scripts.train --preset self-forcing --prompt_file prompts.txt

Every `ARCoPOConfig` field is a flag (`--num_generations 12`, `--learning_rate 1e-5`, ...). A preset only changes
defaults; `--config` YAML keys override the preset and flags override both.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import yaml
from datasets import Dataset, load_dataset
from trl import TrlParser

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, CausalWanPipeline
from trl_arcopo.testing import TINY_TRAINING_ARGS, tiny_causal_wan_pipeline
from trl_arcopo.utils.videos import save_video

TINY_PROMPTS = [
    "a red car driving on a road at night",
    "a cat sitting on a wooden table",
    "waves on the sea at sunset",
    "a dog running in the park",
    "a city street in the rain",
    "a bird flying over the mountains",
]

# Defaults of each preset (YAML keys and flags override them). The AR-CoPO hyper-parameters of the paper (METHOD.md
# §7: G=12, σ=0.5, B=4, ε=1e-4, μ=2, LoRA 64/128, lr 1e-5, 81x480x832) are the `ARCoPOConfig` defaults.
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
        "max_steps": 200,  # 100 rollout iterations x μ=2 updates
        "save_steps": 25,
        "transformer_gradient_checkpointing": True,
        "model_init_kwargs": {"dtype": "bfloat16"},
        # VideoAlign's three heads, optimized jointly (the paper's reward); a column without a weight counts 0.
        "reward_funcs": ["videoalign"],
        "reward_weights": {"videoalign:VQ": 1.0, "videoalign:MQ": 1.0, "videoalign:TA": 1.0},
    },
}


@dataclass
class ScriptArguments:
    """What to train and on which prompts (the AR-CoPO settings are in `ARCoPOConfig`)."""

    preset: str = field(
        default="tiny", metadata={"help": f"Defaults to start from: one of {', '.join(sorted(PRESETS))}."}
    )
    model: str | None = field(
        default=None,
        metadata={"help": "A saved CausalWanPipeline (Hub id or folder). Default: the preset's generator."},
    )
    self_forcing_checkpoint: str = field(
        default="gdhe17/Self-Forcing",
        metadata={"help": "Original Self-Forcing checkpoint (Hub id or file) of the self-forcing preset."},
    )
    base_model: str = field(
        default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", metadata={"help": "Wan2.1 pipeline giving tokenizer/umT5/VAE."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["brightness"],
        metadata={
            "help": "Reward names resolved by the trainer: videoalign, pickscore, clipscore, aesthetic, a reward "
            "server URL, or a built-in (temporal_flicker, colorfulness, brightness, sharpness)."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (or local path) holding the training prompts."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of `dataset_name`."})
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset_name`."})
    dataset_prompt_column: str = field(default="prompt", metadata={"help": "Column of `dataset_name` with prompts."})
    prompt_file: str | None = field(default=None, metadata={"help": "Text file with one prompt per line."})


def _fail(message: str) -> NoReturn:
    """One clear line on stderr and exit code 2 (argparse's convention), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def make_parser() -> TrlParser:
    """The parser of `ScriptArguments` and `ARCoPOConfig` (reads `--config file.yaml`), without preset defaults."""
    return TrlParser((ScriptArguments, ARCoPOConfig), prog="trl-arcopo train")


def _requested_preset(argv: list[str]) -> str:
    """The preset named by `--preset`, else by the `--config` YAML, else "tiny"."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset")
    early.add_argument("--config")
    known = early.parse_known_args(argv)[0]
    if known.preset is not None:
        return known.preset
    if known.config is not None:
        try:
            config = yaml.safe_load(Path(known.config).read_text())
        except (OSError, yaml.YAMLError) as error:
            _fail(f"--config {known.config} is not a readable YAML file: {_one_line(error)}")
        if isinstance(config, dict) and "preset" in config:
            return config["preset"]
    return "tiny"


def parse(argv: list[str] | None = None) -> tuple[ScriptArguments, ARCoPOConfig]:
    """Parse flags and `--config` on top of the requested preset's defaults; bad input exits with code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = _requested_preset(argv)
    if preset not in PRESETS:
        _fail(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    parser = make_parser()
    parser.set_defaults(**PRESETS[preset])
    try:
        script_args, config, unknown_keys, unknown_flags = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as error:  # invalid ARCoPOConfig values
        _fail(_one_line(error))
    if unknown_keys:
        names = ", ".join(key.removeprefix("--") for key in unknown_keys[::2])
        _fail(f"unknown key(s) in the --config file: {names} (`--help` lists the valid ones)")
    if unknown_flags:
        _fail(f"unrecognized arguments: {' '.join(unknown_flags)} (`--help` lists the valid ones)")
    return script_args, config


def load_prompts(script_args: ScriptArguments) -> Dataset:
    """The training prompts as a dataset with a `prompt` column: `--prompt_file`, `--dataset_name`, or (tiny preset
    only) a few built-in prompts."""
    if script_args.prompt_file:
        path = Path(script_args.prompt_file)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            _fail(f"--prompt_file {path} is not a readable text file")
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            _fail(f"--prompt_file {path} has no prompts")
        return Dataset.from_dict({"prompt": prompts})
    if script_args.dataset_name:
        try:
            dataset = load_dataset(
                script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_split
            )
        except (OSError, ValueError) as error:
            _fail(f"cannot load --dataset_name {script_args.dataset_name}: {_one_line(error)}")
        column = script_args.dataset_prompt_column
        if column not in dataset.column_names:
            _fail(
                f"--dataset_name {script_args.dataset_name} has no column {column!r} ({dataset.column_names}); "
                "set --dataset_prompt_column"
            )
        return dataset if column == "prompt" else dataset.rename_column(column, "prompt")
    if script_args.preset == "tiny":
        return Dataset.from_dict({"prompt": TINY_PROMPTS})
    _fail(f"the {script_args.preset} preset needs prompts: pass --prompt_file or --dataset_name")


def load_model(script_args: ScriptArguments, config: ARCoPOConfig) -> CausalWanPipeline | str:
    """The generator to align: `--model` (loaded by the trainer), the tiny offline pipeline, or Self-Forcing."""
    if script_args.model:
        return script_args.model
    if script_args.preset == "tiny":
        return tiny_causal_wan_pipeline()
    dtype = getattr(torch, (config.model_init_kwargs or {}).get("dtype", "bfloat16"))
    return CausalWanPipeline.from_self_forcing(
        script_args.self_forcing_checkpoint, script_args.base_model, dtype=dtype
    )


def main(argv: list[str] | None = None) -> ARCoPOTrainer:
    """Train, save the LoRA and its model card, write a sample video, and push to the Hub if asked.

    Returns the trainer (for in-process use); bad input exits with code 2 and one line on stderr.
    """
    script_args, config = parse(argv)
    prompts = load_prompts(script_args)
    try:
        model = load_model(script_args, config)
    except OSError as error:
        _fail(
            f"cannot load the {script_args.preset} generator ({script_args.self_forcing_checkpoint} + "
            f"{script_args.base_model}): {_one_line(error)} Check the ids, the network and HF_HUB_OFFLINE, or pass "
            "--model"
        )
    try:
        trainer = ARCoPOTrainer(model, script_args.reward_funcs, args=config, train_dataset=prompts)
    except (OSError, ValueError) as error:  # a `--model` or reward that cannot be loaded, settings they reject
        _fail(_one_line(error))
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if trainer.accelerator.is_main_process:
        video = trainer.pipeline(
            prompts[0]["prompt"],
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
