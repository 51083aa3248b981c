"""VideoAlign port against the parity fixture produced by the original code (tests/fixtures/videoalign_tiny)."""

import hashlib
import json
import math
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from trl_arcopo.rewards import compute_rewards, reward_name
from trl_arcopo.rewards.videoalign import VideoAlignReward
from trl_arcopo.rewards.videoalign_processing import build_user_text, sample_frame_indices, smart_resize
from trl_arcopo.testing import populate_hub_cache

# Release constants of `inference_config` (mean, std), as published.
NORMALIZATION = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
ATOL = 1e-4  # binding fp32 tolerance of the fixture README


@pytest.fixture(scope="module")
def root(fixture_dir):
    return fixture_dir / "videoalign_tiny"


@pytest.fixture(scope="module")
def case(root):
    return load_file(root / "case1.safetensors")


@pytest.fixture(scope="module")
def case_json(root):
    return json.loads((root / "case1.json").read_text())


@pytest.fixture(scope="module")
def video(case):
    """The decoded fixture video as the port receives it: float [16, 3, 96, 128] in [0, 1], 8 fps."""
    return case["video_uint8"].float() / 255


@pytest.fixture(scope="module")
def prompts(case_json):
    return case_json["batch"]["prompts"]


@pytest.fixture(scope="module")
def reward(root):
    return VideoAlignReward.from_pretrained(root / "checkpoint", dtype=torch.float32)


@pytest.fixture(scope="module")
def batch_inputs(reward, video, prompts):
    return reward.processor(prompts, torch.stack([video, video]), fps=8.0)


@pytest.fixture(scope="module")
def batch_scores(reward, video, prompts):
    """Normalised scores of the fixture batch (same video, prompts A and B)."""
    return reward(prompts, torch.stack([video, video]), fps=8.0)


# --------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    ("num_frames", "fps", "expected"),
    [
        (16, 8.0, [0, 5, 10, 15]),
        (81, 16.0, [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]),
        (20, 8.0, [0, 6, 13, 19]),  # round(2.5) == 2: half to even
        (21, 7.0, [0, 4, 8, 12, 16, 20]),
        (3, 16.0, [0, 2]),
    ],
)
def test_sample_frame_indices(num_frames, fps, expected):
    assert sample_frame_indices(num_frames, fps).tolist() == expected


def test_sample_frame_indices_fixture_and_limits(case):
    assert torch.equal(sample_frame_indices(16, float(case["source_fps"])), case["sampled_indices"])
    assert len(sample_frame_indices(121, 24.0)) == 10
    assert len(sample_frame_indices(2000, 1.0)) == 768
    with pytest.raises(ValueError, match="at least 2 frames"):
        sample_frame_indices(1, 16.0)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 832), (336, 588)),
        ((720, 1280), (336, 588)),
        ((480, 640), (364, 504)),
        ((448, 448), (448, 448)),
        ((256, 256), (336, 336)),
        ((96, 128), (280, 392)),
        ((80, 144), (252, 448)),
    ],
)
def test_smart_resize(size, expected):
    assert smart_resize(*size, factor=28, min_pixels=128 * 28 * 28, max_pixels=448 * 448) == expected


def test_resized_frames_are_bit_exact(reward, video, case):
    frames = reward.processor.prepare_frames(video, 8.0)
    assert frames.dtype == torch.uint8
    assert torch.equal(frames, case["resized_frames_uint8"])


def test_pixel_values_and_grid(reward, video, case, prompts):
    inputs = reward.processor(prompts[:1], video[None], fps=8.0)
    assert torch.equal(inputs["video_grid_thw"], case["video_grid_thw"])
    pixels = inputs["pixel_values_videos"]
    assert pixels.shape == (1120, 1176) and pixels.dtype == torch.float32
    torch.testing.assert_close(
        pixels[case["pixel_values_videos_rows"]], case["pixel_values_videos_sample"], atol=1e-6, rtol=0
    )
    assert abs(pixels.double().sum().item() - case["pixel_values_videos_sum"].item()) < 1e-3
    assert abs(pixels.double().abs().sum().item() - case["pixel_values_videos_abs_sum"].item()) < 1e-3


