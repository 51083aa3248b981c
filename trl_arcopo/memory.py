"""Peak memory of AR-CoPO training, per phase and per process: predicted before a run, measured to check it.

:func:`estimate_memory` adds up, for each phase of a training iteration, the tensors alive at its peak:

- ``rollout``: the prefix generated once and the branches forked from it (the static KV cache: the prefix's level, one
  row preallocated for the whole video or its window, and each branch batch's own level, one row per branch from the
  pivot on; the prompt's text context once), one no-grad forward's activations, then the decoded videos concatenated;
- ``decode``: the Wan VAE decoding the group's latents (``rollout_batch_size`` videos at a time, one with
  ``vae.enable_slicing()``) and the decoded videos;
- ``reward``: the videos and each reward model's forward (VideoAlign: its processor, vision tower and decoder);
- ``update``: the differentiable pass over ``len(train_steps) × num_anchors`` rows (activations kept for backward, per
  block or only the block inputs with gradient checkpointing), its backward, the gradients and the optimizer step;

on top of the resident weights (per dtype), the LoRA and its AdamW state. Every term is a formula over config values
(widths, layers, tokens, frames, dtypes, the run's settings). The per-element counts of the Wan block, the Wan VAE
decoder and VideoAlign (how many ``[tokens, width]`` tensors are alive at a peak) were measured once with
:class:`TensorMemoryTracker` and are named constants below; ``tests/test_memory.py`` checks every phase against a
measurement at reduced sizes of the real architectures (within 15 %).

:class:`TensorMemoryTracker` measures peak tensor memory per phase on any device: it counts the storages that ATen ops
allocate (a ``TorchDispatchMode``), which on CPU is the only allocator-level peak PyTorch exposes. On CUDA,
``torch.cuda.max_memory_allocated`` measures the same quantity plus kernel workspaces and fragmentation.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .models.kv_cache import attended_frames
from .utils.video_size import nearest_valid, whole_chunk_frames

__all__ = [
    "GeneratorSpec",
    "device_memory",
    "MemoryEstimate",
    "RewardSpec",
    "RunSettings",
    "TensorMemoryTracker",
    "estimate_memory",
    "largest_fitting",
]

GiB = 2**30
PHASES = ("rollout", "decode", "reward", "update")

# ---------------------------------------------------------------------------------------------------------------------
# Measured structure of the models (bytes per element, per batch row). "half" = bfloat16/float16 weights: diffusers'
# Wan block keeps its norms, modulation and residual stream in float32 and PEFT runs the (float32) LoRA on a float32
# copy of every adapted input, so a half-precision block keeps many float32 tensors.
# ---------------------------------------------------------------------------------------------------------------------

# No-grad forward of one Wan block with LoRA, at its peak: the feed-forward up-projection (its output in the model
# dtype plus two float32 LoRA terms of the same [S, ffn_dim] shape), or the self-attention (the cached keys and values
# assembled with the chunk's own, [K, dim] each). Float32 [S, dim] tensors alive alongside: `_NOGRAD_SD`.
_NOGRAD_SF_EXTRA = 8  # + the model dtype's bytes
_NOGRAD_SD = {"half": 14.0, "float32": 17.5}
_NOGRAD_ATTENTION_SD = {"half": 24.0, "float32": 30.0}
# Saved for backward by one block with grad, per element: [S, dim] (13 float32 copies: norms, modulation, LoRA inputs;
# 4 more in the model dtype for half weights), [S, ffn_dim] (the GELU input and the float32 LoRA input of the down
# projection), [K, dim] (the assembled keys and values read by attention), [T, dim] (the projected prompt's float32
# LoRA inputs of the cross-attention keys/values, per row).
_SAVED_SD = {"half": 60, "float32": 52}
_SAVED_SF = {"half": 6, "float32": 8}
_SAVED_TD = {"half": 16, "float32": 12}
_LORA_S_MODULES = (
    8  # LoRA layers applied to the chunk's tokens (q, k, v, out of both attentions but k/v of attn2, FFN)
)
_LORA_T_MODULES = 2  # LoRA layers applied to the prompt's tokens (k, v of the cross-attention)
# Backward of one block: the gradients of its largest activations ([S, ffn_dim], or the keys/values [K, dim]).
_BACKWARD_SF = {"half": 6, "float32": 8}
# Kept outside the blocks with gradient checkpointing (embeddings, output head), per [S, dim] element.
_OUTSIDE_SD = 5.5

# Wan VAE decoder (channel multipliers [1, 2, 4, 4], 2 residual blocks): per video, per base channel and output pixel,
# the full-resolution stage holds ~44 activation/cache elements while a latent frame is decoded.
_VAE_DECODE_ELEMENTS = 44

# VideoAlign (Qwen2-VL): no-grad decoder layer at its peak, per token: `[hidden]` and `[intermediate]` elements; vision
# tower per patch and `embed_dim`.
_QWEN_DECODER_HIDDEN = 5.5
_QWEN_DECODER_INTERMEDIATE = 3
_QWEN_VISION_EMBED = 4.5
# The built-in pixel rewards (brightness, ...): float32 working copies, in videos' worth of float32 elements.
_BUILTIN_VIDEO_COPIES = 1.25
# Characters per token of VideoAlign's scoring template with the Qwen2 tokenizer (an estimate; the prompt adds more).
_QWEN_CHARS_PER_TOKEN = 4.0

# umT5-XXL encoder (the text encoder of Wan2.1), for configs that name no pipeline on disk.
UMT5_XXL_ENCODER = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
# The `config.json` of Qwen/Qwen2-VL-2B-Instruct (the base of VideoAlign, whose checkpoint has 151660 embedding rows).
QWEN2_VL_2B = {
    "model_type": "qwen2_vl",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151660,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "hidden_act": "quick_gelu",
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _kind(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "half"


def _module_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _linear_layers(model: torch.nn.Module) -> tuple[tuple[str, int, int], ...]:
    """``(name, in, out)`` of every linear layer of ``model``, by the names PEFT matches (LoRA layers excluded)."""
    return tuple(
        (name.removesuffix(".base_layer"), m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )


def _meta_bytes(build) -> int:
    """Bytes of the parameters and buffers of the module ``build()`` returns, built without allocating them."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return _module_bytes(build())


