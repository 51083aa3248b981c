"""Preprocessing of VideoAlign (VideoReward): frame sampling, resizing, patchifying and the scoring prompt.

Reproduces, on in-memory video tensors, what the original ``KwaiVGI/VideoAlign`` inference code does to an mp4 file
(its modified ``qwen_vl_utils`` plus the Qwen2-VL processor of transformers 4.45), bit for bit on CPU:

0. quantise the float video ``[F, 3, H, W]`` in ``[0, 1]`` to uint8 (the original only ever sees decoded uint8 frames);
1. pick an even number of frames uniformly at ``target_fps`` (2 in the release) from the source ``fps``;
2. resize to sides that are multiples of 28 with a pixel count in ``[100352, max_pixels]`` (bicubic, antialiased,
   rounded back to uint8; small videos are *up*-sampled);
3. rescale to ``[0, 1]`` and normalise with the CLIP mean/std of the Qwen2-VL image processor;
4. cut into ``temporal_patch_size x patch_size x patch_size`` patches in the order the vision tower expects.

The text is the release's ``detailed_special`` template, which places the three reward tokens, wrapped in the
Qwen2-VL chat template with one video. Torchvision is not needed (transformers' own video processor requires it and
has other defaults).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import BatchFeature, PreTrainedTokenizerBase

from .protocol import _check_prompts, _validate_video_batch

__all__ = [
    "DEFAULT_FPS",
    "DIMENSIONS",
    "REWARD_TOKENS",
    "VideoAlignProcessor",
    "build_user_text",
    "resize_frames",
    "sample_frame_indices",
    "smart_resize",
]

DIMENSIONS = ("VQ", "MQ", "TA")
# Added to the tokenizer in this order by VideoAlign; the template places them once each, in this order.
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
# Source frame rate assumed when none is given: Wan2.1 / Self-Forcing videos play at 16 fps.
DEFAULT_FPS = 16.0

# Frame-count rule of `qwen_vl_utils.smart_nframes` as vendored by VideoAlign.
_FPS_MIN_FRAMES = 4
_FPS_MAX_FRAMES = 768
_FRAME_FACTOR = 2
# `VIDEO_MIN_PIXELS` of VideoAlign's `vision_process.py` (not overridden by the release config).
_VIDEO_MIN_PIXELS = 128 * 28 * 28

# `DETAILED_PROMPT_WITH_SPECIAL_TOKEN` of VideoAlign's `prompt_template.py` (one `{text_prompt}` placeholder).
_PROMPT_TEMPLATE = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
)

# The template carries trailing spaces on five lines; editors and linters strip them, which changes the scores.
_PROMPT_TEMPLATE_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
if hashlib.sha256(_PROMPT_TEMPLATE.encode()).hexdigest() != _PROMPT_TEMPLATE_SHA256:
    raise RuntimeError(
        "The VideoAlign prompt template of trl_arcopo.rewards.videoalign_processing was altered (trailing spaces "
        "stripped?); restore it from the package sources."
    )


def build_user_text(prompt: str) -> str:
    """The user turn VideoAlign scores: the ``detailed_special`` template with ``prompt`` inserted verbatim.

    Raises:
        ValueError: if ``prompt`` is not a string or contains a reward token (the pooling reads the head at the one
            occurrence of each reward token).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"Each prompt must be a string, got {type(prompt).__name__}: {prompt!r}.")
    found = [token for token in REWARD_TOKENS if token in prompt]
    if found:
        raise ValueError(f"Prompts must not contain the VideoAlign reward tokens {found}, got {prompt!r}.")
    return _PROMPT_TEMPLATE.format(text_prompt=prompt)


