"""How well a toy-world generator follows its prompts, how diverse it is, and the same figures for the renderer itself.

On ``--num_prompts`` fixed captions of the toy world (:mod:`trl_arcopo.toy.world`; a quarter of them name a held-out
colour/shape pair of ``HELD_OUT_PAIRS``, reported apart), the pipeline generates one video per prompt and the detector
(:mod:`trl_arcopo.toy.detect`) reads it back:

- **adherence**: the fraction of prompts whose stated colour, shape and motion direction the video shows, each with
  its standard error (targets for the trained toy generator: colour and shape >= 80 %, direction >= 70 %); every
  object a prompt states must show it, so the in-distribution prompts that name one and two objects get rows of their
  own;
- **largest object**: a lenient reading, "the dominant blob's colour and shape": whether the largest detected object
  has the colour (shape, direction) of some object the prompt names
  (:func:`~trl_arcopo.toy.detect.largest_object_adherence`); one right object is enough in a two-object video;
- **diversity**: for ``--diversity_prompts`` prompts, ``--diversity_noises`` videos from different noises: the mean
  pairwise pixel distance (RMS over pixels) between videos of one prompt, and the standard deviation over noises of the
  largest detected object's mean position and radius, averaged over prompts (what the prompt leaves to the noise);
- **VAE PSNR** and the **vae** rows: the pipeline's autoencoder on rendered videos of the prompts (encode, decode),
  and the adherence the detector still reads on those reconstructions (the ceiling the autoencoder leaves a generator);
- the **renderer** row: the same adherence and diversity on ``render`` itself (different seeds instead of noises), the
  ceiling of the detector on this world.

    python benchmarks/bench_toy_world.py                          # the shipped toy pipeline (trl_arcopo/toy/weights)
    python benchmarks/bench_toy_world.py --pipeline toy-run/pipeline --json toy.json --write-figures
    python benchmarks/bench_toy_world.py --pipeline toy-run/pipeline --training_run toy-run    # + the teacher's ODE

``--write-figures`` writes a strip of generated frames (prompts x 5 frames, nearest-upscaled x2) to
``docs/figures/toy_world_samples.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "toy_world_samples.png"
ADHERENCE = ("color", "shape", "direction")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=None, help="A CausalWanPipeline folder (default: the shipped toy one).")
    parser.add_argument("--num_prompts", type=int, default=200, help="Prompts for adherence (a quarter held out).")
    parser.add_argument("--diversity_prompts", type=int, default=8, help="Prompts for the diversity figures.")
    parser.add_argument("--diversity_noises", type=int, default=4, help="Videos (noises) per diversity prompt.")
    parser.add_argument("--num_frames", type=int, default=12)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32, help="Videos generated at once.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompts and of the noises.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--training_run",
        default=None,
        help="A `trl-arcopo toy-train` folder: also read the teacher's ODE samples it kept (ode_pairs.safetensors), "
        "the targets the few-step student was distilled from.",
    )
    parser.add_argument("--json", default=None, help="Write the figures to this JSON file.")
    parser.add_argument("--write-figures", action="store_true", help=f"Write the sample strip to {FIGURE}.")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "diversity_prompts", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.diversity_noises < 2:
        parser.error(f"--diversity_noises must be >= 2 (pairs of videos), got {args.diversity_noises}.")
    return args


def prompts(count: int, seed: int) -> tuple[list[str], list[bool]]:
    """``count`` fixed captions and whether each names a held-out colour/shape pair (every fourth one does)."""
    from trl_arcopo.toy.world import HELD_OUT_PAIRS, caption, sample_scene

    rng = np.random.default_rng(seed)
    held_out = itertools.cycle(sorted(HELD_OUT_PAIRS))
    texts, flags = [], []
    for i in range(count):
        scene = sample_scene(rng)
        if i % 4 == 3:
            color, shape = next(held_out)
            first = replace(scene.objects[0], color=color, shape=shape, turns_into=None)
            scene = replace(scene, objects=(first, *scene.objects[1:]))
        texts.append(caption(scene))
        flags.append(i % 4 == 3)
    return texts, flags


def load_pipeline(args: argparse.Namespace):
    from trl_arcopo.pipelines.causal_wan import CausalWanPipeline
    from trl_arcopo.toy import load_toy_pipeline

    if args.pipeline is not None:
        return CausalWanPipeline.from_pretrained(args.pipeline).to(args.device)
    try:
        return load_toy_pipeline(device=args.device)
    except FileNotFoundError as error:
        sys.exit(f"{error}\nOr pass --pipeline PATH (a folder saved by CausalWanPipeline.save_pretrained).")


@torch.no_grad()
def generate(pipe, texts: list[str], seeds: list[int], args: argparse.Namespace) -> torch.Tensor:
    """Videos ``[B, F, 3, H, W]`` in [0, 1], video ``i`` from the noise of ``seeds[i]``."""
    videos = []
    for start in range(0, len(texts), args.batch_size):
        batch = slice(start, start + args.batch_size)
        generators = [torch.Generator(args.device).manual_seed(s) for s in seeds[batch]]
        out = pipe(
            texts[batch],
            num_frames=args.num_frames,
            height=args.height,
            width=args.width,
            generator=generators,
            output_type="pt",
        )
        videos.append(out.frames.float().cpu())
    return torch.cat(videos)


def rate(values: list[bool]) -> dict[str, float]:
    """Mean of booleans and its standard error (NaN without values)."""
    n = len(values)
    p = float(np.mean(values)) if n else math.nan
    return {"rate": p, "se": math.sqrt(p * (1 - p) / n) if n else math.nan, "n": n}


def adherence_rates(
    texts: list[str], videos: torch.Tensor, splits: dict[str, list[bool]]
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """For each reading (``adherence``: every stated object; ``largest_object``: the largest detected object against
    any stated one) and each split (a mask over the prompts), the rate of each attribute of :data:`ADHERENCE` that
    ``videos`` show; every video is detected once, whatever the splits it belongs to."""
    from trl_arcopo.toy.detect import adherence, detect, largest_object_adherence

    detections = detect(videos)
    readings = {"adherence": adherence, "largest_object": largest_object_adherence}
    rates = {}
    for reading, judge in readings.items():
        results = [judge(text, d) for text, d in zip(texts, detections, strict=True)]
        rates[reading] = {
            split: {
                name: rate([r[name] for r, keep in zip(results, mask, strict=True) if keep and r[name] is not None])
                for name in ADHERENCE
            }
            for split, mask in splits.items()
        }
    return rates


@torch.no_grad()
def teacher_adherence(pipe, run: Path, count: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Adherence of the first ``count`` teacher ODE samples of a toy-train folder ``run`` (normalised latents
    ``[M, C, F, h, w]`` and their captions), decoded by ``pipe``'s VAE."""
    from safetensors.torch import load_file

    latents = load_file(run / "ode_pairs.safetensors")["latents"][:count]
    captions = json.loads((run / "ode_captions.json").read_text())[: len(latents)]
    videos = torch.cat(
        [pipe.decode(b.to(pipe.vae.device), output_type="pt").float().cpu() for b in latents.split(batch_size)]
    )
    return adherence_rates(captions, videos, {"all": [True] * len(captions)})["adherence"]["all"]