# ---------------------------------------------------------------------------------------------------------------------
# What the estimate reads
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorSpec:
    """The parts of a :class:`~trl_arcopo.CausalWanPipeline` the estimate reads (no weights needed).

    Attributes:
        transformer: the ``WanTransformer3DModel`` config.
        dtype: the transformer's weight dtype (its fp32-kept modules stay float32, counted in ``transformer_bytes``).
        transformer_bytes: bytes of its weights (without LoRA).
        vae: the ``AutoencoderKLWan`` config, or None (no decoding).
        vae_dtype, vae_bytes: its dtype and weight bytes.
        vae_slicing: whether the VAE decodes one video at a time (``vae.enable_slicing()``).
        text_encoder_bytes: bytes of the text encoder's weights (0 when there is none on the device).
        num_frame_per_block, num_steps, local_attn_size, sink_size: the sampler's config.
        text_tokens: prompt tokens (``max_sequence_length``).
        linear_layers: ``(name, in_features, out_features)`` of the transformer's linear layers (where LoRA goes).
    """

    transformer: Mapping[str, Any]
    dtype: torch.dtype
    transformer_bytes: int
    vae: Mapping[str, Any] | None
    vae_dtype: torch.dtype = torch.float32
    vae_bytes: int = 0
    vae_slicing: bool = False
    text_encoder_bytes: int = 0
    num_frame_per_block: int = 3
    num_steps: int = 4
    local_attn_size: int = -1
    sink_size: int = 0
    text_tokens: int = 512
    linear_layers: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def from_pipeline(cls, pipeline) -> GeneratorSpec:
        """The spec of a loaded pipeline (weight bytes as they are, LoRA layers excluded)."""
        transformer = pipeline.transformer
        base = {
            name: t
            for name, t in (*transformer.named_parameters(), *transformer.named_buffers())
            if "lora_" not in name
        }
        compute = [t.dtype for name, t in base.items() if name.endswith("attn1.to_q.weight")]
        vae = pipeline.vae
        return cls(
            transformer=dict(transformer.config),
            dtype=compute[0] if compute else transformer.dtype,
            transformer_bytes=sum(t.numel() * t.element_size() for t in {id(t): t for t in base.values()}.values()),
            vae=dict(vae.config) if vae is not None else None,
            vae_dtype=vae.dtype if vae is not None else torch.float32,
            vae_bytes=_module_bytes(vae) if vae is not None else 0,
            vae_slicing=bool(getattr(vae, "use_slicing", False)),
            text_encoder_bytes=_module_bytes(pipeline.text_encoder) if pipeline.text_encoder is not None else 0,
            num_frame_per_block=pipeline.config.num_frame_per_block,
            num_steps=len(pipeline.timesteps),
            local_attn_size=pipeline.config.local_attn_size,
            sink_size=pipeline.config.sink_size,
            text_tokens=pipeline.config.max_sequence_length,
            linear_layers=_linear_layers(transformer),
        )

    @classmethod
    def from_configs(
        cls,
        transformer: Mapping[str, Any],
        *,
        dtype: torch.dtype = torch.bfloat16,
        vae: Mapping[str, Any] | None = None,
        text_encoder: Mapping[str, Any] | None = None,
        **sampler: Any,
    ) -> GeneratorSpec:
        """A spec from configs alone (the models are built on the meta device to count their weights).

        Args:
            transformer: ``WanTransformer3DModel`` keyword arguments.
            dtype: the weights' dtype (transformer, VAE and text encoder, as ``from_pretrained(dtype=...)``).
            vae: ``AutoencoderKLWan`` keyword arguments (``{}``: the Wan2.1 VAE), None for no VAE.
            text_encoder: ``UMT5Config`` keyword arguments (:data:`UMT5_XXL_ENCODER` for Wan2.1), None for none.
            sampler: the other fields (``num_frame_per_block``, ``local_attn_size``, ``sink_size``, ``num_steps``,
                ``text_tokens``, ``vae_slicing``).
        """
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from .models.self_forcing import keeps_fp32

        size = _element_size(dtype)
        with init_empty_weights(include_buffers=False):
            model = WanTransformer3DModel(**transformer)
            vae_model = AutoencoderKLWan(**vae) if vae is not None else None
            encoder = UMT5EncoderModel(UMT5Config(**text_encoder)) if text_encoder is not None else None
        if encoder is not None:
            encoder.tie_weights()  # the encoder's input embeddings are the shared ones
        transformer_bytes = sum(
            p.numel() * (4 if keeps_fp32(name) else size) for name, p in model.named_parameters()
        ) + sum(b.numel() * b.element_size() for b in model.buffers())
        return cls(
            transformer=dict(model.config),
            dtype=dtype,
            transformer_bytes=transformer_bytes,
            vae=dict(vae_model.config) if vae_model is not None else None,
            vae_dtype=dtype,
            vae_bytes=sum(p.numel() for p in vae_model.parameters()) * size if vae_model is not None else 0,
            text_encoder_bytes=sum(p.numel() for p in encoder.parameters()) * size if encoder is not None else 0,
            linear_layers=_linear_layers(model),
            **sampler,
        )

    @classmethod
    def from_pretrained(
        cls, model: str, *, revision: str | None = None, dtype: torch.dtype = torch.bfloat16
    ) -> GeneratorSpec:
        """The spec of a saved :class:`~trl_arcopo.CausalWanPipeline` (Hub id or folder) from its configs alone."""
        from diffusers import AutoencoderKLWan, DiffusionPipeline, WanTransformer3DModel
        from transformers import UMT5Config

        pipeline = DiffusionPipeline.load_config(model, revision=revision)
        transformer = WanTransformer3DModel.load_config(model, subfolder="transformer", revision=revision)
        vae = text_encoder = None
        if (pipeline.get("vae") or [None])[0] is not None:
            vae = AutoencoderKLWan.load_config(model, subfolder="vae", revision=revision)
        if (pipeline.get("text_encoder") or [None])[0] is not None:
            text_encoder = UMT5Config.from_pretrained(model, subfolder="text_encoder", revision=revision).to_dict()
        steps = pipeline.get("denoising_step_list") or [1000.0, 750.0, 500.0, 250.0]
        return cls.from_configs(
            {k: v for k, v in transformer.items() if not k.startswith("_")},
            dtype=dtype,
            vae={k: v for k, v in vae.items() if not k.startswith("_")} if vae is not None else None,
            text_encoder=text_encoder,
            num_frame_per_block=pipeline.get("num_frame_per_block", 3),
            num_steps=len(steps),
            local_attn_size=pipeline.get("local_attn_size", -1),
            sink_size=pipeline.get("sink_size", 0),
            text_tokens=pipeline.get("max_sequence_length", 512),
        )

    @classmethod
    def self_forcing(cls, dtype: torch.dtype = torch.bfloat16, **sampler: Any) -> GeneratorSpec:
        """Self-Forcing on Wan2.1-T2V-1.3B: the 1.3B transformer, the Wan2.1 VAE and umT5-XXL, in ``dtype``."""
        from .models.self_forcing import WAN_1_3B_CONFIG

        return cls.from_configs(WAN_1_3B_CONFIG, dtype=dtype, vae={}, text_encoder=UMT5_XXL_ENCODER, **sampler)