def test_input_ids_single_and_batch(reward, video, case, prompts, batch_inputs):
    single = reward.processor(prompts[:1], video[None], fps=8.0)
    assert torch.equal(single["input_ids"], case["input_ids"])
    assert torch.equal(single["attention_mask"], case["attention_mask"])
    assert torch.equal(batch_inputs["input_ids"], case["input_ids_batch"])
    assert torch.equal(batch_inputs["attention_mask"], case["attention_mask_batch"])
    assert torch.equal(batch_inputs["video_grid_thw"], case["video_grid_thw_batch"])
    positions = torch.stack([(single["input_ids"][0] == i).nonzero()[0, 0] for i in (714, 715, 716)])
    assert torch.equal(positions, case["special_positions"][0])


def test_prompt_template():
    # Inserting the placeholder itself gives back the template, whose hash the spec records.
    template = build_user_text("{text_prompt}")
    assert hashlib.sha256(template.encode()).hexdigest() == (
        "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
    )
    assert len(template) == 3997 and "**Visual Quality:**  \n" in template
    text = build_user_text("a {cat} }{")
    assert "Textual prompt - a {cat} }{\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n" in text


# --------------------------------------------------------------------------------------------- model, fp32


def test_video_embeds(reward, case, batch_inputs):
    first = batch_inputs["pixel_values_videos"][:1120]
    with torch.no_grad():
        embeds = reward.model.get_video_features(first, case["video_grid_thw"]).pooler_output
    torch.testing.assert_close(torch.cat(embeds), case["video_embeds"], atol=ATOL, rtol=0)