def sample_frame_indices(num_frames: int, fps: float, target_fps: float = 2.0) -> torch.Tensor:
    """Indices of the frames VideoAlign looks at: an even count, uniformly spread, about ``target_fps`` per second.

    ``n = F / fps * target_fps`` clamped to ``[4, min(768, F)]`` (both rounded to even) and rounded half to even to
    an even number; then ``linspace(0, F - 1, n)`` rounded half to even. E.g. 81 frames at 16 fps give
    ``[0, 9, 18, 27, 36, 44, 53, 62, 71, 80]``.

    Args:
        num_frames: ``F``, the number of frames of the video.
        fps: the frame rate the video plays at.
        target_fps: frames per second to sample (``data_config.fps`` of the checkpoint).

    Returns:
        Long tensor ``[n]``.

    Raises:
        ValueError: when fewer than 2 frames can be sampled (``F < 2``).
    """
    min_frames = math.ceil(_FPS_MIN_FRAMES / _FRAME_FACTOR) * _FRAME_FACTOR
    max_frames = math.floor(min(_FPS_MAX_FRAMES, num_frames) / _FRAME_FACTOR) * _FRAME_FACTOR
    n = num_frames / fps * target_fps
    n = round(min(max(n, min_frames), max_frames) / _FRAME_FACTOR) * _FRAME_FACTOR
    if not _FRAME_FACTOR <= n <= num_frames:
        raise ValueError(f"VideoAlign needs videos of at least {_FRAME_FACTOR} frames, got {num_frames}.")
    return torch.linspace(0, num_frames - 1, n, dtype=torch.float32).round().long()


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target frame size of VideoAlign's ``vision_process.smart_resize`` (the Qwen2-VL rule).

    Sides are multiples of ``factor`` and the pixel count lies in ``[min_pixels, max_pixels]``, with the aspect ratio
    kept as closely as possible: 480x832 → 336x588, 96x128 → 280x392 (small videos are up-sampled).

    Raises:
        ValueError: for an aspect ratio above 200.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"VideoAlign needs frames with an aspect ratio of at most 200, got {height}x{width}.")
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = math.floor(height / beta / factor) * factor
        new_width = math.floor(width / beta / factor) * factor
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


def resize_frames(
    frames: torch.Tensor, *, max_pixels: int, min_pixels: int = _VIDEO_MIN_PIXELS, factor: int = 28
) -> torch.Tensor:
    """Resize uint8 frames ``[n, 3, H, W]`` as VideoAlign does (torchvision bicubic + antialias on uint8).

    The target size is :func:`smart_resize`; frames already at that size are returned as is. The resize runs in
    float32, then is clamped and rounded (half to even) back to uint8.

    Returns:
        uint8 tensor ``[n, 3, H', W']``.
    """
    height, width = frames.shape[-2:]
    size = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if size == (height, width):
        return frames
    resized = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(0, 255).round().to(torch.uint8)


def _per_video_fps(fps: float | Sequence[float] | torch.Tensor | None, batch_size: int) -> list[float]:
    def check(value: object, where: str) -> float:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
            raise ValueError(f"`{where}` must be a positive finite frame rate, got {value!r}.")
        return float(value)

    if fps is None:
        return [DEFAULT_FPS] * batch_size
    if (isinstance(fps, torch.Tensor) and fps.ndim == 1) or (isinstance(fps, Sequence) and not isinstance(fps, str)):
        if len(fps) != batch_size:
            raise ValueError(f"`fps` must be one frame rate or one per video ({batch_size}), got {len(fps)} values.")
        return [check(value, f"fps[{i}]") for i, value in enumerate(fps)]
    return [check(fps, "fps")] * batch_size


