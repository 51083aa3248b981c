"""`trl-arcopo estimate-memory`: the peak GPU memory of a training config, per phase and process, before a run.

    trl-arcopo estimate-memory --config examples/configs/self_forcing_on_policy.yaml
    trl-arcopo estimate-memory --config my_run.yaml --accelerate_config fsdp2 --num_processes 8 --gpu_memory 79

It reads the flags and `--config` YAML of `trl-arcopo train` (`--num_generations 8` overrides the YAML as there) and
loads nothing: the models are sized from their configs. It prints, for one process, every component's memory in
every phase (rollout, decode, reward, update); with `--gpu_memory` (GiB, as torch reports a GPU: 79.2 for an 80 GB
H100, 139.8 for a 141 GB H200), whether the run fits and the largest rollout_batch_size, num_anchors and
num_generations that do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from trl_arcopo.memory import GeneratorSpec, GiB, RewardSpec, estimate_memory, largest_fitting
from trl_arcopo.scripts.utils import fail

MAX_GENERATIONS = 64  # the largest num_generations tried


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-arcopo estimate-memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every option of `trl-arcopo train` (and its --config YAML) is accepted too.",
    )
    parser.add_argument("--accelerate_config", help="a shipped accelerate config (multi_gpu, fsdp2, ...) or a file")
    parser.add_argument("--num_processes", type=int, help="processes of the run (default: the accelerate config's)")
    parser.add_argument("--gpu_memory", type=float, help="memory of one GPU in GiB: report what fits in it")
    return parser


def distributed_setup(accelerate_config: str | None, num_processes: int | None) -> tuple[str, int]:
    """`(strategy, processes)` of an accelerate config (`ddp` or `fsdp2`); without one, DDP on `num_processes` (1)."""
    from trl_arcopo.cli import resolve_accelerate_config

    if accelerate_config is None:
        return "ddp", num_processes or 1
    try:
        config = yaml.safe_load(Path(resolve_accelerate_config(accelerate_config)).read_text())
    except ValueError as error:
        fail(error)
    kind = config.get("distributed_type", "NO")
    if kind == "FSDP":
        if str(config.get("fsdp_config", {}).get("fsdp_version", 1)) != "2":
            fail(f"--accelerate_config {accelerate_config}: only FSDP version 2 is modeled (set fsdp_version: 2)")
        strategy = "fsdp2"
    elif kind in ("NO", "MULTI_GPU"):
        strategy = "ddp"
    else:
        fail(f"--accelerate_config {accelerate_config}: distributed_type {kind} is not modeled (use DDP or FSDP2)")
    return strategy, num_processes or int(config.get("num_processes", 1))


def generator_spec(script_args) -> GeneratorSpec:
    """The spec of the generator the train script would load: a `--model` (its configs, fetched from the Hub or a
    folder), the tiny preset's, or Self-Forcing's."""
    dtype = getattr(torch, script_args.dtype or "bfloat16")
    if script_args.model:
        return GeneratorSpec.from_pretrained(script_args.model, revision=script_args.model_revision, dtype=dtype)
    if script_args.preset == "tiny":
        from trl_arcopo.testing import tiny_causal_wan_pipeline

        return GeneratorSpec.from_pipeline(tiny_causal_wan_pipeline())
    return GeneratorSpec.self_forcing(dtype)


def main(argv: list[str] | None = None) -> None:
    """Print the estimate; bad input exits with code 2 and one line on stderr."""
    from trl_arcopo.scripts import train

    own, rest = make_parser().parse_known_args(argv)
    if own.num_processes is not None and own.num_processes < 1:
        fail(f"--num_processes must be >= 1, got {own.num_processes}")
    if own.gpu_memory is not None and own.gpu_memory <= 0:
        fail(f"--gpu_memory must be a positive number of GiB, got {own.gpu_memory}")
    strategy, processes = distributed_setup(own.accelerate_config, own.num_processes)
    script_args, config = train.parse(rest)
    try:
        generator = generator_spec(script_args)
    except (OSError, ValueError) as error:
        fail(f"cannot read the generator's configs: {error}")
    rewards = [RewardSpec.named(name) for name in script_args.reward_funcs]
    estimate = estimate_memory(config, generator, rewards, num_processes=processes, strategy=strategy)
    print(
        f"Estimated peak memory per process ({processes} process{'es' if processes > 1 else ''}, "
        f"{strategy.upper()}), {config.num_frames} frames at {config.height}x{config.width}, "
        f"G={config.num_generations}, {config.num_anchors} anchors, "
        f"rollout_batch_size={config.rollout_batch_size or config.num_generations}:\n"
    )
    print(estimate.table())
    print(f"\nPeak: {estimate.peak / GiB:.1f} GiB ({estimate.advice()}).")
    for note in estimate.notes:
        print(f"Note: {note}.")
    if own.gpu_memory is not None:
        memory = int(own.gpu_memory * GiB)
        verdict = "fits in" if estimate.peak <= memory else "does NOT fit in"
        print(f"\nThis run {verdict} {own.gpu_memory:g} GiB. Largest settings that fit, chosen in turn:")
        fitting = largest_fitting(
            config,
            generator,
            rewards,
            memory_bytes=memory,
            num_processes=processes,
            strategy=strategy,
            max_generations=MAX_GENERATIONS,
        )
        most = {"rollout_batch_size": config.num_generations, "num_anchors": config.num_generations}
        most["num_generations"] = MAX_GENERATIONS
        for name, value in fitting.items():
            if value is None:
                shown = "none (even 1 does not fit)"
            else:
                shown = f"{value} (the most tried)" if value == most[name] else str(value)
            print(f"  {name}: {shown}")


if __name__ == "__main__":
    main()
