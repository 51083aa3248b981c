"""`trl-arcopo sweep`: choose the merge scale of `W = W0 + ΔW_semi + s·ΔW_on` with the dual-benchmark rule.

    trl-arcopo sweep --preset self-forcing --adapter semi=outputs/semi --adapter on_policy=outputs/on-policy \\
        --in_domain videoalign --out_of_domain pickscore --prompt_file eval_prompts.txt --batch_size 4
    trl-arcopo sweep --preset tiny --adapter semi=... --adapter on_policy=... \\
        --in_domain brightness --out_of_domain sharpness                     # offline, seconds

The base model (adapters disabled) and `{--fixed, --swept: s}` for every `--scales` value generate one video per
prompt from the same seeds; the in-domain reward(s) and the out-of-domain metric(s) score the same videos. The
selected scale is the largest that improves BOTH over the base (or none). Rewards are names of
`trl_arcopo.rewards.load_reward` (built-ins, registered models, Hub ids, reward-server URLs). Writes `sweep.png` and
`sweep.json` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from trl_arcopo.scripts.utils import (
    adapter_sources,
    add_adapter_argument,
    add_video_size_arguments,
    check_reward_names,
    fail,
    generator_parser,
    load_adapters,
    load_generator,
    load_prompt_dataset,
    read_prompt_file,
    scale_spec,
    video_size,
)

if TYPE_CHECKING:
    from trl_arcopo.sweep import SweepResult

# Held-out evaluation prompts of the tiny preset (words of the tiny tokenizer, not the training prompts).
TINY_PROMPTS = [
    "a white boat on the lake in the morning",
    "a horse running on the beach",
    "a girl dancing in the snow",
    "a yellow flower in the garden",
]
# (num_frames, height, width) of each preset's generator; a --model is sized like self-forcing.
SIZES = {"toy": (9, 32, 32), "tiny": (21, 32, 32), "self-forcing": (81, 480, 832)}


def make_parser() -> argparse.ArgumentParser:
    """The generator options (`--model` or `--preset` required), `--adapter`, and the sweep, prompt and generation
    ones."""
    parser = generator_parser(require_generator=True, prog="trl-arcopo sweep", description=__doc__)
    add_adapter_argument(parser)
    parser.add_argument("--device", help="where the videos are generated (default: cuda if available, else cpu)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--swept", default="on_policy", help="the adapter whose scale is swept (default on_policy)")
    sweep.add_argument(
        "--fixed",
        type=scale_spec,
        action="append",
        default=[],
        metavar="NAME=SCALE",
        help="an adapter kept at a fixed scale; repeatable (default: semi=1.0)",
    )
    sweep.add_argument(
        "--scales", type=float, nargs="+", help="scales of --swept to try (default 0 0.2 0.4 0.6 0.8 1)"
    )
    sweep.add_argument("--in_domain", nargs="+", required=True, metavar="REWARD", help="the optimized reward(s)")
    sweep.add_argument("--out_of_domain", nargs="+", required=True, metavar="REWARD", help="the independent metric(s)")
    prompts = parser.add_argument_group("prompts (default: a few held-out prompts with --preset tiny)")
    prompts.add_argument("--prompt_file", type=Path, help="a text file with one prompt per line")
    prompts.add_argument("--dataset_name", help="a Hub dataset id or local path with a prompt column")
    prompts.add_argument("--dataset_split", default="train", help="split of --dataset_name (default train)")
    prompts.add_argument("--prompt_column", default="prompt", help="column of --dataset_name (default prompt)")
    prompts.add_argument("--max_prompts", type=int, help="evaluate only the first N prompts")
    generation = parser.add_argument_group("generation")
    add_video_size_arguments(generation)
    generation.add_argument("--batch_size", type=int, default=1, help="videos per pipeline call")
    generation.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i, for every model")
    parser.add_argument(
        "--output_dir", type=Path, default=Path("outputs/merge-sweep"), help="sweep.png and sweep.json go here"
    )
    return parser


def load_prompts(args: argparse.Namespace) -> list[str]:
    """The evaluation prompts: `--prompt_file`, `--dataset_name`, or (tiny preset) a few held-out ones; the first
    `--max_prompts` of them."""
    if args.max_prompts is not None and args.max_prompts < 1:
        fail(f"--max_prompts must be >= 1, got {args.max_prompts}")
    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
    elif args.dataset_name is not None:
        dataset = load_prompt_dataset(
            args.dataset_name, split=args.dataset_split, column=args.prompt_column, column_flag="--prompt_column"
        )
        prompts = list(dataset["prompt"])
    elif args.preset == "tiny" and args.model is None:
        prompts = TINY_PROMPTS
    elif args.preset == "toy" and args.model is None:
        from trl_arcopo.toy import sample_captions

        # Captions the training prompts do not include, colour/shape pairs the generator never saw among them.
        prompts = sample_captions(16, seed=1, held_out=frozenset(), mention={"color": 1.0})
        prompts = [p for p in prompts if p not in sample_captions(64, seed=0)]
    else:
        fail("pass evaluation prompts with --prompt_file or --dataset_name")
    return prompts[: args.max_prompts]


def main(argv: list[str] | None = None) -> SweepResult:
    """Run the sweep, print the table and the choice, write `sweep.png` and `sweep.json`; returns the result."""
    args = make_parser().parse_args(argv)
    fixed = dict(args.fixed) or {"semi": 1.0}
    if args.swept in fixed:
        fail(f"--swept {args.swept} is also given in --fixed; remove it there")
    sources = adapter_sources(args, "--fixed/--swept", [*fixed, args.swept])
    prompts = load_prompts(args)
    check_reward_names(args.in_domain, "--in_domain")
    check_reward_names(args.out_of_domain, "--out_of_domain")
    num_frames, height, width = video_size(args, SIZES)
    import torch  # the heavy imports, once the arguments are known to be good

    from trl_arcopo.evaluation import resolve_rewards
    from trl_arcopo.sweep import DEFAULT_SCALES, sweep_merge_scale

    try:
        in_domain, out_of_domain = resolve_rewards(args.in_domain), resolve_rewards(args.out_of_domain)
    except (OSError, ValueError) as error:
        fail(error)
    pipe = load_generator(args, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_adapters(pipe, sources)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = sweep_merge_scale(
            pipe,
            prompts,
            in_domain=in_domain,
            out_of_domain=out_of_domain,
            scales=args.scales or DEFAULT_SCALES,
            fixed=fixed,
            swept=args.swept,
            plot_path=args.output_dir / "sweep.png",
            num_frames=num_frames,
            height=height,
            width=width,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValueError as error:  # bad scales or sizes
        fail(error)
    (args.output_dir / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2))
    print(f"{args.output_dir}: sweep.png, sweep.json")
    return result


if __name__ == "__main__":
    main()
