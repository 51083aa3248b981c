"""Does AR-CoPO learn? AR-CoPO (fork), the SDE-GRPO baseline and learning rate 0, on several rewards and seeds.

    python benchmarks/bench_learning.py --pipeline toy                   # the recorded figures (2 CPU cores)
    python benchmarks/bench_learning.py --pipeline tiny --quick          # smoke test, about a minute
    python benchmarks/bench_learning.py --pipeline toy --rewards redness toy_size --seeds 0 1 2 --steps 40

Every run is an `ARCoPOTrainer` run (the real code path) with the preset of the pipeline (`trl-arcopo train --preset
<pipeline>`) and the same budget: `--steps` optimizer steps on the same training prompts; the methods differ only in
`exploration` ("fork" / "sde") and, for "lr0", `learning_rate=0`. Per run the script prints the reward gain on a fixed
evaluation set (the same prompts and noises before and after training, so the gain is paired; its standard error is
over the evaluation prompts), the final ratio statistics and clipped fraction (over the updates that reused a rollout
in the second half of the run), the mean `reward_std` and `policy/self_prob`. Then a summary (mean ± s.e. over
seeds), and two diagnostics:

- the candidates' spread per sampler step (mean pairwise distance of the pivot chunk's x̂0, from the rollout groups
  of the runs): whether the sampler keeps the fork (AR-CoPO's regime) or erases it;
- the cosine between each method's first update direction (minus the gradient of its loss with respect to the LoRA
  parameters, on a fresh adapter) and the direct gradient of the reward, backpropagated through the pivot chunk's
  sampler steps and the VAE decoder for the same group (the chunks after the pivot are held at their rollout values:
  the pipeline's KV cache carries no gradient), averaged over groups with its standard error. Only for the rewards of
  this script, which are differentiable.

`--out` receives `results.json` and `learning_curves.png` (the reward of each rollout during training, mean over
seeds with a ±1 s.e. band, one panel per reward, plus the spread per sampler step). `--set FIELD=VALUE` changes an
`ARCoPOConfig` value for every run (e.g. to choose a preset's `epsilon` or `distance_temperature` from measurements).
Figures from the tiny pipeline (random weights) say nothing about the method: record toy-pipeline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PIPELINES = ("tiny", "toy")
METHODS = ("fork", "sde", "lr0")
# Captions of the toy world (trl_arcopo.toy.world; the tiny pipeline reads the words it knows). Evaluation captions are
# disjoint from the training ones and include colour/shape pairs the toy generator never saw in training.
TRAIN_PROMPTS = [
    "a blue circle moving left",
    "a yellow square bouncing",
    "a small magenta square moving down",
    "a white circle moving right quickly",
    "a cyan triangle moving right",
    "a large green square moving up slowly",
    "a small yellow triangle bouncing on a gray background",
    "a blue triangle moving down",
]
EVAL_PROMPTS = [
    "a blue square moving right",
    "a yellow circle moving down",
    "a white triangle moving left",
    "a large cyan circle bouncing",
    "a magenta triangle moving up",
    "a small green circle moving left",
    "a cyan square moving down slowly",
    "a red circle moving right",
]
EVAL_SEED = 1000
QUICK = {"rewards": ["toy_size"], "seeds": [0], "steps": 2, "eval_prompts": 2, "cosine_groups": 1}
QUICK_TRAINING_ARGUMENTS = {"num_generations": 4, "num_anchors": 2}


def _channel_excess(channel: int) -> Callable:
    """`trl_arcopo.rewards.channel_excess` for one channel (0: the registered `redness` reward), imported when called."""

    def score(videos):
        from trl_arcopo.rewards import channel_excess

        return channel_excess(videos, channel)

    return score


def _toy_reward(name: str) -> Callable:
    """A registered toy-world reward (differentiable in the videos) as a tensor function of the videos."""

    def score(videos):
        from trl_arcopo.rewards import load_reward

        return load_reward(name)([""] * len(videos), videos)

    return score


# Differentiable rewards: tensor functions of the videos (the direct-gradient diagnostic backpropagates through them).
DIFFERENTIABLE_REWARDS: dict[str, Callable] = {
    "toy_color": _toy_reward("toy_color"),  # how red the objects are
    "toy_size": _toy_reward("toy_size"),  # the objects' area
    "toy_position": _toy_reward("toy_position"),  # the objects' closeness to the centre
    "redness": _channel_excess(0),
    "greenness": _channel_excess(1),
    "blueness": _channel_excess(2),
}
DEFAULT_REWARDS = ["toy_size", "toy_color", "redness"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", choices=PIPELINES, default="toy", help="the generator (and its training preset)")
    parser.add_argument(
        "--model",
        default=None,
        help="a CausalWanPipeline folder to train instead of the shipped one, with --pipeline's preset (e.g. another "
        "seed's `trl-arcopo toy-train` run: RUN/pipeline)",
    )
    parser.add_argument(
        "--rewards",
        nargs="+",
        default=DEFAULT_REWARDS,
        help=f"rewards of this script ({', '.join(DIFFERENTIABLE_REWARDS)}) or registered reward names (no cosine)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the same for every method)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--eval_prompts", type=int, default=len(EVAL_PROMPTS), help="evaluation prompts (<= 8)")
    parser.add_argument("--cosine_groups", type=int, default=4, help="groups per reward and method for the cosine")
    parser.add_argument("--out", default="outputs/bench_learning", help="folder for results.json and the PNG")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="ARCoPOConfig values for every run on top of the preset (JSON values), e.g. distance_temperature=1.0",
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}, {QUICK_TRAINING_ARGUMENTS}")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set takes FIELD=VALUE pairs, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    args.set = overrides
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not 2 <= args.eval_prompts <= len(EVAL_PROMPTS):
        parser.error(f"--eval_prompts must be between 2 and {len(EVAL_PROMPTS)}, got {args.eval_prompts}")
    if args.cosine_groups < 0:
        parser.error(f"--cosine_groups must be >= 0, got {args.cosine_groups}")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Pipelines, rewards and runs
# ----------------------------------------------------------------------------------------------------------------------


def load_pipeline(name: str, model: str | None = None):
    """A fresh pipeline (every run adds its own LoRA adapter to the transformer): the folder ``model``, else the
    generator named ``name``."""
    if model is not None:
        from trl_arcopo.pipelines.causal_wan import CausalWanPipeline

        return CausalWanPipeline.from_pretrained(model)
    if name == "tiny":
        from trl_arcopo.testing import tiny_causal_wan_pipeline

        return tiny_causal_wan_pipeline()
    try:
        from trl_arcopo.toy import load_toy_pipeline
    except ImportError as error:
        sys.exit(f"--pipeline toy needs `trl_arcopo.toy.load_toy_pipeline`, which this install lacks ({error}).")
    return load_toy_pipeline()


def training_arguments(pipeline: str, quick: bool = False, overrides: dict | None = None) -> dict:
    """The `ARCoPOConfig` values of the `trl-arcopo train` preset named like the pipeline (smaller groups with
    `quick`), then `overrides` (`--set`)."""
    from dataclasses import fields

    from trl_arcopo import ARCoPOConfig
    from trl_arcopo.scripts.train import PRESETS

    if pipeline not in PRESETS:
        sys.exit(f"`trl-arcopo train` has no preset {pipeline!r} (it has {sorted(PRESETS)}).")
    names = {f.name for f in fields(ARCoPOConfig)} - {"output_dir", "max_steps", "save_steps", "log_videos_steps"}
    unknown = sorted(set(overrides or {}) - names)
    if unknown:
        sys.exit(f"--set: {unknown} are not ARCoPOConfig fields this script lets you set.")
    arguments = {key: value for key, value in PRESETS[pipeline].items() if key in names}
    return {**arguments, **(QUICK_TRAINING_ARGUMENTS if quick else {}), **(overrides or {})}


def reward_function(name: str):
    """A reward of the protocol for the trainer: the script's differentiable rewards, or a registered name."""
    if name not in DIFFERENTIABLE_REWARDS:
        return name
    score = DIFFERENTIABLE_REWARDS[name]

    def reward(prompts, videos, **kwargs):
        return score(videos.float()).tolist()

    reward.__name__ = name
    return reward


