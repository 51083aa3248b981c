"""What the `trl-arcopo` scripts share: strict parsers with one-line errors, presets, the base generator and its
LoRAs, prompts, and the checks that run before anything heavy is imported.

Every script loads its generator the same way, from the fields of `GeneratorArguments` (`--preset tiny|self-forcing`,
`--model`, `--model_revision`, `--self_forcing_checkpoint`, `--base_model`, `--dtype`) with `load_generator`.

torch, diffusers and datasets are imported inside the functions that use them, so that a script checks its arguments
(in about a second) before it spends seconds importing what the work needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from trl import TrlParser

from trl_arcopo.rewards.registry import check_reward_name
from trl_arcopo.utils.arguments import ArgumentParser, StrictParserMixin, fail
from trl_arcopo.utils.video_size import nearest_valid, whole_chunk_frames

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from trl_arcopo import CausalWanPipeline

GENERATOR_PRESETS = ("toy", "tiny", "self-forcing")
# The video geometry of the presets' generators, (pixel frames per latent frame, latent frames per chunk, pixel
# multiple of height and width): Wan2.1's VAE packs 4 pixel frames (the first one alone) and 8x8 pixels into one
# latent and the transformer's patches are 2x2 latents; the toy VAE is per-frame and 4x4. A chunk is 3 latent frames.
# `CausalWanPipeline.check_inputs` applies the same rule with the values of the loaded pipeline.
WAN_GEOMETRY = (4, 3, 16)
PRESET_GEOMETRY = {"toy": (1, 3, 8), "tiny": WAN_GEOMETRY, "self-forcing": WAN_GEOMETRY}


class ScriptParser(StrictParserMixin, TrlParser):
    """The scripts' parser: TRL's dataclass parser (it also reads `--config file.yaml`) with the strict behaviour of
    `StrictParserMixin`: no abbreviated options, `-1e-3` read as a number, one-line errors."""


@dataclass
class GeneratorArguments:
    """The generator to load: a preset's, or a saved `CausalWanPipeline` (`--model`)."""

    preset: str = field(
        default="toy",
        metadata={
            "help": "'toy' (the trained toy-world generator shipped in the package: offline, CPU friendly), 'tiny' "
            "(random weights, for quick checks) or 'self-forcing' (Self-Forcing on Wan2.1-T2V-1.3B). `--model` "
            "replaces the preset's generator.",
            "choices": list(GENERATOR_PRESETS),
        },
    )
    model: str | None = field(
        default=None, metadata={"help": "A saved CausalWanPipeline (Hub id or folder) instead of the preset's."}
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of `--model`."}
    )
    self_forcing_checkpoint: str = field(
        default="gdhe17/Self-Forcing",
        metadata={"help": "Original Self-Forcing checkpoint (Hub id or file) of the self-forcing preset."},
    )
    base_model: str = field(
        default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        metadata={"help": "Wan2.1 pipeline giving the tokenizer, umT5 and VAE of the self-forcing preset."},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype of the generator's weights (the tiny preset's are always float32). Default: bfloat16 on "
            "a GPU, float32 on CPU.",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )


def generator_parser(*, require_generator: bool = False, **kwargs: Any) -> ScriptParser:
    """An argument parser holding the `GeneratorArguments` options (add the script's own ones to it).

    Args:
        require_generator: no default preset: `--model` or `--preset` must be given (for scripts that load adapters
            trained on one generator, which a default would silently mismatch).
        kwargs: `argparse.ArgumentParser` options (`prog`, `description`, ...).
    """
    parser = ScriptParser(GeneratorArguments, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    if require_generator:
        parser.set_defaults(preset=None)
    return parser


def load_generator(
    args: GeneratorArguments | argparse.Namespace, *, device: torch.device | str = "cpu", **pipeline_config: Any
) -> CausalWanPipeline:
    """The generator of `args` on `device`: `args.model` (at `args.model_revision`), else the preset's (the trained
    toy-world one, the tiny random one, or Self-Forcing built from `args.self_forcing_checkpoint` and
    `args.base_model`).

    Args:
        args: the `GeneratorArguments` fields (a dataclass inheriting them, or the namespace of `generator_parser`).
        device: where the pipeline goes; with `args.dtype` unset, it is loaded in bfloat16 on a GPU, else float32
            (the tiny random generator is always float32).
        pipeline_config: pipeline config overrides (`local_attn_size`, `sink_size`).

    A generator that cannot be loaded exits with one line (code 2).
    """
    import torch

    from trl_arcopo import CausalWanPipeline
    from trl_arcopo.testing import tiny_causal_wan_pipeline

    device = torch.device(device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.model is None and args.preset is None:
        fail(f"pass --model PATH_OR_REPO or --preset {{{','.join(GENERATOR_PRESETS)}}}")
    try:
        if args.model:
            pipe = CausalWanPipeline.from_pretrained(
                args.model, revision=args.model_revision, dtype=dtype, **pipeline_config
            )
        elif args.preset == "tiny":
            pipe = tiny_causal_wan_pipeline(**pipeline_config)
        elif args.preset == "toy":
            from trl_arcopo.toy import load_toy_pipeline

            pipe = load_toy_pipeline(dtype=dtype, **pipeline_config)
        else:
            pipe = CausalWanPipeline.from_self_forcing(
                args.self_forcing_checkpoint, args.base_model, dtype=dtype, **pipeline_config
            )
    except (OSError, ValueError) as error:  # not found (offline, wrong id), or not a pipeline of this kind
        if args.model:
            fail(f"cannot load --model {args.model}: {error}")
        fail(
            f"cannot load the {args.preset} generator ({args.self_forcing_checkpoint} + {args.base_model}): "
            f"{error} Check the ids, the network and HF_HUB_OFFLINE, or pass --model"
        )
    return pipe.to(device)


def add_video_size_arguments(group: argparse._ArgumentGroup) -> None:
    """`--num_frames`, `--height` and `--width`, unset by default (read with `video_size`)."""
    group.add_argument(
        "--num_frames", type=int, help="pixel frames: 9 + 12·k on Wan2.1, a multiple of 3 on the toy (preset default)"
    )
    group.add_argument("--height", type=int, help="pixels, a multiple of 16 (8 on the toy; preset default)")
    group.add_argument("--width", type=int, help="pixels, a multiple of 16 (8 on the toy; preset default)")


def video_size(args: argparse.Namespace, sizes: Mapping[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    """`(num_frames, height, width)`: the flags of `add_video_size_arguments` that were given, the others from
    `sizes[args.preset]` (a `--model` is sized like the self-forcing preset), checked with `check_video_size`."""
    default = sizes["self-forcing" if args.model else args.preset]
    given = (args.num_frames, args.height, args.width)
    size = tuple(value if value is not None else preset for value, preset in zip(given, default, strict=True))
    check_video_size(*size, geometry=None if args.model else PRESET_GEOMETRY[args.preset])
    return size


def check_video_size(
    num_frames: int, height: int, width: int, *, geometry: tuple[int, int, int] | None = WAN_GEOMETRY
) -> None:
    """Exit with one line naming the flag (`--num_frames`, `--height`, `--width`) unless the size is positive and
    fits the generator's `geometry` (see `PRESET_GEOMETRY`; None for a `--model`, whose pipeline checks its own sizes
    once loaded). With Wan2.1's, `num_frames` = 9 + 12·k and height and width are multiples of 16."""
    for flag, value in (("--num_frames", num_frames), ("--height", height), ("--width", width)):
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    if geometry is None:
        return
    frames_per_latent, latents_per_chunk, pixel_multiple = geometry
    first, step = whole_chunk_frames(frames_per_latent, latents_per_chunk)
    if num_frames < first or (num_frames - first) % step:
        lower = max(first, num_frames - (num_frames - first) % step)
        fail(
            f"--num_frames {num_frames} does not split into whole chunks of the generator: use {first} + {step}·k "
            f"frames, e.g. {', '.join(str(n) for n in sorted({lower, lower + step, lower + 2 * step}))}"
        )
    for flag, value in (("--height", height), ("--width", width)):
        if value % pixel_multiple:
            fail(
                f"{flag} {value} is not a multiple of {pixel_multiple}: use "
                f"{nearest_valid(value, pixel_multiple, pixel_multiple)}"
            )


def check_reward_names(names: Sequence[str], flag: str) -> None:
    """Exit with one line (naming `flag` and suggesting close names) if a reward name is not one that
    `trl_arcopo.rewards.load_reward` knows; imports no reward."""
    for name in names:
        try:
            check_reward_name(name)
        except ValueError as error:
            fail(f"{flag}: {error}")


def looks_local(source: str) -> bool:
    """A path rather than a Hub id `org/name` (which has exactly one `/` and no leading `.`, `/` or `~`)."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or source.endswith(".safetensors")


def is_missing_path(source: str) -> bool:
    """Whether `source` is a local path (not a Hub id `org/name`) that does not exist."""
    return looks_local(source) and not Path(source).expanduser().exists()


def load_lora(pipe: CausalWanPipeline, source: str, *, adapter_name: str, argument: str) -> None:
    """Load the LoRA `source` (a folder or file with `pytorch_lora_weights.safetensors`, or a Hub id `org/name`)
    into `pipe` as `adapter_name`. If it cannot be loaded, exits with one line naming `argument` (the command-line
    text that gave it, e.g. `--lora org/name`)."""
    if is_missing_path(source):
        fail(f"{argument}: no such file or folder (nor a Hub id org/name)")
    try:
        pipe.load_lora_weights(
            str(Path(source).expanduser()) if looks_local(source) else source, adapter_name=adapter_name
        )
    except (OSError, ValueError, RuntimeError) as error:  # not found, or a LoRA for another architecture
        fail(f"{argument}: {' '.join(str(error).strip().splitlines()[:2])}")  # a size mismatch lists every tensor


def _name_value(spec: str) -> tuple[str, str]:
    name, separator, value = spec.partition("=")
    if not separator or not name or not value:
        raise argparse.ArgumentTypeError(f"{spec!r} is not NAME=VALUE (e.g. on_policy=0.8)")
    return name, value


def scale_spec(spec: str) -> tuple[str, float]:
    """`NAME=SCALE` -> `(name, scale)` with a finite scale >= 0 (an argparse `type`)."""
    name, value = _name_value(spec)
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or scale < 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: the scale must be a finite number >= 0 (e.g. on_policy=0.8)")
    return name, scale


def add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    """The required, repeatable `--adapter NAME=PATH_OR_REPO` (read with `adapter_sources`)."""
    parser.add_argument(
        "--adapter",
        type=_name_value,
        action="append",
        required=True,
        metavar="NAME=PATH_OR_REPO",
        help="a LoRA (folder or Hub id with pytorch_lora_weights.safetensors) loaded as adapter NAME; repeatable, "
        "e.g. --adapter semi=outputs/semi --adapter on_policy=outputs/on-policy",
    )


def adapter_sources(args: argparse.Namespace, flag: str, names: Sequence[str]) -> dict[str, str]:
    """`{name: source}` of the `--adapter` flags, checked before anything is loaded: unique names, local sources
    that exist, and every name of `names` (given by `flag`) among them."""
    sources = dict(args.adapter)
    if len(sources) != len(args.adapter):
        fail(f"--adapter names must be unique, got {[name for name, _ in args.adapter]}")
    unknown = [name for name in names if name not in sources]
    if unknown:
        fail(f"{flag} names {unknown} but the loaded adapters (--adapter) are {list(sources)}")
    for name, source in sources.items():
        if is_missing_path(source):
            fail(f"--adapter {name}={source}: no such file or folder (nor a Hub id org/name)")
    return sources


def load_adapters(pipe: CausalWanPipeline, sources: Mapping[str, str]) -> None:
    """Load every `--adapter` of `sources` (see `adapter_sources`) into `pipe` under its name."""
    for name, source in sources.items():
        load_lora(pipe, source, adapter_name=name, argument=f"--adapter {name}={source}")


def read_prompt_file(path: str | os.PathLike, flag: str = "--prompt_file") -> list[str]:
    """The stripped non-blank lines of the text file `path` (given by `flag`); exits with one line if it cannot be
    read or holds no prompt."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        fail(f"{flag} {path} is not a readable text file")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        fail(f"{flag} {path} has no prompts")
    return prompts


def load_prompt_dataset(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    column: str = "prompt",
    column_flag: str = "--dataset_prompt_column",
) -> Dataset:
    """The split of the dataset `name` (Hub id or local path) with its prompt column `column` (given by
    `column_flag`) renamed to `prompt`; the other columns are kept. Exits with one line if either is missing."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config, split=split)
    except (OSError, ValueError) as error:
        fail(f"cannot load --dataset_name {name} (split {split}): {error}")
    if column not in dataset.column_names:
        fail(f"--dataset_name {name} has no column {column!r} ({dataset.column_names}); set {column_flag}")
    return dataset if column == "prompt" else dataset.rename_column(column, "prompt")


def requested_preset(argv: Sequence[str], default: str = "toy") -> str:
    """The preset named by `--preset` in `argv`, else by the `preset` key of its `--config` YAML, else `default`."""
    early = ArgumentParser(add_help=False)
    early.add_argument("--preset")
    early.add_argument("--config")
    known = early.parse_known_args(argv)[0]
    if known.preset is not None:
        return known.preset
    if known.config is not None:
        try:
            config = yaml.safe_load(Path(known.config).read_text())
        except (OSError, yaml.YAMLError) as error:
            fail(f"--config {known.config} is not a readable YAML file: {error}")
        if isinstance(config, dict) and "preset" in config:
            return config["preset"]
    return default


def parse_with_preset(
    parser: TrlParser,
    presets: Mapping[str, Mapping[str, Any]],
    argv: Sequence[str] | None = None,
    *,
    partial: bool = False,
) -> tuple[Any, ...]:
    """Parse `argv` (default: `sys.argv[1:]`) and its `--config` YAML on top of the defaults of the requested preset
    (see `requested_preset`): YAML keys override the preset, flags override both. Bad input exits with one line.

    Args:
        parser: parses the dataclasses.
        presets: `{preset: {field: default}}`; the fields `parser` does not have are ignored.
        argv: the arguments.
        partial: `parser` has only some of the options (the early check of a script, before its heavy imports):
            the flags and YAML keys it does not know are left to the full parser.

    Returns:
        The dataclasses of `parser`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = requested_preset(argv)
    if preset not in presets:
        fail(f"unknown --preset {preset!r}; choose one of {sorted(presets)}")
    fields = {f.name for dataclass_type in parser.dataclass_types for f in dataclasses.fields(dataclass_type)}
    parser.set_defaults(**{key: value for key, value in presets[preset].items() if key in fields})
    try:
        *outputs, unknown_keys, unknown_flags = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as error:  # values the dataclasses reject
        fail(error)
    if unknown_keys and not partial:
        names = ", ".join(key.removeprefix("--") for key in unknown_keys[::2])
        fail(f"unknown key(s) in the --config file: {names} (`--help` lists the valid ones)")
    if unknown_flags and not partial:
        fail(f"unrecognized arguments: {' '.join(unknown_flags)} (`--help` lists the valid ones)")
    return tuple(outputs)
