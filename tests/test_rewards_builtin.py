"""Reward protocol (validation, names, output normalisation, collection) and the model-free built-in rewards."""

import asyncio
import functools
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from trl_arcopo.rewards import (
    BUILTIN_REWARDS,
    RewardFunctionError,
    RewardOutputError,
    brightness_reward,
    channel_excess,
    colorfulness_reward,
    compute_rewards,
    normalize_reward_output,
    redness_reward,
    reward_column_weights,
    reward_name,
    reward_names,
    sharpness_reward,
    temporal_flicker_reward,
    validate_videos,
)

ALL_BUILTINS = list(BUILTIN_REWARDS.values())


def solid(frames_rgb, height=4, width=4):
    """One video ``[1, F, 3, H, W]`` whose frame ``t`` is filled with the colour ``frames_rgb[t]``."""
    colours = torch.tensor(frames_rgb, dtype=torch.float32)  # [F, 3]
    return colours[None, :, :, None, None].expand(1, -1, -1, height, width).contiguous()


def gray_frames(frames):
    """``[1, F, 3, H, W]`` from a list of ``[H, W]`` gray frames."""
    x = torch.stack([torch.as_tensor(f, dtype=torch.float32) for f in frames])  # [F, H, W]
    return x[None, :, None].expand(-1, -1, 3, -1, -1).contiguous()


def checkerboard(size):
    idx = torch.arange(size)
    return ((idx[:, None] + idx[None, :]) % 2).float()


def blur3(frame):
    """3x3 box blur (valid padding) of an ``[H, W]`` frame."""
    return torch.nn.functional.avg_pool2d(frame[None, None], 3, stride=1)[0, 0]


def prompts_for(videos):
    return ["a prompt"] * videos.shape[0]


# --------------------------------------------------------------------------------------------------------------------
# Built-in rewards: hand-computed values
# --------------------------------------------------------------------------------------------------------------------


def test_temporal_flicker_hand_computed():
    # frame 0 black, frame 1 at 0.25: mean |diff| = 0.25 * 255 = 63.75 -> (255 - 63.75) / 255 = 0.75
    video = solid([[0, 0, 0], [0.25, 0.25, 0.25]])
    assert temporal_flicker_reward(["p"], video) == pytest.approx([0.75], abs=1e-6)
    # 3 frames: pair diffs 63.75 and 0 -> mean 31.875 -> (255 - 31.875) / 255 = 0.875
    video = solid([[0, 0, 0], [0.25, 0.25, 0.25], [0.25, 0.25, 0.25]])
    assert temporal_flicker_reward(["p"], video) == pytest.approx([0.875], abs=1e-6)
    # only the red channel changes by 1.0: mean over channels = 255 / 3 = 85 -> 170 / 255
    video = solid([[0, 0, 0], [1, 0, 0]])
    assert temporal_flicker_reward(["p"], video) == pytest.approx([170 / 255], abs=1e-6)
    # black <-> white alternation is the worst case
    assert temporal_flicker_reward(["p"], solid([[0, 0, 0], [1, 1, 1], [0, 0, 0]])) == pytest.approx([0.0], abs=1e-6)


def test_temporal_flicker_static_and_single_frame():
    static = torch.rand(1, 1, 3, 8, 8).expand(2, 5, -1, -1, -1)
    assert temporal_flicker_reward(["a", "b"], static) == [1.0, 1.0]
    assert temporal_flicker_reward(["a"], torch.rand(1, 1, 3, 8, 8)) == [1.0]