def diversity(videos: torch.Tensor, noises: int) -> dict[str, float]:
    """``videos`` ``[P · noises, F, 3, H, W]``, the noises of a prompt next to each other."""
    from trl_arcopo.toy.detect import detect

    groups = videos.unflatten(0, (-1, noises)).flatten(2)  # [P, N, F·3·H·W]
    distance = torch.cdist(groups, groups) / math.sqrt(groups.shape[-1])  # RMS pixel distance
    pairs = distance.sum((1, 2)) / (noises * (noises - 1))
    spreads = []
    for start in range(0, len(videos), noises):
        found = [d.objects[0] for d in detect(videos[start : start + noises]) if d.objects]
        if len(found) >= 2:
            x = [np.nanmean(o.x) for o in found]
            y = [np.nanmean(o.y) for o in found]
            spreads.append([np.std(x), np.std(y), np.std([o.radius for o in found])])
    spread = np.mean(spreads, 0) if spreads else [math.nan] * 3
    return {
        "pixel_distance": float(pairs.mean()),
        "x_std": float(spread[0]),
        "y_std": float(spread[1]),
        "radius_std": float(spread[2]),
    }


@torch.no_grad()
def vae_reconstruct(vae, videos: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The autoencoder's reconstruction ``[B, F, 3, H, W]`` in [0, 1] of ``videos`` (same shape), encoded as the toy
    generator's training data is (each frame on its own) and decoded as the pipeline decodes (whole videos)."""
    from trl_arcopo.toy.train import encode_videos

    reconstructions = []
    for batch in videos.split(batch_size):
        latents = encode_videos(vae, batch.to(vae.device, vae.dtype))  # [B, C, F, h, w]
        decoded = vae.decode(latents).sample.float().cpu()  # [B, 3, F, H, W] in [-1, 1]
        reconstructions.append(((decoded + 1) / 2).clamp(0, 1).transpose(1, 2))
    return torch.cat(reconstructions)


def psnr(reconstruction: torch.Tensor, videos: torch.Tensor) -> float:
    """Mean over videos of the PSNR (dB, pixels in [0, 1]) of ``reconstruction`` against ``videos`` ``[B, ...]``."""
    errors = (reconstruction - videos).square().flatten(1).mean(1)
    return float((-10 * torch.log10(errors.clamp_min(1e-10))).mean())


def write_strip(videos: torch.Tensor, path: Path, frames: int = 5) -> None:
    """A PNG grid: one row per video, ``frames`` evenly spaced frames, nearest-upscaled x2, 2-pixel gaps."""
    from PIL import Image

    index = torch.linspace(0, videos.shape[1] - 1, frames).round().long()
    tiles = videos[:, index].repeat_interleave(2, -1).repeat_interleave(2, -2)  # [R, T, 3, 2H, 2W]
    tiles = torch.nn.functional.pad(tiles, (1, 1, 1, 1), value=1.0)
    rows, cols, _, h, w = tiles.shape
    grid = tiles.permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().byte().numpy()).save(path)


