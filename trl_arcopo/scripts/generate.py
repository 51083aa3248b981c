"""`trl-arcopo generate`: sample videos from a causal Wan pipeline, optionally with LoRAs (e.g. AR-CoPO adapters).

    trl-arcopo generate                                                # tiny offline generator (CPU, seconds)
    trl-arcopo generate --preset self-forcing --prompt "A corgi surfing a wave at sunset"    # real model (GPU)
    trl-arcopo generate --preset self-forcing --lora outputs/self-forcing-arcopo=0.8 --lora my-org/semi-lora
    trl-arcopo generate --model my-org/causal-wan --prompt_file prompts.txt --num_videos_per_prompt 2

Video `k` uses seed `--seed + k`, so a run is reproducible and the same seeds can be compared across LoRAs. The
video size defaults to the one the LoRA was trained at (read from the `training_args.json` that `trl-arcopo train`
saves next to it), else to the preset's. Writes mp4 files when the `video` extra (imageio + imageio-ffmpeg) is
installed, else PNG contact sheets of the frames.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from trl_arcopo.scripts.utils import (
    add_video_size_arguments,
    fail,
    generator_parser,
    is_missing_path,
    load_generator,
    load_lora,
    looks_local,
    read_prompt_file,
    video_size,
)

if TYPE_CHECKING:
    from trl_arcopo import CausalWanPipeline

# (num_frames, height, width) of each preset's generator.
SIZES = {"toy": (12, 32, 32), "tiny": (33, 64, 96), "self-forcing": (81, 480, 832)}
DEFAULT_PROMPT = "a red car driving on a road at night"
TOY_DEFAULT_PROMPT = "a large blue circle moving right"  # in the toy world's vocabulary


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
    """The generator options (default: the toy preset), `--lora`, and the sampling ones."""
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
    model.add_argument("--device", help="where the videos are generated (default: cuda if available, else cpu)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--prompt",
        action="append",
        default=[],
        help=f"repeatable; default {DEFAULT_PROMPT!r} ({TOY_DEFAULT_PROMPT!r} for the toy preset)",
    )
    sampling.add_argument("--prompt_file", type=Path, help="a text file with one prompt per line")
    sampling.add_argument("--num_videos_per_prompt", type=int, default=1)
    add_video_size_arguments(sampling)
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--fps", type=int, default=16, help="frame rate of the written videos (default 16)")
    sampling.add_argument("--output_dir", type=Path, default=Path("outputs/videos"))
    return parser


def trained_size(source: str) -> tuple[int, int, int] | None:
    """`(num_frames, height, width)` the LoRA `source` was trained at, from the `training_args.json` that
    `ARCoPOTrainer` saves next to it (a local folder or file, or a Hub repo); None if there is none."""
    path = Path(source).expanduser()
    if looks_local(source):
        args_file = (path.parent if path.is_file() else path) / "training_args.json"
        if not args_file.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            args_file = Path(hf_hub_download(source, "training_args.json"))
        except (OSError, ValueError, EntryNotFoundError):  # not there, offline, or not a repo
            return None
    try:
        args = json.loads(args_file.read_text())
        size = tuple(args[key] for key in ("num_frames", "height", "width"))
    except (OSError, ValueError, KeyError, TypeError):  # not the JSON of an ARCoPOConfig
        return None
    return size if all(isinstance(value, int) and not isinstance(value, bool) for value in size) else None


def _default_size(args: argparse.Namespace) -> dict[str, tuple[int, int, int]]:
    """The size defaults: the size the `--lora` adapters were trained at, if they say so and agree, else each
    preset's."""
    sizes = {source: size for source, _ in args.lora if (size := trained_size(source)) is not None}
    if len(set(sizes.values())) == 1:
        (size,) = set(sizes.values())
        print(f"default size {size[0]} frames of {size[2]}x{size[1]}: the one {', '.join(sizes)} was trained at")
        return dict.fromkeys(SIZES, size)
    if sizes:
        print(f"the LoRAs were trained at different sizes {sizes}: the default size is the preset's")
    return SIZES


def load_pipeline(args: argparse.Namespace) -> CausalWanPipeline:
    """The generator of `args` (`--model`, or the preset's) on `--device`, with its `--lora` adapters active at their
    scales."""
    import torch

    pipeline_config = {
        key: value for key in ("local_attn_size", "sink_size") if (value := getattr(args, key)) is not None
    }
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_generator(args, device=device, **pipeline_config)
    names = [f"lora_{i}" for i in range(len(args.lora))]
    for name, (source, scale) in zip(names, args.lora, strict=True):
        load_lora(pipe, source, adapter_name=name, argument=f"--lora {source}")
        print(f"LoRA {source} loaded as adapter {name} at scale {scale:g}")
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in args.lora])
    return pipe


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        prompts += read_prompt_file(args.prompt_file)
    return prompts or [TOY_DEFAULT_PROMPT if args.preset == "toy" and args.model is None else DEFAULT_PROMPT]


def main(argv: list[str] | None = None) -> list[Path]:
    """Generate `--num_videos_per_prompt` videos per prompt and write them to `--output_dir`; returns their paths."""
    args = make_parser().parse_args(argv)
    prompts = _prompts(args)
    if args.num_videos_per_prompt < 1:
        fail(f"--num_videos_per_prompt must be >= 1, got {args.num_videos_per_prompt}")
    if args.fps < 1:
        fail(f"--fps must be >= 1, got {args.fps}")
    for source, _ in args.lora:
        if is_missing_path(source):
            fail(f"--lora {source}: no such file or folder (nor a Hub id org/name)")
    num_frames, height, width = video_size(args, _default_size(args))
    import torch  # the heavy imports, once the arguments are known to be good

    from trl_arcopo.utils.videos import save_video

    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
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
