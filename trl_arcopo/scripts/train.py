"""`trl-arcopo train`: align a causal video generator with AR-CoPO.

    trl-arcopo train                                       # the toy preset: offline, minutes on 2 CPU cores
    trl-arcopo train --preset tiny                         # random weights, for quick checks
    trl-arcopo train --config examples/configs/self_forcing_on_policy.yaml --prompt_file prompts.txt
    trl-arcopo train --accelerate_config multi_gpu --num_processes 8 --preset self-forcing \\
        --dataset_name <hub dataset with a prompt column> --push_to_hub
    trl-arcopo train --preset tiny --training_mode semi_on_policy --replay_dataset outputs/replay-tiny
    accelerate launch -m trl_arcopo.scripts.train --preset self-forcing --prompt_file prompts.txt

Every `ARCoPOConfig` field is a flag (`--num_generations 12`, `--learning_rate 1e-5`, ...). A preset only changes
defaults; `--config` YAML keys override the preset and flags override both. Semi-on-policy training
(`--training_mode semi_on_policy`) takes its prompts from the replay buffer `--replay_dataset` (written by
`trl-arcopo collect`), not from `--prompt_file` / `--dataset_name`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trl_arcopo.presets import TINY_TRAINING_ARGS, TOY_TRAINING_ARGS
from trl_arcopo.scripts.utils import (
    PRESET_GEOMETRY,
    GeneratorArguments,
    ScriptParser,
    check_reward_names,
    check_video_size,
    fail,
    is_missing_path,
    load_generator,
    load_prompt_dataset,
    parse_with_preset,
    read_prompt_file,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from trl_arcopo import ARCoPOConfig, ARCoPOTrainer

TOY_NUM_PROMPTS = 64
NUM_COMPARED = 4  # prompts in the before/after video
TINY_PROMPTS = [
    "a red car driving on a road at night",
    "a cat sitting on a wooden table",
    "waves on the sea at sunset",
    "a dog running in the park",
    "a city street in the rain",
    "a bird flying over the mountains",
]

# Defaults of each preset (YAML keys and flags override them). The AR-CoPO hyper-parameters of the paper
# (docs/method.md §12: G=12, σ=0.5, B=4, ε=1e-4, μ=2, LoRA 64/128, lr 1e-5, 81x480x832) are the `ARCoPOConfig` defaults.
PRESETS: dict[str, dict] = {
    # The trained toy-world generator (trl_arcopo.toy), with a reward a person sees at once: the videos turn red.
    "toy": {
        **TOY_TRAINING_ARGS,
        "output_dir": "outputs/arcopo-toy",
        "max_steps": 60,
        "save_steps": 30,
        "log_videos_steps": 30,
        "reward_funcs": ["redness"],
    },
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
        "dtype": "bfloat16",
        # VideoAlign's three heads, optimized jointly (the paper's reward); a column without a weight counts 0.
        "reward_funcs": ["videoalign"],
        "reward_weights": {"videoalign:VQ": 1.0, "videoalign:MQ": 1.0, "videoalign:TA": 1.0},
    },
}


@dataclass
class ScriptArguments(GeneratorArguments):
    """What to train and on which prompts (the AR-CoPO settings are in `ARCoPOConfig`)."""

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


def make_parser() -> ScriptParser:
    """The parser of `ScriptArguments` and `ARCoPOConfig` (reads `--config file.yaml`), without preset defaults."""
    from trl_arcopo import ARCoPOConfig  # imports transformers' TrainingArguments (seconds): after `check_args`

    return ScriptParser((ScriptArguments, ARCoPOConfig), prog="trl-arcopo train")


def check_args(argv: list[str] | None = None) -> ScriptArguments:
    """The checks that need no heavy import (the script's own options: preset, rewards, prompts), run before the
    `ARCoPOConfig` ones; bad input exits with code 2 within about a second. Returns the script's arguments."""
    parser = ScriptParser(ScriptArguments, prog="trl-arcopo train", add_help=False)  # `--help` is the full parser's
    (script_args,) = parse_with_preset(parser, PRESETS, argv, partial=True)
    check_reward_names(script_args.reward_funcs, "--reward_funcs")
    if script_args.prompt_file:
        read_prompt_file(script_args.prompt_file)
    return script_args


def parse(argv: list[str] | None = None) -> tuple[ScriptArguments, ARCoPOConfig]:
    """Parse flags and `--config` on top of the requested preset's defaults; bad input exits with code 2."""
    check_args(argv)
    script_args, config = parse_with_preset(make_parser(), PRESETS, argv)
    # A preset's video geometry is known before its generator loads; a `--model`'s is checked by the trainer.
    geometry = None if script_args.model else PRESET_GEOMETRY[script_args.preset]
    check_video_size(config.num_frames, config.height, config.width, geometry=geometry)
    if config.model_init_kwargs:
        fail(
            "--model_init_kwargs is not read by this script, which loads the generator itself: use --dtype and "
            "--model_revision"
        )
    if config.training_mode == "semi_on_policy" and (script_args.prompt_file or script_args.dataset_name):
        fail(
            "--training_mode semi_on_policy trains on the prompts of the replay buffer --replay_dataset: remove "
            "--prompt_file / --dataset_name"
        )
    if config.replay_dataset is not None and is_missing_path(config.replay_dataset):
        fail(f"--replay_dataset: the folder {config.replay_dataset} does not exist; for a Hub dataset use org/name")
    return script_args, config


def load_prompts(script_args: ScriptArguments) -> Dataset:
    """The training prompts as a dataset with a `prompt` column: `--prompt_file`, `--dataset_name`, or (toy and tiny
    presets only) built-in prompts: captions of random toy-world scenes, or a few fixed prompts."""
    from datasets import Dataset

    if script_args.prompt_file:
        return Dataset.from_dict({"prompt": read_prompt_file(script_args.prompt_file)})
    if script_args.dataset_name:
        return load_prompt_dataset(
            script_args.dataset_name,
            config=script_args.dataset_config,
            split=script_args.dataset_split,
            column=script_args.dataset_prompt_column,
        )
    if script_args.preset == "toy":
        from trl_arcopo.toy import sample_captions

        return Dataset.from_dict({"prompt": sample_captions(TOY_NUM_PROMPTS, seed=0)})
    if script_args.preset == "tiny":
        return Dataset.from_dict({"prompt": TINY_PROMPTS})
    fail(f"the {script_args.preset} preset needs prompts: pass --prompt_file or --dataset_name")


def write_before_after(trainer: ARCoPOTrainer, prompts: list[str], config: ARCoPOConfig) -> Path:
    """Generate ``prompts`` with the base model (adapters off) and with the LoRA, from the same noises, and write them
    side by side (a row per prompt, base left) as ``output_dir/before_after.mp4`` (a PNG of its frames without the
    ``video`` extra) plus ``before_after_frames.png`` (4 moments of it). Returns the video's path."""
    import torch

    from trl_arcopo.utils.videos import comparison_video, contact_sheet, save_video, to_pil_frames

    pipe = trainer.pipeline

    def generate() -> torch.Tensor:
        kwargs = {"num_frames": config.num_frames, "height": config.height, "width": config.width}
        generator = torch.Generator().manual_seed(config.seed)
        return pipe(prompts, generator=generator, output_type="pt", **kwargs).frames

    with pipe.adapters_disabled():
        before = generate()
    after = generate()
    video = comparison_video([before, after], scale=max(1, 128 // min(config.height, config.width)))
    output_dir = Path(config.output_dir)
    moments = torch.linspace(0, len(video) - 1, 4).round().long()
    contact_sheet(to_pil_frames(video[moments]), columns=4).save(output_dir / "before_after_frames.png")
    return save_video(video, output_dir / "before_after", fps=config.video_fps)


def main(argv: list[str] | None = None) -> ARCoPOTrainer:
    """Train, save the LoRA and its model card, write a sample video, and push to the Hub if asked.

    Returns the trainer (for in-process use); bad input exits with code 2 and one line on stderr.
    """
    script_args, config = parse(argv)
    from trl_arcopo import ARCoPOTrainer  # the heavy imports, once the arguments are known to be good

    semi_on_policy = config.training_mode == "semi_on_policy"
    prompts = None if semi_on_policy else load_prompts(script_args)  # the replay buffer brings its own
    model = load_generator(script_args, device=config.device)
    try:
        trainer = ARCoPOTrainer(model, script_args.reward_funcs, args=config, train_dataset=prompts)
    except (OSError, ValueError) as error:  # a reward or buffer that cannot be loaded, settings they reject
        fail(error)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if trainer.accelerator.is_main_process:
        path = write_before_after(trainer, list(trainer.train_dataset["prompt"][:NUM_COMPARED]), config)
        print(f"LoRA, model card and the base model vs the LoRA ({path.name}) written to {config.output_dir}")
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=config.replay_dataset if semi_on_policy else script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    main()
