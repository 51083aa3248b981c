"""Per-frame image rewards through transformers' CLIP: PickScore, CLIPScore and the LAION aesthetic predictor.

Each reward is an ``nn.Module`` following the reward protocol of :mod:`trl_arcopo.rewards.protocol`::

    reward(prompts, videos) -> list[float]        # videos: float [B, F, 3, H, W] in [0, 1]

Frames are scored one by one as images, then aggregated per video (``frame_aggregation``: ``"mean"``, ``"first"``
or ``"min"``). ``num_frames=K`` scores only ``K`` frames evenly spaced from the first to the last one (indices
``round(linspace(0, F - 1, K))``, so ``K = 1`` keeps the first frame); by default every frame is scored.

Frames go from tensors to CLIP pixel values without a PIL (or video file) round trip: the loaded image processor's
settings (resize to ``size``, resampling, ``crop_size`` center crop, rescale, ``image_mean`` / ``image_std``) are
applied with torch ops on the frames' device. Resizing is antialiased bilinear/bicubic interpolation, the same
operation as the processor's torchvision backend on float images. Its PIL backend rounds to 8 bits (and clamps
overshoots) after each of its two resize passes: on smooth frames pixel values differ from it by at most about two
8-bit levels, on pixel noise by more.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .protocol import _validate_inputs

__all__ = ["AestheticHead", "AestheticReward", "CLIPScoreReward", "PickScoreReward"]

FrameAggregation = Literal["mean", "first", "min"]
_TextImageReward = TypeVar("_TextImageReward", bound="_CLIPTextImageReward")
_FRAME_AGGREGATIONS = ("mean", "first", "min")
_INTERPOLATION_MODES = {PILImageResampling.BILINEAR: "bilinear", PILImageResampling.BICUBIC: "bicubic"}
# Looked up in this order when `AestheticReward.from_pretrained(filename=None)`; TRL's DDPO example uses the `.pth`.
_AESTHETIC_FILENAMES = ("aesthetic-model.safetensors", "aesthetic-model.pth")


def _preprocess_frames(frames: torch.Tensor, image_processor: BaseImageProcessor) -> torch.Tensor:
    """Apply a CLIP image processor's settings to float frames ``[N, 3, H, W]`` in [0, 1].

    Returns float32 pixel values ``[N, 3, crop_h, crop_w]`` on the frames' device (see the module docstring for how
    they compare with the processor's own output).
    """
    processor = image_processor
    pixels = frames.to(torch.float32)
    if processor.do_resize:
        size = processor.size
        if size.shortest_edge:
            new_size = get_resize_output_image_size(
                pixels, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        elif size.height and size.width:
            new_size = (size.height, size.width)
        else:
            raise ValueError(f"image processor `size` must give `shortest_edge` or `height` and `width`, got {size}.")
        mode = _INTERPOLATION_MODES.get(PILImageResampling(processor.resample))
        if mode is None:
            raise ValueError(
                f"image processor `resample`={processor.resample!r} is not supported; "
                "use bilinear (2) or bicubic (3) resampling."
            )
        pixels = F.interpolate(pixels, size=new_size, mode=mode, align_corners=False, antialias=True)
    if processor.do_center_crop:
        crop_height, crop_width = processor.crop_size.height, processor.crop_size.width
        height, width = pixels.shape[-2:]
        if crop_height > height or crop_width > width:
            raise ValueError(
                f"frames of {height}x{width} pixels (after resizing) are smaller than the image processor's "
                f"`crop_size` {crop_height}x{crop_width}; enable `do_resize` or pass larger frames."
            )
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        pixels = pixels[..., top : top + crop_height, left : left + crop_width]
    # Processors expect 0-255 values; `rescale_factor` is usually 1/255.
    pixels = pixels * (255.0 * processor.rescale_factor if processor.do_rescale else 255.0)
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
        pixels = (pixels - mean) / std
    return pixels


def _load_clip(
    model_name_or_path: str | os.PathLike,
    processor_name_or_path: str | os.PathLike | None,
    *,
    with_tokenizer: bool,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    dtype: torch.dtype,
    model_kwargs: dict[str, Any],
) -> tuple[CLIPModel, BaseImageProcessor, PreTrainedTokenizerBase | None]:
    """``CLIPModel`` (eval, frozen), image processor and tokenizer; ``revision`` also applies to the processor when
    it comes from the model's repo."""
    model = CLIPModel.from_pretrained(
        model_name_or_path, revision=revision, cache_dir=cache_dir, token=token, dtype=dtype, **model_kwargs
    )
    model.eval().requires_grad_(False)
    if processor_name_or_path is None:
        processor_name_or_path, processor_revision = model_name_or_path, revision
    else:
        processor_revision = None
    # Only the processor's settings are used (see `_preprocess_frames`), so its PIL variant (always importable) is
    # loaded whatever the installed image backends.
    processor_kwargs = {"revision": processor_revision, "cache_dir": cache_dir, "token": token}
    image_processor = CLIPImageProcessorPil.from_pretrained(processor_name_or_path, **processor_kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(processor_name_or_path, **processor_kwargs) if with_tokenizer else None
    return model, image_processor, tokenizer


class _CLIPFrameReward(nn.Module):
    """Shared machinery: frame sampling, CLIP image embeddings, aggregation. Subclasses define ``frame_scores``."""

    name: ClassVar[str]

    def __init__(
        self,
        model: CLIPModel,
        image_processor: BaseImageProcessor,
        *,
        frame_aggregation: FrameAggregation = "mean",
        num_frames: int | None = None,
    ):
        super().__init__()
        if frame_aggregation not in _FRAME_AGGREGATIONS:
            raise ValueError(f"`frame_aggregation` must be one of {_FRAME_AGGREGATIONS}, got {frame_aggregation!r}.")
        if num_frames is not None and (
            isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1
        ):
            raise ValueError(f"`num_frames` must be a positive int or None (all frames), got {num_frames!r}.")
        self.model = model
        self.image_processor = image_processor
        self.frame_aggregation = frame_aggregation
        self.num_frames = num_frames

    def extra_repr(self) -> str:
        return f"frame_aggregation={self.frame_aggregation!r}, num_frames={self.num_frames}"

    def frame_indices(self, total_frames: int) -> torch.Tensor:
        """Indices of the scored frames among ``total_frames``: all, or ``num_frames`` evenly spaced ones."""
        if self.num_frames is None or self.num_frames >= total_frames:
            return torch.arange(total_frames)
        return torch.linspace(0, total_frames - 1, self.num_frames).round().long()

    def image_embeddings(self, videos: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``[B, K, D]`` of the scored frames of ``videos`` ``[B, F, 3, H, W]``."""
        frames = videos[:, self.frame_indices(videos.shape[1]).to(videos.device)]  # [B, K, 3, H, W]
        batch, num_frames = frames.shape[:2]
        pixel_values = _preprocess_frames(frames.flatten(0, 1).to(self.model.device), self.image_processor)
        pixel_values = pixel_values.to(self.model.dtype)
        embeddings = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return F.normalize(embeddings, dim=-1).view(batch, num_frames, -1)

    def frame_scores(self, prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, K]`` of the scored frames (differentiable with respect to ``videos``)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs: Any) -> list[float]:
        """Score ``B`` videos: ``prompts`` ``B`` strings, ``videos`` float ``[B, F, 3, H, W]`` in [0, 1].

        Extra keyword arguments (dataset columns, trainer state) are ignored. Returns ``B`` floats, the frame scores
        aggregated with ``frame_aggregation``.
        """
        _validate_inputs(prompts, videos)
        scores = self.frame_scores(prompts, videos).float()  # [B, K]
        if self.frame_aggregation == "first":
            per_video = scores[:, 0]
        elif self.frame_aggregation == "min":
            per_video = scores.min(dim=1).values
        else:
            per_video = scores.mean(dim=1)
        return per_video.cpu().tolist()


class _CLIPTextImageReward(_CLIPFrameReward):
    """A CLIP reward comparing each frame with its prompt."""

    default_model: ClassVar[str]
    default_processor: ClassVar[str | None] = None  # None: the model's repo

    def __init__(
        self,
        model: CLIPModel,
        image_processor: BaseImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        *,
        frame_aggregation: FrameAggregation = "mean",
        num_frames: int | None = None,
    ):
        super().__init__(model, image_processor, frame_aggregation=frame_aggregation, num_frames=num_frames)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls: type[_TextImageReward],
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *,
        processor_name_or_path: str | os.PathLike | None = None,
        frame_aggregation: FrameAggregation = "mean",
        num_frames: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        **model_kwargs: Any,
    ) -> _TextImageReward:
        """Load the CLIP model, image processor and tokenizer (Hub id or local folder).

        Args:
            pretrained_model_name_or_path: the ``CLIPModel`` checkpoint; ``None`` for the class's default.
            processor_name_or_path: where the image processor and tokenizer live; ``None`` for the class's default
                processor repo, or the model's own repo when the class has none.
            frame_aggregation, num_frames: see the module docstring.
            device: where to put the model (default: CPU); videos are moved there.
            dtype: the model's dtype (pixel values are computed in float32 and cast to it).
            revision: revision of the model repo, also used for the processor when it comes from the same repo.
            cache_dir, token: passed to every Hub download.
            **model_kwargs: passed to ``CLIPModel.from_pretrained`` (e.g. ``attn_implementation``).
        """
        model, image_processor, tokenizer = _load_clip(
            pretrained_model_name_or_path or cls.default_model,
            processor_name_or_path or cls.default_processor,
            with_tokenizer=True,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            dtype=dtype,
            model_kwargs=model_kwargs,
        )
        reward = cls(model, image_processor, tokenizer, frame_aggregation=frame_aggregation, num_frames=num_frames)
        return reward.eval().to(device) if device is not None else reward.eval()

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings ``[B, D]``; prompts longer than the tokenizer's ``model_max_length``
        (77 tokens for CLIP) are truncated. Repeated prompts are encoded once."""
        unique = list(dict.fromkeys(prompts))
        inputs = self.tokenizer(unique, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        embeddings = F.normalize(self.model.get_text_features(**inputs).pooler_output, dim=-1)
        index = {prompt: i for i, prompt in enumerate(unique)}
        return embeddings[torch.tensor([index[prompt] for prompt in prompts], device=embeddings.device)]

    def cosine_similarities(self, prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
        """``cos(text, frame)`` ``[B, K]`` between each prompt and the scored frames of its video."""
        return torch.einsum("bkd,bd->bk", self.image_embeddings(videos), self.text_embeddings(prompts))


class PickScoreReward(_CLIPTextImageReward):
    """PickScore (Kirstain et al., 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic human preferences.

    Per frame, as in the PickScore reference code: ``score = exp(logit_scale) · cos(text, image)`` where
    ``logit_scale`` is the model's learned log temperature (``exp`` ≈ 100 for ``yuvalkirstain/PickScore_v1``), so
    scores are about 15-25 on natural images. The processor (image settings and tokenizer) comes from
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` by default.
    """

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def frame_scores(self, prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp() * self.cosine_similarities(prompts, videos)


class CLIPScoreReward(_CLIPTextImageReward):
    """CLIPScore (Hessel et al., 2021) with ``openai/clip-vit-large-patch14``.

    Per frame: ``score = weight · max(cos(text, image), 0)`` with the paper's ``weight = 2.5`` (scores in
    [0, 2.5], about 0.5-1 for matching image-text pairs). Pass ``weight=100`` after loading for the ``100 · cos``
    convention of torchmetrics (which also clamps at 0).
    """

    name = "clipscore"
    default_model = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        model: CLIPModel,
        image_processor: BaseImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        *,
        frame_aggregation: FrameAggregation = "mean",
        num_frames: int | None = None,
        weight: float = 2.5,
    ):
        super().__init__(model, image_processor, tokenizer, frame_aggregation=frame_aggregation, num_frames=num_frames)
        self.weight = weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.weight}"

    def frame_scores(self, prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
        return self.weight * self.cosine_similarities(prompts, videos).clamp(min=0)


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's head: ``Linear`` layers ``in → 1024 → 128 → 64 → 16 → 1``.

    The layers are linear only (the original's Dropout layers, inactive at inference, sit at the missing indices
    1, 3 and 5), so state dicts of the original layout (``layers.{0,2,4,6,7}.{weight,bias}``) load as they are.

    Input: L2-normalised CLIP image embeddings ``[..., in_features]``; output: scores ``[...]`` (about 1-10).
    """

    def __init__(self, in_features: int = 768):
        super().__init__()
        widths = (in_features, 1024, 128, 64, 16, 1)
        self.layers = nn.Sequential(
            OrderedDict(
                (str(index), nn.Linear(width_in, width_out))
                for index, width_in, width_out in zip((0, 2, 4, 6, 7), widths[:-1], widths[1:], strict=True)
            )
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def _aesthetic_head_file(
    path_or_repo_id: str | os.PathLike,
    filename: str | None,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
) -> str:
    """Path of the head's weights in a local folder or Hub repo: ``filename``, else the first of
    ``_AESTHETIC_FILENAMES`` present."""
    candidates = (filename,) if filename is not None else _AESTHETIC_FILENAMES
    for candidate in candidates:
        if os.path.isdir(path_or_repo_id):
            path = os.path.join(path_or_repo_id, candidate)
            if os.path.isfile(path):
                return path
            continue
        try:
            return hf_hub_download(
                str(path_or_repo_id), candidate, revision=revision, cache_dir=cache_dir, token=token
            )
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(
        f"No aesthetic head weights {list(candidates)} in {str(path_or_repo_id)!r}; pass `filename=` to name the file."
    )


class AestheticReward(_CLIPFrameReward):
    """The LAION aesthetic predictor on CLIP ViT-L/14 image embeddings, as in TRL's DDPO example; prompt-independent.

    Per frame: ``score = head(e / ‖e‖)`` with ``e`` the ``openai/clip-vit-large-patch14`` image embedding and
    ``head`` an [`AestheticHead`] (weights ``aesthetic-model.pth`` of ``trl-lib/ddpo-aesthetic-predictor``). Scores
    are about 1-10 (higher = more aesthetic).
    """

    name = "aesthetic"
    default_model = "trl-lib/ddpo-aesthetic-predictor"
    default_clip_model = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        model: CLIPModel,
        image_processor: BaseImageProcessor,
        head: AestheticHead,
        *,
        frame_aggregation: FrameAggregation = "mean",
        num_frames: int | None = None,
    ):
        super().__init__(model, image_processor, frame_aggregation=frame_aggregation, num_frames=num_frames)
        self.head = head

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *,
        filename: str | None = None,
        clip_model_name_or_path: str | os.PathLike | None = None,
        clip_revision: str | None = None,
        frame_aggregation: FrameAggregation = "mean",
        num_frames: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        **model_kwargs: Any,
    ) -> AestheticReward:
        """Load the head (Hub id or local folder) and the CLIP model with its image processor.

        Args:
            pretrained_model_name_or_path: where the head's weights live; ``None`` for
                ``trl-lib/ddpo-aesthetic-predictor``.
            filename: the weights file; by default ``aesthetic-model.safetensors`` if present, else
                ``aesthetic-model.pth`` (read with ``torch.load(weights_only=True)``).
            clip_model_name_or_path, clip_revision: the CLIP model and image processor (default
                ``openai/clip-vit-large-patch14``).
            frame_aggregation, num_frames: see the module docstring.
            device, dtype: where and in which dtype to run the CLIP model and the head.
            revision: revision of the head's repo.
            cache_dir, token: passed to every Hub download.
            **model_kwargs: passed to ``CLIPModel.from_pretrained``.
        """
        head_path = pretrained_model_name_or_path or cls.default_model
        weights_file = _aesthetic_head_file(head_path, filename, revision=revision, cache_dir=cache_dir, token=token)
        if weights_file.endswith(".safetensors"):
            state_dict = load_file(weights_file)
        else:
            state_dict = torch.load(weights_file, map_location="cpu", weights_only=True)
        model, image_processor, _ = _load_clip(
            clip_model_name_or_path or cls.default_clip_model,
            None,
            with_tokenizer=False,
            revision=clip_revision,
            cache_dir=cache_dir,
            token=token,
            dtype=dtype,
            model_kwargs=model_kwargs,
        )
        head = AestheticHead(model.config.projection_dim)
        try:
            head.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(
                f"{weights_file} is not an aesthetic head for this CLIP model (projection_dim "
                f"{model.config.projection_dim}, layers {{0, 2, 4, 6, 7}}): {error}"
            ) from error
        head = head.to(dtype).requires_grad_(False)
        reward = cls(model, image_processor, head, frame_aggregation=frame_aggregation, num_frames=num_frames)
        return reward.eval().to(device) if device is not None else reward.eval()

    def frame_scores(self, prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_embeddings(videos))