@dataclass(frozen=True)
class RewardSpec:
    """A reward model's weights and, where modeled, its activations.

    Attributes:
        name: the reward's name.
        weight_bytes: bytes of its weights on the device.
        videoalign: for VideoAlign, its Qwen2-VL config (``text_config``, ``vision_config``), else None.
        builtin: a built-in pixel statistic (its float32 working copies of the videos are counted).
        dtype: VideoAlign's dtype.
        max_pixels: VideoAlign's pixel budget per sampled frame.
        text_tokens: tokens of VideoAlign's scoring text (template + prompt), without the video's.
        modeled: False for a model whose activations are not modeled (a warning says so).
    """

    name: str
    weight_bytes: int = 0
    videoalign: Mapping[str, Any] | None = None
    builtin: bool = False
    dtype: torch.dtype = torch.bfloat16
    max_pixels: int = 448 * 448
    text_tokens: int = 0
    modeled: bool = True

    @classmethod
    def for_reward(cls, reward: Any) -> RewardSpec:
        """The spec of a loaded reward: a :class:`~trl_arcopo.rewards.videoalign.VideoAlignReward` (modeled), another
        ``nn.Module`` (weights only) or a function (nothing on the device)."""
        from .rewards import reward_name
        from .rewards.builtin import BUILTIN_REWARDS
        from .rewards.videoalign import VideoAlignReward

        name = reward_name(reward)
        if reward in BUILTIN_REWARDS.values():
            return cls(name, builtin=True)
        if isinstance(reward, VideoAlignReward):
            config = reward.model.config
            processor = reward.processor
            text = processor.tokenizer(processor.chat_text("a prompt"))["input_ids"]
            return cls(
                name,
                _module_bytes(reward),
                videoalign={
                    "text_config": config.text_config.to_dict(),
                    "vision_config": config.vision_config.to_dict(),
                },
                dtype=reward.rm_head.weight.dtype,
                max_pixels=processor.max_pixels,
                text_tokens=len(text),
            )
        if isinstance(reward, torch.nn.Module):
            return cls(name, _module_bytes(reward), modeled=False)
        return cls(name)

    @classmethod
    def named(cls, name: str, dtype: torch.dtype = torch.bfloat16) -> RewardSpec:
        """The spec of a reward by name, without loading it: ``videoalign`` (the released 2B model) or a built-in
        pixel statistic; other models are not modeled."""
        from .rewards.builtin import BUILTIN_REWARDS

        if name == "videoalign":
            from transformers import Qwen2VLConfig, Qwen2VLModel

            from .rewards.videoalign_processing import build_user_text

            config = Qwen2VLConfig.from_dict(QWEN2_VL_2B)
            return cls(
                name,
                _meta_bytes(lambda: Qwen2VLModel(config)) // 4 * _element_size(dtype),
                videoalign={
                    "text_config": config.text_config.to_dict(),
                    "vision_config": config.vision_config.to_dict(),
                },
                dtype=dtype,
                text_tokens=round(len(build_user_text("")) / _QWEN_CHARS_PER_TOKEN) + 64,
            )
        return cls(name, builtin=True) if name in BUILTIN_REWARDS else cls(name, modeled=False)

    def activation_bytes(self, num_videos: int, num_frames: int, height: int, width: int, fps: float = 16.0) -> int:
        """Peak bytes of one call on ``num_videos`` videos ``[num_frames, 3, height, width]``, above the videos."""
        if self.builtin:
            return int(_BUILTIN_VIDEO_COPIES * num_videos * num_frames * 3 * height * width * 4)
        if self.videoalign is None:
            return 0
        from .rewards.videoalign_processing import _VIDEO_MIN_PIXELS, sample_frame_indices, smart_resize

        vision, text = self.videoalign["vision_config"], self.videoalign["text_config"]
        patch, merge, temporal = vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]
        frames = len(sample_frame_indices(num_frames, fps))
        rows, cols = smart_resize(
            height, width, factor=patch * merge, min_pixels=_VIDEO_MIN_PIXELS, max_pixels=self.max_pixels
        )
        patches = frames // temporal * (rows // patch) * (cols // patch)  # per video
        tokens = self.text_tokens + patches // merge**2
        size = _element_size(self.dtype)
        # The float32 patches of every video, and one video's float64 frames while it is normalised.
        processor = num_videos * patches * 3 * temporal * patch**2 * 4 + 2 * frames * 3 * rows * cols * 8
        vision_tower = num_videos * patches * vision["embed_dim"] * _QWEN_VISION_EMBED * size
        decoder = (
            num_videos
            * tokens
            * size
            * (_QWEN_DECODER_HIDDEN * text["hidden_size"] + _QWEN_DECODER_INTERMEDIATE * text["intermediate_size"])
        )
        return int(processor + max(vision_tower, decoder))