def table(results: dict) -> str:
    def row(label: str, rates: dict[str, dict[str, float]]) -> str:
        return f"{label:<26}" + "".join(
            f"{rates[name]['rate']:>9.1%} ± {rates[name]['se']:>4.1%}" for name in ADHERENCE
        )

    lines = [f"{'every stated object':<26}{'colour':>16}{'shape':>16}{'direction':>16}"]
    for source in ("generator", "renderer", "vae"):
        for split, rates in results[source]["adherence"].items():
            lines.append(row(f"{source} {split.replace('_', '-')}", rates))
    if "teacher_ode" in results:
        lines.append(row("teacher ODE samples", results["teacher_ode"]))
    lines.append("")
    lines.append(f"{'largest object':<26}{'colour':>16}{'shape':>16}{'direction':>16}")
    for source in ("generator", "renderer"):
        for split, rates in results[source]["largest_object"].items():
            lines.append(row(f"{source} {split.replace('_', '-')}", rates))
    lines.append("")
    lines.append(f"{'diversity':<22}{'pixel RMS':>12}{'x std':>10}{'y std':>10}{'radius std':>12}")
    for source in ("generator", "renderer"):
        d = results[source]["diversity"]
        lines.append(
            f"{source:<22}{d['pixel_distance']:>12.3f}{d['x_std']:>10.3f}{d['y_std']:>10.3f}{d['radius_std']:>12.3f}"
        )
    lines.append("")
    lines.append(f"VAE reconstruction PSNR on rendered videos: {results['vae_psnr_db']:.2f} dB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from trl_arcopo.toy.world import parse, render

    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    texts, held_out = prompts(args.num_prompts, args.seed)
    in_distribution = [not flag for flag in held_out]
    # Every stated object must be right: two-object prompts are harder, so they and one-object prompts get own rows.
    objects = [len(parse(text).objects) if keep else 0 for text, keep in zip(texts, in_distribution, strict=True)]
    splits = {
        "in_distribution": in_distribution,
        "one_object": [n == 1 for n in objects],
        "two_object": [n == 2 for n in objects],
        "held_out": held_out,
    }
    size = (args.num_frames, args.height, args.width)
    start = time.perf_counter()
    noise_seeds = [args.seed * 100_000 + i for i in range(len(texts))]
    generated = generate(pipe, texts, noise_seeds, args)
    rendered = render(texts, *size, seed=noise_seeds)
    reconstructed = vae_reconstruct(pipe.vae, rendered, args.batch_size)

    # Diversity: the first in-distribution prompts, several noises (or render seeds) each.
    chosen = [t for t, keep in zip(texts, in_distribution, strict=True) if keep][: args.diversity_prompts]
    repeated = [t for t in chosen for _ in range(args.diversity_noises)]
    seeds = [10**9 + i for i in range(len(repeated))]
    results = {
        "generator": {
            **adherence_rates(texts, generated, splits),
            "diversity": diversity(generate(pipe, repeated, seeds, args), args.diversity_noises),
        },
        "renderer": {
            **adherence_rates(texts, rendered, splits),
            "diversity": diversity(render(repeated, *size, seed=seeds), args.diversity_noises),
        },
        # The autoencoder's ceiling: what the detector still reads after encoding and decoding perfect videos.
        "vae": {"adherence": adherence_rates(texts, reconstructed, splits)["adherence"]},
        "vae_psnr_db": psnr(reconstructed, rendered),
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "write_figures")},
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
    if args.training_run is not None:
        results["teacher_ode"] = teacher_adherence(pipe, Path(args.training_run), args.num_prompts, args.batch_size)
    print(table(results))
    if args.write_figures:
        write_strip(generated[:6], FIGURE)
        print(f"Wrote {FIGURE}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
