"""Reward registry: short names, Hub ids and URLs resolved by `load_reward`; `register_reward`; lazy imports."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trl_arcopo.rewards as rewards
from trl_arcopo.rewards import (
    BUILTIN_REWARDS,
    AestheticReward,
    CLIPScoreReward,
    PickScoreReward,
    available_rewards,
    load_reward,
    register_reward,
    reward_name,
)
from trl_arcopo.rewards import registry as registry_module
from trl_arcopo.testing import cache_tiny_clip_rewards, populate_hub_cache

TOY_REWARDS = ["toy_adherence", "toy_color", "toy_size", "toy_position", "toy_smoothness"]
REPO_IDS = {
    "yuvalkirstain/PickScore_v1": (PickScoreReward, "pickscore"),
    "openai/clip-vit-large-patch14": (CLIPScoreReward, "clipscore"),
    "trl-lib/ddpo-aesthetic-predictor": (AestheticReward, "aesthetic"),
}


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(registry_module, "_LOADERS", dict(registry_module._LOADERS))
    monkeypatch.setattr(registry_module, "_REPO_IDS", dict(registry_module._REPO_IDS))


@pytest.fixture(scope="module")
def clip_cache(hf_cache: Path) -> Path:
    cache_tiny_clip_rewards(hf_cache)
    return hf_cache


class Recorder:
    """A loader that records how it was called and returns a dummy reward."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return lambda prompts, videos, **kw: [0.0] * len(prompts)


def test_available_rewards() -> None:
    assert available_rewards() == sorted(
        [*BUILTIN_REWARDS, "videoalign", "pickscore", "clipscore", "aesthetic", "remote", *TOY_REWARDS]
    )


def test_builtin_names() -> None:
    assert set(registry_module._BUILTIN_NAMES) == set(BUILTIN_REWARDS)  # registered without importing them
    for name, func in BUILTIN_REWARDS.items():
        assert load_reward(name) is func
        assert load_reward(f"{name}_reward") is func
    # `device` and `dtype` fit every reward (e.g. `trl-arcopo-reward-server --device`): a built-in ignores them.
    assert load_reward("brightness", device="cpu", dtype=torch.bfloat16) is BUILTIN_REWARDS["brightness"]
    with pytest.raises(
        ValueError, match=r"'brightness' takes no options other than \['device', 'dtype'\].*\['revision'\]"
    ):
        load_reward("brightness", revision="main")


def test_clip_names_and_repo_ids(clip_cache: Path) -> None:
    videos = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a red car"]
    for repo_id, (cls, name) in REPO_IDS.items():
        by_name = load_reward(name, cache_dir=clip_cache)
        by_repo = load_reward(repo_id, cache_dir=clip_cache, frame_aggregation="min")
        assert type(by_name) is cls and type(by_repo) is cls
        assert reward_name(by_name) == reward_name(by_repo) == name
        assert by_repo.frame_aggregation == "min"  # options reach `from_pretrained`
        by_name_state = by_name.state_dict()
        assert all(torch.equal(v, by_name_state[k]) for k, v in by_repo.state_dict().items())
        assert by_name(prompts, videos[:, :1]) == by_repo(prompts, videos[:, :1])


def test_repo_id_is_passed_as_the_repo_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    monkeypatch.setattr(PickScoreReward, "from_pretrained", recorder)
    load_reward("pickscore", dtype=torch.bfloat16)
    load_reward("yuvalkirstain/PickScore_v1", revision="v2")
    assert recorder.calls == [((), {"dtype": torch.bfloat16}), (("yuvalkirstain/PickScore_v1",), {"revision": "v2"})]


def test_videoalign_name_and_repo_id(monkeypatch: pytest.MonkeyPatch) -> None:
    videoalign = pytest.importorskip("trl_arcopo.rewards.videoalign", reason="trl_arcopo.rewards.videoalign missing")
    recorder = Recorder()
    monkeypatch.setattr(videoalign.VideoAlignReward, "from_pretrained", recorder)
    load_reward("videoalign", dtype=torch.float32)
    load_reward("KwaiVGI/VideoReward", base_model="org/base", device="cpu")
    assert recorder.calls == [
        ((), {"dtype": torch.float32}),
        (("KwaiVGI/VideoReward",), {"base_model": "org/base", "device": "cpu"}),
    ]
    assert rewards.VideoAlignReward is videoalign.VideoAlignReward


def test_videoalign_repo_id_loads_from_the_hub_cache(hf_cache: Path, fixture_dir: Path) -> None:
    videoalign = pytest.importorskip("trl_arcopo.rewards.videoalign", reason="trl_arcopo.rewards.videoalign missing")
    fixture = fixture_dir / "videoalign_tiny"
    populate_hub_cache("KwaiVGI/VideoReward", fixture / "checkpoint", cache_dir=hf_cache)
    reward = load_reward(
        "KwaiVGI/VideoReward", base_model=str(fixture / "base"), cache_dir=hf_cache, dtype=torch.float32
    )
    assert isinstance(reward, videoalign.VideoAlignReward) and reward_name(reward) == "videoalign"
    scores = reward(["a cat"], torch.rand(1, 4, 3, 56, 56, generator=torch.Generator().manual_seed(0)))
    assert {"VQ", "MQ", "TA"} <= set(scores)


