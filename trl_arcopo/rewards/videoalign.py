"""VideoAlign ("VideoReward", ``KwaiVGI/VideoReward``) as a native reward on current transformers.

VideoReward (arXiv 2501.13918) is Qwen2-VL-2B-Instruct with a LoRA-tuned decoder, a fully tuned vision tower, three
added reward tokens and a one-output linear head read at those tokens. It scores a (video, prompt) pair on visual
quality (VQ), motion quality (MQ) and text alignment (TA); ``Overall = VQ + MQ + TA``. Because the VQ and MQ tokens sit
before the prompt in the causal sequence, only TA depends on the prompt.

This port reads the released checkpoint (``model_config.json`` + ``checkpoint-*/model.pth``) with the base model's
config, tokenizer and image processor, merges the LoRA into the decoder and scores video tensors directly (no mp4
round trip). It reproduces the original code (transformers 4.45) to ~1e-6 in float32, including its plain sequential
rotary positions (the original never computes Qwen2-VL's 3D M-RoPE positions).

Example:
    ```python
    >>> reward = VideoAlignReward.from_pretrained("KwaiVGI/VideoReward", device="cuda")
    >>> reward(["a cat playing piano"], videos, fps=16)  # videos: [B, F, 3, H, W] in [0, 1]
    {'VQ': [...], 'MQ': [...], 'TA': [...], 'Overall': [...]}
    ```
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, Qwen2VLConfig, Qwen2VLModel
from transformers.initialization import no_init_weights

from .videoalign_processing import DIMENSIONS, REWARD_TOKENS, VideoAlignProcessor

__all__ = ["VideoAlignReward"]

_MODEL_CONFIG_NAME = "model_config.json"
_WEIGHTS_NAME = "model.pth"
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
_PEFT_PREFIX = "base_model.model."
_LORA_A_SUFFIX = ".lora_A.default.weight"
# Settings of the release this port implements; other values select code paths of the original it does not have.
_REQUIRED_SETTINGS = {
    "model_config": {"output_dim": 1, "use_special_tokens": True, "reward_token": "special"},
    "data_config": {"prompt_template_type": "detailed_special", "sample_type": "uniform", "num_frames": None},
    "peft_lora_config": {"lora_enable": True, "use_rslora": False, "vision_lora": False},
}


def _read_model_config(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    for section, settings in _REQUIRED_SETTINGS.items():
        for key, expected in settings.items():
            value = config.get(section, {}).get(key, ...)
            if value != expected:
                raise ValueError(
                    f"{path}: `{section}.{key}` must be {expected!r} (the released VideoReward setting this port "
                    f"implements), got {'nothing' if value is ... else repr(value)}."
                )
    missing = [
        f"{dim}_{stat}"
        for dim in DIMENSIONS
        for stat in ("mean", "std")
        if f"{dim}_{stat}" not in config.get("inference_config", {})
    ]
    if missing:
        raise ValueError(f"{path}: `inference_config` lacks the normalisation constants {missing}.")
    return config


def _checkpoint_dir(
    path_or_repo_id: str | os.PathLike,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
) -> Path:
    if os.path.isdir(path_or_repo_id):
        return Path(path_or_repo_id)
    return Path(
        snapshot_download(
            str(path_or_repo_id),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=[_MODEL_CONFIG_NAME, f"checkpoint-*/{_WEIGHTS_NAME}"],
        )
    )


def _latest_weights(checkpoint_dir: Path) -> Path:
    """``checkpoint-<highest step>/model.pth``, as the original picks the checkpoint to load."""
    steps = {
        int(match.group(1)): child
        for child in checkpoint_dir.iterdir()
        if child.is_dir() and (match := _CHECKPOINT_DIR.fullmatch(child.name))
    }
    if not steps:
        raise FileNotFoundError(f"{checkpoint_dir} has no `checkpoint-<step>` directory.")
    weights = steps[max(steps)] / _WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found: only the full-state-dict layout of the release (`checkpoint-<step>/model.pth`) is "
            "supported."
        )
    return weights


def _merged_model(
    config: Qwen2VLConfig, state_dict: Mapping[str, torch.Tensor], lora_settings: Mapping[str, Any]
) -> tuple[Qwen2VLModel, torch.Tensor]:
    """Rebuild the PEFT-wrapped model the checkpoint was saved from, load it strictly and merge the LoRA in float32.

    The release's keys follow the transformers-4.45 layout under PEFT's prefix (``base_model.model.visual.*``,
    ``base_model.model.model.*``); transformers 5 nests the decoder as ``language_model``. ``lm_head`` (tied to the
    embeddings, unused by the reward) is dropped; ``rm_head.weight`` ``[1, hidden]`` is returned separately.

    Returns:
        The float32 ``Qwen2VLModel`` with merged weights, and the reward head weight.
    """
    weights = {}
    for key, value in state_dict.items():
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"`{_WEIGHTS_NAME}` key {key!r} lacks the PEFT prefix {_PEFT_PREFIX!r} of the release.")
        name = key.removeprefix(_PEFT_PREFIX)
        weights[re.sub(r"^model\.", "language_model.", name)] = value
    rm_head = weights.pop("rm_head.weight", None)
    if rm_head is None:
        raise ValueError(f"`{_WEIGHTS_NAME}` has no `{_PEFT_PREFIX}rm_head.weight`.")
    weights.pop("lm_head.weight", None)

    lora_modules = sorted(name.removesuffix(_LORA_A_SUFFIX) for name in weights if name.endswith(_LORA_A_SUFFIX))
    rank, alpha = lora_settings["lora_r"], lora_settings["lora_alpha"]
    for module in lora_modules:
        if weights[module + _LORA_A_SUFFIX].shape[0] != rank:
            raise ValueError(
                f"`{_WEIGHTS_NAME}`: LoRA rank of {module} is {weights[module + _LORA_A_SUFFIX].shape[0]}, but "
                f"`peft_lora_config.lora_r` is {rank}."
            )
    config.text_config.vocab_size = weights["language_model.embed_tokens.weight"].shape[0]
    # Every parameter is overwritten by the strict load below.
    with no_init_weights():
        model = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if not isinstance(model, Qwen2VLModel):
        raise ValueError(f"The base model must be a Qwen2-VL model, got {type(model).__name__}.")
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_modules))
    peft_model.load_state_dict({_PEFT_PREFIX + name: value for name, value in weights.items()}, strict=True)
    # The merge happens in the dtype of the base weights: float32 here, cast afterwards by the caller.
    return peft_model.merge_and_unload(), rm_head


class VideoAlignReward(nn.Module):
    """The VideoAlign reward model: ``reward(prompts, videos, fps=None, use_norm=True)`` → VQ, MQ, TA, Overall.

    A reward for :func:`trl_arcopo.rewards.compute_rewards` (logged as ``videoalign:VQ``, ...). Build it with
    :meth:`from_pretrained`; move it with ``.to(device)``.

    Args:
        model: the Qwen2-VL model with merged weights (``embed_tokens`` holding the three reward tokens).
        rm_head: ``Linear(hidden, 1, bias=False)`` read at the reward tokens.
        processor: turns prompts and videos into model inputs.
        normalization: ``{dim: (mean, std)}`` for ``VQ``, ``MQ`` and ``TA`` (``inference_config`` of the checkpoint).
    """

    name = "videoalign"

    def __init__(
        self,
        model: Qwen2VLModel,
        rm_head: nn.Linear,
        processor: VideoAlignProcessor,
        normalization: Mapping[str, tuple[float, float]],
    ) -> None:
        super().__init__()
        self.model = model
        self.rm_head = rm_head
        self.processor = processor
        self.normalization = {dim: (float(mean), float(std)) for dim, (mean, std) in normalization.items()}
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = "KwaiVGI/VideoReward",
        *,
        base_model: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> VideoAlignReward:
        """Load a VideoAlign checkpoint in the released layout.

        Reads ``model_config.json`` and ``checkpoint-<highest step>/model.pth`` (with ``torch.load(weights_only=True)``;
        ``training_args.bin`` is never read) and the base model's config, tokenizer (plus the three reward tokens) and
        image processor; the base weights are not needed. The model is built in float32, the LoRA merged
        (``W + alpha / r * B @ A``), then cast to ``dtype``: loading the 2B release peaks at about 9 GB of CPU memory.

        Args:
            path_or_repo_id: a local checkpoint directory or a Hub repo id (downloaded with ``snapshot_download``,
                which honours ``HF_HUB_OFFLINE``).
            base_model: the Qwen2-VL base (local directory or Hub id). Defaults to the checkpoint's
                ``model_config.model_name_or_path`` (``Qwen/Qwen2-VL-2B-Instruct`` in the release, at its
                ``model_revision``); a relative path there is resolved against the checkpoint directory.
            dtype: weight dtype (the release runs in ``torch.bfloat16``; use ``torch.float32`` for exact parity).
            device: where to put the model; preprocessing runs on the device of the videos.
            revision: revision of ``path_or_repo_id`` on the Hub.
            cache_dir: Hub cache directory, used for the checkpoint and the base.
            token: Hub token, for both downloads.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}.")
        checkpoint_dir = _checkpoint_dir(path_or_repo_id, revision, cache_dir, token)
        model_config = _read_model_config(checkpoint_dir / _MODEL_CONFIG_NAME)
        weights_path = _latest_weights(checkpoint_dir)
        base_revision = None
        if base_model is None:
            base_model = model_config["model_config"]["model_name_or_path"]
            base_revision = model_config["model_config"].get("model_revision")
            if (checkpoint_dir / base_model).is_dir():
                base_model = checkpoint_dir / base_model
        hub_kwargs = {"revision": base_revision, "cache_dir": cache_dir, "token": token}
        config = AutoConfig.from_pretrained(base_model, **hub_kwargs)
        if not isinstance(config, Qwen2VLConfig):
            raise ValueError(
                f"`base_model` must be a Qwen2-VL model, got a {type(config).__name__} from {base_model}."
            )
        tokenizer = AutoTokenizer.from_pretrained(base_model, **hub_kwargs)
        tokenizer.add_tokens(list(REWARD_TOKENS), special_tokens=True)
        image_processor = AutoImageProcessor.from_pretrained(base_model, **hub_kwargs)
        data_config = model_config["data_config"]
        processor = VideoAlignProcessor(
            tokenizer,
            image_processor,
            target_fps=data_config["fps"],
            max_pixels=data_config["max_frame_pixels"],
            video_token=tokenizer.convert_ids_to_tokens(config.video_token_id),
        )

        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True, mmap=True)
        model, head_weight = _merged_model(config, state_dict, model_config["peft_lora_config"])
        if model.config.text_config.vocab_size != len(tokenizer):
            raise ValueError(
                f"{weights_path} has {model.config.text_config.vocab_size} embedding rows but the tokenizer of "
                f"{base_model} plus the reward tokens has {len(tokenizer)}: wrong `base_model`?"
            )
        rm_head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False, dtype=torch.float32)
        rm_head.weight.data.copy_(head_weight)
        inference_config = model_config["inference_config"]
        normalization = {dim: (inference_config[f"{dim}_mean"], inference_config[f"{dim}_std"]) for dim in DIMENSIONS}
        # Buffers too (the rotary frequencies), as in the original's bf16 run: keeping them in float32 moves the bf16
        # scores of the parity fixture away from the original's (max diff 0.094 instead of 0.053).
        reward = cls(model, rm_head, processor, normalization).to(dtype=dtype)
        return reward if device is None else reward.to(device)

    @property
    def device(self) -> torch.device:
        return self.rm_head.weight.device

    def reward_hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """Final (normed) decoder hidden states at the VQ, MQ and TA reward tokens.

        Args:
            input_ids, attention_mask: ``[B, L]``, right-padded, each row holding each reward token once.
            pixel_values_videos: ``[P, 1176]``, the patches of all videos in batch order.
            video_grid_thw: ``[B, 3]``.

        Returns:
            ``[B, 3, hidden]`` in the model dtype.
        """
        reward_ids = torch.tensor(self.processor.reward_token_ids, device=input_ids.device)
        is_reward_token = input_ids.unsqueeze(-1) == reward_ids  # [B, L, 3]
        if not bool((is_reward_token.sum(dim=1) == 1).all()):
            raise ValueError(f"Every row of `input_ids` must contain each of {list(REWARD_TOKENS)} exactly once.")
        batch_size, length = input_ids.shape
        # The original's forward never computed Qwen2-VL's 3D M-RoPE positions: plain 0..L-1 on all three axes.
        position_ids = torch.arange(length, device=input_ids.device).expand(3, batch_size, length)
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            use_cache=False,
        ).last_hidden_state
        positions = is_reward_token.int().argmax(dim=1)  # [B, 3]
        return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def logits(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Raw scores ``[B, 3]`` (VQ, MQ, TA) for the processor's ``inputs`` (see :meth:`reward_hidden_states`)."""
        return self.rm_head(self.reward_hidden_states(**inputs)).squeeze(-1)

    @torch.no_grad()
    def forward(
        self,
        prompts: Sequence[str],
        videos: torch.Tensor | Sequence[torch.Tensor],
        fps: float | Sequence[float] | None = None,
        use_norm: bool = True,
        **kwargs: Any,
    ) -> dict[str, list[float]]:
        """Score videos against their prompts.

        Args:
            prompts: ``B`` prompts.
            videos: float ``[B, F, 3, H, W]`` in ``[0, 1]``, or a list of ``B`` float ``[F_i, 3, H_i, W_i]`` tensors of
                any sizes. Frames are quantised to uint8 (the original scores decoded uint8 frames).
            fps: the frame rate the videos play at (what an mp4 of them would carry), one for all or one per video;
                it decides which frames are sampled (2 per second). ``None`` means 16, the rate of Wan2.1 /
                Self-Forcing videos.
            use_norm: standardise each dimension with the release's ``(score - mean) / std`` (the original's default).
            **kwargs: ignored (other dataset columns, trainer state).

        Returns:
            ``{"VQ", "MQ", "TA", "Overall"}``, ``B`` Python floats each; ``Overall = VQ + MQ + TA``. Higher is better.
        """
        inputs = self.processor(prompts, videos, fps=fps).to(self.device)
        scores = self.logits(**inputs).double().cpu()
        columns = {dim: scores[:, i] for i, dim in enumerate(DIMENSIONS)}
        if use_norm:
            columns = {
                dim: (values - self.normalization[dim][0]) / self.normalization[dim][1]
                for dim, values in columns.items()
            }
        columns["Overall"] = columns["VQ"] + columns["MQ"] + columns["TA"]
        return {dim: values.tolist() for dim, values in columns.items()}
