"""CLIP rewards (PickScore, CLIPScore, LAION aesthetic) on tiny random CLIPs loaded by repo id from a local Hub cache."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPModel

from trl_arcopo.rewards import (
    AestheticReward,
    CLIPScoreReward,
    PickScoreReward,
    compute_rewards,
    reward_name,
)
from trl_arcopo.rewards.clip import AestheticHead, _preprocess_frames
from trl_arcopo.testing import (
    cache_tiny_clip_rewards,
    populate_hub_cache,
    save_tiny_aesthetic_head,
    save_tiny_clip,
)

PROMPTS = ["a cat", "a red car", "a cat"]


@pytest.fixture(scope="module")
def clip_cache(hf_cache: Path) -> Path:
    cache_tiny_clip_rewards(hf_cache)
    return hf_cache


@pytest.fixture(scope="module")
def pickscore(clip_cache: Path) -> PickScoreReward:
    return PickScoreReward.from_pretrained(cache_dir=clip_cache)


@pytest.fixture(scope="module")
def clipscore(clip_cache: Path) -> CLIPScoreReward:
    return CLIPScoreReward.from_pretrained(cache_dir=clip_cache)


@pytest.fixture(scope="module")
def aesthetic(clip_cache: Path) -> AestheticReward:
    return AestheticReward.from_pretrained(cache_dir=clip_cache)


def uint8_videos(batch: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random ``[B, F, 3, H, W]`` videos with values ``k / 255`` (exactly representable as 8-bit frames)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, 3, height, width), generator=generator) / 255.0


def tiny_clip_model(tmp_path: Path, seed: int) -> CLIPModel:
    return CLIPModel.from_pretrained(save_tiny_clip(tmp_path / f"clip-{seed}", seed=seed))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    b_state = b.state_dict()
    return all(torch.equal(value, b_state[key]) for key, value in a.state_dict().items())


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def test_load_defaults_from_hub_cache(
    pickscore: PickScoreReward, clipscore: CLIPScoreReward, aesthetic: AestheticReward, tmp_path: Path
) -> None:
    # Each default repo id resolves to the tiny checkpoint installed under it (seeds of `cache_tiny_clip_rewards`).
    assert same_weights(pickscore.model, tiny_clip_model(tmp_path, seed=1))
    assert same_weights(clipscore.model, tiny_clip_model(tmp_path, seed=5))
    assert same_weights(aesthetic.model, clipscore.model)
    torch.manual_seed(0)
    assert same_weights(aesthetic.head, AestheticHead(16))
    # PickScore's repo has no processor: the tokenizer and image settings came from the LAION repo.
    assert pickscore.tokenizer.model_max_length == 77
    assert pickscore.image_processor.crop_size.height == 32
    for reward, name in ((pickscore, "pickscore"), (clipscore, "clipscore"), (aesthetic, "aesthetic")):
        assert reward_name(reward) == name
        assert not reward.training
        assert not any(p.requires_grad for p in reward.parameters())
        assert reward.frame_aggregation == "mean" and reward.num_frames is None


def test_revision_dtype_and_options(clip_cache: Path, tmp_path: Path) -> None:
    other = save_tiny_clip(tmp_path / "other", seed=7)
    populate_hub_cache("openai/clip-vit-large-patch14", other, cache_dir=clip_cache, revision="tiny-v2")
    reward = CLIPScoreReward.from_pretrained(revision="tiny-v2", cache_dir=clip_cache, device="cpu", num_frames=2)
    assert same_weights(reward.model, tiny_clip_model(tmp_path, seed=7))
    assert reward.num_frames == 2 and reward.weight == 2.5

    fp32 = CLIPScoreReward.from_pretrained(cache_dir=clip_cache)
    bf16 = CLIPScoreReward.from_pretrained(cache_dir=clip_cache, dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    videos = uint8_videos(3, 2, 32, 32)
    torch.testing.assert_close(
        torch.tensor(bf16(PROMPTS, videos)), torch.tensor(fp32(PROMPTS, videos)), atol=0.05, rtol=0.05
    )


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------------


def processor_pixels(processor: CLIPImageProcessorPil, frames: torch.Tensor) -> torch.Tensor:
    """The image processor's own output for 8-bit versions of ``frames`` ``[N, 3, H, W]``."""
    images = [np.ascontiguousarray(f.permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()) for f in frames]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def test_preprocessing_matches_the_image_processor(pickscore: PickScoreReward) -> None:
    processor = pickscore.image_processor
    # At the processor's size, resizing is the identity: the two paths agree to float precision.
    frames = uint8_videos(1, 4, 32, 32)[0]
    torch.testing.assert_close(_preprocess_frames(frames, processor), processor_pixels(processor, frames))
    # Downscaling (shortest edge 40 -> 32, then a 32x32 center crop of 32x38) and upscaling (16 -> 32) of smooth
    # frames: the PIL path rounds to 8 bits after each of its two resize passes, which costs up to about two 8-bit
    # levels, one level being 1 / (255 * std) ≈ 0.015 here.
    for height, width in ((40, 48), (16, 16)):
        coarse = torch.rand(4, 3, 5, 6, generator=torch.Generator().manual_seed(height))
        frames = (torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear") * 255).round() / 255
        ours = _preprocess_frames(frames, processor)
        assert ours.shape == (4, 3, 32, 32)
        difference = (ours - processor_pixels(processor, frames)).abs()
        assert difference.max() < 0.035 and difference.mean() < 0.006


# --------------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------------


def test_pickscore_equals_the_reference_formula(pickscore: PickScoreReward) -> None:
    """PickScore's reference code: processor on images, text padded to 77, ``logit_scale.exp() * text @ image.T``."""
    videos = uint8_videos(3, 2, 32, 32)
    model, tokenizer = pickscore.model, pickscore.tokenizer
    with torch.no_grad():
        pixels = processor_pixels(pickscore.image_processor, videos.flatten(0, 1))
        image = model.get_image_features(pixel_values=pixels).pooler_output
        image = (image / torch.norm(image, dim=-1, keepdim=True)).view(3, 2, -1)
        text_inputs = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        text = model.get_text_features(**text_inputs).pooler_output
        text = text / torch.norm(text, dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * torch.einsum("bfd,bd->bf", image, text)).mean(dim=1)
    scores = pickscore(PROMPTS, videos)
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    torch.testing.assert_close(torch.tensor(scores), expected)
    assert pickscore(PROMPTS, videos) == scores  # deterministic


def test_clipscore_is_weighted_clamped_cosine(clipscore: CLIPScoreReward) -> None:
    prompts = ["a cat", "a red car", "sunset over the sea", "A PANDA EATING"]
    videos = uint8_videos(1, 3, 40, 48).expand(len(prompts), -1, -1, -1, -1)
    with torch.no_grad():
        cosine = clipscore.cosine_similarities(prompts, videos)  # [B, F]
    # The tiny model gives a negative cosine for the last prompt and positive, different ones for the others.
    assert (cosine[:3] > 0).all() and (cosine[3] < 0).all()
    scores = torch.tensor(clipscore(prompts, videos))
    torch.testing.assert_close(scores, (2.5 * cosine.clamp(min=0)).mean(dim=1))
    assert scores[3] == 0 and len(set(scores[:3].tolist())) == 3  # text matters
    assert ((scores >= 0) & (scores <= 2.5)).all()


def test_aesthetic_is_prompt_independent_head_on_normalised_embeddings(aesthetic: AestheticReward) -> None:
    videos = uint8_videos(2, 3, 32, 32)
    with torch.no_grad():
        pixels = processor_pixels(aesthetic.image_processor, videos.flatten(0, 1))
        embeddings = aesthetic.model.get_image_features(pixel_values=pixels).pooler_output
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        expected = aesthetic.head.layers(embeddings).view(2, 3).mean(dim=1)
    scores = aesthetic(["a cat", "a dog"], videos)
    torch.testing.assert_close(torch.tensor(scores), expected)
    assert aesthetic(["something else entirely", ""], videos) == scores
    assert scores[0] != scores[1]


def test_text_matters_for_pickscore(pickscore: PickScoreReward) -> None:
    videos = uint8_videos(1, 2, 32, 32).expand(2, -1, -1, -1, -1)
    cat, car = pickscore(["a cat", "a red car"], videos)
    assert cat != car


def test_frame_aggregation_and_sampling(pickscore: PickScoreReward) -> None:
    videos = uint8_videos(2, 5, 36, 36, seed=3)
    prompts = ["a cat", "a red car"]
    # Each frame scored alone, as a one-frame video.
    per_frame = torch.tensor([pickscore(prompts, videos[:, t : t + 1]) for t in range(5)]).T  # [B, F]

    def variant(**kwargs) -> PickScoreReward:
        return PickScoreReward(pickscore.model, pickscore.image_processor, pickscore.tokenizer, **kwargs)

    mean, first, low = (torch.tensor(variant(frame_aggregation=a)(prompts, videos)) for a in ("mean", "first", "min"))
    torch.testing.assert_close(mean, per_frame.mean(dim=1))
    torch.testing.assert_close(first, per_frame[:, 0])
    torch.testing.assert_close(low, per_frame.min(dim=1).values)
    assert (low < mean).all() and (first != mean).all()

    torch.testing.assert_close(torch.tensor(variant(num_frames=2)(prompts, videos)), per_frame[:, [0, 4]].mean(1))
    torch.testing.assert_close(torch.tensor(variant(num_frames=3)(prompts, videos)), per_frame[:, [0, 2, 4]].mean(1))
    torch.testing.assert_close(torch.tensor(variant(num_frames=9)(prompts, videos)), mean)
    assert variant(num_frames=1).frame_indices(81).tolist() == [0]
    assert variant(num_frames=5).frame_indices(81).tolist() == [0, 20, 40, 60, 80]
    assert variant(num_frames=4).frame_indices(10).tolist() == [0, 3, 6, 9]
    assert variant(num_frames=4).frame_indices(21).tolist() == [0, 7, 13, 20]  # nearest to 0, 6.67, 13.33, 20


def test_collected_by_compute_rewards(
    pickscore: PickScoreReward, clipscore: CLIPScoreReward, aesthetic: AestheticReward
) -> None:
    videos = uint8_videos(3, 2, 32, 32)
    columns = compute_rewards([pickscore, clipscore, aesthetic], PROMPTS, videos, reward_kwargs={"trainer_state": 1})
    assert list(columns) == ["pickscore", "clipscore", "aesthetic"]
    torch.testing.assert_close(columns["pickscore"], torch.tensor(pickscore(PROMPTS, videos), dtype=torch.float64))
    torch.testing.assert_close(columns["aesthetic"], torch.tensor(aesthetic(PROMPTS, videos), dtype=torch.float64))


def test_frame_scores_are_differentiable(aesthetic: AestheticReward) -> None:
    videos = uint8_videos(1, 2, 32, 32).requires_grad_(True)
    aesthetic.frame_scores(["a cat"], videos).sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "videos", "match"),
    [
        (["a"], torch.rand(1, 3, 32, 32), "rank 4"),
        (["a"], torch.rand(1, 2, 3, 32, 32) * 2, r"values in \[0, 1\]"),
        (["a"], torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8), "dtype torch.uint8"),
        ([], torch.rand(0, 2, 3, 32, 32), "empty batch"),
        (["a", "b"], torch.rand(1, 2, 3, 32, 32), "same batch size"),
        ("a", torch.rand(1, 2, 3, 32, 32), "list of 1 strings"),
    ],
)
def test_bad_videos_and_prompts_raise(pickscore: PickScoreReward, prompts, videos, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pickscore(prompts, videos)


def test_bad_options_raise(pickscore: PickScoreReward) -> None:
    parts = (pickscore.model, pickscore.image_processor, pickscore.tokenizer)
    with pytest.raises(ValueError, match="`frame_aggregation` must be one of"):
        PickScoreReward(*parts, frame_aggregation="max")
    for num_frames in (0, 1.5, True):
        with pytest.raises(ValueError, match="`num_frames` must be a positive int"):
            PickScoreReward(*parts, num_frames=num_frames)


def test_frames_smaller_than_the_crop_raise(pickscore: PickScoreReward) -> None:
    processor = CLIPImageProcessorPil(do_resize=False, crop_size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match="smaller than the image processor's `crop_size`"):
        _preprocess_frames(torch.rand(1, 3, 16, 16), processor)


# --------------------------------------------------------------------------------------------------------------------
# Aesthetic head files
# --------------------------------------------------------------------------------------------------------------------


def test_aesthetic_head_has_the_laion_layout() -> None:
    """The LAION / TRL DDPO head (Linear-Dropout-Linear-Dropout-Linear-Dropout-Linear-Linear) loads unchanged."""
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Linear(768, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    ).eval()
    head = AestheticHead()
    head.layers.load_state_dict(reference.state_dict())
    embeddings = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    torch.testing.assert_close(head(embeddings), reference(embeddings).squeeze(-1))


def test_aesthetic_head_files(clip_cache: Path, tmp_path: Path) -> None:
    clip = tmp_path / "clip"
    save_tiny_clip(clip, seed=5)
    folder = tmp_path / "head"
    save_tiny_aesthetic_head(folder, seed=1)
    save_tiny_aesthetic_head(folder, seed=2, safe_serialization=True)
    torch.manual_seed(2)
    from_safetensors = AestheticHead(16)
    torch.manual_seed(1)
    from_pth = AestheticHead(16)

    # A local folder; safetensors is preferred when both files exist.
    reward = AestheticReward.from_pretrained(folder, clip_model_name_or_path=clip)
    assert same_weights(reward.head, from_safetensors)
    reward = AestheticReward.from_pretrained(folder, filename="aesthetic-model.pth", clip_model_name_or_path=clip)
    assert same_weights(reward.head, from_pth)
    # The same through the Hub cache.
    populate_hub_cache("org/aesthetic-both", folder, cache_dir=clip_cache)
    reward = AestheticReward.from_pretrained("org/aesthetic-both", cache_dir=clip_cache)
    assert same_weights(reward.head, from_safetensors)

    with pytest.raises(FileNotFoundError, match=r"aesthetic-model.safetensors.*pass `filename=`"):
        AestheticReward.from_pretrained(tmp_path / "clip", clip_model_name_or_path=clip)
    wide = save_tiny_aesthetic_head(tmp_path / "wide", in_features=24).parent
    with pytest.raises(ValueError, match="not an aesthetic head for this CLIP model"):
        AestheticReward.from_pretrained(wide, clip_model_name_or_path=clip)
    # Only tensors are read from `.pth` files.
    (tmp_path / "pickled").mkdir()
    torch.save({"layers.0.weight": torch.zeros(1), "extra": object()}, tmp_path / "pickled" / "aesthetic-model.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        AestheticReward.from_pretrained(tmp_path / "pickled", clip_model_name_or_path=clip)