class VideoAlignProcessor:
    """Turns prompts and float videos into the inputs of the VideoAlign model (see the module docstring).

    Args:
        tokenizer: the Qwen2-VL tokenizer with the three :data:`REWARD_TOKENS` added, and its chat template.
        image_processor: the base model's Qwen2-VL image processor; only its constants are used (``image_mean``,
            ``image_std``, ``rescale_factor``, ``patch_size``, ``temporal_patch_size``, ``merge_size``).
        target_fps: frames per second sampled from each video (``data_config.fps``).
        max_pixels: upper bound on the pixels of a resized frame (``data_config.max_frame_pixels``).
        video_token: the placeholder the vision features replace.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: object,
        *,
        target_fps: float = 2.0,
        max_pixels: int = 448 * 448,
        video_token: str = "<|video_pad|>",
    ) -> None:
        self.tokenizer = tokenizer
        self.target_fps = target_fps
        self.max_pixels = max_pixels
        self.patch_size = image_processor.patch_size
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.merge_size = image_processor.merge_size
        self.image_mean = tuple(image_processor.image_mean)
        self.image_std = tuple(image_processor.image_std)
        self.rescale_factor = image_processor.rescale_factor
        self.video_token = video_token
        ids = tokenizer.convert_tokens_to_ids([video_token, *REWARD_TOKENS])
        if tokenizer.unk_token_id in ids or None in ids:
            raise ValueError(
                f"The tokenizer must contain {video_token!r} and the reward tokens {list(REWARD_TOKENS)} "
                "(add them with `tokenizer.add_tokens(list(REWARD_TOKENS), special_tokens=True)`)."
            )
        self.video_token_id = ids[0]
        self.reward_token_ids = tuple(ids[1:])

    def prepare_frames(self, video: torch.Tensor, fps: float) -> torch.Tensor:
        """Steps 0-2: sample frames from ``video`` (float ``[F, 3, H, W]`` in ``[0, 1]``), quantise, resize.

        Returns:
            uint8 tensor ``[n, 3, H', W']`` (``n`` even, ``H'`` and ``W'`` multiples of 28).
        """
        frames = video.detach()[sample_frame_indices(video.shape[0], fps, self.target_fps).to(video.device)]
        frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
        return resize_frames(frames, max_pixels=self.max_pixels, factor=self.patch_size * self.merge_size)

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Steps 3-4: normalise uint8 frames ``[n, 3, H, W]`` and flatten them into vision-tower patches.

        Returns:
            ``pixel_values`` float32 ``[t * h * w, 3 * temporal_patch_size * patch_size**2]`` and the grid
            ``[t, h, w]`` (``t = n / temporal_patch_size``, ``h = H / patch_size``, ``w = W / patch_size``).
        """
        n, channels, height, width = frames.shape
        mean = torch.tensor(self.image_mean, device=frames.device).view(-1, 1, 1)
        std = torch.tensor(self.image_std, device=frames.device).view(-1, 1, 1)
        # As the (numpy) Qwen2-VL processor of the original: rescale in float64, normalise in float32.
        pixels = ((frames.double() * self.rescale_factor).float() - mean) / std
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        t, h, w = n // tp, height // p, width // p
        pixels = pixels.reshape(t, tp, channels, h // m, m, p, w // m, m, p)
        pixels = pixels.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, channels * tp * p * p)
        return pixels, [t, h, w]

    def chat_text(self, prompt: str) -> str:
        """The text of one sample: the chat template around one video placeholder and :func:`build_user_text`."""
        user_text = build_user_text(prompt)
        if self.video_token in prompt:
            raise ValueError(f"Prompts must not contain the video placeholder {self.video_token!r}, got {prompt!r}.")
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": user_text}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(self.video_token) != 1:
            raise ValueError(
                f"The tokenizer's chat template must render one {self.video_token!r} per video, got "
                f"{text.count(self.video_token)}."
            )
        return text

    def __call__(
        self,
        prompts: Sequence[str],
        videos: torch.Tensor | Sequence[torch.Tensor],
        fps: float | Sequence[float] | None = None,
    ) -> BatchFeature:
        """Build a right-padded batch.

        Args:
            prompts: ``B`` text prompts.
            videos: float ``[B, F, 3, H, W]`` in ``[0, 1]``, or a list of ``B`` float ``[F_i, 3, H_i, W_i]``.
            fps: the frame rate the videos play at, one for all or one per video; ``None`` means
                :data:`DEFAULT_FPS` (16, the rate of Wan2.1 / Self-Forcing videos).

        Returns:
            ``BatchFeature`` with ``input_ids`` and ``attention_mask`` ``[B, L]``, ``pixel_values_videos``
            ``[sum_i t_i * h_i * w_i, 1176]`` (videos concatenated in batch order) and ``video_grid_thw`` ``[B, 3]``,
            on the device of the videos.
        """
        _check_prompts(prompts, _validate_video_batch(videos))
        video_list = list(videos)  # [F, 3, H, W] tensors
        rates = _per_video_fps(fps, len(video_list))
        texts = [self.chat_text(prompt) for prompt in prompts]
        pixel_values, grids = [], []
        for i, (video, rate) in enumerate(zip(video_list, rates, strict=True)):
            pixels, grid = self.patchify(self.prepare_frames(video, rate))
            pixel_values.append(pixels)
            grids.append(grid)
            # The processor of the original repeats the placeholder once per merged vision token.
            texts[i] = texts[i].replace(self.video_token, self.video_token * (math.prod(grid) // self.merge_size**2))
        text_inputs = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        device = pixel_values[0].device
        return BatchFeature(
            {
                "input_ids": text_inputs["input_ids"].to(device),
                "attention_mask": text_inputs["attention_mask"].to(device),
                "pixel_values_videos": torch.cat(pixel_values),
                "video_grid_thw": torch.tensor(grids, device=device),
            }
        )