def test_remote_name_and_urls() -> None:
    remote = pytest.importorskip("trl_arcopo.rewards.remote", reason="trl_arcopo.rewards.remote missing")
    by_name = load_reward("remote", url="http://127.0.0.1:9/", token="secret-token", max_retries=0)
    assert isinstance(by_name, remote.RemoteReward) and by_name.max_retries == 0
    by_url = load_reward("https://rewards.example.com", token="secret-token")
    assert isinstance(by_url, remote.RemoteReward)
    assert "secret-token" not in repr(by_name) + repr(by_url)
    assert rewards.RemoteReward is remote.RemoteReward


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("brightnes", "Did you mean 'brightness'?"),
        ("brightness_rewards", "Did you mean 'brightness'?"),
        ("videoalgn", "Did you mean 'videoalign'?"),
        ("KwaiVGI/VideoRewards", "Did you mean 'KwaiVGI/VideoReward'?"),
    ],
)
def test_unknown_names_suggest_close_ones(name, suggestion) -> None:
    for check in (load_reward, registry_module.check_reward_name):
        with pytest.raises(ValueError, match=re.escape(f"Unknown reward '{name}'. {suggestion} Known names: ['aes")):
            check(name)
    registry_module.check_reward_name("KwaiVGI/VideoReward")  # known: nothing raised, nothing loaded
    registry_module.check_reward_name("http://127.0.0.1:8008")


def test_weight_keys_may_name_rewards_as_passed() -> None:
    """`reward_weights={"brightness": 2}` with `reward_funcs=["brightness"]`, whose column is `brightness_reward`."""
    specs = ["brightness", "KwaiVGI/VideoReward", reward_name]
    names = ["brightness_reward", "videoalign", "reward_name"]
    weights = {"brightness": 2.0, "KwaiVGI/VideoReward:VQ": 1.0, "videoalign:MQ": 0.5, "reward_name": 3.0}
    assert registry_module.rename_weight_keys(weights, specs, names) == {
        "brightness_reward": 2.0,
        "videoalign:VQ": 1.0,
        "videoalign:MQ": 0.5,
        "reward_name": 3.0,
    }


def test_unknown_names_raise() -> None:
    for unknown in ("hpsv3", "org/unknown-model"):
        with pytest.raises(
            ValueError, match=r"Unknown reward .*Known names: \['aesthetic', 'brightness'.*register_reward"
        ):
            load_reward(unknown)
    with pytest.raises(ValueError, match="`name_or_repo_id` must be a string"):
        load_reward(len)


def test_register_reward() -> None:
    recorder = Recorder()
    register_reward("custom", recorder, repo_ids=["org/custom-a", "org/custom-b"])
    assert "custom" in available_rewards()
    reward = load_reward("custom", scale=2)
    assert reward(["a"], torch.zeros(1, 1, 3, 2, 2)) == [0.0]
    load_reward("org/custom-b")
    assert recorder.calls == [((), {"scale": 2}), (("org/custom-b",), {})]

    with pytest.raises(ValueError, match="'custom' is already registered; pass `overwrite=True`"):
        register_reward("custom", recorder)
    with pytest.raises(ValueError, match=r"\['org/custom-a'\] already resolve to \['custom'\]"):
        register_reward("other", recorder, repo_ids=["org/custom-a"])
    # Overwriting replaces the loader and the old repo ids.
    replacement = Recorder()
    register_reward("custom", replacement, repo_ids=["org/custom-c"], overwrite=True)
    load_reward("custom")
    load_reward("org/custom-c")
    assert len(replacement.calls) == 2 and len(recorder.calls) == 2
    with pytest.raises(ValueError, match="Unknown reward 'org/custom-a'"):
        load_reward("org/custom-a")


@pytest.mark.parametrize(
    ("name", "loader", "repo_ids", "match"),
    [
        ("", Recorder(), (), "`name` must be a non-empty string"),
        ("org/name", Recorder(), (), "`name` must be a non-empty string without '/'"),
        ("x", "not callable", (), "`loader` must be callable"),
        ("x", Recorder(), "org/name", "wrap it in a list"),
        ("x", Recorder(), ["no-slash"], "`repo_ids` must hold Hub ids 'org/name'"),
        ("x", Recorder(), ["a/b/c"], "`repo_ids` must hold Hub ids 'org/name'"),
        ("x", Recorder(), ["/name"], "`repo_ids` must hold Hub ids 'org/name'"),
    ],
)
def test_register_reward_rejects_bad_arguments(name, loader, repo_ids, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        register_reward(name, loader, repo_ids=repo_ids)
    assert "x" not in available_rewards()


def test_importing_rewards_is_light() -> None:
    """Every reward is imported on first access only: checking a name imports neither torch nor transformers."""
    code = (
        "import sys, trl_arcopo.rewards as r, trl_arcopo.rewards.registry as registry; "
        "registry.check_reward_name('brightness'); "
        "heavy = [m for m in sys.modules if m.startswith(('torch', 'transformers', 'trl_arcopo.rewards.clip', "
        "'trl_arcopo.rewards.videoalign', 'trl_arcopo.rewards.remote', 'trl_arcopo.rewards.builtin', 'trl_arcopo.rewards.toy'))]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # a fresh interpreter, which imported nothing yet
    # An access imports the reward's module through the package's `__getattr__` (checked here, where torch is
    # already imported: in the subprocess it would cost seconds of imports).
    assert rewards.PickScoreReward.__module__ == "trl_arcopo.rewards.clip"
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchReward'"):
        rewards.NoSuchReward  # noqa: B018