def test_special_hidden_and_logits_fp32(reward, video, case, prompts, batch_inputs):
    single = reward.processor(prompts[:1], video[None], fps=8.0)
    with torch.no_grad():
        hidden = reward.reward_hidden_states(**single)
        logits = reward.logits(**single)
        batch_logits = reward.logits(**batch_inputs)
    torch.testing.assert_close(hidden, case["special_hidden"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, case["logits_fp32"], atol=ATOL, rtol=0)
    torch.testing.assert_close(batch_logits, case["logits_fp32_batch"], atol=ATOL, rtol=0)


def test_fixture_rejects_3d_mrope_and_pixel_changes(reward, video, case, prompts):
    """The tolerance discriminates: Qwen2-VL's 3D M-RoPE positions or one uint8 step per pixel both miss it."""
    inputs = reward.processor(prompts[:1], video[None], fps=8.0)
    ids = inputs["input_ids"]
    video_mask = (ids == reward.model.config.video_token_id).int() * 2
    positions, _ = reward.model.get_rope_index(
        ids,
        mm_token_type_ids=video_mask,
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    with torch.no_grad():
        hidden = reward.model(**inputs, position_ids=positions).last_hidden_state
        mrope = reward.rm_head(hidden[0, case["special_positions"][0]]).squeeze(-1)
        shifted = reward.logits(**reward.processor(prompts[:1], (video + 1 / 255).clamp(0, 1)[None], fps=8.0))
    assert (mrope - case["logits_fp32"][0]).abs().max() > 0.1
    assert (shifted - case["logits_fp32"]).abs().max() > ATOL


def test_scores_and_normalisation(reward, video, case_json, prompts, batch_scores):
    raw = reward(prompts, torch.stack([video, video]), fps=8.0, use_norm=False)
    normalized = batch_scores
    assert list(normalized) == ["VQ", "MQ", "TA", "Overall"]
    for i, expected in enumerate(case_json["batch"]["expected_fp32"]):
        for dim, (mean, std) in NORMALIZATION.items():
            assert raw[dim][i] == pytest.approx(expected["raw"][dim], abs=ATOL)
            assert normalized[dim][i] == pytest.approx((raw[dim][i] - mean) / std, rel=1e-6)
        assert raw["Overall"][i] == pytest.approx(raw["VQ"][i] + raw["MQ"][i] + raw["TA"][i], rel=1e-12)
        assert normalized["Overall"][i] == pytest.approx(sum(normalized[d][i] for d in NORMALIZATION), rel=1e-12)
        assert normalized["Overall"][i] == pytest.approx(expected["normalized"]["Overall"], abs=ATOL)
    # VQ and MQ sit before the prompt in the causal sequence: only TA depends on it.
    assert raw["VQ"][0] == pytest.approx(raw["VQ"][1], abs=1e-6)
    assert raw["MQ"][0] == pytest.approx(raw["MQ"][1], abs=1e-6)
    assert abs(raw["TA"][0] - raw["TA"][1]) > 0.1


def test_bf16_is_close_to_the_stock_precision(root, video, case, batch_inputs):
    reward = VideoAlignReward.from_pretrained(root / "checkpoint")  # default dtype: bfloat16, as the release
    assert {p.dtype for p in reward.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = reward.logits(**batch_inputs).float()
    # Informative only: observed 0.053 (bf16 rounding differs from the original's unmerged bf16 LoRA).
    assert (logits - case["logits_bf16_batch"]).abs().max() < 0.1


# --------------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def hub_cache(root, hf_cache, tmp_path_factory):
    """`KwaiVGI/VideoReward` (fixture checkpoint, base named by Hub id, plus a `training_args.bin` that must never
    be unpickled) and `Qwen/Qwen2-VL-2B-Instruct` (the fixture's tiny base) in a local Hub cache."""
    repo = tmp_path_factory.mktemp("videoreward") / "repo"
    shutil.copytree(root / "checkpoint", repo)
    config = json.loads((repo / "model_config.json").read_text())
    config["model_config"]["model_name_or_path"] = "Qwen/Qwen2-VL-2B-Instruct"
    (repo / "model_config.json").write_text(json.dumps(config, indent=4))
    (repo / "checkpoint-11352" / "training_args.bin").write_bytes(b"not a pickle")
    populate_hub_cache("KwaiVGI/VideoReward", repo, cache_dir=hf_cache)
    populate_hub_cache("Qwen/Qwen2-VL-2B-Instruct", root / "base", cache_dir=hf_cache)
    return hf_cache


@pytest.mark.parametrize("base_model", [None, "Qwen/Qwen2-VL-2B-Instruct"])
def test_from_pretrained_through_the_hub_cache(hub_cache, base_model, reward, batch_inputs, case):
    loaded = VideoAlignReward.from_pretrained(
        "KwaiVGI/VideoReward", base_model=base_model, dtype=torch.float32, cache_dir=hub_cache, revision="main"
    )
    assert reward_name(loaded) == "videoalign"
    with torch.no_grad():
        logits = loaded.logits(**batch_inputs)
        torch.testing.assert_close(logits, reward.logits(**batch_inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, case["logits_fp32_batch"], atol=ATOL, rtol=0)


def test_from_pretrained_picks_the_latest_checkpoint(root, tmp_path, reward, batch_inputs):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(root / "checkpoint", checkpoint)
    config = json.loads((checkpoint / "model_config.json").read_text())
    config["model_config"]["model_name_or_path"] = str(root / "base")
    (checkpoint / "model_config.json").write_text(json.dumps(config))
    older = checkpoint / "checkpoint-9000"
    older.mkdir()
    torch.save({"not": torch.zeros(1)}, older / "model.pth")  # would fail the strict load if picked
    loaded = VideoAlignReward.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(**batch_inputs), reward.logits(**batch_inputs), atol=1e-6, rtol=0)


class _Payload:
    pass


def test_from_pretrained_errors(root, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(root / "checkpoint", checkpoint)
    base = root / "base"
    config_path = checkpoint / "model_config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "model_config": {**config["model_config"], "reward_token": "last"}}))
    with pytest.raises(ValueError, match="model_config.reward_token"):
        VideoAlignReward.from_pretrained(checkpoint, base_model=base)
    config_path.write_text(json.dumps(config))

    with pytest.raises(ValueError, match="dtype"):
        VideoAlignReward.from_pretrained(checkpoint, base_model=base, dtype="bfloat16")

    # weights_only: a pickled object other than tensors is refused.
    weights = checkpoint / "checkpoint-11352" / "model.pth"
    torch.save({"x": _Payload()}, weights)
    with pytest.raises(pickle.UnpicklingError):
        VideoAlignReward.from_pretrained(checkpoint, base_model=base)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.pth"):
        VideoAlignReward.from_pretrained(checkpoint, base_model=base)


# --------------------------------------------------------------------------------------------- call convention


def test_list_of_videos_with_per_video_fps(reward, video, prompts):
    other = video.flip(-1)[:12, :, :, :64]  # 12 frames of 96x64
    batch = reward(prompts, [video, other], fps=[8.0, 4.0])
    first = reward(prompts[:1], [video], fps=8.0)
    second = reward(prompts[1:], other[None], fps=4.0)
    for dim in batch:
        assert batch[dim] == pytest.approx(first[dim] + second[dim], abs=1e-5)
    inputs = reward.processor(prompts, [video, other], fps=[8.0, 4.0])
    assert inputs["video_grid_thw"].tolist() == [[2, 20, 28], [3, 28, 20]]  # 96x64 → 392x280, 6 frames


def test_fps_default_and_effect(reward, video, prompts):
    default = reward.processor(prompts[:1], video[None])
    at_16 = reward.processor(prompts[:1], video[None], fps=16.0)
    at_4 = reward.processor(prompts[:1], video[None], fps=torch.tensor([4.0]))
    assert all(torch.equal(default[key], at_16[key]) for key in default)
    assert default["video_grid_thw"].tolist() == [[2, 20, 28]] and at_4["video_grid_thw"].tolist() == [[4, 20, 28]]


def test_deterministic_and_reward_protocol(reward, video, prompts, batch_scores):
    videos = torch.stack([video, video])
    columns = compute_rewards([reward], prompts, videos, reward_kwargs={"fps": [8.0, 8.0], "extra": ["a", "b"]})
    assert reward_name(reward) == "videoalign"
    assert list(columns) == ["videoalign:VQ", "videoalign:MQ", "videoalign:TA", "videoalign:Overall"]
    for dim, values in batch_scores.items():
        assert columns[f"videoalign:{dim}"].tolist() == values  # bitwise: the call is deterministic
    assert isinstance(reward, torch.nn.Module) and reward.to("cpu") is reward


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"videos": "video4d"}, "rank 4"),
        ({"videos": "too_bright"}, r"\[0, 1\]"),
        ({"videos": "uint8"}, "dtype torch.uint8"),
        ({"videos": "empty"}, "empty batch"),
        ({"videos": []}, "non-empty list"),
        ({"videos": "list_rank3"}, r"`videos\[0\]` must be a floating tensor \[F, 3, H, W\]"),
        ({"videos": "list_uint8"}, r"`videos\[1\]`.*dtype"),
        ({"videos": "one_frame"}, "at least 2 frames"),
        ({"prompts": ["only one"]}, "same batch size"),
        ({"prompts": ["a <|TA_reward|>", "b"]}, "reward tokens"),
        ({"prompts": ["a <|video_pad|>", "b"]}, "video placeholder"),
        ({"prompts": ["a", 3]}, "must be a string"),
        ({"fps": 0}, "`fps` must be a positive"),
        ({"fps": -8.0}, "`fps` must be a positive"),
        ({"fps": math.nan}, "`fps` must be a positive"),
        ({"fps": math.inf}, "`fps` must be a positive"),
        ({"fps": True}, "`fps` must be a positive"),
        ({"fps": "8"}, "`fps` must be a positive"),
        ({"fps": [8.0]}, "one per video"),
        ({"fps": [8.0, 0.0]}, r"`fps\[1\]` must be a positive"),
    ],
)
def test_bad_input(reward, video, prompts, kwargs, error):
    videos = {
        "video4d": video,
        "too_bright": torch.stack([video, video]) * 2,
        "uint8": torch.zeros(2, 4, 3, 8, 8, dtype=torch.uint8),
        "empty": torch.zeros(0, 4, 3, 8, 8),
        "list_rank3": [video[0], video],
        "list_uint8": [video, (video * 255).to(torch.uint8)],
        "one_frame": torch.stack([video, video])[:, :1],
    }
    call = {"prompts": prompts, "videos": torch.stack([video, video]), "fps": 8.0, **kwargs}
    if isinstance(call["videos"], str):
        call["videos"] = videos[call["videos"]]
    with pytest.raises(ValueError, match=error):
        reward(call["prompts"], call["videos"], fps=call["fps"])
