"""`trl-arcopo merge`: combine named LoRA adapters with scales, `W = W0 + ΔW_semi + s·ΔW_on`, into one LoRA.

    trl-arcopo merge --preset self-forcing --adapter semi=outputs/semi --adapter on_policy=outputs/on-policy \\
        --scale on_policy=0.8 --output_dir outputs/merged-lora
    trl-arcopo merge ... --push_to_hub my-org/self-forcing-arcopo           # also upload the folder to the Hub
    trl-arcopo merge ... --fuse --output_dir outputs/fused                  # a pipeline with the LoRA fused in

The exported LoRA is exact (rank = sum of the adapters' ranks) and loads with `pipe.load_lora_weights(folder)`;
`--fuse` writes a full `CausalWanPipeline` (or only its transformer) with the combination added to the weights.
Adapters without `--scale` get 1.0. Pushing uses the logged-in token (`hf auth login` or `HF_TOKEN`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn

import torch

from trl_arcopo import CausalWanPipeline
from trl_arcopo.adapters import fuse_adapters, push_folder_to_hub, save_merged_lora

PRESETS = ("tiny", "self-forcing")


def fail(message: str) -> NoReturn:
    """One clear line on stderr and exit code 2 (argparse's convention), no traceback."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def _name_value(spec: str) -> tuple[str, str]:
    name, separator, value = spec.partition("=")
    if not separator or not name or not value:
        raise argparse.ArgumentTypeError(f"{spec!r} is not NAME=VALUE (e.g. on_policy=0.8)")
    return name, value


def adapter_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH_OR_REPO` -> `(name, path_or_repo)`."""
    return _name_value(spec)


def scale_spec(spec: str) -> tuple[str, float]:
    """`NAME=SCALE` -> `(name, scale)` with a finite scale >= 0."""
    name, value = _name_value(spec)
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or scale < 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: the scale must be a finite number >= 0 (e.g. on_policy=0.8)")
    return name, scale


def add_generator_arguments(parser: argparse.ArgumentParser, *, default_dtype: str = "float32") -> None:
    """`--model` / `--preset` and the loading options of :func:`load_generator`, plus the repeatable `--adapter`."""
    group = parser.add_argument_group("generator and adapters")
    group.add_argument("--model", help="a saved CausalWanPipeline (Hub id or folder)")
    group.add_argument(
        "--preset", choices=PRESETS, help="instead of --model: tiny (offline, random) or self-forcing (real)"
    )
    group.add_argument(
        "--self_forcing_checkpoint", default="gdhe17/Self-Forcing", help="original checkpoint (self-forcing preset)"
    )
    group.add_argument(
        "--base_model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="Wan2.1 pipeline (self-forcing preset)"
    )
    group.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=default_dtype,
        help=f"default {default_dtype} (the tiny preset is always float32)",
    )
    group.add_argument(
        "--adapter",
        type=adapter_spec,
        action="append",
        required=True,
        metavar="NAME=PATH_OR_REPO",
        help="a LoRA (folder or Hub id with pytorch_lora_weights.safetensors) loaded as adapter NAME; repeatable, "
        "e.g. --adapter semi=outputs/semi --adapter on_policy=outputs/on-policy",
    )


def check_adapter_names(args: argparse.Namespace, flag: str, names: list[str]) -> dict[str, str]:
    """`{name: source}` of the `--adapter` flags; fails on duplicates or on `names` (from `flag`) not among them."""
    sources = dict(args.adapter)
    if len(sources) != len(args.adapter):
        fail(f"--adapter names must be unique, got {[name for name, _ in args.adapter]}")
    unknown = [name for name in names if name not in sources]
    if unknown:
        fail(f"{flag} names {unknown} but the loaded adapters (--adapter) are {list(sources)}")
    return sources


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id `org/name` (which has exactly one `/` and no leading `.`, `/` or `~`)."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or source.endswith(".safetensors")


def load_generator(args: argparse.Namespace, sources: dict[str, str]) -> CausalWanPipeline:
    """The generator of `--model` or `--preset` with every `--adapter` loaded under its name (on CPU)."""
    if (args.model is None) == (args.preset is None):
        fail("pass exactly one of --model PATH_OR_REPO or --preset {tiny,self-forcing}")
    for name, source in sources.items():
        if _looks_local(source) and not Path(source).expanduser().exists():
            fail(f"--adapter {name}={source}: no such file or folder (nor a Hub id org/name)")
    dtype = getattr(torch, args.dtype)
    try:
        if args.model:
            pipe = CausalWanPipeline.from_pretrained(args.model, dtype=dtype)
        elif args.preset == "tiny":
            from trl_arcopo.testing import tiny_causal_wan_pipeline

            pipe = tiny_causal_wan_pipeline()
        else:
            pipe = CausalWanPipeline.from_self_forcing(args.self_forcing_checkpoint, args.base_model, dtype=dtype)
    except (OSError, ValueError) as error:  # a model that cannot be found or loaded
        fail(f"--model {args.model}: {error}" if args.model else f"--preset {args.preset}: {error}")
    for name, source in sources.items():
        try:
            pipe.load_lora_weights(
                str(Path(source).expanduser()) if _looks_local(source) else source, adapter_name=name
            )
        except (OSError, ValueError, RuntimeError) as error:  # not found, or a LoRA for another architecture
            first_lines = " ".join(str(error).strip().splitlines()[:2])  # a size mismatch lists every tensor
            fail(f"--adapter {name}={source}: {first_lines}")
    return pipe


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-arcopo merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_generator_arguments(parser)
    merging = parser.add_argument_group("merging")
    merging.add_argument(
        "--scale",
        type=scale_spec,
        action="append",
        default=[],
        metavar="NAME=SCALE",
        help="scale of adapter NAME (default 1.0); repeatable, e.g. --scale on_policy=0.8",
    )
    merging.add_argument("--fuse", action="store_true", help="fuse into the weights instead of exporting one LoRA")
    merging.add_argument(
        "--fused_component",
        choices=["pipeline", "transformer"],
        default="pipeline",
        help="with --fuse: save the whole pipeline or only its transformer",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=Path, default=Path("outputs/merged"), help="default outputs/merged")
    output.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload the output folder to this Hub repo")
    output.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Merge the adapters and write the result to `--output_dir`; returns that folder."""
    args = make_parser().parse_args(argv)
    scales = dict(args.scale)
    sources = check_adapter_names(args, "--scale", list(scales))
    weights = {name: scales.get(name, 1.0) for name in sources}
    pipe = load_generator(args, sources)
    try:
        if args.fuse:
            fuse_adapters(pipe, weights)
            target = pipe if args.fused_component == "pipeline" else pipe.transformer
            target.save_pretrained(args.output_dir)
        else:
            save_merged_lora(pipe, weights, args.output_dir, adapter_sources=sources, repo_id=args.push_to_hub)
    except ValueError as error:  # e.g. all scales 0, DoRA adapters
        fail(str(error))
    combination = " + ".join(f"{scale:g}·{name}" for name, scale in weights.items())
    what = f"fused {args.fused_component}" if args.fuse else "merged LoRA"
    print(f"{args.output_dir}: {what} W0 + {combination}")
    if args.push_to_hub:
        url = push_folder_to_hub(
            args.output_dir, args.push_to_hub, private=args.private or None, commit_message=f"Upload {what}"
        )
        print(url)
    return args.output_dir


if __name__ == "__main__":
    main()