def _config(args: argparse.Namespace, method: str, seed: int, steps: int, output_dir: str):
    from trl_arcopo import ARCoPOConfig

    overrides = {"exploration": "sde" if method == "sde" else "fork"}
    if method == "lr0":
        overrides["learning_rate"] = 0.0
    fixed = {"max_steps": steps, "seed": seed, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
    return ARCoPOConfig(
        output_dir, **{**training_arguments(args.pipeline, args.quick, args.set), **overrides, **fixed}
    )


def _trainer(args: argparse.Namespace, reward: str, method: str, seed: int, steps: int, output_dir: str):
    import transformers
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_arcopo import ARCoPOTrainer

    transformers.set_seed(seed)  # the LoRA initialisation
    trainer = ARCoPOTrainer(
        load_pipeline(args.pipeline, args.model),
        reward_function(reward),
        args=_config(args, method, seed, steps, output_dir),
        train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS}),
    )
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts
    return trainer


def evaluate(pipe, reward: str, config, num_prompts: int) -> list[float]:
    """Per-prompt scores of the fixed evaluation set (prompt `i` from seed `EVAL_SEED + i`, whatever the adapter)."""
    from trl_arcopo.evaluation import evaluate_pipeline

    result = evaluate_pipeline(
        pipe,
        EVAL_PROMPTS[:num_prompts],
        reward_function(reward),
        num_frames=config.num_frames,
        height=config.height,
        width=config.width,
        seed=EVAL_SEED,
        progress_bar=False,
    )
    [column] = result.reward_columns
    return list(result.table[column])


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN s.e. for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def train_run(args: argparse.Namespace, reward: str, method: str, seed: int, before: list[float]) -> dict:
    """One training run and its figures."""
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        trainer = _trainer(args, reward, method, seed, args.steps, output_dir)
        trainer.train()
        after = evaluate(trainer.pipeline, reward, trainer.args, args.eval_prompts)
        seconds = time.perf_counter() - start
    history = [entry for entry in trainer.state.log_history if "ratio/mean" in entry]
    rollouts = [entry for entry in history if "reward" in entry]
    # Updates that reuse a rollout (ratio 1 by construction at the first one): where the ratio and the clip act.
    later = [entry for entry in history if "reward" not in entry] or history
    final = later[len(later) // 2 :]  # the second half of the run
    shapes = [entry["policy/self_prob"] for entry in history if "policy/self_prob" in entry]
    num_steps = len(trainer.pipeline.timesteps)
    gain, gain_se = mean_se([a - b for a, b in zip(after, before, strict=True)])
    return {
        "reward": reward,
        "method": method,
        "seed": seed,
        "seconds": seconds,
        "gain": gain,
        "gain_se": gain_se,
        "eval_before": sum(before) / len(before),
        "eval_after": sum(after) / len(after),
        "ratio_mean": statistics.median(e["ratio/mean"] for e in final),
        "ratio_min": statistics.median(e["ratio/min"] for e in final),
        "ratio_max": statistics.median(e["ratio/max"] for e in final),
        "clip_fraction": sum(e["clip_ratio/region_mean"] for e in final) / len(final),
        # Over every update that reused a rollout: the healthy-optimisation check (ratio/mean in [0.5, 2], clip <= 0.3).
        "ratio_mean_extremes": [min(e["ratio/mean"] for e in later), max(e["ratio/mean"] for e in later)],
        "clip_fraction_max": max(e["clip_ratio/region_mean"] for e in later),
        "reward_std": sum(e["reward_std"] for e in rollouts) / len(rollouts),
        "self_prob": sum(shapes) / len(shapes) if shapes else math.nan,  # the surrogate policy (not SDE-GRPO's)
        "curve": {"step": [e["step"] for e in rollouts], "reward": [e["reward"] for e in rollouts]},
        "spread_per_step": [
            sum(e[f"rollout/candidate_distance/step_{s}"] for e in rollouts) / len(rollouts) for s in range(num_steps)
        ],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Direct-gradient diagnostic
# ----------------------------------------------------------------------------------------------------------------------


def group_reward(trainer, group, score: Callable, context=None):
    """The mean reward of a rollout group's videos, rebuilt differentiably: the pivot chunk's sampler steps are run
    again from each branch's recorded noises with the current weights and decoded by the VAE; the chunks after the
    pivot keep their rollout values. A scalar tensor.

    The prefix context is a constant, as in the AR-CoPO update: ``context`` (a state from
    :func:`~trl_arcopo.rollout.rebuild_context`, not changed here) or, if None, rebuilt without gradient from the
    current weights. The gradient therefore leaves out how the weights move the prefix's keys/values."""
    import torch

    from trl_arcopo import CausalWanPipeline
    from trl_arcopo.rollout import rebuild_context

    pipe = trainer.pipeline
    if context is None:
        context = rebuild_context(pipe, group.prompt_embeds, group.prefix_latents)
    rows = pipe.fork(context, group.num_generations)
    # The undecorated methods: `denoise_chunk` and `decode` run under no_grad for sampling.
    trajectory = CausalWanPipeline.denoise_chunk.__wrapped__(pipe, rows, group.inputs[0], step_noise=group.noise)
    chunk = pipe.config.num_frame_per_block
    start = group.pivot * chunk
    latents = torch.cat(
        [group.latents[:, :, :start], trajectory.predictions[-1], group.latents[:, :, start + chunk :]], dim=2
    )
    return score(CausalWanPipeline.decode.__wrapped__(pipe, latents, output_type="pt")).mean()


def direct_reward_gradient(trainer, group, score: Callable, context=None) -> list:
    """The gradient of :func:`group_reward` (same arguments) with respect to the trainable (LoRA) parameters."""
    import torch

    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    return torch.autograd.grad(group_reward(trainer, group, score, context), parameters)


def update_direction_cosines(args: argparse.Namespace, reward: str, method: str) -> list[float]:
    """Cosines between a method's first update direction and the direct reward gradient, one per group."""
    import torch

    cosines = []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _trainer(args, reward, "fork" if method == "lr0" else method, 0, 1, output_dir)
        parameters = [p for p in trainer.model.parameters() if p.requires_grad]
        for index in range(args.cosine_groups):
            row = {"prompt": TRAIN_PROMPTS[index % len(TRAIN_PROMPTS)]}
            [item] = trainer._generate_and_score([row], mode="train")  # the trainer's rollout, rewards, advantages
            loss = trainer.compute_loss(trainer.model, [item])
            update = torch.cat([-g.flatten() for g in torch.autograd.grad(loss, parameters)])
            gradient = direct_reward_gradient(trainer, item["group"], DIFFERENTIABLE_REWARDS[reward])
            direct = torch.cat([g.flatten() for g in gradient])
            cosines.append(torch.nn.functional.cosine_similarity(update, direct, dim=0).item())
    return cosines


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


RUN_HEADER = [
    "reward",
    "method",
    "seed",
    "gain ± s.e.",
    "before → after",
    "ratio/mean",
    "ratio range",
    "clip",
    "worst update (ratio/mean, clip)",
    "reward_std",
    "π(self)",
]


def run_row(run: dict) -> list:
    """One run as a row of `RUN_HEADER`. The ratio and clip columns describe the updates that reused a rollout (the
    first update of a rollout has ratio 1) in the second half of the run: medians of `ratio/mean`, `ratio/min` and
    `ratio/max`, mean clipped fraction."""
    return [
        run["reward"],
        run["method"],
        run["seed"],
        f"{run['gain']:+.4g} ± {run['gain_se']:.2g}",
        f"{run['eval_before']:.4g} → {run['eval_after']:.4g}",
        run["ratio_mean"],
        f"{run['ratio_min']:.3g} … {run['ratio_max']:.3g}",
        run["clip_fraction"],
        f"{run['ratio_mean_extremes'][0]:.3g} … {run['ratio_mean_extremes'][1]:.3g}, {run['clip_fraction_max']:.2f}",
        run["reward_std"],
        run["self_prob"],
    ]


def summarize(runs: list[dict], rewards: list[str], methods: list[str]) -> list[list]:
    rows = []
    for reward in rewards:
        for method in methods:
            mine = [r for r in runs if r["reward"] == reward and r["method"] == method]
            gain, se = mean_se([r["gain"] for r in mine])
            significant = sum(r["gain"] > 2 * r["gain_se"] for r in mine)
            rows.append(
                [
                    reward,
                    method,
                    len(mine),
                    f"{gain:+.4g} ± {se:.2g}",
                    f"{significant}/{len(mine)}",
                    sum(r["ratio_mean"] for r in mine) / len(mine),
                    sum(r["clip_fraction"] for r in mine) / len(mine),
                    sum(r["reward_std"] for r in mine) / len(mine),
                ]
            )
    return rows


def plot(runs: list[dict], rewards: list[str], methods: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * (len(rewards) + 1), 3.4), layout="constrained")
    axes = figure.subplots(1, len(rewards) + 1, squeeze=False)[0]
    for ax, reward in zip(axes, rewards, strict=False):
        for method in methods:
            curves = [r["curve"] for r in runs if r["reward"] == reward and r["method"] == method]
            length = min(len(c["reward"]) for c in curves)
            steps = curves[0]["step"][:length]
            stats = [mean_se([c["reward"][i] for c in curves]) for i in range(length)]
            mean = [m for m, _ in stats]
            band = [0.0 if math.isnan(s) else s for _, s in stats]
            ax.plot(steps, mean, label=method)
            low = [m - s for m, s in zip(mean, band, strict=True)]
            ax.fill_between(steps, low, [m + s for m, s in zip(mean, band, strict=True)], alpha=0.25)
        ax.set_title(f"{reward}: rollout reward")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[-1]
    for method in [m for m in methods if m != "lr0"]:
        spreads = [r["spread_per_step"] for r in runs if r["method"] == method]
        steps = range(len(spreads[0]))
        ax.plot(steps, [sum(s[i] for s in spreads) / len(spreads) for i in steps], "o-", label=method)
    ax.set_yscale("log")
    ax.set_title("candidate spread per sampler step")
    ax.set_xlabel("sampler step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    unknown = [r for r in args.rewards if r not in DIFFERENTIABLE_REWARDS]
    import torch
    import transformers

    from trl_arcopo.evaluation import markdown_table

    transformers.logging.set_verbosity_error()
    if unknown:
        from trl_arcopo.rewards import load_reward

        for name in unknown:
            load_reward(name)  # fails early, with the registry's message, on a name that is not a reward
    print(
        f"# bench_learning: pipeline={args.model or args.pipeline}, rewards={args.rewards}, seeds={args.seeds}, steps={args.steps}, "
        f"methods={args.methods}, eval prompts={args.eval_prompts}; torch {torch.__version__}, "
        f"{platform.machine()}, threads={torch.get_num_threads()}"
    )
    print(f"# training arguments: {training_arguments(args.pipeline, args.quick, args.set)}")
    config = _config(args, "fork", 0, 1, tempfile.gettempdir())  # the video size of the evaluations
    runs = []
    for reward in args.rewards:
        before = evaluate(load_pipeline(args.pipeline, args.model), reward, config, args.eval_prompts)
        for seed in args.seeds:
            for method in args.methods:
                runs.append(train_run(args, reward, method, seed, before))
                line = markdown_table(RUN_HEADER, [run_row(runs[-1])]).splitlines()[-1]
                print(line, f"({runs[-1]['seconds']:.0f} s)", flush=True)

    print("\n## Per run\n")
    print(markdown_table(RUN_HEADER, [run_row(run) for run in runs]))
    print("\n## Summary (mean ± s.e. over seeds; 'gain > 2 s.e.' counts seeds)\n")
    summary_header = ["reward", "method", "seeds", "gain", "gain > 2 s.e.", "ratio/mean", "clip", "reward_std"]
    summary = summarize(runs, args.rewards, args.methods)
    print(markdown_table(summary_header, summary))

    print("\n## Candidate spread per sampler step (mean pairwise distance of x̂0, averaged over rollouts and runs)\n")
    spread_rows = []
    for method in [m for m in args.methods if m != "lr0"]:
        spreads = [r["spread_per_step"] for r in runs if r["method"] == method]
        spread_rows.append([method, *(f"{mean_se([s[i] for s in spreads])[0]:.3g}" for i in range(len(spreads[0])))])
    steps = len(runs[0]["spread_per_step"])
    print(markdown_table(["method", *(f"step {s}" for s in range(steps))], spread_rows))

    cosines = {}
    differentiable = [r for r in args.rewards if r in DIFFERENTIABLE_REWARDS]
    if args.cosine_groups and differentiable:
        print("\n## Cosine(first update direction, direct reward gradient), mean ± s.e. over groups\n")
        cosine_rows = []
        for reward in differentiable:
            for method in [m for m in args.methods if m != "lr0"]:
                values = update_direction_cosines(args, reward, method)
                cosines[f"{reward}/{method}"] = values
                mean, se = mean_se(values)
                cosine_rows.append([reward, method, len(values), f"{mean:+.3f} ± {se:.2g}"])
        print(markdown_table(["reward", "method", "groups", "cosine"], cosine_rows))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "arguments": vars(args),
        "training_arguments": training_arguments(args.pipeline, args.quick, args.set),
        "runs": runs,
        "summary": [dict(zip(summary_header, row, strict=True)) for row in summary],
        "cosines": cosines,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(runs, args.rewards, args.methods, out / "learning_curves.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'learning_curves.png'}")
    return results


if __name__ == "__main__":
    main()
