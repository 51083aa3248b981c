"""Video rewards: the reward protocol (call convention, validation, collection) and model-free built-in rewards."""

from .builtin import (
    BUILTIN_REWARDS,
    brightness_reward,
    colorfulness_reward,
    sharpness_reward,
    temporal_flicker_reward,
)
from .protocol import (
    RewardFunctionError,
    RewardOutputError,
    compute_rewards,
    normalize_reward_output,
    reward_name,
    reward_names,
    validate_videos,
)

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFunctionError",
    "RewardOutputError",
    "brightness_reward",
    "colorfulness_reward",
    "compute_rewards",
    "normalize_reward_output",
    "reward_name",
    "reward_names",
    "sharpness_reward",
    "temporal_flicker_reward",
    "validate_videos",
]