@dataclass(frozen=True)
class RunSettings:
    """The settings of a run the estimate reads (from :class:`~trl_arcopo.ARCoPOConfig` with :meth:`from_args`)."""

    num_frames: int = 81
    height: int = 480
    width: int = 832
    num_generations: int = 12
    num_anchors: int = 4
    rollout_batch_size: int | None = None
    train_steps: tuple[int, ...] | None = None
    pivots: tuple[int, ...] | None = None  # None: any chunk
    exploration: str = "fork"
    beta: float = 0.0
    lora_r: int = 64
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    gradient_checkpointing: bool = False
    groups_per_update: int = 1
    overlap_rewards: bool = True

    def __post_init__(self) -> None:
        if self.rollout_batch_size is not None and not 1 <= self.rollout_batch_size:
            raise ValueError(f"`rollout_batch_size` must be None or >= 1, got {self.rollout_batch_size}.")

    @classmethod
    def from_args(cls, args) -> RunSettings:
        pivots = None
        if args.pivot_strategy == "fixed":
            pivots = (args.pivot_index,)
        elif args.pivot_strategy == "weighted":
            pivots = tuple(i for i, weight in enumerate(args.pivot_weights) if weight > 0)
        return cls(
            num_frames=args.num_frames,
            height=args.height,
            width=args.width,
            num_generations=args.num_generations,
            num_anchors=args.num_anchors,
            rollout_batch_size=args.rollout_batch_size,
            train_steps=tuple(args.train_steps) if args.train_steps is not None else None,
            pivots=pivots,
            exploration=args.exploration,
            beta=args.beta,
            lora_r=args.lora_r,
            lora_target_modules=tuple(args.lora_target_modules),
            gradient_checkpointing=args.transformer_gradient_checkpointing,
            groups_per_update=args.per_device_train_batch_size * args.gradient_accumulation_steps,
            overlap_rewards=args.overlap_rewards,
        )


