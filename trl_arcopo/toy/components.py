"""The toy generator's architecture: stock diffusers/transformers classes at small sizes."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from torch import nn

from .text import toy_text_encoder, toy_tokenizer

__all__ = [
    "TOY_PIPELINE_CONFIG",
    "TOY_VAE_STRIDES",
    "per_frame_autoencoder",
    "toy_components",
    "toy_transformer_config",
    "toy_vae",
]

# (spatial, temporal) strides of the toy VAE: 32x32 pixels and 12 frames -> 16x16 latents and 12 latent frames
# (4 chunks). A 4x stride loses the outline of the smallest objects (the detector then reads 79 % of the shapes of
# the reconstructions, against 88 % at 2x).
TOY_VAE_STRIDES = (2, 1)
# Text: captions are at most ~25 words; the encoder's width is the transformer's `text_dim`.
TEXT_DIM = 64
MAX_SEQUENCE_LENGTH = 32

# The sampler of Self-Forcing, unchanged: chunks of 3 latent frames, 4 warped steps with shift 5, a clean context pass.
TOY_PIPELINE_CONFIG: dict[str, Any] = {
    "num_frame_per_block": 3,
    "denoising_step_list": [1000.0, 750.0, 500.0, 250.0],
    "warp_denoising_step": True,
    "timestep_shift": 5.0,
    "context_noise": 0.0,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}


def toy_transformer_config() -> dict[str, Any]:
    """A 1.3 M-parameter ``WanTransformer3DModel``: 4 blocks of 4 heads x 32, 16 latent channels, 4x4 patches (one
    token per 8x8 pixels: 16 tokens per frame of 32x32)."""
    return {
        "patch_size": (1, 4, 4),
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": TEXT_DIM,
        "freq_dim": 256,
        "ffn_dim": 512,
        "num_layers": 4,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 256,
    }


def toy_vae() -> AutoencoderKLWan:
    """A small ``AutoencoderKLWan`` that compresses each frame 2x in space and does not compress time.

    Its causal temporal convolutions start with the taps on earlier frames at zero and are trained on single frames,
    so they stay zero: the autoencoder is a per-frame one (see :func:`per_frame_autoencoder`), which trains in minutes
    on a CPU where a temporally compressing one would take hours.
    """
    spatial, temporal = TOY_VAE_STRIDES
    return per_frame_autoencoder(
        AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            scale_factor_spatial=spatial,
            scale_factor_temporal=temporal,
        )
    )


def per_frame_autoencoder(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Zero the taps of every causal temporal convolution on earlier frames (in place): each output frame then depends
    on its own input frame only. Returns ``vae``."""
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, nn.Conv3d) and module.kernel_size[0] > 1:
                module.weight[:, :, :-1].zero_()  # causal padding puts the current frame at the last tap
    return vae


def toy_components() -> dict[str, Any]:
    """Untrained components, the keyword arguments of ``CausalWanPipeline`` (with :data:`TOY_PIPELINE_CONFIG`)."""
    return {
        "tokenizer": toy_tokenizer(MAX_SEQUENCE_LENGTH),
        "text_encoder": toy_text_encoder(TEXT_DIM),
        "vae": toy_vae(),
        "transformer": WanTransformer3DModel(**toy_transformer_config()),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
    }