def test_colorfulness_hand_computed():
    # constant red frame: rg = 255, yb = 127.5, no spread -> 0.3 * sqrt(255² + 127.5²)
    red = 0.3 * math.sqrt(255**2 + 127.5**2)
    assert colorfulness_reward(["p"], solid([[1, 0, 0]])) == pytest.approx([red / 100], rel=1e-5)
    # red frame then gray frame: frames are averaged
    assert colorfulness_reward(["p"], solid([[1, 0, 0], [0.5, 0.5, 0.5]])) == pytest.approx([red / 200], rel=1e-5)
    # left half red (rg 255, yb 127.5), right half blue (rg 0, yb -255):
    # μ_rg = 127.5, μ_yb = -63.75; two equal halves -> σ = |difference| / 2: σ_rg = 127.5, σ_yb = 191.25
    frame = torch.zeros(3, 4, 4)
    frame[0, :, :2] = 1.0
    frame[2, :, 2:] = 1.0
    expected = math.sqrt(127.5**2 + 191.25**2) + 0.3 * math.sqrt(127.5**2 + 63.75**2)
    assert colorfulness_reward(["p"], frame[None, None]) == pytest.approx([expected / 100], rel=1e-5)


def test_brightness_hand_computed():
    # red frame: luma 0.299; mid-gray frame: 0.5; mean 0.3995
    assert brightness_reward(["p"], solid([[1, 0, 0], [0.5, 0.5, 0.5]])) == pytest.approx([0.3995], abs=1e-6)
    # one white pixel out of 4 in a single frame: 1 / 4
    video = gray_frames([[[1.0, 0.0], [0.0, 0.0]]])
    assert brightness_reward(["p"], video) == pytest.approx([0.25], abs=1e-6)
    assert brightness_reward(["a", "b"], solid([[0, 0, 0]]).repeat(2, 1, 1, 1, 1)) == [0.0, 0.0]


def test_redness_hand_computed_and_differentiable():
    colors = [[1, 0, 0], [0, 1, 1], [0.5, 0.5, 0.5], [1, 0.5, 0]]
    assert redness_reward(["p"] * 4, torch.cat([solid([c]) for c in colors])) == pytest.approx([1, -1, 0, 0.75])
    video = solid([[0.2, 0.2, 0.2]]).repeat(1, 2, 1, 1, 1)
    video[:, 0, 0] = 1.0  # the first frame's red channel only
    assert redness_reward(["p"], video) == pytest.approx([0.4], abs=1e-6)
    x = torch.rand(2, 3, 3, 4, 4, requires_grad=True)
    channel_excess(x, 0).sum().backward()
    assert torch.allclose(x.grad[:, :, 0], torch.full((2, 3, 4, 4), 1 / 48))
    assert torch.allclose(x.grad[:, :, 1:], torch.full((2, 3, 2, 4, 4), -0.5 / 48))


def test_sharpness_hand_computed():
    # 4x4 one-pixel checkerboard: the 2x2 valid Laplacian is ±4 (two of each) -> variance 16 -> 1600
    assert sharpness_reward(["p"], gray_frames([checkerboard(4)])) == pytest.approx([1600.0], rel=1e-5)
    # a single white pixel in the centre of a 5x5 black frame: the valid 3x3 Laplacian is
    # [[0, 1, 0], [1, -4, 1], [0, 1, 0]] -> mean 0, variance (16 + 4·1) / 9 = 20 / 9
    dot = torch.zeros(5, 5)
    dot[2, 2] = 1.0
    assert sharpness_reward(["p"], gray_frames([dot])) == pytest.approx([2000 / 9], rel=1e-5)
    # frames are averaged: dot frame + flat frame -> 1000 / 9
    assert sharpness_reward(["p"], gray_frames([dot, torch.full((5, 5), 0.3)])) == pytest.approx([1000 / 9], rel=1e-5)


def test_sharpness_rejects_tiny_frames():
    with pytest.raises(ValueError, match=r"at least 3×3 pixels, got 2×5"):
        sharpness_reward(["p"], torch.rand(1, 1, 3, 2, 5))


# --------------------------------------------------------------------------------------------------------------------
# Built-in rewards: ordering, range, dtype, kwargs
# --------------------------------------------------------------------------------------------------------------------


def test_flicker_orders_noisy_below_static():
    gen = torch.Generator().manual_seed(0)
    frame = torch.rand(1, 1, 3, 16, 16, generator=gen)
    static = frame.expand(1, 6, -1, -1, -1)
    noisy = (static + 0.3 * torch.randn(1, 6, 3, 16, 16, generator=gen)).clamp(0, 1)
    flicker_static, flicker_noisy = temporal_flicker_reward(["a", "b"], torch.cat([static, noisy]))
    assert flicker_noisy < flicker_static == 1.0