# ---------------------------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------------------------

# What to change when a component is too large (named in the trainer's warning and the CLI's advice).
KNOBS = {
    "transformer weights": "shard them with --accelerate_config fsdp2, or load the generator in bfloat16",
    "text encoder": "encode the prompts on another device (the text encoder runs once per prompt)",
    "reward models": "serve the reward on another GPU (trl-arcopo reward-server) or load it in bfloat16",
    "KV cache": "lower rollout_batch_size (branches denoised at once) or use a window (local_attn_size)",
    "activations": "lower num_anchors or train fewer train_steps, or set transformer_gradient_checkpointing",
    "VAE decode": "lower rollout_batch_size or call pipeline.vae.enable_slicing()",
    "videos": "lower num_generations or the video size",
    "reward forward": "serve the reward on another GPU (trl-arcopo reward-server)",
}


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of each phase on one process, by component (``phases[phase][component]``)."""

    phases: dict[str, dict[str, int]]
    num_processes: int = 1
    strategy: str = "ddp"
    notes: list[str] = field(default_factory=list)

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> int:
        return self.total(self.peak_phase)

    def largest_component(self, phase: str | None = None) -> str:
        """The component with the most bytes in ``phase`` (default: the peak phase)."""
        components = self.phases[phase or self.peak_phase]
        return max(components, key=components.get)

    def advice(self) -> str:
        """What to change to lower the peak: the setting of its largest component."""
        component = self.largest_component()
        return f"the {self.peak_phase} peak is mostly {component}: {KNOBS.get(component, 'lower the batch sizes')}"

    def table(self) -> str:
        """A markdown table: one row per component, one column per phase, in GiB."""
        components = list(dict.fromkeys(c for phase in self.phases.values() for c in phase))
        header = "| GiB per process | " + " | ".join(self.phases) + " |"
        lines = [header, "|---" * (len(self.phases) + 1) + "|"]
        for component in components:
            cells = [self.phases[phase].get(component, 0) / GiB for phase in self.phases]
            lines.append(f"| {component} | " + " | ".join(f"{c:.2f}" if c else "" for c in cells) + " |")
        lines.append("| **total** | " + " | ".join(f"**{self.total(p) / GiB:.2f}**" for p in self.phases) + " |")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Geometry:
    """Sizes of one run on one generator (tokens, widths, chunks) and the per-element byte counts of its dtype."""

    generator: GeneratorSpec
    run: RunSettings

    def __post_init__(self) -> None:
        config, vae = self.generator.transformer, self.generator.vae or {}
        temporal, spatial = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
        _, patch_h, patch_w = config["patch_size"]
        latent_h, latent_w = self.run.height // spatial, self.run.width // spatial
        values = {
            "channels": config["in_channels"],
            "latent_frames": (self.run.num_frames - 1) // temporal + 1,
            "latent_hw": latent_h * latent_w,
            "frame_tokens": (latent_h // patch_h) * (latent_w // patch_w),
            "dim": config["num_attention_heads"] * config["attention_head_dim"],
            "ffn": config["ffn_dim"],
            "layers": config["num_layers"],
            "text_dim": config["text_dim"],
            "size": _element_size(self.generator.dtype),
            "kind": _kind(self.generator.dtype),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        first, step = whole_chunk_frames(temporal, self.chunk_frames)
        if self.run.num_frames < first or (self.run.num_frames - first) % step:
            raise ValueError(
                f"`num_frames` ({self.run.num_frames}) does not split into whole chunks of this generator (VAE "
                f"temporal stride {temporal}, {self.chunk_frames} latent frames per chunk): use "
                f"{nearest_valid(self.run.num_frames, first, step)} frames."
            )
        if self.run.pivots and max(self.run.pivots) >= self.num_chunks:
            raise ValueError(
                f"A pivot chunk ({max(self.run.pivots)}) is out of range: a video of `num_frames`={self.run.num_frames} "
                f"has {self.num_chunks} chunks on this generator; set `pivot_index` (or `pivot_weights`) to chunks "
                f"0 .. {self.num_chunks - 1}."
            )

    @property
    def chunk_frames(self) -> int:
        return self.generator.num_frame_per_block

    @property
    def num_chunks(self) -> int:
        return self.latent_frames // self.chunk_frames

    @property
    def chunk_tokens(self) -> int:  # S
        return self.chunk_frames * self.frame_tokens

    @property
    def chunk_elements(self) -> int:  # one latent chunk [C, f, h, w]
        return self.channels * self.chunk_frames * self.latent_hw

    @property
    def latent_elements(self) -> int:  # one latent video [C, F, h, w]
        return self.channels * self.latent_frames * self.latent_hw

    @property
    def kv_bytes_per_token(self) -> int:  # keys and values of every layer, one row
        return 2 * self.layers * self.dim * self.size

    def _attended(self, chunk: int) -> list[int]:
        g = self.generator
        return attended_frames(
            chunk * self.chunk_frames, self.chunk_frames, local_attn_size=g.local_attn_size, sink_size=g.sink_size
        )

    def attended_tokens(self, chunk: int) -> int:
        """Tokens a chunk's self-attention reads (its own included)."""
        return len(self._attended(chunk)) * self.frame_tokens

    def level_bytes(self, rows: int, start_chunk: int) -> int:
        """Bytes of a static KV cache level of ``rows`` videos written from chunk ``start_chunk`` on: its slots hold
        the rest of the video (global attention) or the window (sink slots still ahead of it included)."""
        g, start = self.generator, start_chunk * self.chunk_frames
        frames = self.latent_frames - start
        if g.local_attn_size != -1:
            frames = min(frames, max(0, g.sink_size - start) + g.local_attn_size - g.sink_size)
        return rows * frames * self.frame_tokens * self.kv_bytes_per_token

    @property
    def cross_bytes(self) -> int:
        """The per-prompt text context of the no-grad passes: the projected prompt and every block's cross-attention
        keys/values, one row (branches read it through a ``repeat``)."""
        return (2 * self.layers + 1) * self.generator.text_tokens * self.dim * self.size

    def pivots(self) -> list[int]:
        return list(self.run.pivots) if self.run.pivots is not None else list(range(self.num_chunks))

    # Activations, bytes per batch row -------------------------------------------------------------------------

    def nograd_forward(self, attended: int) -> float:
        """Peak of a no-grad transformer call, per row, reading ``attended`` self-attention tokens."""
        s, d, t, size = self.chunk_tokens, self.dim, self.generator.text_tokens, self.size
        common = t * d * size + 6 * d * 4  # the projected prompt; the block's modulation
        ffn = s * self.ffn * (size + _NOGRAD_SF_EXTRA) + s * d * _NOGRAD_SD[self.kind]
        attention = 2 * attended * d * size + s * d * _NOGRAD_ATTENTION_SD[self.kind]
        return common + max(ffn, attention)

    def saved_per_block(self, attended: int, lora_r: int) -> float:
        """Bytes one block keeps for backward, per row."""
        s, d, t, kind = self.chunk_tokens, self.dim, self.generator.text_tokens, self.kind
        lora = (_LORA_S_MODULES * s + _LORA_T_MODULES * t) * lora_r * 4
        return (
            s * d * _SAVED_SD[kind]
            + s * self.ffn * _SAVED_SF[kind]
            + 2 * attended * d * self.size
            + t * d * _SAVED_TD[kind]
            + lora
        )

    def backward_per_block(self, attended: int) -> float:
        return max(self.chunk_tokens * self.ffn * _BACKWARD_SF[self.kind], 2 * attended * self.dim * self.size)


