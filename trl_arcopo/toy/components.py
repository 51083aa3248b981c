"""The toy generator's architecture: stock diffusers/transformers classes at small sizes."""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from .text import toy_text_encoder, toy_tokenizer

__all__ = ["TOY_PIPELINE_CONFIG", "toy_components", "toy_transformer_config", "toy_vae"]

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
    """A 1.3 M-parameter ``WanTransformer3DModel``: 4 blocks of 4 heads x 32, 16 latent channels, 2x2 patches."""
    return {
        "patch_size": (1, 2, 2),
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
    """A 0.67 M-parameter ``AutoencoderKLWan`` with Wan2.1's strides (4 in time, first frame alone; 8 in space)."""
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def toy_components() -> dict[str, Any]:
    """Untrained components, the keyword arguments of ``CausalWanPipeline`` (with :data:`TOY_PIPELINE_CONFIG`)."""
    return {
        "tokenizer": toy_tokenizer(MAX_SEQUENCE_LENGTH),
        "text_encoder": toy_text_encoder(TEXT_DIM),
        "vae": toy_vae(),
        "transformer": WanTransformer3DModel(**toy_transformer_config()),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
    }
