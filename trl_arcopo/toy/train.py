"""Train the toy world's few-step causal generator from scratch, the way Self-Forcing's generator starts.

    python -m trl_arcopo.toy.train --output_dir toy-run        # or: trl-arcopo toy-train --output_dir toy-run

Stages (each resumable; a finished stage is skipped when the command is run again):

1. ``vae``: an ``AutoencoderKLWan`` trained to reconstruct rendered clips (L1 + MSE + a small KL), then the
   per-channel latent mean/std written to its config (the normalised latent space of Wan2.1).
2. ``latents``: a dataset of rendered videos with training captions, encoded once.
3. ``teacher``: a ``WanTransformer3DModel`` trained by block-causal flow matching: chunk ``c`` noised at ``σ``
   attends to the clean chunks before it (timestep 0, as the KV cache's context pass) under the chunk-causal mask;
   the text encoder is trained with it; captions are dropped 10 % of the time for classifier-free guidance. The
   loss weighs the objects' latent pixels more (``foreground_weight``; ``foreground_ring`` extends it to the
   background around them) and the first chunk is drawn more often
   (``first_chunk_fraction``): both spend the budget where the caption's content is decided.
4. ``ode``: the teacher generates videos chunk by chunk with a many-step Euler ODE sampler (guided), recording the
   state at the 4 timesteps of the few-step sampler and the final clean latents. For a caption that names two
   objects, the first chunk's early steps are guided by region (``ode_regional_sigma``): the left half of the frame
   is denoised as a frame of its own with the first-named object's one-object caption, the right half with the
   second's, so that the two objects are placed apart, which the teacher alone rarely does.
5. ``student``: initialised from the teacher, regressed on those ODE pairs at the sampler's 4 timesteps: its x̂0 must
   equal the ODE's clean chunk, from the ODE's initial noise at step 1 and, at steps 2-4, from that clean chunk
   re-noised with fresh noise (what the sampler feeds it; ``student_ode_states`` mixes in the recorded ODE states),
   with the clean ODE chunks before it as context. This makes the initial noise decide the content (the regime of
   Self-Forcing's distilled generators), and the result runs unchanged in ``CausalWanPipeline``'s 4-step sampler.
6. ``dmd`` (only with ``--dmd_steps N``): distribution matching, the stage Self-Forcing trains its generator with.
   The generator samples a chunk after context it generated itself; a critic learns the distribution of those
   samples; the generator moves along the difference between the critic's and the guided teacher's estimates. The
   pipeline then ships this generator. Off by default: on the default recipe it raises the colour adherence (65 % to
   78 % on the benchmark's prompts), but AR-CoPO's LoRA on the result turns the main job's frames into textures
   instead of red frames (docs/benchmarks.md, "A distribution-matching stage").

The result is a ``CausalWanPipeline`` folder (``save_pretrained``), a loss-curve PNG and ``losses.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm.auto import tqdm
from transformers import HfArgumentParser, UMT5EncoderModel, get_cosine_schedule_with_warmup

from ..pipelines.causal_wan import CausalWanPipeline
from ..pipelines.sampler import renoise
from ..utils.video_size import whole_chunk_frames
from .components import TOY_PIPELINE_CONFIG, TOY_VAE_STRIDES, toy_transformer_config, toy_vae
from .text import toy_text_encoder, toy_tokenizer
from .world import SHAPES, caption, coverage, layout, render, sample_scene, travel_directions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "ToyTrainingConfig",
    "distribution_matching_loss",
    "encode_videos",
    "main",
    "make_parser",
    "train_toy_pipeline",
]


@dataclass
class ToyTrainingConfig:
    """Sizes and budgets of the toy generator's training (defaults: the shipped pipeline)."""

    output_dir: str = field(default="toy-run", metadata={"help": "Folder of the stages' results and checkpoints."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage (data, initialisation, noise)."})
    # Video size
    num_frames: int = field(default=12, metadata={"help": "Frames of the videos (a multiple of the 3-frame chunk)."})
    height: int = field(default=32, metadata={"help": "Pixel height (a multiple of 8)."})
    width: int = field(default=32, metadata={"help": "Pixel width (a multiple of 8)."})
    # VAE
    vae_steps: int = field(default=1500, metadata={"help": "Optimizer steps of the VAE."})
    vae_batch_size: int = field(
        default=16, metadata={"help": "Frames per VAE step (one from each of as many videos)."}
    )
    vae_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the VAE."})
    vae_kl_weight: float = field(default=1e-4, metadata={"help": "Weight of the per-element KL term."})
    vae_shape_code_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of a term that makes the latent's first channels (one per shape of the world) a per-pixel "
            "code of the objects' shape: their posterior mean is pulled to 2 x that shape's coverage of each latent "
            "pixel. The generator can then take the shape from the caption as it takes a colour, a value per pixel, "
            "where it cannot learn an outline around a centre that the noise decides (docs/benchmarks.md). 0: off."
        },
    )
    vae_blur_probability: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of the VAE's training frames decoded from their latents blurred (Gaussian, sigma 1.5 "
            "latent pixels), so that the decoder learns to draw an outline from the shape code where the latent's "
            "outline is vague, as in a generator's samples. 0: off."
        },
    )
    motion_code: bool = field(
        default=True,
        metadata={
            "help": "Replace the two latent channels after the shape code by a per-pixel code of each object's "
            "direction of travel (2 x its (dx, dy), 0 on the background and on bouncing objects) in the latents the "
            "generator trains on, and in the VAE's decoder inputs so that it decodes such latents. A per-frame "
            "encoder cannot see motion; with the code the generator can take the direction from the caption as a "
            "value per pixel in the first chunk, and its later chunks continue it. `--motion_code false`: off."
        },
    )
    # Dataset
    num_videos: int = field(default=3000, metadata={"help": "Rendered and encoded videos for the teacher."})
    # Teacher
    teacher_steps: int = field(default=7500, metadata={"help": "Optimizer steps of the flow-matching teacher."})
    teacher_batch_size: int = field(default=32, metadata={"help": "Videos per teacher step."})
    teacher_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the teacher."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Fraction of empty captions (for guidance)."})
    foreground_weight: float = field(
        default=4.0,
        metadata={
            "help": "Extra weight of the teacher's loss where objects are: each latent pixel weighs 1 + this x the "
            "fraction of it the objects cover. Objects are about a sixth of the pixels and carry everything a "
            "caption says."
        },
    )
    foreground_ring: int = field(
        default=0,
        metadata={
            "help": "Latent pixels of background around each object that get the objects' weight too (coverage "
            "max-pooled over a (2r+1)x(2r+1) window). The weight alone makes the teacher's objects too large "
            "(docs/benchmarks.md: radius 0.26 for the world's 0.19; a ring of 2 gives 0.21). 0: the objects only."
        },
    )
    first_chunk_fraction: float = field(
        default=0.79,
        metadata={
            "help": "Fraction of the teacher's steps spent on the first chunk, where the objects' colour, shape and "
            "place are decided (the later chunks share the rest equally; it is also the cheapest chunk). The default "
            "gives the first chunk ~5900 of the 7500 steps; with under ~4500 its samples break objects into fragments."
        },
    )
    timestep_shift: float = field(default=3.0, metadata={"help": "Shift of the teacher's training sigmas."})
    # ODE pairs
    ode_videos: int = field(default=1024, metadata={"help": "Videos generated by the teacher's ODE sampler."})
    ode_steps: int = field(default=20, metadata={"help": "Euler steps per chunk (a multiple of 4)."})
    ode_batch_size: int = field(default=128, metadata={"help": "Videos per ODE batch."})
    guidance_scale: float = field(default=2.5, metadata={"help": "Classifier-free guidance of the teacher's ODE."})
    ode_regional_sigma: float = field(
        default=0.5,
        metadata={
            "help": "Regional guidance of the ODE samples of two-object captions: while the noise level is above "
            "this sigma, the first chunk's left half is denoised as a frame of its own with the first-named "
            "object's one-object caption and its right half with the second's (each guided); the full caption "
            "below it and in every later chunk. The teacher alone draws two separate objects for under a tenth of "
            "two-object captions; with it the colour adherence of its two-object ODE samples "
            "goes from 38 to 69 percent (docs/benchmarks.md). Needs a width that is a multiple of 16. 1: off."
        },
    )
    # Student
    student_steps: int = field(default=800, metadata={"help": "Optimizer steps of the few-step student."})
    student_batch_size: int = field(default=16, metadata={"help": "Videos per student step (x 4 sampler steps)."})
    student_learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate of the student."})
    student_ode_states: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the student's steps 2..T trained on the teacher's ODE states instead of the clean ODE "
            "chunk re-noised with fresh noise (the sampler's own inputs)."
        },
    )
    # Distribution matching
    dmd_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of an optional distribution-matching stage (DMD, as Self-Forcing trains its generator) after "
            "the regression: the 4-step sampler's samples are moved along the difference between a critic's "
            "estimate (trained online on those samples) and the guided teacher's. 0: none."
        },
    )
    dmd_batch_size: int = field(default=16, metadata={"help": "Videos per distribution-matching step."})
    dmd_learning_rate: float = field(
        default=1e-4, metadata={"help": "Peak learning rate of the generator and its critic in the DMD stage."}
    )
    dmd_critic_steps: int = field(
        default=2, metadata={"help": "Critic updates per generator update in the DMD stage (the first of each set)."}
    )
    dmd_regression_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the student's ODE-pair regression loss added to the generator's DMD loss (as DMD's "
            "paired regression term): keeps the generator on the teacher's noise-to-video map, and takes back DMD's "
            "colour gain in proportion (docs/benchmarks.md). 0: DMD alone."
        },
    )
    # Bookkeeping
    checkpoint_every: int = field(default=100, metadata={"help": "Steps between resumable checkpoints."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    stop_after: str | None = field(
        default=None,
        metadata={
            "help": "Stop after this stage (vae, latents, teacher, ode, student, dmd); rerun without it to go on."
        },
    )

    def __post_init__(self) -> None:
        spatial, temporal = TOY_VAE_STRIDES
        multiple = spatial * toy_transformer_config()["patch_size"][1]
        if self.height <= 0 or self.width <= 0 or self.height % multiple or self.width % multiple:
            raise ValueError(
                f"`height` and `width` must be positive multiples of {multiple}, got {self.height}x{self.width}."
            )
        chunk = TOY_PIPELINE_CONFIG["num_frame_per_block"]
        first, step = whole_chunk_frames(temporal, chunk)
        if self.num_frames < first or (self.num_frames - first) % step:
            valid = ", ".join(str(first + step * k) for k in range(4))
            raise ValueError(
                f"`num_frames` must make whole chunks of latent frames ({valid}, ...), got {self.num_frames}."
            )
        if not 0 < self.first_chunk_fraction <= 1 or self.foreground_weight < 0:
            raise ValueError(
                "`first_chunk_fraction` must be in (0, 1] and `foreground_weight` >= 0, got "
                f"{self.first_chunk_fraction} and {self.foreground_weight}."
            )
        if self.vae_shape_code_weight < 0 or not 0 <= self.vae_blur_probability <= 1:
            raise ValueError(
                "`vae_shape_code_weight` must be >= 0 and `vae_blur_probability` in [0, 1], got "
                f"{self.vae_shape_code_weight} and {self.vae_blur_probability}."
            )
        if self.foreground_ring < 0:
            raise ValueError(f"`foreground_ring` must be >= 0 latent pixels, got {self.foreground_ring}.")
        if self.dmd_steps < 0 or self.dmd_critic_steps < 1:
            raise ValueError(
                f"`dmd_steps` must be >= 0 and `dmd_critic_steps` >= 1, got {self.dmd_steps} and {self.dmd_critic_steps}."
            )
        if not self.dmd_regression_weight >= 0:
            raise ValueError(f"`dmd_regression_weight` must be >= 0 (0: DMD alone), got {self.dmd_regression_weight}.")
        if self.ode_steps % 4:
            raise ValueError(
                f"`ode_steps` must be a multiple of 4 (the sampler's timesteps lie on its grid), got {self.ode_steps}."
            )
        if not 0 <= self.ode_regional_sigma <= 1:
            raise ValueError(f"`ode_regional_sigma` must be in [0, 1] (1: off), got {self.ode_regional_sigma}.")
        if self.ode_regional_sigma < 1 and self.width % (2 * multiple):
            raise ValueError(
                f"`ode_regional_sigma` < 1 denoises each half of the frame alone, so `width` must be a multiple of "
                f"{2 * multiple}, got {self.width}; use such a width or `--ode_regional_sigma 1` (off)."
            )


# ----------------------------------------------------------------------------------------------------------------------
# A resumable training loop shared by the stages
# ----------------------------------------------------------------------------------------------------------------------


def _stage_rng(seed: int, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The randomness of one step of one stage: a pure function of (seed, stage, step), so resuming replays it."""
    rng = np.random.default_rng([seed, stage, step])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def _atomic_dir(path: Path) -> Path:
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, path: Path) -> None:
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def _train_stage(
    name: str,
    modules: dict[str, nn.Module],
    loss_fn: Callable[[int], torch.Tensor],
    *,
    steps: int,
    learning_rate: float,
    output_dir: Path,
    checkpoint_every: int,
    ema_decay: float | None = None,
) -> list[float]:
    """AdamW with warm-up and cosine decay over ``steps``, gradient clipping at 1, optional EMA (copied into the
    modules at the end); a checkpoint every ``checkpoint_every`` steps from which a rerun continues exactly.

    Returns the loss of every step.
    """

    params = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, betas=(0.9, 0.99))
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=0.75) if ema_decay else None
    checkpoint = output_dir / f"{name}-checkpoint"
    losses: list[float] = []
    if checkpoint.exists():
        for key, module in modules.items():
            load_model(module, str(checkpoint / f"{key}.safetensors"))
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        losses = json.loads((checkpoint / "progress.json").read_text())["losses"]

    for module in modules.values():
        module.train()
    with tqdm(total=steps, initial=len(losses), desc=name, dynamic_ncols=True) as bar:
        for step in range(len(losses), steps):
            loss = loss_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.step(params)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                staging = _atomic_dir(checkpoint)
                for key, module in modules.items():
                    save_model(module, str(staging / f"{key}.safetensors"))
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                if ema is not None:
                    state["ema"] = ema.state_dict()
                torch.save(state, staging / "optimizer.pt")
                (staging / "progress.json").write_text(json.dumps({"losses": losses}))
                _publish(staging, checkpoint)
    if ema is not None:
        ema.copy_to(params)
    for module in modules.values():
        module.eval()
    shutil.rmtree(checkpoint, ignore_errors=True)
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------------


def shape_code(layouts: list, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The VAE's shape-code target ``[B, len(SHAPES), h, w]``: 2 x each shape's coverage of each latent pixel in frame
    ``frames[b]`` ``[B]`` of ``layouts[b]`` (rendered at ``height`` x ``width``)."""
    shapes = coverage(layouts, layouts[0].num_frames, height, width, per_shape=True)  # [B, F, S, H, W]
    return _latent_code(shapes[torch.arange(len(layouts)), frames].unsqueeze(1))[:, :, 0]  # the picked frames only


def motion_code(layouts: list, height: int, width: int) -> torch.Tensor:
    """The motion code ``[B, 2, F, h, w]`` of ``layouts`` (rendered at ``height`` x ``width``): 2 x the objects' direction
    of travel on each latent pixel (`travel_directions`, averaged over the pixels the latent pixel covers)."""
    return _latent_code(travel_directions(layouts, layouts[0].num_frames, height, width))


def _latent_code(maps: torch.Tensor) -> torch.Tensor:
    """Per-pixel maps ``[B, F, K, H, W]`` -> 2 x their average over each latent pixel, ``[B, K, F, h, w]``."""
    pooled = nn.functional.avg_pool2d(maps.flatten(0, 1), TOY_VAE_STRIDES[0])
    return 2 * pooled.unflatten(0, maps.shape[:2]).transpose(1, 2)


def with_motion_code(latents: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``latents`` ``[B, C, F, h, w]`` with the channels after the shape code's replaced by ``code`` ``[B, 2, F, h, w]``."""
    first = len(SHAPES)
    return torch.cat([latents[:, :first], code, latents[:, first + code.shape[1] :]], dim=1)


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """A normalised 2-D Gaussian ``[1, 1, 2·radius + 1, 2·radius + 1]`` (a depthwise convolution's weight)."""
    g = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32).square() / (2 * sigma**2))
    g = g[:, None] * g[None]
    return (g / g.sum()).view(1, 1, 2 * radius + 1, 2 * radius + 1)


def _scenes_and_seeds(rng: np.random.Generator, count: int):
    scenes = [sample_scene(rng) for _ in range(count)]
    return [caption(s) for s in scenes], scenes, [int(s) for s in rng.integers(2**31, size=count)]


def _frames(videos: torch.Tensor) -> torch.Tensor:
    """Rendered videos ``[B, F, 3, H, W]`` in [0, 1] -> single-frame clips ``[B·F, 3, 1, H, W]`` in [-1, 1] (the toy
    autoencoder is per frame, so frames are encoded and decoded as a batch)."""
    return videos.flatten(0, 1).unsqueeze(2) * 2 - 1


@torch.no_grad()
def encode_videos(vae: AutoencoderKLWan, videos: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, C, F, h, w]`` (posterior modes, not normalised) of rendered videos ``[B, F, 3, H, W]``."""
    latents = vae.encode(_frames(videos)).latent_dist.mode()  # [B·F, C, 1, h, w]
    return latents.squeeze(2).unflatten(0, videos.shape[:2]).transpose(1, 2)


def train_vae(cfg: ToyTrainingConfig, out: Path) -> list[float]:

    torch.manual_seed(cfg.seed)
    vae = toy_vae()
    with torch.no_grad():
        # Start nearly deterministic (posterior std e^-4): from the default init (std ~1) the decoder first sees noise
        # and learns the mean frame for hundreds of steps; the KL term then widens the posterior as far as it can.
        z_dim = vae.config.z_dim
        vae.quant_conv.weight[z_dim:].zero_()
        vae.quant_conv.bias[z_dim:].fill_(-8.0)
    # `AutoencoderKLWan.decode` clamps its output to [-1, 1], which zeroes the gradient of every overshooting pixel
    # (a dark background learnt as < -1 would never be corrected): while training, the decoder's output is clamped in
    # value but passes its gradient straight through.
    hook = vae.decoder.register_forward_hook(lambda module, args, out: out - (out - out.clamp(-1, 1)).detach())

    blur = _gaussian_kernel(1.5, 2).expand(vae.config.z_dim, 1, -1, -1)  # depthwise over the latent's channels

    def loss_fn(step: int) -> torch.Tensor:
        rng, generator = _stage_rng(cfg.seed, 1, step)
        _, scenes, seeds = _scenes_and_seeds(rng, cfg.vae_batch_size)
        layouts = [layout(scene, cfg.num_frames, seed) for scene, seed in zip(scenes, seeds, strict=True)]
        videos = render(layouts, cfg.num_frames, cfg.height, cfg.width)
        picked = (torch.arange(len(videos)), torch.as_tensor(rng.integers(cfg.num_frames, size=len(videos))))
        x = _frames(videos[picked].unsqueeze(1))
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        if cfg.motion_code:
            z = with_motion_code(z, motion_code(layouts, cfg.height, cfg.width)[picked[0], :, picked[1]].unsqueeze(2))
        if cfg.vae_blur_probability:
            blurred = nn.functional.conv2d(z[:, :, 0], blur, padding=blur.shape[-1] // 2, groups=z.shape[1])
            blurred = blurred.unsqueeze(2)  # [B, C, 1, h, w]
            chosen = torch.rand(len(z), generator=generator) < cfg.vae_blur_probability
            z = torch.where(chosen.view(-1, 1, 1, 1, 1), blurred, z)
        reconstruction = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        loss = (reconstruction - x).abs().mean() + (reconstruction - x).square().mean() + cfg.vae_kl_weight * kl
        if cfg.vae_shape_code_weight:
            code = shape_code(layouts, picked[1], cfg.height, cfg.width)
            loss = loss + cfg.vae_shape_code_weight * (posterior.mean[:, : code.shape[1], 0] - code).square().mean()
        return loss

    losses = _train_stage(
        "vae",
        {"vae": vae},
        loss_fn,
        steps=cfg.vae_steps,
        learning_rate=cfg.vae_learning_rate,
        output_dir=out,
        checkpoint_every=cfg.checkpoint_every,
    )
    hook.remove()
    vae.save_pretrained(out / "vae")
    return losses


@torch.no_grad()
def encode_dataset(cfg: ToyTrainingConfig, out: Path) -> None:
    """Render ``num_videos`` training videos, encode them, store the normalised latents with the objects' coverage of
    each latent pixel (``foreground`` ``[N, F, h, w]``, for the teacher's loss weights) and write the latent statistics
    into the VAE's config (``latents_mean`` / ``latents_std``, as Wan2.1's)."""

    vae = AutoencoderKLWan.from_pretrained(out / "vae").eval()
    rng = np.random.default_rng([cfg.seed, 2])
    captions, latents, foreground = [], [], []
    batch = 32
    for start in tqdm(range(0, cfg.num_videos, batch), desc="latents", dynamic_ncols=True):
        texts, scenes, seeds = _scenes_and_seeds(rng, min(batch, cfg.num_videos - start))
        layouts = [layout(scene, cfg.num_frames, seed) for scene, seed in zip(scenes, seeds, strict=True)]
        encoded = encode_videos(vae, render(layouts, cfg.num_frames, cfg.height, cfg.width))
        latents.append(
            with_motion_code(encoded, motion_code(layouts, cfg.height, cfg.width)) if cfg.motion_code else encoded
        )
        covered = coverage(layouts, cfg.num_frames, cfg.height, cfg.width)
        foreground.append(torch.nn.functional.avg_pool2d(covered, TOY_VAE_STRIDES[0]))
        captions += texts
    latents = torch.cat(latents)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    vae.save_pretrained(out / "vae")
    normalized = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    save_file({"latents": normalized.contiguous(), "foreground": torch.cat(foreground)}, out / "latents.safetensors")
    (out / "captions.json").write_text(json.dumps(captions))


def _pipeline(
    transformer: nn.Module, text_encoder: nn.Module, vae: AutoencoderKLWan | None = None, **config
) -> CausalWanPipeline:
    """A ``CausalWanPipeline`` over the toy components (without a VAE, the training stages work on latents)."""
    return CausalWanPipeline(
        tokenizer=toy_tokenizer(TOY_PIPELINE_CONFIG["max_sequence_length"]),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        **{**TOY_PIPELINE_CONFIG, **config},
    )


def _chunk_inputs(
    context: torch.Tensor, noisy: torch.Tensor, timestep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean context frames ``[B, C, k, h, w]`` followed by a noisy chunk ``[B, C, f, h, w]`` at ``timestep`` ``[B]``:
    the latents and per-frame timesteps (0 for the context, as the cache's context pass) of one block-causal forward."""
    frames = torch.cat(
        [context.new_zeros(context.shape[0], context.shape[2]), timestep[:, None].expand(-1, noisy.shape[2])], 1
    )
    return torch.cat([context, noisy], dim=2), frames


def _denoise_chunk(
    pipe: CausalWanPipeline,
    context: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    timestep: torch.Tensor | None = None,
) -> torch.Tensor:
    """x̂0 ``[B, C, f, h, w]`` of a noisy chunk ``x_t`` at ``sigma`` ``[B]`` after clean ``context`` ``[B, C, k, h, w]``:
    ``x_t - σ·v`` of one block-causal forward (``timestep`` ``[B]`` defaults to ``1000·σ``, the training grid)."""
    timestep = 1000 * sigma if timestep is None else timestep
    inputs, frame_t = _chunk_inputs(context, x_t, timestep)
    flow = pipe.forward_block_causal(inputs, frame_t, prompt_embeds)[:, :, context.shape[2] :]
    return x_t - sigma.view(-1, 1, 1, 1, 1) * flow


def loss_weight(coverage: torch.Tensor, foreground_weight: float, ring: int = 0) -> torch.Tensor:
    """Per-pixel weight ``[B, 1, F, h, w]`` of the teacher's loss from the objects' coverage ``[B, F, h, w]`` of each
    latent pixel: ``1 + foreground_weight * coverage``, the coverage first spread over ``ring`` pixels around it."""
    if ring:
        frames = coverage.flatten(0, 1).unsqueeze(1)
        coverage = nn.functional.max_pool2d(frames, 2 * ring + 1, stride=1, padding=ring).squeeze(1).view_as(coverage)
    return 1 + foreground_weight * coverage.unsqueeze(1)


def train_teacher(cfg: ToyTrainingConfig, out: Path) -> list[float]:

    data = load_file(out / "latents.safetensors")
    latents, foreground = data["latents"], data["foreground"]  # [N, C, F, h, w], [N, F, h, w]
    captions = json.loads((out / "captions.json").read_text())
    torch.manual_seed(cfg.seed)
    transformer = WanTransformer3DModel(**toy_transformer_config())
    torch.manual_seed(cfg.seed)
    text_encoder = toy_text_encoder()
    pipe = _pipeline(transformer, text_encoder)
    chunk = pipe.config.num_frame_per_block
    num_chunks = latents.shape[2] // chunk
    shift = cfg.timestep_shift
    later = (1 - cfg.first_chunk_fraction) / max(1, num_chunks - 1)
    chunk_probabilities = [cfg.first_chunk_fraction] + [later] * (num_chunks - 1) if num_chunks > 1 else [1.0]

    def loss_fn(step: int) -> torch.Tensor:
        rng, generator = _stage_rng(cfg.seed, 3, step)
        index = torch.as_tensor(rng.integers(len(latents), size=cfg.teacher_batch_size))
        c = int(rng.choice(num_chunks, p=chunk_probabilities))
        x0 = latents[index, :, : (c + 1) * chunk]
        clean = x0[:, :, c * chunk :]
        u = torch.rand(len(index), generator=generator)
        sigma = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(clean.shape, generator=generator)
        noisy = renoise(clean, noise, sigma.view(-1, 1, 1, 1, 1))
        inputs, timesteps = _chunk_inputs(x0[:, :, : c * chunk], noisy, 1000 * sigma)
        texts = ["" if rng.random() < cfg.caption_dropout else captions[i] for i in index.tolist()]
        flow = pipe.forward_block_causal(inputs, timesteps, pipe.encode_prompt(texts))[:, :, c * chunk :]
        weight = loss_weight(
            foreground[index, c * chunk : (c + 1) * chunk], cfg.foreground_weight, cfg.foreground_ring
        )
        return (weight * (flow - (noise - clean)).square()).mean() / weight.mean()

    losses = _train_stage(
        "teacher",
        {"transformer": transformer, "text_encoder": text_encoder},
        loss_fn,
        steps=cfg.teacher_steps,
        learning_rate=cfg.teacher_learning_rate,
        output_dir=out,
        checkpoint_every=cfg.checkpoint_every,
        ema_decay=0.999,
    )
    transformer.save_pretrained(out / "teacher" / "transformer")
    text_encoder.save_pretrained(out / "teacher" / "text_encoder")
    return losses


def _guided_x0(pipe, state, x: torch.Tensor, step: int, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided x̂0 ``[B, C, f, h, w]`` of ``x`` for a state over ``[conditional; unconditional]`` rows."""
    conditional, unconditional = pipe.predict_x0(state, torch.cat([x, x]), step).chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def ode_sample(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    noise: torch.Tensor,
    guidance_scale: float,
    record: list[int],
    halves: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    regional_sigma: float = 1.0,
):
    """Generate latents chunk by chunk with a guided Euler ODE over the pipeline's step list (``σ`` to 0).

    Args:
        pipe: a ``CausalWanPipeline`` whose ``denoising_step_list`` is the ODE grid.
        prompt_embeds, negative_embeds: ``[B, L, D]`` conditional and empty-caption embeddings.
        noise: ``[B, C, F, h, w]`` initial noise of every chunk.
        record: grid indices whose inputs are returned (the few-step sampler's timesteps).
        halves: optional regional guidance, ``(rows [R], left_embeds [R, L, D], right_embeds [R, L, D])``: while
            ``σ > regional_sigma``, the first chunk of each of those rows is denoised as two frames of half the
            width, the left one guided by ``left_embeds`` and the right one by ``right_embeds``.

    Returns:
        ``(latents [B, C, F, h, w], states [len(record), B, C, F, h, w])``.
    """
    chunk = pipe.config.num_frame_per_block
    batch = noise.shape[0]
    state = pipe.init_state(torch.cat([prompt_embeds, negative_embeds]))
    if halves is not None:
        rows, left, right = halves
        half = noise.shape[-1] // 2
        regions = [
            (pipe.init_state(torch.cat([e, negative_embeds[rows]])), cols)
            for e, cols in ((left, slice(None, half)), (right, slice(half, None)))
        ]
    sigmas = [*pipe.sigmas, 0.0]
    states = [[] for _ in record]
    for start in range(0, noise.shape[2], chunk):
        x = noise[:, :, start : start + chunk]
        for k in range(len(pipe.sigmas)):
            if k in record:
                states[record.index(k)].append(x)
            x0 = _guided_x0(pipe, state, x, k, guidance_scale)
            if halves is not None and start == 0 and sigmas[k] > regional_sigma:
                named = x[rows]
                x0[rows] = torch.cat(
                    [_guided_x0(pipe, s, named[..., cols], k, guidance_scale) for s, cols in regions], dim=-1
                )
            x = x0 + (sigmas[k + 1] / sigmas[k]) * (x - x0)
        pipe.commit_chunk(state, torch.cat([x, x]), update_cache=start + chunk < noise.shape[2])
    latents = torch.cat(state.chunks, dim=2)[:batch]
    if not record:
        return latents, noise.new_empty(0, *noise.shape)
    return latents, torch.stack([torch.cat(s, dim=2) for s in states])


def _object_halves(pipe, scenes: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``ode_sample``'s ``halves`` for the two-object ``scenes``: their rows and the embeddings of each object's own
    one-object caption (the first-named object on the left), or None without such scenes."""
    rows = [i for i, scene in enumerate(scenes) if len(scene.objects) == 2]
    if not rows:
        return None
    left, right = (
        pipe.encode_prompt([caption(replace(scenes[i], objects=(scenes[i].objects[j],))) for i in rows])
        for j in (0, 1)
    )
    return torch.tensor(rows), left, right


def generate_ode_pairs(cfg: ToyTrainingConfig, out: Path) -> None:

    transformer = WanTransformer3DModel.from_pretrained(out / "teacher" / "transformer").eval()
    text_encoder = UMT5EncoderModel.from_pretrained(out / "teacher" / "text_encoder").eval()
    grid = [1000.0 * (1 - k / cfg.ode_steps) for k in range(cfg.ode_steps)]
    pipe = _pipeline(transformer, text_encoder, denoising_step_list=grid)
    record = [k * cfg.ode_steps // 4 for k in range(4)]  # the grid points of [1000, 750, 500, 250]
    latent_shape = load_file(out / "latents.safetensors")["latents"].shape[1:]
    rng = np.random.default_rng([cfg.seed, 4])
    generator = torch.Generator().manual_seed(cfg.seed)
    captions, latents, states = [], [], []
    for start in tqdm(range(0, cfg.ode_videos, cfg.ode_batch_size), desc="ode", dynamic_ncols=True):
        texts, scenes, _ = _scenes_and_seeds(rng, min(cfg.ode_batch_size, cfg.ode_videos - start))
        noise = torch.randn(len(texts), *latent_shape, generator=generator)
        x0, x_t = ode_sample(
            pipe,
            pipe.encode_prompt(texts),
            pipe.encode_prompt([""] * len(texts)),
            noise,
            cfg.guidance_scale,
            record,
            halves=_object_halves(pipe, scenes) if cfg.ode_regional_sigma < 1 else None,
            regional_sigma=cfg.ode_regional_sigma,
        )
        captions += texts
        latents.append(x0)
        states.append(x_t)
    save_file(
        {"latents": torch.cat(latents), "states": torch.cat(states, dim=1).contiguous()}, out / "ode_pairs.safetensors"
    )
    (out / "ode_captions.json").write_text(json.dumps(captions))


def _ode_pairs(out: Path, pipe: CausalWanPipeline) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``ode`` stage's pairs: clean latents ``[M, C, F, h, w]``, the states at the sampler's timesteps
    ``[4, M, C, F, h, w]`` and the captions' embeddings ``[M, L, D]`` (by ``pipe``'s text encoder)."""
    pairs = load_file(out / "ode_pairs.safetensors")
    with torch.no_grad():
        captions = json.loads((out / "ode_captions.json").read_text())
        embeds = torch.cat([pipe.encode_prompt(captions[i : i + 256]) for i in range(0, len(captions), 256)])
    return pairs["latents"], pairs["states"], embeds


def _ode_regression_loss(
    pipe: CausalWanPipeline,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    index: torch.Tensor,
    c: int,
    generator: torch.Generator,
    ode_states: float,
) -> torch.Tensor:
    """The student's loss on the ODE pairs ``index`` (see :func:`_ode_pairs`) at chunk ``c``: the MSE between its x̂0
    at each of the sampler's timesteps and the ODE's clean chunk."""
    latents, states, embeds = pairs
    chunk = pipe.config.num_frame_per_block
    num_steps = len(pipe.timesteps)
    timesteps, sigmas = torch.tensor(pipe.timesteps), torch.tensor(pipe.sigmas)
    frames = slice(c * chunk, (c + 1) * chunk)
    clean = latents[index, :, frames]
    # Step 1 starts from the ODE's own noise (so the noise decides the content); later steps see the clean ODE chunk
    # re-noised with fresh noise, as the sampler does, or (a fraction `ode_states`) the ODE state.
    noise = torch.randn(num_steps - 1, *clean.shape, generator=generator)
    renoised = renoise(clean, noise, sigmas[1:].view(-1, 1, 1, 1, 1, 1))  # [T - 1, B, C, f, h, w]
    on_path = torch.rand(num_steps - 1, len(index), generator=generator) < ode_states
    later = torch.where(on_path.view(*on_path.shape, 1, 1, 1, 1), states[1:, index, :, frames], renoised)
    x_t = torch.cat([states[:1, index, :, frames], later]).flatten(0, 1)  # [T·B, C, f, h, w], step-major
    context = latents[index, :, : c * chunk].repeat(num_steps, 1, 1, 1, 1)
    x0 = _denoise_chunk(
        pipe,
        context,
        x_t,
        sigmas.repeat_interleave(len(index)),
        embeds[index].repeat(num_steps, 1, 1),
        timesteps.repeat_interleave(len(index)),
    )
    return (x0 - clean.repeat(num_steps, 1, 1, 1, 1)).square().mean()


def train_student(cfg: ToyTrainingConfig, out: Path) -> list[float]:

    transformer = WanTransformer3DModel.from_pretrained(out / "teacher" / "transformer")
    text_encoder = UMT5EncoderModel.from_pretrained(out / "teacher" / "text_encoder").eval().requires_grad_(False)
    pipe = _pipeline(transformer, text_encoder)
    pairs = _ode_pairs(out, pipe)
    num_chunks = pairs[0].shape[2] // pipe.config.num_frame_per_block

    def loss_fn(step: int) -> torch.Tensor:
        rng, generator = _stage_rng(cfg.seed, 5, step)
        index = torch.as_tensor(rng.integers(len(pairs[0]), size=cfg.student_batch_size))
        return _ode_regression_loss(pipe, pairs, index, step % num_chunks, generator, cfg.student_ode_states)

    losses = _train_stage(
        "student",
        {"transformer": transformer},
        loss_fn,
        steps=cfg.student_steps,
        learning_rate=cfg.student_learning_rate,
        output_dir=out,
        checkpoint_every=cfg.checkpoint_every,
        ema_decay=0.999,
    )
    transformer.save_pretrained(out / "student" / "transformer")
    return losses


def distribution_matching_loss(x0: torch.Tensor, critic_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """DMD's generator loss on samples ``x0`` ``[B, ...]``, given the critic's and the (guided) teacher's x̂0 of the
    same re-noised samples (no grad through them).

    Its gradient with respect to ``x0`` is ``(critic_x0 - teacher_x0) / (mean|x0 - teacher_x0| · numel)`` per sample:
    the difference of the two scores (the gradient of the KL divergence between the samples' distribution and the
    teacher's), normalised so that every sample moves at the same rate whatever its distance to the teacher.
    """
    sample = x0.detach()
    scale = (sample - teacher_x0).abs().flatten(1).mean(1).clamp_min(1e-6).view(-1, *[1] * (x0.ndim - 1))
    return 0.5 * (x0 - (sample - (critic_x0 - teacher_x0) / scale)).square().mean()


def train_dmd(cfg: ToyTrainingConfig, out: Path) -> list[float]:
    """Distribution matching (DMD): the regressed student's samples, moved towards the guided teacher's distribution.

    Each step draws training captions and a chunk ``c``. The generator makes the ``c`` chunks before it with the
    pipeline's own sampler (KV cache, no grad: the context it will see when used, as in Self-Forcing), then chunk
    ``c`` with the 4-step sampler from fresh noise, stopping at a random step (only that step's forward keeps its
    graph). That sample is re-noised at a random ``σ``; the gradient on it is the critic's x̂0 minus the guided
    teacher's (:func:`distribution_matching_loss`). The critic, initialised from the teacher, learns the samples'
    distribution by flow matching on every step; the generator is updated on every ``dmd_critic_steps``-th.
    """
    generator = WanTransformer3DModel.from_pretrained(out / "student" / "transformer")
    critic = WanTransformer3DModel.from_pretrained(out / "teacher" / "transformer")
    teacher = WanTransformer3DModel.from_pretrained(out / "teacher" / "transformer").eval().requires_grad_(False)
    text_encoder = UMT5EncoderModel.from_pretrained(out / "teacher" / "text_encoder").eval().requires_grad_(False)
    sampler, real, fake = (_pipeline(model, text_encoder) for model in (generator, teacher, critic))
    sampler.set_progress_bar_config(disable=True)
    with safe_open(out / "latents.safetensors", "pt") as data:
        video_shape = tuple(data.get_slice("latents").get_shape()[1:])  # [C, F, h, w]
    chunk = sampler.config.num_frame_per_block
    num_chunks = video_shape[1] // chunk
    with torch.no_grad():
        empty = sampler.encode_prompt([""]).expand(cfg.dmd_batch_size, -1, -1)
    timesteps, sigmas = torch.tensor(sampler.timesteps), torch.tensor(sampler.sigmas)
    shift = cfg.timestep_shift
    pairs = _ode_pairs(out, sampler) if cfg.dmd_regression_weight else None

    def loss_fn(step: int) -> torch.Tensor:
        rng, noise_rng = _stage_rng(cfg.seed, 6, step)
        texts, _, _ = _scenes_and_seeds(rng, cfg.dmd_batch_size)
        c = int(rng.integers(num_chunks))
        last = int(rng.integers(len(timesteps)))
        update_generator = step % cfg.dmd_critic_steps == 0
        with torch.no_grad():
            prompt = sampler.encode_prompt(texts)
            noise = torch.randn(len(texts), *video_shape[:1], (c + 1) * chunk, *video_shape[2:], generator=noise_rng)
            context = noise[:, :, : c * chunk]
            if c:
                context = sampler(
                    prompt_embeds=prompt, latents=context, generator=noise_rng, output_type="latent"
                ).frames
        x = noise[:, :, c * chunk :]
        rows = torch.ones(len(texts))
        for k in range(last + 1):
            with torch.set_grad_enabled(update_generator and k == last):
                x0 = _denoise_chunk(sampler, context, x, sigmas[k] * rows, prompt, timesteps[k] * rows)
            if k < last:
                x = renoise(x0, torch.randn(x.shape, generator=noise_rng), sampler.sigmas[k + 1])

        sample = x0.detach()
        u = 0.02 + 0.96 * torch.rand(len(texts), generator=noise_rng)
        sigma = shift * u / (1 + (shift - 1) * u)
        noisy = renoise(sample, torch.randn(sample.shape, generator=noise_rng), sigma.view(-1, 1, 1, 1, 1))
        critic_x0 = _denoise_chunk(fake, context, noisy, sigma, prompt)
        # Flow matching: (x̂0 - x0) / σ is the error of the predicted velocity.
        loss = ((critic_x0 - sample) / sigma.view(-1, 1, 1, 1, 1)).square().mean()
        if update_generator:
            with torch.no_grad():
                both = _denoise_chunk(
                    real,
                    context.repeat(2, 1, 1, 1, 1),
                    noisy.repeat(2, 1, 1, 1, 1),
                    sigma.repeat(2),
                    torch.cat([prompt, empty]),
                )
                conditional, unconditional = both.chunk(2)
                target = unconditional + cfg.guidance_scale * (conditional - unconditional)
            loss = loss + distribution_matching_loss(x0, critic_x0.detach(), target)
            if pairs is not None:
                pair_rng, pair_noise = _stage_rng(cfg.seed, 7, step)
                index = torch.as_tensor(pair_rng.integers(len(pairs[0]), size=cfg.dmd_batch_size))
                pair_chunk = int(pair_rng.integers(num_chunks))
                regression = _ode_regression_loss(
                    sampler, pairs, index, pair_chunk, pair_noise, cfg.student_ode_states
                )
                loss = loss + cfg.dmd_regression_weight * regression
        return loss

    losses = _train_stage(
        "dmd",
        {"transformer": generator, "critic": critic},
        loss_fn,
        steps=cfg.dmd_steps,
        learning_rate=cfg.dmd_learning_rate,
        output_dir=out,
        checkpoint_every=cfg.checkpoint_every,
        ema_decay=0.999,
    )
    generator.save_pretrained(out / "dmd" / "transformer")
    return losses


def assemble_pipeline(out: Path, generator: str = "student") -> Path:
    """The trained components as one ``CausalWanPipeline`` folder (``save_pretrained``): ``out/pipeline``, with the
    transformer of stage ``generator`` (``student`` or ``dmd``)."""
    transformer = WanTransformer3DModel.from_pretrained(out / generator / "transformer")
    vae = AutoencoderKLWan.from_pretrained(out / "vae")
    for model in (transformer, vae):  # diffusers would save the local folder they were loaded from
        model.register_to_config(_name_or_path=None)
    pipe = _pipeline(transformer, UMT5EncoderModel.from_pretrained(out / "teacher" / "text_encoder"), vae)
    staging = _atomic_dir(out / "pipeline")
    pipe.save_pretrained(staging)
    _publish(staging, out / "pipeline")
    return out / "pipeline"


# ----------------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------------


def _plot_losses(losses: dict[str, list[float]], path: Path) -> None:

    matplotlib.use("Agg")

    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], losses.items(), strict=True):
        values = np.asarray(values)
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(values, color="0.8", linewidth=0.5)
        ax.plot(np.arange(len(smooth)) + window // 2, smooth)
        ax.set_yscale("log")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_toy_pipeline(cfg: ToyTrainingConfig) -> Path:
    """Run every stage that has not finished yet; returns the folder of the trained ``CausalWanPipeline``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "config.json"
    comparable = {k: v for k, v in asdict(cfg).items() if k not in ("stop_after", "threads", "checkpoint_every")}
    if settings.exists() and json.loads(settings.read_text()) != comparable:
        raise ValueError(
            f"{out} holds a run with other settings ({settings}); use another --output_dir or the same settings."
        )
    settings.write_text(json.dumps(comparable, indent=2))
    record_path = out / "losses.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"losses": {}, "seconds": {}}
    stages: list[tuple[str, Callable[[ToyTrainingConfig, Path], list[float] | None]]] = [
        ("vae", train_vae),
        ("latents", encode_dataset),
        ("teacher", train_teacher),
        ("ode", generate_ode_pairs),
        ("student", train_student),
    ]
    if cfg.dmd_steps:
        stages.append(("dmd", train_dmd))
    for name, run in stages:
        if name in record["seconds"]:
            continue
        start = time.perf_counter()
        losses = run(cfg, out)
        if losses is not None:
            record["losses"][name] = losses
        record["seconds"][name] = time.perf_counter() - start
        record_path.write_text(json.dumps(record))
        if name == cfg.stop_after:
            _plot_losses(record["losses"], out / "loss_curves.png")
            return out
    _plot_losses(record["losses"], out / "loss_curves.png")
    pipeline = assemble_pipeline(out, "dmd" if cfg.dmd_steps else "student")
    total = sum(record["seconds"].values())
    print(
        f"Trained toy pipeline in {pipeline} ({total / 60:.1f} min: "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in record["seconds"].items())
        + ")"
    )
    return pipeline


def make_parser() -> argparse.ArgumentParser:

    return HfArgumentParser(
        ToyTrainingConfig, prog="trl-arcopo toy-train", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )


def main(argv: list[str] | None = None) -> int:
    (cfg,) = make_parser().parse_args_into_dataclasses(args=argv)
    train_toy_pipeline(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