def _lora_parameters(generator: GeneratorSpec, targets: Sequence[str], rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on the linear layers named by ``targets`` (PEFT's rule: the layer's name
    equals a target or ends with ``.target``)."""
    return sum(
        rank * (in_features + out_features)
        for name, in_features, out_features in generator.linear_layers
        if any(name == t or name.endswith(f".{t}") for t in targets)
    )


def estimate_memory(
    args,
    generator: GeneratorSpec,
    rewards: Sequence[RewardSpec] = (),
    *,
    num_processes: int = 1,
    strategy: str = "ddp",
) -> MemoryEstimate:
    """Predict the peak memory of each phase of a training iteration on one process.

    Args:
        args: an :class:`~trl_arcopo.ARCoPOConfig` or :class:`RunSettings`.
        generator: the pipeline's :class:`GeneratorSpec` (``GeneratorSpec.from_pipeline(pipe)``,
            ``GeneratorSpec.self_forcing()``).
        rewards: the rewards' :class:`RewardSpec` (``RewardSpec.for_reward(f)``, ``RewardSpec.named("videoalign")``).
        num_processes: processes of the run (one per GPU).
        strategy: ``"ddp"`` (every process holds everything) or ``"fsdp2"`` (the transformer, its LoRA, gradients
            and optimizer state sharded over the processes; the text encoder, VAE and rewards are not).

    Returns:
        A :class:`MemoryEstimate`: ``phases`` ``rollout``, ``decode``, ``reward``, ``update``, each
        ``{component: bytes}``, resident weights included.
    """
    if strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"`strategy` must be 'ddp' or 'fsdp2', got {strategy!r}.")
    if num_processes < 1:
        raise ValueError(f"`num_processes` must be >= 1, got {num_processes}.")
    run = args if isinstance(args, RunSettings) else RunSettings.from_args(args)
    geo = _Geometry(generator, run)
    g, notes = generator, []
    shards = num_processes if strategy == "fsdp2" else 1
    num_generations = run.num_generations
    batch = min(run.rollout_batch_size or num_generations, num_generations)
    steps = list(run.train_steps) if run.train_steps is not None else list(range(g.num_steps))
    if run.exploration == "sde":
        rows = len([s for s in steps if s < g.num_steps - 1]) * num_generations
    else:
        rows = len(steps) * min(run.num_anchors, num_generations)
    s_tokens, chunk_el, latent_el = geo.chunk_tokens, geo.chunk_elements, geo.latent_elements

    # Resident: weights, LoRA with its AdamW moments (float32), DDP's gradient buckets.
    lora = _lora_parameters(g, run.lora_target_modules, run.lora_r) * 4
    resident = {
        "transformer weights": g.transformer_bytes // shards,
        "text encoder": g.text_encoder_bytes,
        "VAE": g.vae_bytes,
        "reward models": sum(r.weight_bytes for r in rewards),
        "LoRA + AdamW state": 3 * lora // shards,
    }
    if strategy == "ddp" and num_processes > 1:
        resident["DDP gradient buckets"] = lora
    gathered = {"all-gathered blocks": 2 * g.transformer_bytes // geo.layers} if shards > 1 else {}

    # The rollout group as the trainer keeps it until its last update (pivot chunk records, final latents).
    steps_total = g.num_steps
    kept_group = 4 * ((2 * steps_total - 1) * num_generations * chunk_el + num_generations * latent_el)
    kept = run.groups_per_update * kept_group
    pivots = geo.pivots()
    # The prefix's KV cache level (one row, allocated for the whole video once a chunk is committed): kept with the
    # group as the first update's context.
    prefix_level = geo.level_bytes(1, 0) if max(pivots) > 0 else 0
    context = prefix_level + geo.cross_bytes

    # Rollout: noise, records, latents; the prefix's level and one branch batch's own level; one no-grad call.
    noise = latent_el + geo.num_chunks * (steps_total - 1) * chunk_el + num_generations * chunk_el
    if run.exploration == "sde":
        noise += (steps_total - 1) * num_generations * chunk_el
    rollout_buffers = 4 * (
        noise + 2 * (2 * steps_total - 1) * num_generations * chunk_el + (2 * num_generations + batch) * latent_el
    )
    video = 3 * run.num_frames * run.height * run.width * _element_size(g.vae_dtype)
    reward_videos = num_generations * video
    rollout_peak = {"KV cache": 0, "activations": 0}
    for pivot in pivots:
        levels = (geo.level_bytes(1, 0) if pivot > 0 else 0) + geo.level_bytes(batch, pivot)
        for chunk in range(geo.num_chunks):
            width = batch if chunk >= pivot else 1
            activations = width * (
                geo.nograd_forward(geo.attended_tokens(chunk)) + g.text_tokens * geo.text_dim * geo.size
            )
            if levels + geo.cross_bytes + activations > sum(rollout_peak.values()):
                rollout_peak = {"KV cache": int(levels + geo.cross_bytes), "activations": int(activations)}
    if g.vae is not None:  # the decoded batches concatenated into the group's videos
        concatenated = {"KV cache": context, "videos": 2 * reward_videos}
        if sum(concatenated.values()) > sum(rollout_peak.values()):
            rollout_peak = concatenated
    rollout = {**resident, **gathered, "rollout buffers": rollout_buffers, **rollout_peak}

    # Decode: `rollout_batch_size` videos at a time (one with VAE slicing), collected into the group's videos.
    decode = {**resident, "rollout buffers": kept, "KV cache": context}
    if g.vae is not None:
        decoding = 1 if g.vae_slicing else batch
        vae_act = (
            decoding * _VAE_DECODE_ELEMENTS * g.vae["base_dim"] * run.height * run.width * _element_size(g.vae_dtype)
        )
        decode["VAE decode"] = int(vae_act + 2 * batch * video)
        decode["videos"] = (num_generations - batch) * video  # the batches decoded before
    # Reward: the group's videos and each reward's forward (rewards run one after the other).
    reward_act = max(
        [r.activation_bytes(num_generations, run.num_frames, run.height, run.width) for r in rewards] or [0]
    )
    reward = {**resident, "rollout buffers": kept, "KV cache": context, "videos": reward_videos}
    reward["reward forward"] = reward_act
    if run.overlap_rewards and run.groups_per_update > 1:  # group i is scored while group i + 1 is rolled out
        rollout.update({"videos": rollout.get("videos", 0) + reward_videos, "reward forward": reward_act})
        rollout["rollout buffers"] += kept
    # Update: the context (the rollout's prefix level for the first update, a rebuilt one of the pivot's frames for
    # the next), the rows' prompt, the activations kept for backward, gradients, AdamW's step.
    update_peak = None
    for pivot in pivots:
        attended = geo.attended_tokens(pivot)
        ctx = geo.level_bytes(1, 0) + geo.cross_bytes if pivot > 0 else 0
        prompt = rows * g.text_tokens * geo.text_dim * geo.size + rows * pivot * chunk_el * 4
        saved = rows * geo.saved_per_block(attended, run.lora_r)
        backward = rows * geo.backward_per_block(attended)
        outside = rows * (s_tokens * geo.dim * _OUTSIDE_SD + g.text_tokens * geo.dim * geo.size + 2 * chunk_el * 4)
        if run.gradient_checkpointing:
            inputs = geo.layers * rows * s_tokens * geo.dim * geo.size
            activations = inputs + outside + max(rows * geo.nograd_forward(attended), saved + backward)
        else:
            activations = geo.layers * saved + outside + backward
        if run.beta:
            activations += rows * geo.nograd_forward(attended)  # the reference pass, before backward
        candidate = {"KV cache": int(ctx), "activations": int(prompt + activations)}
        if update_peak is None or sum(candidate.values()) > sum(update_peak.values()):
            update_peak = candidate
    update = {**resident, **gathered, "rollout buffers": kept, **update_peak, "gradients": lora // shards}
    phases = {"rollout": rollout, "decode": decode, "reward": reward, "update": update}
    for spec in rewards:
        if not spec.modeled:
            notes.append(f"the activations of reward {spec.name!r} are not modeled (weights only)")
    return MemoryEstimate(
        {name: {k: int(v) for k, v in phase.items() if v} for name, phase in phases.items()},
        num_processes=num_processes,
        strategy=strategy,
        notes=notes,
    )


def largest_fitting(
    args,
    generator: GeneratorSpec,
    rewards: Sequence[RewardSpec] = (),
    *,
    memory_bytes: int,
    num_processes: int = 1,
    strategy: str = "ddp",
    max_generations: int = 64,
) -> dict[str, int | None]:
    """The largest settings whose estimated peak fits in ``memory_bytes``, chosen in turn: ``rollout_batch_size``
    (with the other settings of ``args``), then ``num_anchors`` (with that batch size), then ``num_generations``
    (with both). A value is None when even the smallest does not fit (the later ones then keep ``args``' values)."""
    run = args if isinstance(args, RunSettings) else RunSettings.from_args(args)

    def fits(settings: RunSettings) -> bool:
        estimate = estimate_memory(settings, generator, rewards, num_processes=num_processes, strategy=strategy)
        return estimate.peak <= memory_bytes

    result: dict[str, int | None] = {}
    for name in ("rollout_batch_size", "num_anchors", "num_generations"):
        if name == "num_generations":
            low, high = max(2, run.num_anchors, run.rollout_batch_size or 2), max_generations
        else:
            low, high = 1, run.num_generations
        if not fits(replace(run, **{name: low})):
            result[name] = None
            continue
        while low < high:  # the peak grows with each of them: bisect
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(replace(run, **{name: middle})) else (low, middle - 1)
        result[name] = low
        run = replace(run, **{name: low})
    return result


def device_memory(device: torch.device | str) -> int | None:
    """Total memory of ``device`` in bytes: a CUDA GPU's, or the machine's RAM for ``cpu`` (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------------


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated while it is active, overall and per named phase.

    Every ATen op's outputs are inspected; a storage seen for the first time (not one of the op's inputs: views and
    in-place results are not allocations) is counted until it is freed. Storages that existed before the tracker was
    entered are not counted. Allocations in other threads are not seen (the mode is thread-local).

    Example:
        ```py
        >>> tracker = TensorMemoryTracker()
        >>> with tracker:
        ...     with tracker.phase("rollout"):
        ...         group = generate_group(pipe, embeds, ...)
        >>> tracker.phases["rollout"] / 2**30  # GiB
        ```
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phases: dict[str, int] = {}
        self._sizes: dict[int, int] = {}
        self._active: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, key)
            self._update_peaks()
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _update_peaks(self) -> None:
        self.peak = max(self.peak, self.live)
        if self._active:
            name = self._active[-1]
            self.phases[name] = max(self.phases.get(name, 0), self.live)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the peaks reached inside to ``name`` (the innermost phase wins; repeated phases keep the max)."""
        self._active.append(name)
        self._update_peaks()
        try:
            yield
        finally:
            self._active.pop()
