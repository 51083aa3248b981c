"""`trl-arcopo generate`: sample videos from a causal Wan pipeline, optionally with LoRAs (e.g. AR-CoPO adapters).

    trl-arcopo generate                                                # tiny offline generator (CPU, seconds)
    trl-arcopo generate --preset self-forcing --prompt "A corgi surfing a wave at sunset"    # real model (GPU)
    trl-arcopo generate --preset self-forcing --lora outputs/self-forcing-arcopo=0.8 --lora my-org/semi-lora
    trl-arcopo generate --model my-org/causal-wan --prompt_file prompts.txt --num_videos_per_prompt 2

Video `k` uses seed `--seed + k`, so a run is reproducible and the same seeds can be compared across LoRAs. Writes
mp4 files when the `video` extra (imageio + imageio-ffmpeg) is installed, else PNG contact sheets of the frames.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from trl_arcopo import CausalWanPipeline
from trl_arcopo.scripts.utils import (
    add_video_size_arguments,
    fail,
    generator_parser,
    load_generator,
    load_lora,
    read_prompt_file,
    video_size,
)
from trl_arcopo.utils.videos import save_video

# (num_frames, height, width) of each preset's generator.
SIZES = {"tiny": (33, 64, 96), "self-forcing": (81, 480, 832)}
DEFAULT_PROMPT = "a red car driving on a road at night"


def parse_lora(spec: str) -> tuple[str, float]:
    """`path_or_repo[=scale]` -> `(path_or_repo, scale)`; the scale defaults to 1.0."""
    source, separator, scale = spec.rpartition("=")
    if not separator:
        return spec, 1.0
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not source or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{spec!r} is not path_or_repo[=scale] (e.g. my-org/lora=0.8)")
    return source, value


def make_parser() -> argparse.ArgumentParser:
    """The generator options (default: the tiny preset), `--lora`, and the sampling ones."""
    parser = generator_parser(prog="trl-arcopo generate", description=__doc__)
    model = parser.add_argument_group("LoRAs and attention window")
    model.add_argument(
        "--lora",
        type=parse_lora,
        action="append",
        default=[],
        metavar="PATH_OR_REPO[=SCALE]",
        help="a LoRA (folder or Hub id with pytorch_lora_weights.safetensors) and its scale (default 1); repeatable",
    )
    model.add_argument("--local_attn_size", type=int, help="attention window in latent frames (-1: global)")
    model.add_argument("--sink_size", type=int, help="first latent frames never evicted from the window")
    model.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the videos are generated"
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--prompt", action="append", default=[], help=f"repeatable; default {DEFAULT_PROMPT!r}")
    sampling.add_argument("--prompt_file", type=Path, help="a text file with one prompt per line")
    sampling.add_argument("--num_videos_per_prompt", type=int, default=1)
    add_video_size_arguments(sampling)
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--fps", type=int, default=16)
    sampling.add_argument("--output_dir", type=Path, default=Path("outputs/videos"))
    return parser


def load_pipeline(args: argparse.Namespace) -> CausalWanPipeline:
    """The generator of `args` (`--model`, or the preset's) on `--device`, with its `--lora` adapters active at their
    scales."""
    pipeline_config = {
        key: value for key in ("local_attn_size", "sink_size") if (value := getattr(args, key)) is not None
    }
    pipe = load_generator(args, device=args.device, **pipeline_config)
    names = [f"lora_{i}" for i in range(len(args.lora))]
    for name, (source, _) in zip(names, args.lora, strict=True):
        load_lora(pipe, source, adapter_name=name, argument=f"--lora {source}")
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in args.lora])
    return pipe


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        prompts += read_prompt_file(args.prompt_file)
    return prompts or [DEFAULT_PROMPT]


def main(argv: list[str] | None = None) -> list[Path]:
    """Generate `--num_videos_per_prompt` videos per prompt and write them to `--output_dir`; returns their paths."""
    args = make_parser().parse_args(argv)
    prompts = _prompts(args)
    if args.num_videos_per_prompt < 1:
        fail(f"--num_videos_per_prompt must be >= 1, got {args.num_videos_per_prompt}")
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    num_frames, height, width = video_size(args, SIZES)
    paths = []
    for index, prompt in enumerate(p for p in prompts for _ in range(args.num_videos_per_prompt)):
        generator = torch.Generator().manual_seed(args.seed + index)
        try:
            frames = pipe(
                prompt, num_frames=num_frames, height=height, width=width, generator=generator, output_type="pt"
            ).frames[0]
        except ValueError as error:  # sizes the pipeline rejects
            fail(error)
        path = save_video(frames, args.output_dir / f"video_{index:03d}", fps=args.fps)
        print(f"{path}: {len(frames)} frames of {width}x{height}, seed {args.seed + index}, {prompt!r}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
