"""``CausalWanPipeline``: chunk-wise, KV-cached generation with Self-Forcing-style few-step samplers on Wan2.1."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import diffusers
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from ..models.kv_cache import (
    AttentionPlan,
    CrossAttentionCache,
    KVCache,
    block_causal_mask,
    cross_attention_weights_version,
    enable_causal_attention,
    tokens_per_frame,
)
from ..models.self_forcing import SELF_FORCING_FILENAME, SELF_FORCING_REPO_ID, load_self_forcing_transformer
from ..utils.video_size import nearest_valid, whole_chunk_frames
from .sampler import few_step_schedule, predict_x0, renoise

__all__ = [
    "CausalGenerationState",
    "CausalWanPipeline",
    "CausalWanPipelineOutput",
    "ChunkTrajectory",
    "PipelineSource",
    "check_finite_latents",
    "pipeline_hub_id",
    "pipeline_model_id",
    "pipeline_source",
]

WAN_BASE_REPO_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


@dataclass
class ChunkTrajectory:
    """What one chunk's few-step denoising did, for every batch row.

    Attributes:
        chunk_index: index of the chunk in the video.
        frame_start: absolute index of its first latent frame.
        timesteps / sigmas: ``[T]`` float32, the schedule of the steps.
        inputs: ``[T, B, C, f, H, W]`` the input ``x_{t_s}`` of every step (``inputs[0]`` is the chunk's noise).
        predictions: ``[T, B, C, f, H, W]`` the x̂0 prediction of every step (``predictions[-1]`` is the chunk).
        noise: ``[T-1, B, C, f, H, W]`` the re-noise draws ``η_s`` that turned ``predictions[s]`` into ``inputs[s+1]``.
    """

    chunk_index: int
    frame_start: int
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    inputs: torch.Tensor
    predictions: torch.Tensor
    noise: torch.Tensor

    @property
    def latents(self) -> torch.Tensor:
        """The chunk's clean latents ``[B, C, f, H, W]`` (the last step's x̂0)."""
        return self.predictions[-1]


@dataclass
class CausalGenerationState:
    """Everything a partially generated batch of videos needs to continue: the streaming API's unit of work.

    Attributes:
        prompt_embeds: ``[B, text_tokens, text_dim]`` text-encoder outputs, one row per video.
        cache: self-attention KV cache of the committed chunks (preallocated, written in place; a fork reads its
            parent's levels without copying them).
        cross_cache: the prompts' text projection and per-block keys/values, reused by no-grad passes while the
            weights they came from are unchanged (None: recompute every pass).
        frame_offset: absolute latent frame where the next chunk starts.
        chunks: committed clean chunk latents, each ``[B, C, f, H, W]``.
    """

    prompt_embeds: torch.Tensor
    cache: KVCache
    cross_cache: CrossAttentionCache | None = None
    frame_offset: int = 0
    chunks: list[torch.Tensor] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def latents(self) -> torch.Tensor:
        """The committed latent video ``[B, C, F, H, W]``."""
        return torch.cat(self.chunks, dim=2)


@dataclass
class CausalWanPipelineOutput(BaseOutput):
    """Output of :class:`CausalWanPipeline`.

    Attributes:
        frames: decoded video ``[B, num_frames, H, W, 3]`` (np), ``[B, num_frames, 3, H, W]`` (pt), lists of PIL images
            (pil), or the latents ``[B, C, F, H, W]`` for ``output_type="latent"``.
        trajectory: with ``return_trajectory=True``, one :class:`ChunkTrajectory` per chunk.
    """

    frames: object
    trajectory: list[ChunkTrajectory] | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _collapse_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def pipeline_model_id(pipeline: DiffusionPipeline) -> str | None:
    """The Hub id or path the pipeline's generator was loaded from (None for a pipeline built in memory)."""
    return getattr(pipeline, "generator_id", None) or pipeline.name_or_path or None


def pipeline_hub_id(pipeline: DiffusionPipeline) -> str | None:
    """:func:`pipeline_model_id` when it is a Hub id (None for a local folder): the base model a model card names."""
    source = pipeline_model_id(pipeline)
    return None if source is None or os.path.isdir(source) else source


@dataclass(frozen=True)
class PipelineSource:
    """Where a pipeline's generator comes from, for model cards.

    Attributes:
        name: how a model card names it (markdown): a link to its Hub repo, a local path, or how it was built.
        hub_id: the Hub id (a card's ``base_model``); None for a folder or a pipeline built in memory.
        code: Python lines that build the same generator as ``pipe`` (imports included).
    """

    name: str
    hub_id: str | None
    code: str


def pipeline_source(pipeline: DiffusionPipeline) -> PipelineSource:
    """The :class:`PipelineSource` of ``pipeline``: the one its constructor recorded (``pipeline.source``, set by
    ``trl_arcopo.testing.tiny_causal_wan_pipeline``), else built from the checkpoint of
    :meth:`CausalWanPipeline.from_self_forcing` or the Hub id / folder ``from_pretrained`` read."""
    recorded = getattr(pipeline, "source", None)
    if recorded is not None:
        return recorded
    dtype = str(pipeline.transformer.dtype).removeprefix("torch.")
    device = '.to("cuda" if torch.cuda.is_available() else "cpu")'
    imports = "import torch\nfrom trl_arcopo import CausalWanPipeline\n\n"
    checkpoint = getattr(pipeline, "generator_id", None)
    if checkpoint is not None:
        window = pipeline.config.local_attn_size
        window_args = f", local_attn_size={window}, sink_size={pipeline.config.sink_size}" if window != -1 else ""
        call = f"from_self_forcing({checkpoint!r}, {pipeline.name_or_path!r}, dtype=torch.{dtype}{window_args})"
        return _loaded_source(
            checkpoint, pipeline_hub_id(pipeline), f"{imports}pipe = CausalWanPipeline.{call}{device}"
        )
    if pipeline.name_or_path:
        code = f"{imports}pipe = CausalWanPipeline.from_pretrained({pipeline.name_or_path!r}, dtype=torch.{dtype}){device}"
        return _loaded_source(pipeline.name_or_path, pipeline_hub_id(pipeline), code)
    return PipelineSource(
        "a CausalWanPipeline built in memory (not saved)",
        None,
        "pipe = ...  # the CausalWanPipeline this LoRA was trained on (it was built in memory, not saved)",
    )


def _loaded_source(source: str, hub_id: str | None, code: str) -> PipelineSource:
    name = f"[`{hub_id}`](https://huggingface.co/{hub_id})" if hub_id else f"`{source}` (a local path)"
    return PipelineSource(name, hub_id, code)


def check_finite_latents(latents: torch.Tensor, where: str) -> None:
    """Raise a ``FloatingPointError`` naming ``where`` when ``latents`` hold a NaN or an infinity (one reduction)."""
    if not torch.isfinite(latents).all():
        raise FloatingPointError(
            f"The generator produced non-finite latents (NaN or inf) in {where}: its weights (e.g. a LoRA trained "
            "with too high a learning rate) or its dtype overflowed. Check the loaded LoRA, or use bfloat16 or "
            "float32 instead of float16."
        )


class CausalWanPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    r"""Chunk-wise autoregressive text-to-video generation (Self-Forcing, CausVid, LongLive, ...) on a stock
    ``WanTransformer3DModel`` with a KV cache.

    The latent video ``[B, C, F, H, W]`` is generated ``num_frame_per_block`` latent frames at a time. Each chunk runs
    the few-step sampler (``denoising_step_list``) attending to the cached keys/values of the previous chunks, then a
    clean context pass at ``context_noise`` writes its own keys/values to the cache. The streaming primitives
    (:meth:`init_state`, :meth:`denoise_chunk` / :meth:`sample_chunk`, :meth:`commit_chunk`, :meth:`fork`,
    :meth:`decode`) expose the same loop to trainers, which fork a prefix into several branches that share its cache.

    Args:
        tokenizer, text_encoder: the umT5 tokenizer and encoder (optional when ``prompt_embeds`` are passed).
        vae: ``AutoencoderKLWan`` (optional for ``output_type="latent"``).
        transformer: the causal generator as a stock ``WanTransformer3DModel``.
        scheduler: kept only as a config holder; the sampler uses the explicit schedule below.
        num_frame_per_block: latent frames per chunk.
        denoising_step_list, warp_denoising_step, timestep_shift: the few-step schedule (see
            :func:`~trl_arcopo.pipelines.sampler.few_step_schedule`); default ``[1000, 750, 500, 250]``, warped, 5.0.
        context_noise: timestep of the cache-refresh pass (0: clean).
        local_attn_size: attention window in latent frames including the current chunk (-1: global attention).
        sink_size: first latent frames never evicted from a windowed cache.
        max_sequence_length: text tokens per prompt.

    Examples:
        ```py
        >>> import torch
        >>> from trl_arcopo import CausalWanPipeline

        >>> pipe = CausalWanPipeline.from_self_forcing(dtype=torch.bfloat16).to("cuda")
        >>> video = pipe("A corgi surfing a wave at sunset", num_frames=81).frames[0]
        ```
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder", "vae", "scheduler"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        text_encoder: UMT5EncoderModel | None,
        vae: AutoencoderKLWan | None,
        transformer: WanTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        num_frame_per_block: int = 3,
        denoising_step_list: list[float] | None = None,
        warp_denoising_step: bool = True,
        timestep_shift: float = 5.0,
        context_noise: float = 0.0,
        local_attn_size: int = -1,
        sink_size: int = 0,
        max_sequence_length: int = 512,
    ) -> None:
        super().__init__()
        if denoising_step_list is None:
            denoising_step_list = [1000.0, 750.0, 500.0, 250.0]
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.register_to_config(
            num_frame_per_block=num_frame_per_block,
            denoising_step_list=[float(s) for s in denoising_step_list],
            warp_denoising_step=warp_denoising_step,
            timestep_shift=timestep_shift,
            context_noise=context_noise,
            local_attn_size=local_attn_size,
            sink_size=sink_size,
            max_sequence_length=max_sequence_length,
        )
        self._check_sampler_config()
        self.timesteps, self.sigmas = few_step_schedule(
            denoising_step_list, warp=warp_denoising_step, shift=timestep_shift
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.runtime = enable_causal_attention(transformer)
        self._forward_transformer: torch.nn.Module | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_self_forcing(
        cls,
        checkpoint: str | os.PathLike = SELF_FORCING_REPO_ID,
        base: str | os.PathLike = WAN_BASE_REPO_ID,
        *,
        dtype: torch.dtype = torch.bfloat16,
        use_ema: bool = True,
        filename: str = SELF_FORCING_FILENAME,
        transformer_config: dict | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        **kwargs,
    ) -> CausalWanPipeline:
        """Build the real Self-Forcing pipeline: converted causal weights + tokenizer, umT5 and VAE of Wan2.1.

        Args:
            checkpoint: Hub repo id or local file of the original generator checkpoint.
            base: Hub repo id or local folder of a diffusers Wan2.1 T2V pipeline (its transformer is not loaded; its
                ``transformer/config.json`` gives the architecture unless ``transformer_config`` is passed).
            dtype: dtype of the components (fp32-sensitive transformer modules stay float32).
            kwargs: pipeline config overrides (``local_attn_size=12, sink_size=3`` ...) and ``from_pretrained``
                options (``revision``, ``variant`` ...).
        """
        if transformer_config is None:
            base_config = WanTransformer3DModel.load_config(
                base, subfolder="transformer", cache_dir=cache_dir, token=token
            )
            transformer_config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        transformer = load_self_forcing_transformer(
            checkpoint,
            config=transformer_config,
            use_ema=use_ema,
            dtype=dtype,
            filename=filename,
            cache_dir=cache_dir,
            token=token,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=kwargs.get("timestep_shift", 5.0))
        pipe = cls.from_pretrained(
            base, transformer=transformer, scheduler=scheduler, dtype=dtype, cache_dir=cache_dir, token=token, **kwargs
        )
        pipe.generator_id = str(checkpoint)  # the base model of LoRAs trained on this pipeline (model cards)
        return pipe

    # ------------------------------------------------------------------ validation

    def _check_sampler_config(self) -> None:
        cfg = self.config
        chunk, window, sink = cfg.num_frame_per_block, cfg.local_attn_size, cfg.sink_size
        if chunk < 1:
            raise ValueError(f"`num_frame_per_block` must be >= 1, got {chunk}.")
        if not cfg.denoising_step_list:
            raise ValueError("`denoising_step_list` must name at least one step, e.g. [1000, 750, 500, 250].")
        if sink < 0:
            raise ValueError(f"`sink_size` must be >= 0, got {sink}.")
        if window != -1:
            if window < chunk:
                raise ValueError(
                    f"`local_attn_size`={window} is smaller than a chunk (`num_frame_per_block`={chunk}); use -1 for "
                    f"global attention or a window of at least {chunk + sink} latent frames."
                )
            if sink >= window:
                raise ValueError(f"`sink_size`={sink} must be smaller than `local_attn_size`={window}.")
            if window - sink < chunk:
                raise ValueError(
                    f"`local_attn_size`={window} minus `sink_size`={sink} leaves fewer frames than one chunk "
                    f"({chunk}); raise `local_attn_size` to at least {chunk + sink}."
                )
        elif sink:
            raise ValueError(f"`sink_size`={sink} needs a window: set `local_attn_size` (e.g. 12) or sink_size=0.")

    def compile(self, **kwargs) -> None:
        """Compile the transformer's blocks with ``torch.compile`` (diffusers' regional compilation,
        ``transformer.compile_repeated_blocks``); ``kwargs`` go to ``torch.compile`` (e.g. ``mode``, ``backend``).

        Every block compiles to one set of graphs shared by all blocks: shapes in a block do not depend on the chunk,
        the step, the pivot or the cache length (the attention over the KV cache runs eagerly between the graphs),
        so generation never recompiles after the first call of a batch size (``dynamic=None``, the default, makes
        the batch dimension dynamic when a second batch size appears). Generation and the differentiable update
        (``predict_x0`` with grad, gradient checkpointing included) both run compiled.
        """
        self.transformer.compile_repeated_blocks(**kwargs)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The base generator inside the block: the transformer's LoRA adapters, if any, are disabled."""
        transformer = self.transformer
        if not getattr(transformer, "_hf_peft_config_loaded", False):
            yield
            return
        transformer.disable_adapters()
        try:
            yield
        finally:
            transformer.enable_adapters()

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, F, H, W)`` of the latent video for ``num_frames`` pixel frames of ``height × width``."""
        return (
            self.transformer.config.in_channels,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )

    def check_video_size(self, num_frames: int, height: int, width: int) -> None:
        """Raise a ``ValueError`` naming the field and its nearest valid values unless this pipeline can generate
        videos of ``num_frames`` pixel frames of ``height × width`` pixels.

        The VAE packs ``vae_scale_factor_temporal`` pixel frames into one latent frame (the first frame alone) and the
        latent frames must split into whole chunks of ``num_frame_per_block``: with Wan2.1's VAE (stride 4) and
        3-frame chunks, ``num_frames`` is ``9 + 12·k`` (81 = 7 chunks); with a per-frame VAE (stride 1), a multiple
        of 3. ``height`` and ``width`` are multiples of the VAE's spatial stride times the transformer's patch size
        (16 on Wan2.1).
        """
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
            if not _is_int(value):
                raise ValueError(f"`{name}` ({value!r}) must be an integer.")
        t_scale, chunk = self.vae_scale_factor_temporal, self.config.num_frame_per_block
        first, step = whole_chunk_frames(t_scale, chunk)
        if num_frames < first or (num_frames - first) % step:
            raise ValueError(
                f"`num_frames` ({num_frames}) does not split into whole chunks of this pipeline (VAE temporal "
                f"stride {t_scale}, {chunk} latent frames per chunk): use {nearest_valid(num_frames, first, step)} (any "
                f"{first} + {step}·k)."
            )
        patch_h, patch_w = self.transformer.config.patch_size[1:]
        multiple = self.vae_scale_factor_spatial * max(patch_h, patch_w)
        for name, value in (("height", height), ("width", width)):
            if value < multiple or value % multiple:
                raise ValueError(
                    f"`{name}` ({value}) must be a positive multiple of {multiple} for this pipeline (VAE spatial "
                    f"stride {self.vae_scale_factor_spatial}, {patch_h}x{patch_w} patches): use "
                    f"{nearest_valid(value, multiple, multiple)}."
                )

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        num_frames: int,
        height: int,
        width: int,
        latents: torch.Tensor | None,
        output_type: str,
        num_videos_per_prompt: int = 1,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    ) -> None:
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` (a string or a list of strings) or `prompt_embeds`; got neither.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass exactly one of `prompt` or `prompt_embeds`, not both.")
        if prompt is not None:
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {prompt!r}.")
            if isinstance(prompt, list) and not prompt:
                raise ValueError("`prompt` is an empty list: pass at least one prompt.")
            if self.tokenizer is None or self.text_encoder is None:
                raise ValueError(
                    "`prompt` needs a tokenizer and a text encoder; this pipeline has none: pass `prompt_embeds`."
                )
        text_dim = self.transformer.config.text_dim
        if prompt_embeds is not None and (
            not isinstance(prompt_embeds, torch.Tensor)
            or prompt_embeds.ndim != 3
            or prompt_embeds.shape[-1] != text_dim
        ):
            shape = (
                tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds).__name__
            )
            raise ValueError(
                f"`prompt_embeds` must be a tensor [batch, tokens, {text_dim}] (the transformer's `text_dim`), got "
                f"{shape}; make them with `pipe.encode_prompt(prompts)`."
            )
        if not _is_int(num_videos_per_prompt) or num_videos_per_prompt < 1:
            raise ValueError(f"`num_videos_per_prompt` must be an integer >= 1, got {num_videos_per_prompt!r}.")
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"`output_type` must be one of 'np', 'pt', 'pil', 'latent', got {output_type!r}.")
        if output_type != "latent" and self.vae is None:
            raise ValueError("Decoding needs a VAE; this pipeline has none: use `output_type='latent'`.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown} are not among {self._callback_tensor_inputs}."
            )
        num_prompts = (
            len([prompt] if isinstance(prompt, str) else prompt) if prompt is not None else len(prompt_embeds)
        )
        batch = num_prompts * num_videos_per_prompt
        chunk = self.config.num_frame_per_block
        patch_h, patch_w = self.transformer.config.patch_size[1:]
        if latents is not None:
            if latents.ndim != 5 or latents.shape[1] != self.transformer.config.in_channels:
                raise ValueError(
                    f"`latents` must be [batch, {self.transformer.config.in_channels}, frames, height, width] "
                    f"(channel-major latent noise), got shape {tuple(latents.shape)}."
                )
            if latents.shape[0] != batch:
                raise ValueError(
                    f"`latents` has batch {latents.shape[0]} but there are {num_prompts} prompts x "
                    f"{num_videos_per_prompt} videos per prompt; pass one noise row per video."
                )
            if latents.shape[2] % chunk:
                raise ValueError(
                    f"`latents` has {latents.shape[2]} latent frames, not a multiple of the chunk size "
                    f"`num_frame_per_block`={chunk}."
                )
            if latents.shape[3] % patch_h or latents.shape[4] % patch_w:
                raise ValueError(
                    f"`latents` height/width {tuple(latents.shape[3:])} must be multiples of the patch size "
                    f"{(patch_h, patch_w)}."
                )
            return
        self.check_video_size(num_frames, height, width)

    def _check_step_noise(self, step_noise: dict, latents: torch.Tensor, num_chunks: int) -> None:
        num_draws = len(self.timesteps) - 1
        chunk = self.config.num_frame_per_block
        expected = (latents.shape[0], latents.shape[1], chunk, *latents.shape[3:])
        for key, value in step_noise.items():
            if not (isinstance(key, tuple) and len(key) == 2 and 0 <= key[0] < num_chunks and 0 <= key[1] < num_draws):
                raise ValueError(
                    f"`step_noise` key {key!r} is not a (chunk_index, step_index) pair with chunk_index in "
                    f"[0, {num_chunks}) and step_index in [0, {num_draws})."
                )
            if tuple(value.shape) != expected:
                raise ValueError(f"`step_noise`[{key}] has shape {tuple(value.shape)}, expected {expected}.")

    # ------------------------------------------------------------------ text

    def encode_prompt(
        self, prompt: str | list[str], *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """umT5 embeddings ``[B, max_sequence_length, text_dim]``; positions past each prompt's length are zero.

        Differentiable with respect to a trainable text encoder when grad is enabled (``__call__`` runs without)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        max_length = self.config.max_sequence_length
        inputs = self.tokenizer(
            [_collapse_whitespace(p) for p in prompts],
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        encoder_device = next(self.text_encoder.parameters()).device
        mask = inputs.attention_mask.to(encoder_device)
        embeds = self.text_encoder(inputs.input_ids.to(encoder_device), mask).last_hidden_state
        embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return embeds.to(device=device or self._execution_device, dtype=dtype or self.transformer.dtype)

    # ------------------------------------------------------------------ streaming API

    def init_state(
        self,
        prompt_embeds: torch.Tensor,
        *,
        num_frames: int | None = None,
        cache_cross_attention: bool = True,
    ) -> CausalGenerationState:
        """A fresh state (empty cache, frame 0) for the videos of ``prompt_embeds`` ``[B, text_tokens, text_dim]``.

        ``num_frames`` (latent frames of the whole video, if known) sizes the KV cache once; without it the cache
        grows as chunks are committed."""
        return CausalGenerationState(
            prompt_embeds=prompt_embeds.to(self.transformer.dtype),
            cache=KVCache(self.config.local_attn_size, self.config.sink_size, num_frames),
            cross_cache=CrossAttentionCache() if cache_cross_attention else None,
        )

    def _cached_pass(self, state: CausalGenerationState, x: torch.Tensor, timestep: float | torch.Tensor):
        """Flow of one transformer call on the state's next chunk ``x`` ``[B, C, f, H, W]`` attending to its cache.

        Without grad the call writes the chunk's keys/values into the cache (committed by :meth:`commit_chunk`) and
        reuses the state's text context; with grad the cache is only read."""
        write = not torch.is_grad_enabled()
        tokens = tokens_per_frame(self.transformer, x.shape[3], x.shape[4])
        plan = state.cache.plan(state.frame_offset, x.shape[2], tokens, x.shape[0], x.device, write=write)
        if write and state.cross_cache is not None:
            version = cross_attention_weights_version(self.transformer)
            if state.cross_cache.weights_version != version:
                state.cross_cache = CrossAttentionCache(weights_version=version, repeat=state.cross_cache.repeat)
            plan = replace(plan, cross=state.cross_cache)
        with self.runtime.active(plan):
            return self._transformer(x, timestep, state.prompt_embeds)

    def _transformer(
        self, x: torch.Tensor, timestep: float | torch.Tensor, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Flow ``[B, C, f, H, W]`` (in ``x``'s dtype) of one call at ``timestep`` (a float or one per row ``[B]``);
        inputs are cast to ``prompt_embeds``' dtype, which :meth:`init_state` set to the transformer's."""
        t = torch.as_tensor(timestep, device=x.device, dtype=torch.float32).expand(x.shape[0])
        flow = (self._forward_transformer or self.transformer)(
            hidden_states=x.to(prompt_embeds.dtype), timestep=t, encoder_hidden_states=prompt_embeds, return_dict=False
        )[0]
        return flow.to(x.dtype)

    @contextlib.contextmanager
    def transformer_forward(self, module: torch.nn.Module) -> Iterator[None]:
        """Route the streaming API's transformer calls through ``module``: the same transformer wrapped by
        DDP/FSDP/DeepSpeed, so that gradient synchronisation hooks see the forward."""
        previous, self._forward_transformer = self._forward_transformer, module
        try:
            yield
        finally:
            self._forward_transformer = previous

    def predict_x0(self, state: CausalGenerationState, x_t: torch.Tensor, step: int | Sequence[int]) -> torch.Tensor:
        """x̂0 of sampler step ``step`` for the next chunk's input ``x_t`` ``[B, C, f, H, W]`` given the state's cache.

        ``step`` is one step index for all rows or one per row (rows at different noise levels in one batched
        forward). Differentiable with respect to the transformer's trainable weights when grad is enabled (the cache
        is detached; the cross-attention cache is only used without grad).
        """
        if isinstance(step, int):
            timestep, sigma = self.timesteps[step], self.sigmas[step]
        else:
            if len(step) != x_t.shape[0]:
                raise ValueError(f"`step` has {len(step)} entries for {x_t.shape[0]} rows of `x_t`.")
            timestep = torch.tensor([self.timesteps[s] for s in step], device=x_t.device)
            sigma = torch.tensor([self.sigmas[s] for s in step], device=x_t.device, dtype=torch.float64)
            sigma = sigma.view(-1, *([1] * (x_t.ndim - 1)))
        return predict_x0(x_t, self._cached_pass(state, x_t, timestep), sigma)

    @torch.no_grad()
    def denoise_chunk(
        self,
        state: CausalGenerationState,
        noise: torch.Tensor,
        *,
        step_noise: Sequence[torch.Tensor | None] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> ChunkTrajectory:
        """Run the few-step sampler on the next chunk from ``noise`` ``[B, C, f, H, W]`` and record every step.

        ``step_noise[s]`` (``[B, C, f, H, W]``) fixes the re-noise draw after step ``s``; missing draws are sampled
        from ``generator``. The state is not changed: commit the result with :meth:`commit_chunk`.
        """
        inputs, predictions, draws = [], [], []
        self._run_sampler(state, noise, step_noise, generator, record=(inputs, predictions, draws))
        return ChunkTrajectory(
            chunk_index=len(state.chunks),
            frame_start=state.frame_offset,
            timesteps=torch.tensor(self.timesteps),
            sigmas=torch.tensor(self.sigmas),
            inputs=torch.stack(inputs),
            predictions=torch.stack(predictions),
            noise=torch.stack(draws) if draws else inputs[0].new_zeros(0, *inputs[0].shape),
        )

    @torch.no_grad()
    def sample_chunk(
        self,
        state: CausalGenerationState,
        noise: torch.Tensor,
        *,
        step_noise: Sequence[torch.Tensor | None] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """:meth:`denoise_chunk`'s clean latents ``[B, C, f, H, W]`` (the same values) without keeping the steps: only
        the current step's tensors are alive, as in the original sampler."""
        return self._run_sampler(state, noise, step_noise, generator)

    def _run_sampler(
        self,
        state: CausalGenerationState,
        noise: torch.Tensor,
        step_noise: Sequence[torch.Tensor | None] | None,
        generator: torch.Generator | list[torch.Generator] | None,
        record: tuple[list, list, list] | None = None,
    ) -> torch.Tensor:
        """The few-step sampler on one chunk; returns the last x̂0. With ``record`` (three lists), every step's input,
        x̂0 and re-noise draw are appended to them."""
        num_steps = len(self.timesteps)
        x = noise.float()
        for s in range(num_steps):
            x0 = self.predict_x0(state, x, s)
            if record is not None:
                record[0].append(x)
                record[1].append(x0)
            if s < num_steps - 1:
                eta = step_noise[s] if step_noise is not None and step_noise[s] is not None else None
                if eta is None:
                    eta = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
                eta = eta.to(device=x0.device, dtype=x0.dtype)
                if record is not None:
                    record[2].append(eta)
                x = renoise(x0, eta, self.sigmas[s + 1])
        return x0

    @torch.no_grad()
    def commit_chunk(
        self,
        state: CausalGenerationState,
        latents: torch.Tensor,
        *,
        update_cache: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> None:
        """Append the clean chunk ``latents`` ``[B, C, f, H, W]`` to the state.

        With ``update_cache`` (skip it only after the last chunk) the transformer runs once more on the chunk at
        timestep ``context_noise`` and its keys/values become the chunk's cache segment.
        """
        frames = latents.shape[2]
        if update_cache:
            x = latents.float()
            context_t = float(self.config.context_noise)
            if context_t > 0:
                sigma = few_step_schedule([context_t], warp=False, shift=self.config.timestep_shift)[1][0]
                x = renoise(x, randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype), sigma)
            self._cached_pass(state, x, context_t)
            state.cache.commit(state.frame_offset, frames)
        state.chunks.append(latents)
        state.frame_offset += frames

    def fork(self, state: CausalGenerationState, n: int) -> CausalGenerationState:
        """A state of ``B * n`` rows in which row ``i`` continues row ``i // n`` of ``state``.

        The cache levels are shared, not copied; ``state`` itself stays valid and unchanged.
        """
        if n < 1:
            raise ValueError(f"`n` must be >= 1 to fork a state, got {n}.")
        return CausalGenerationState(
            prompt_embeds=state.prompt_embeds.repeat_interleave(n, dim=0),
            cache=state.cache.fork(n),
            cross_cache=state.cross_cache.fork(n) if state.cross_cache is not None else None,
            frame_offset=state.frame_offset,
            chunks=[c.repeat_interleave(n, dim=0) for c in state.chunks],
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "np"):
        """Decode normalized latents ``[B, C, F, H, W]`` into ``1 + s·(F - 1)`` pixel frames, ``s`` the VAE's
        ``vae_scale_factor_temporal`` (``output_type`` as in ``__call__``). The whole video is decoded at once: the Wan
        VAE's causal cache is not streamable."""
        vae = self.vae
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)
        latents = latents.to(vae.dtype) * std.to(latents.device, vae.dtype) + mean.to(latents.device, vae.dtype)
        video = vae.decode(latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def forward_block_causal(
        self, latents: torch.Tensor, frame_timesteps: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """One full transformer forward over ``latents`` ``[B, C, F, H, W]`` under the chunk-causal mask.

        ``frame_timesteps`` ``[B, F]`` gives each latent frame its own timestep (0 for clean context frames). This is
        what the cache computes chunk by chunk, done the slow way: the reference for tests and benchmarks.
        Returns the flow ``[B, C, F, H, W]``.
        """
        batch, _, num_frames, height, width = latents.shape
        tpf = tokens_per_frame(self.transformer, height, width)
        mask = block_causal_mask(
            num_frames,
            self.config.num_frame_per_block,
            tpf,
            local_attn_size=self.config.local_attn_size,
            sink_size=self.config.sink_size,
            device=latents.device,
        )
        timestep = frame_timesteps.float().repeat_interleave(tpf, dim=1)
        with self.runtime.active(AttentionPlan(attention_mask=mask)):
            flow = self.transformer(
                hidden_states=latents.to(self.transformer.dtype),
                timestep=timestep,
                encoder_hidden_states=prompt_embeds.to(self.transformer.dtype),
                return_dict=False,
            )[0]
        return flow.to(latents.dtype)

    # ------------------------------------------------------------------ generation

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a ``callback_on_step_end`` to stop after the current chunk."""
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        num_videos_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        step_noise: Mapping[tuple[int, int], torch.Tensor] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        return_trajectory: bool = False,
        callback_on_step_end: Callable[[DiffusionPipeline, int, float, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> CausalWanPipelineOutput | tuple:
        r"""Generate videos chunk by chunk.

        Args:
            prompt: text prompt(s); or pass ``prompt_embeds`` ``[B, text_tokens, text_dim]``.
            num_frames: pixel frames making whole chunks (:meth:`check_video_size`): ``9 + 12·(chunks - 1)`` with
                Wan2.1's VAE and 3-frame chunks (81 = 7 chunks).
            height, width: pixel size, multiples of 16.
            num_videos_per_prompt: videos generated for each prompt (the batch is ``B · num_videos_per_prompt``, the
                videos of a prompt next to each other).
            latents: initial noise ``[B · num_videos_per_prompt, C, F, H, W]`` (channel-major, latent frames); its
                shape then sets the frames and size.
            step_noise: ``{(chunk_index, step_index): η}`` fixes re-noise draws (``η`` ``[B, C, f, H, W]``, step
                ``0 .. T-2`` is the step whose x̂0 is re-noised); other draws come from ``generator``.
            generator: torch generator(s) for the noise.
            output_type: ``"np"``, ``"pt"``, ``"pil"`` or ``"latent"``.
            return_trajectory: also return every chunk's per-step inputs, x̂0 predictions and noise.
            callback_on_step_end: as in diffusers' Wan pipelines, with a chunk as the step: called as
                ``callback_on_step_end(pipe, chunk_index, timestep, callback_kwargs)`` after each chunk is denoised,
                before it enters the KV cache (``timestep`` is the chunk's last sampler timestep). ``callback_kwargs``
                holds the tensors named in ``callback_on_step_end_tensor_inputs``: ``"latents"`` is the latent video
                ``[B, C, F, H, W]``, clean up to the current chunk and still the initial noise after it. A returned
                ``"latents"`` replaces it: the current chunk is committed (cached and decoded) as returned and the later
                chunks start from the returned noise. Setting ``pipe._interrupt = True`` stops after the current chunk
                (the output then has the chunks generated so far).
            callback_on_step_end_tensor_inputs: tensors passed to the callback (default ``["latents"]``; a
                ``PipelineCallback`` brings its own ``tensor_inputs``).

        Returns:
            :class:`CausalWanPipelineOutput` or a tuple ``(frames,)`` / ``(frames, trajectory)``.
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        self.check_inputs(
            prompt,
            prompt_embeds,
            num_frames,
            height,
            width,
            latents,
            output_type,
            num_videos_per_prompt,
            callback_on_step_end_tensor_inputs,
        )
        self._interrupt = False
        device = self._execution_device
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, device=device)
        prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_videos_per_prompt, dim=0)
        if latents is None:
            shape = (prompt_embeds.shape[0], *self.latent_shape(num_frames, height, width))
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        step_noise = dict(step_noise or {})
        chunk = self.config.num_frame_per_block
        num_chunks = latents.shape[2] // chunk
        self._check_step_noise(step_noise, latents, num_chunks)

        state = self.init_state(prompt_embeds, num_frames=latents.shape[2])
        trajectory = []
        with self.progress_bar(total=num_chunks) as progress_bar:
            for c in range(num_chunks):
                frames = slice(c * chunk, (c + 1) * chunk)
                draws = [step_noise.get((c, s)) for s in range(len(self.timesteps) - 1)]
                if return_trajectory:
                    record = self.denoise_chunk(state, latents[:, :, frames], step_noise=draws, generator=generator)
                    trajectory.append(record)
                    chunk_latents = record.latents
                else:
                    chunk_latents = self.sample_chunk(
                        state, latents[:, :, frames], step_noise=draws, generator=generator
                    )
                check_finite_latents(chunk_latents, f"chunk {c} of {num_chunks}")
                if callback_on_step_end is not None:
                    video = torch.cat([*state.chunks, chunk_latents, latents[:, :, frames.stop :]], dim=2)
                    tensors = {"latents": video}
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, c, self.timesteps[-1], callback_kwargs).pop("latents", video)
                    chunk_latents = latents[:, :, frames]
                last = c == num_chunks - 1 or self.interrupt
                self.commit_chunk(state, chunk_latents, update_cache=not last, generator=generator)
                progress_bar.update()
                if self.interrupt:
                    break

        video = state.latents if output_type == "latent" else self.decode(state.latents, output_type)
        self.maybe_free_model_hooks()
        trajectory = trajectory if return_trajectory else None
        if not return_dict:
            return (video, trajectory) if return_trajectory else (video,)
        return CausalWanPipelineOutput(frames=video, trajectory=trajectory)


# `DiffusionPipeline.from_pretrained` looks up the `_class_name` of a saved pipeline's model_index.json in the diffusers
# namespace: registering the class there lets it load a saved CausalWanPipeline once this module is imported.
if not hasattr(diffusers, CausalWanPipeline.__name__):
    setattr(diffusers, CausalWanPipeline.__name__, CausalWanPipeline)
