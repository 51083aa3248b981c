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
from pathlib import Path

from trl_arcopo.scripts.utils import (
    adapter_sources,
    add_adapter_argument,
    fail,
    generator_parser,
    load_adapters,
    load_generator,
    scale_spec,
)


def make_parser() -> argparse.ArgumentParser:
    """The generator options (`--model` or `--preset` required), `--adapter`, and the merging and output ones."""
    parser = generator_parser(require_generator=True, prog="trl-arcopo merge", description=__doc__)
    add_adapter_argument(parser)
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
    sources = adapter_sources(args, "--scale", list(scales))
    weights = {name: scales.get(name, 1.0) for name in sources}
    from trl_arcopo.adapters import push_folder_to_hub, save_fused, save_merged_lora  # once the arguments are good

    pipe = load_generator(args)
    load_adapters(pipe, sources)
    try:
        if args.fuse:
            save_fused(
                pipe,
                weights,
                args.output_dir,
                component=args.fused_component,
                adapter_sources=sources,
                repo_id=args.push_to_hub,
            )
        else:
            save_merged_lora(pipe, weights, args.output_dir, adapter_sources=sources, repo_id=args.push_to_hub)
    except ValueError as error:  # e.g. all scales 0, DoRA adapters
        fail(error)
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
