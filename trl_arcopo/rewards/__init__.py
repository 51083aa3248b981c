"""Video rewards: the reward protocol (call convention, validation, collection), model-free built-in rewards, CLIP
rewards and the registry resolving reward names, Hub ids and reward-server URLs (:func:`load_reward`).

Every name is imported on first access, so importing this package (e.g. to check a reward name on the command line)
imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .builtin import (
        BUILTIN_REWARDS,
        brightness_reward,
        channel_excess,
        colorfulness_reward,
        redness_reward,
        sharpness_reward,
        temporal_flicker_reward,
    )
    from .clip import AestheticReward, CLIPScoreReward, PickScoreReward
    from .protocol import (
        RewardFunctionError,
        RewardOutputError,
        compute_rewards,
        is_column_of,
        normalize_reward_output,
        reward_column_weights,
        reward_name,
        reward_names,
        validate_videos,
    )
    from .registry import available_rewards, load_reward, register_reward
    from .remote import RemoteReward, RemoteRewardError
    from .toy import ToyAdherenceReward, ToyColorReward, ToyPositionReward, ToySizeReward, ToySmoothnessReward
    from .videoalign import VideoAlignReward

# Public names and the module that defines each.
_LAZY_EXPORTS = {
    "BUILTIN_REWARDS": ".builtin",
    "brightness_reward": ".builtin",
    "channel_excess": ".builtin",
    "colorfulness_reward": ".builtin",
    "redness_reward": ".builtin",
    "sharpness_reward": ".builtin",
    "temporal_flicker_reward": ".builtin",
    "AestheticReward": ".clip",
    "CLIPScoreReward": ".clip",
    "PickScoreReward": ".clip",
    "RewardFunctionError": ".protocol",
    "RewardOutputError": ".protocol",
    "compute_rewards": ".protocol",
    "is_column_of": ".protocol",
    "normalize_reward_output": ".protocol",
    "reward_column_weights": ".protocol",
    "reward_name": ".protocol",
    "reward_names": ".protocol",
    "validate_videos": ".protocol",
    "available_rewards": ".registry",
    "load_reward": ".registry",
    "register_reward": ".registry",
    "RemoteReward": ".remote",
    "RemoteRewardError": ".remote",
    "ToyAdherenceReward": ".toy",
    "ToyColorReward": ".toy",
    "ToyPositionReward": ".toy",
    "ToySizeReward": ".toy",
    "ToySmoothnessReward": ".toy",
    "VideoAlignReward": ".videoalign",
}

__all__ = [
    "BUILTIN_REWARDS",
    "AestheticReward",
    "CLIPScoreReward",
    "PickScoreReward",
    "RemoteReward",
    "RemoteRewardError",
    "RewardFunctionError",
    "RewardOutputError",
    "ToyAdherenceReward",
    "ToyColorReward",
    "ToyPositionReward",
    "ToySizeReward",
    "ToySmoothnessReward",
    "VideoAlignReward",
    "available_rewards",
    "brightness_reward",
    "channel_excess",
    "colorfulness_reward",
    "compute_rewards",
    "is_column_of",
    "load_reward",
    "normalize_reward_output",
    "register_reward",
    "reward_column_weights",
    "reward_name",
    "redness_reward",
    "reward_names",
    "sharpness_reward",
    "temporal_flicker_reward",
    "validate_videos",
]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