def test_colorfulness_orders_gray_below_saturated():
    gen = torch.Generator().manual_seed(0)
    gray = torch.rand(1, 3, 1, 8, 8, generator=gen).expand(-1, -1, 3, -1, -1)
    saturated = torch.zeros(1, 3, 3, 8, 8)
    saturated[:, :, 0, :, :4] = 1.0  # red half
    saturated[:, :, 1, :, 4:] = 1.0  # green half
    score_gray, score_saturated = colorfulness_reward(["a", "b"], torch.cat([gray, saturated]))
    assert score_gray == pytest.approx(0.0, abs=1e-6)
    assert score_saturated > 1.0


def test_sharpness_orders_blurred_below_sharp_and_flat_is_zero():
    board = checkerboard(10)
    sharp = gray_frames([board[1:-1, 1:-1]])
    blurred = gray_frames([blur3(board)])
    flat = gray_frames([torch.full((8, 8), 0.7)])
    score_sharp, score_blurred, score_flat = sharpness_reward(["a"] * 3, torch.cat([sharp, blurred, flat]))
    assert score_flat == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < score_blurred < score_sharp


def test_brightness_orders_dark_below_bright():
    dark, bright = brightness_reward(["a", "b"], torch.cat([solid([[0.1, 0.1, 0.1]]), solid([[0.9, 0.9, 0.9]])]))
    assert dark < bright


@pytest.mark.parametrize("name", list(BUILTIN_REWARDS))
def test_builtin_range_and_return_type(name):
    func = BUILTIN_REWARDS[name]
    gen = torch.Generator().manual_seed(1)
    videos = torch.cat(
        [
            torch.rand(3, 4, 3, 9, 7, generator=gen),
            torch.zeros(1, 4, 3, 9, 7),
            torch.ones(1, 4, 3, 9, 7),
        ]
    )
    scores = func(prompts_for(videos), videos)
    assert isinstance(scores, list) and len(scores) == 5
    assert all(type(s) is float and math.isfinite(s) for s in scores)
    bounds = {
        "temporal_flicker": (0, 1),
        "brightness": (0, 1),
        "colorfulness": (0, 3),
        "redness": (-1, 1),
        "sharpness": (0, 1600),
    }
    low, high = bounds[name]
    assert all(low <= s <= high for s in scores)
    # black and white videos are static, gray, flat
    expected_constant = {
        "temporal_flicker": (1, 1),
        "brightness": (0, 1),
        "colorfulness": (0, 0),
        "redness": (0, 0),
        "sharpness": (0, 0),
    }
    assert scores[3:] == pytest.approx(list(expected_constant[name]), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", list(BUILTIN_REWARDS))
def test_builtin_dtypes(name, dtype):
    func = BUILTIN_REWARDS[name]
    videos = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    reference = func(["a", "b"], videos)
    scores = func(["a", "b"], videos.to(dtype))
    assert all(type(s) is float for s in scores)
    tolerance = 1e-5 if dtype == torch.float64 else 2e-2
    assert scores == pytest.approx(reference, rel=tolerance, abs=tolerance)


@pytest.mark.parametrize("name", list(BUILTIN_REWARDS))
def test_builtin_ignores_kwargs_and_prompts_content(name):
    func = BUILTIN_REWARDS[name]
    videos = torch.rand(2, 2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    plain = func(["a", "b"], videos)
    with_kwargs = func(["x", "y"], videos, category=["c1", "c2"], trainer_state=object(), log_metric=lambda *a: None)
    assert with_kwargs == plain


@pytest.mark.parametrize("name", list(BUILTIN_REWARDS))
def test_builtin_validates_inputs(name):
    func = BUILTIN_REWARDS[name]
    with pytest.raises(ValueError, match="1 prompts for 2 videos"):
        func(["a"], torch.rand(2, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="`videos`"):
        func(["a"], torch.rand(1, 2, 4, 4, 3))


def test_builtin_batch_rows_are_independent():
    videos = torch.rand(3, 3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    for func in ALL_BUILTINS:
        batched = func(["a", "b", "c"], videos)
        single = [func(["a"], videos[i : i + 1])[0] for i in range(3)]
        assert batched == pytest.approx(single, rel=1e-5)


def test_builtin_registry():
    assert BUILTIN_REWARDS == {
        "temporal_flicker": temporal_flicker_reward,
        "colorfulness": colorfulness_reward,
        "brightness": brightness_reward,
        "redness": redness_reward,
        "sharpness": sharpness_reward,
    }
    for func in ALL_BUILTINS:
        assert func.__doc__ and "higher" in func.__doc__


# --------------------------------------------------------------------------------------------------------------------
# validate_videos
# --------------------------------------------------------------------------------------------------------------------


def test_validate_videos_accepts_valid_input():
    validate_videos(torch.rand(2, 3, 3, 4, 4))
    validate_videos(torch.rand(1, 1, 3, 1, 1, dtype=torch.float64))
    validate_videos(torch.rand(1, 2, 3, 4, 4).bfloat16())
    # small overshoot of the range is tolerated
    validate_videos(torch.full((1, 1, 3, 2, 2), 1.0005))
    validate_videos(torch.full((1, 1, 3, 2, 2), -0.0005))


@pytest.mark.parametrize(
    ("videos", "match"),
    [
        (np.zeros((1, 1, 3, 4, 4), dtype=np.float32), r"`videos` must be a floating torch\.Tensor.*got ndarray"),
        ([[0.5]], r"`videos` must be .*got list"),
        (torch.rand(1, 3, 4, 4), r"`videos` must be .*\[B, F, 3, H, W\].*rank 4 with shape \(1, 3, 4, 4\)"),
        (torch.rand(1, 1, 1, 3, 4, 4), r"rank 6"),
        (torch.rand(1, 2, 4, 4, 3), r"3 RGB channels at dim 2.*shape \(1, 2, 4, 4, 3\) with 4 channels"),
        (torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8), r"`videos` must be a floating.*got dtype torch\.uint8"),
        (torch.zeros(1, 2, 3, 4, 4, dtype=torch.int64), r"got dtype torch\.int64"),
        (torch.rand(1, 2, 3, 4, 4) * 255, r"`videos` must be .*values in \[0, 1\].*got values in \[.*, .*\]"),
        (torch.rand(1, 2, 3, 4, 4) * 2 - 1, r"got values in \[-"),
        (torch.full((1, 1, 3, 2, 2), 1.01), r"got values in \[1\.01, 1\.01\]"),
        (torch.full((1, 1, 3, 2, 2), math.nan), r"got NaN values"),
        (torch.zeros(0, 2, 3, 4, 4), r"`videos` must be .*B >= 1, got an empty batch"),
        (torch.zeros(1, 0, 3, 4, 4), r"F, H, W >= 1, got shape \(1, 0, 3, 4, 4\)"),
    ],
)
def test_validate_videos_errors(videos, match):
    with pytest.raises(ValueError, match=match):
        validate_videos(videos)


# --------------------------------------------------------------------------------------------------------------------
# reward_name
# --------------------------------------------------------------------------------------------------------------------


def my_reward(prompts, videos, **kwargs):
    return [1.0] * len(prompts)


class CallableReward:
    def __call__(self, prompts, videos, **kwargs):
        return [2.0] * len(prompts)


class NamedReward(CallableReward):
    name = "custom"


class ModuleReward(nn.Module):
    def forward(self, prompts, videos, **kwargs):
        return torch.full((len(prompts),), 3.0)


class _Config:
    _name_or_path = "org/video-reward-model"


class ConfiguredModule(ModuleReward):
    def __init__(self, path="org/video-reward-model"):
        super().__init__()
        self.config = _Config()
        self.config._name_or_path = path


def test_reward_name():
    assert reward_name(my_reward) == "my_reward"
    assert reward_name(lambda p, v: []) == "<lambda>"
    assert reward_name(functools.partial(my_reward, scale=2)) == "my_reward"
    assert reward_name(functools.partial(functools.partial(my_reward, a=1), b=2)) == "my_reward"
    assert reward_name(CallableReward()) == "CallableReward"
    assert reward_name(NamedReward()) == "custom"
    assert reward_name(ModuleReward()) == "ModuleReward"
    assert reward_name(ConfiguredModule()) == "video-reward-model"
    assert reward_name(ConfiguredModule("/local/dir/checkpoint/")) == "checkpoint"
    assert reward_name(ConfiguredModule("")) == "ConfiguredModule"  # empty path: fall back to the class name
    assert reward_name(temporal_flicker_reward) == "temporal_flicker_reward"


def test_reward_names_deduplicates():
    names = reward_names([my_reward, my_reward, CallableReward(), my_reward, functools.partial(my_reward)])
    assert names == ["my_reward", "my_reward_1", "CallableReward", "my_reward_2", "my_reward_3"]
    assert reward_names(my_reward) == ["my_reward"]


# --------------------------------------------------------------------------------------------------------------------
# normalize_reward_output
# --------------------------------------------------------------------------------------------------------------------


def assert_tensor_equal(actual, expected):
    assert actual.dtype == torch.float64 and actual.device.type == "cpu"
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


@pytest.mark.parametrize(
    "output",
    [
        [1.0, None, 3],
        (1.0, None, 3),
        np.array([1.0, np.nan, 3.0]),
        np.array([1.0, None, 3], dtype=object),
        torch.tensor([1.0, math.nan, 3.0], dtype=torch.bfloat16, requires_grad=True),
        [torch.tensor(1.0), None, np.float32(3.0)],
    ],
)
def test_normalize_reward_output_sequences(output):
    result = normalize_reward_output(output, 3, "r")
    assert list(result) == [""]
    assert_tensor_equal(result[""], [1.0, math.nan, 3.0])


def test_normalize_reward_output_bools_ints_and_non_finite():
    assert_tensor_equal(normalize_reward_output([True, False], 2, "r")[""], [1.0, 0.0])
    assert_tensor_equal(normalize_reward_output(torch.tensor([2, 5]), 2, "r")[""], [2.0, 5.0])
    # non-finite values are not an error: they become NaN for the caller to count
    result = normalize_reward_output([math.inf, -math.inf, math.nan, 0.5], 4, "r")[""]
    assert_tensor_equal(result, [math.nan, math.nan, math.nan, 0.5])


def test_normalize_reward_output_heads():
    result = normalize_reward_output({"VQ": [1.0, None], "MQ": torch.tensor([0.5, math.inf])}, 2, "videoalign")
    assert list(result) == ["VQ", "MQ"]
    assert_tensor_equal(result["VQ"], [1.0, math.nan])
    assert_tensor_equal(result["MQ"], [0.5, math.nan])


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ([1.0, 2.0], r"reward 'r' returned 2 values for a batch of 3 videos \(expected 3\)"),
        (torch.ones(4), r"reward 'r' returned 4 values for a batch of 3 videos \(expected 3\)"),
        ({"VQ": [1.0]}, r"reward 'r' head 'VQ' returned 1 values .*\(expected 3\)"),
        (1.0, r"reward 'r' returned float; expected one score per video \(3 values"),
        ("0.5", r"reward 'r' returned str"),
        (torch.ones(3, 1), r"reward 'r' returned a tensor of shape \(3, 1\)"),
        (np.ones((3, 2)), r"reward 'r' returned an array of shape \(3, 2\)"),
        ([1.0, "bad", 2.0], r"reward 'r' returned a non-numeric value at index 1: 'bad' \(str\)"),
        ([1.0, 2.0, [3.0]], r"non-numeric value at index 2: \[3\.0\] \(list\)"),
        ([1.0, 2.0, torch.ones(2)], r"non-numeric value at index 2"),
        ({"VQ": [1.0, "x", 2.0]}, r"reward 'r' head 'VQ' returned a non-numeric value at index 1"),
        ({}, r"reward 'r' returned an empty dict"),
        ({"": [1.0, 2.0, 3.0]}, r"head name ''"),
        ({1: [1.0, 2.0, 3.0]}, r"head name 1"),
        ({"VQ": {"a": [1.0]}}, r"head 'VQ' is a dict"),
        (None, r"reward 'r' returned NoneType"),
    ],
)
def test_normalize_reward_output_errors(output, match):
    with pytest.raises(RewardOutputError, match=match):
        normalize_reward_output(output, 3, "r")
    assert issubclass(RewardOutputError, ValueError)


# --------------------------------------------------------------------------------------------------------------------
# compute_rewards
# --------------------------------------------------------------------------------------------------------------------


def heads_reward(prompts, videos, **kwargs):
    return {"VQ": [1.0] * len(prompts), "MQ": [None] * len(prompts)}


def test_compute_rewards_columns_and_order():
    videos = torch.rand(2, 2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    prompts = ["a", "b"]
    funcs = [brightness_reward, heads_reward, my_reward, my_reward, CallableReward(), ModuleReward(), heads_reward]
    columns = compute_rewards(funcs, prompts, videos)
    assert list(columns) == [
        "brightness_reward",
        "heads_reward:VQ",
        "heads_reward:MQ",
        "my_reward",
        "my_reward_1",
        "CallableReward",
        "ModuleReward",
        "heads_reward_1:VQ",
        "heads_reward_1:MQ",
    ]
    for values in columns.values():
        assert values.dtype == torch.float64 and values.shape == (2,)
    assert_tensor_equal(columns["brightness_reward"], brightness_reward(prompts, videos))
    assert_tensor_equal(columns["heads_reward:MQ"], [math.nan, math.nan])
    assert_tensor_equal(columns["ModuleReward"], [3.0, 3.0])
    assert list(compute_rewards(my_reward, prompts, videos)) == ["my_reward"]  # a single callable is accepted


def test_compute_rewards_builtins():
    videos = torch.rand(3, 2, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    columns = compute_rewards(ALL_BUILTINS, ["a", "b", "c"], videos)
    assert list(columns) == [f.__name__ for f in ALL_BUILTINS]
    for func in ALL_BUILTINS:
        assert_tensor_equal(columns[func.__name__], func(["a", "b", "c"], videos))


def test_compute_rewards_passes_prompts_videos_and_kwargs():
    seen = {}

    def spy(prompts, videos, **kwargs):
        seen.update(prompts=prompts, videos=videos, kwargs=kwargs, grad=torch.is_grad_enabled())
        return [0.0] * len(prompts)

    videos = torch.rand(2, 1, 3, 4, 4)
    compute_rewards([spy], ["a", "b"], videos, reward_kwargs={"category": ["x", "y"]})
    assert seen["prompts"] == ["a", "b"] and seen["videos"] is videos
    assert seen["kwargs"] == {"category": ["x", "y"]}
    assert seen["grad"] is False
    with pytest.raises(ValueError, match=r"`reward_kwargs` must not contain \['videos'\]"):
        compute_rewards([spy], ["a", "b"], videos, reward_kwargs={"videos": None})


def test_compute_rewards_input_errors():
    videos = torch.rand(2, 1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"same batch size, got 3 prompts for 2 videos"):
        compute_rewards([my_reward], ["a", "b", "c"], videos)
    with pytest.raises(ValueError, match=r"`prompts` must be a list of 2 strings, got str"):
        compute_rewards([my_reward], "ab", videos)
    with pytest.raises(ValueError, match=r"`videos` must be .*got dtype torch\.uint8"):
        compute_rewards([my_reward], ["a", "b"], (videos * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="every reward must be callable"):
        compute_rewards([my_reward, "not-a-function"], ["a", "b"], videos)


def test_compute_rewards_wraps_exceptions():
    def failing(prompts, videos, **kwargs):
        raise KeyError("missing column")

    videos = torch.rand(2, 1, 3, 4, 4)
    with pytest.raises(RewardFunctionError, match=r"reward 'failing' raised KeyError: 'missing column'") as info:
        compute_rewards([my_reward, failing, failing], ["a", "b"], videos)
    assert info.value.reward_name == "failing"  # the first failing reward is reported
    assert isinstance(info.value.__cause__, KeyError)
    assert isinstance(info.value, RuntimeError)


def test_compute_rewards_reports_first_failure_with_its_cause():
    original = ZeroDivisionError("boom")

    class Broken(nn.Module):
        def forward(self, prompts, videos, **kwargs):
            raise original

    with pytest.raises(RewardFunctionError, match=r"^reward 'Broken' raised ZeroDivisionError: boom$") as info:
        compute_rewards([my_reward, Broken()], ["a"], torch.rand(1, 1, 3, 4, 4))
    assert info.value.__cause__ is original
    assert info.value.reward_name == "Broken"


def test_compute_rewards_output_errors_name_the_reward():
    def short(prompts, videos, **kwargs):
        return [1.0]

    with pytest.raises(RewardOutputError, match=r"reward 'short' returned 1 values for a batch of 2 videos"):
        compute_rewards([my_reward, short], ["a", "b"], torch.rand(2, 1, 3, 4, 4))


def test_compute_rewards_async_rewards():
    order = []

    async def slow(prompts, videos, **kwargs):
        await asyncio.sleep(0.01)
        order.append("slow")
        return [1.0] * len(prompts)

    async def fast(prompts, videos, **kwargs):
        order.append("fast")
        return {"h": [2.0] * len(prompts)}

    videos = torch.rand(2, 1, 3, 4, 4)
    columns = compute_rewards([slow, my_reward, fast], ["a", "b"], videos)
    assert list(columns) == ["slow", "my_reward", "fast:h"]
    assert order == ["fast", "slow"]  # awaited concurrently
    assert_tensor_equal(columns["slow"], [1.0, 1.0])

    async def failing(prompts, videos, **kwargs):
        raise OSError("server down")

    with pytest.raises(RewardFunctionError, match=r"reward 'failing' raised OSError: server down") as info:
        compute_rewards([slow, failing], ["a", "b"], videos)
    assert isinstance(info.value.__cause__, OSError)

    async def inside_loop():
        return compute_rewards([slow], ["a", "b"], videos)

    assert list(asyncio.run(inside_loop())) == ["slow"]


def test_compute_rewards_closes_pending_coroutines_on_sync_failure(recwarn):
    async def never(prompts, videos, **kwargs):
        return [0.0]

    def failing(prompts, videos, **kwargs):
        raise ValueError("bad")

    with pytest.raises(RewardFunctionError):
        compute_rewards([never, failing], ["a"], torch.rand(1, 1, 3, 4, 4))
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


# --------------------------------------------------------------------------------------------------------------------
# Weights of reward columns
# --------------------------------------------------------------------------------------------------------------------

COLUMNS = ["videoalign:VQ", "videoalign:MQ", "videoalign:TA", "videoalign:Overall", "brightness"]
NAMES = ["videoalign", "brightness"]


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (None, [1.0, 1.0, 1.0, 1.0, 1.0]),
        ([0.5, 2.0], [0.5, 0.5, 0.5, 0.5, 2.0]),  # one per reward: applied to each head
        ([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]),  # one per column
        ({"videoalign:VQ": 1.0, "videoalign:MQ": 1.0, "videoalign:TA": 1.0}, [1.0, 1.0, 1.0, 0.0, 0.0]),
        ({"videoalign": 2.0, "videoalign:Overall": 0.0, "brightness": -1.0}, [2.0, 2.0, 2.0, 0.0, -1.0]),
    ],
)
def test_reward_column_weights(weights, expected):
    assert reward_column_weights(COLUMNS, NAMES, weights) == expected


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 2.0, 3.0], "has 3 entries, but there are 2 rewards"),
        ({"videoalign:XX": 1.0}, "keys ['videoalign:XX'] are neither reward columns"),
    ],
)
def test_reward_column_weights_errors(weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        reward_column_weights(COLUMNS, NAMES, weights)
