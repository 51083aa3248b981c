"""Rewards by name: short names, Hub ids and reward-server URLs resolved to reward callables.

>>> from trl_arcopo.rewards import load_reward
>>> load_reward("brightness")                                  # a built-in function
>>> load_reward("pickscore", device="cuda")                    # PickScoreReward.from_pretrained(device="cuda")
>>> load_reward("yuvalkirstain/PickScore_v1", revision="main")  # the same, the repo id passed as the repo to load
>>> load_reward("https://rewards.example.com", token=...)      # RemoteReward(url, token=...)

Known names: the built-in rewards (``temporal_flicker``, ``colorfulness``, ``brightness``, ``redness``, ``sharpness``, also with
a ``_reward`` suffix), the toy-world rewards (``toy_adherence``, ``toy_color``, ``toy_size``, ``toy_position``,
``toy_smoothness``; options such as ``color="blue"`` go to their constructors), ``videoalign``, ``pickscore``,
``clipscore``, ``aesthetic`` and ``remote``. Add your own with :func:`register_reward`. Nothing here turns
``trust_remote_code`` on, and nothing is imported before a reward
is loaded: :func:`check_reward_name` checks a name without torch.
"""

from __future__ import annotations

import difflib
import importlib
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["available_rewards", "check_reward_name", "load_reward", "register_reward", "rename_weight_keys"]

_URL_PREFIXES = ("http://", "https://")
# The keys of `.builtin.BUILTIN_REWARDS`, registered without importing torch (a test keeps them in sync).
_BUILTIN_NAMES = ("temporal_flicker", "colorfulness", "brightness", "redness", "sharpness")
# Options of the model rewards that a built-in accepts and ignores (it has no weights and computes on the device of
# its videos), so that e.g. `trl-arcopo-reward-server --device` works with every reward.
_BUILTIN_OPTIONS = ("device", "dtype")

# name -> loader; a loader is called as `loader(**kwargs)` for its name, `loader(repo_id, **kwargs)` for one of its
# Hub ids and `loader(url, **kwargs)` for "remote" given a URL.
_LOADERS: dict[str, Callable[..., Callable]] = {}
_REPO_IDS: dict[str, str] = {}  # Hub id -> name


def register_reward(
    name: str, loader: Callable[..., Callable], *, repo_ids: tuple[str, ...] | list[str] = (), overwrite: bool = False
) -> None:
    """Make ``load_reward(name, **kwargs)`` return ``loader(**kwargs)``, and ``load_reward(repo_id, **kwargs)``
    return ``loader(repo_id, **kwargs)`` for each of ``repo_ids``.

    Args:
        name: a short name without ``/`` (e.g. ``"hpsv2"``).
        loader: builds the reward; it takes the repo id as its first positional argument when called for one of
            ``repo_ids`` (a ``from_pretrained`` classmethod fits).
        repo_ids: Hub ids (``"org/name"``) that resolve to this loader.
        overwrite: replace an existing registration of ``name`` (and take over its ``repo_ids``).

    Raises:
        ValueError: a malformed name or repo id, a non-callable loader, or a name / repo id already registered to
            another reward without ``overwrite=True``.
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"`name` must be a non-empty string without '/' (e.g. 'hpsv2'), got {name!r}.")
    if not callable(loader):
        raise ValueError(f"`loader` must be callable (e.g. a `from_pretrained` classmethod), got {loader!r}.")
    if isinstance(repo_ids, str):
        raise ValueError(f"`repo_ids` must be a list of Hub ids, got the string {repo_ids!r}; wrap it in a list.")
    for repo_id in repo_ids:
        if not isinstance(repo_id, str) or len(repo_id.split("/")) != 2 or not all(repo_id.split("/")):
            raise ValueError(f"`repo_ids` must hold Hub ids 'org/name', got {repo_id!r}.")
    if not overwrite:
        if name in _LOADERS:
            raise ValueError(f"A reward named {name!r} is already registered; pass `overwrite=True` to replace it.")
        taken = [repo_id for repo_id in repo_ids if repo_id in _REPO_IDS]
        if taken:
            raise ValueError(
                f"{taken} already resolve to {[_REPO_IDS[r] for r in taken]}; pass `overwrite=True` to take them over."
            )
    for repo_id in [repo_id for repo_id, owner in _REPO_IDS.items() if owner == name]:
        del _REPO_IDS[repo_id]
    _LOADERS[name] = loader
    _REPO_IDS.update(dict.fromkeys(repo_ids, name))


def available_rewards() -> list[str]:
    """The registered short names, sorted (Hub ids and URLs are accepted by :func:`load_reward` too)."""
    return sorted(_LOADERS)


def _resolve(name_or_repo_id: str) -> tuple[Callable[..., Callable], tuple[str, ...]]:
    """The loader of ``name_or_repo_id`` and the positional arguments it gets."""
    if not isinstance(name_or_repo_id, str):
        raise ValueError(
            f"`name_or_repo_id` must be a string, got {type(name_or_repo_id).__name__}; "
            "pass a reward callable to the trainer directly instead."
        )
    if name_or_repo_id.startswith(_URL_PREFIXES):
        return _LOADERS["remote"], (name_or_repo_id,)
    if name_or_repo_id in _REPO_IDS:
        return _LOADERS[_REPO_IDS[name_or_repo_id]], (name_or_repo_id,)
    name = name_or_repo_id
    if name not in _LOADERS and name.removesuffix("_reward") in _BUILTIN_NAMES:
        name = name.removesuffix("_reward")
    if name not in _LOADERS:
        close = difflib.get_close_matches(name.removesuffix("_reward"), [*_LOADERS, *_REPO_IDS], n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(match) for match in close)}?" if close else ""
        raise ValueError(
            f"Unknown reward {name_or_repo_id!r}.{hint} Known names: {available_rewards()}; known Hub ids: "
            f"{sorted(_REPO_IDS)}; or an http(s):// reward-server URL. Register another one with "
            "`trl_arcopo.rewards.register_reward(name, loader)`, or pass a callable reward directly."
        )
    return _LOADERS[name], ()


def check_reward_name(name_or_repo_id: str) -> None:
    """Raise the ``ValueError`` of :func:`load_reward` (with its "did you mean") if ``name_or_repo_id`` is neither a
    registered name, a registered Hub id nor a URL; loads and imports nothing (for checking command lines early)."""
    _resolve(name_or_repo_id)


def load_reward(name_or_repo_id: str, **kwargs: Any) -> Callable:
    """Build a reward from a short name, a known Hub id or a reward-server URL.

    Args:
        name_or_repo_id: a name of :func:`available_rewards` (a built-in may also carry a ``_reward`` suffix), a Hub
            id registered with one of them (e.g. ``"KwaiVGI/VideoReward"``, loaded from that repo) or an
            ``http(s)://`` URL of a ``trl-arcopo-reward-server`` (a ``RemoteReward``).
        **kwargs: passed to the reward's loader (e.g. ``device``, ``dtype``, ``revision``, ``cache_dir`` for model
            rewards; ``token`` for remote ones). Built-in rewards accept ``device`` and ``dtype`` and ignore them
            (they have no weights and compute in float32 on the device of the videos).

    Returns:
        A reward callable ``reward(prompts, videos, **kwargs)``.

    Raises:
        ValueError: an unknown name (the message suggests close names and lists the known ones), or options a
            built-in reward does not take.
    """
    loader, args = _resolve(name_or_repo_id)
    return loader(*args, **kwargs)


def rename_weight_keys(weights: Mapping[str, float], specs: Sequence[Any], names: Sequence[str]) -> dict[str, float]:
    """``weights`` keyed by reward names as the rewards were given: a key that is a string of ``specs`` (e.g.
    ``"brightness"``, which :func:`load_reward` resolves to ``brightness_reward``), or one of its columns
    ``"spec:head"``, is renamed to the resolved name ``names[i]`` (or ``"name:head"``); other keys are kept.

    Args:
        weights: ``reward_weights`` keyed by reward name or column.
        specs: the rewards as passed (names, Hub ids, URLs or callables).
        names: the resolved reward names (:func:`~trl_arcopo.rewards.reward_names`), one per spec.
    """
    renames = {spec: name for spec, name in zip(specs, names, strict=True) if isinstance(spec, str) and spec != name}
    renamed = {}
    for key, weight in weights.items():
        spec, separator, head = key.partition(":")
        if key in renames:
            key = renames[key]
        elif separator and spec in renames:
            key = f"{renames[spec]}:{head}"
        renamed[key] = weight
    return renamed


def _builtin_loader(name: str) -> Callable[..., Callable]:
    def load(**kwargs: Any) -> Callable:
        unknown = sorted(set(kwargs) - set(_BUILTIN_OPTIONS))
        if unknown:
            raise ValueError(
                f"The built-in reward {name!r} takes no options other than {list(_BUILTIN_OPTIONS)} (which it "
                f"ignores), got {unknown}."
            )
        return importlib.import_module(".builtin", __package__).BUILTIN_REWARDS[name]

    return load


def _lazy_loader(module: str, attribute: str) -> Callable[..., Callable]:
    """A loader calling ``module.attribute(*args, **kwargs)``; the module (relative to this package) is imported on
    first use, so that importing the registry does not import transformers or Qwen2-VL."""

    def load(*args: Any, **kwargs: Any) -> Callable:
        return operator.attrgetter(attribute)(importlib.import_module(module, __package__))(*args, **kwargs)

    return load


for _name in _BUILTIN_NAMES:
    register_reward(_name, _builtin_loader(_name))
register_reward(
    "videoalign", _lazy_loader(".videoalign", "VideoAlignReward.from_pretrained"), repo_ids=["KwaiVGI/VideoReward"]
)
register_reward(
    "pickscore", _lazy_loader(".clip", "PickScoreReward.from_pretrained"), repo_ids=["yuvalkirstain/PickScore_v1"]
)
register_reward(
    "clipscore", _lazy_loader(".clip", "CLIPScoreReward.from_pretrained"), repo_ids=["openai/clip-vit-large-patch14"]
)
register_reward(
    "aesthetic",
    _lazy_loader(".clip", "AestheticReward.from_pretrained"),
    repo_ids=["trl-lib/ddpo-aesthetic-predictor"],
)
register_reward("remote", _lazy_loader(".remote", "RemoteReward"))
for _name, _class in [
    ("toy_adherence", "ToyAdherenceReward"),
    ("toy_color", "ToyColorReward"),
    ("toy_size", "ToySizeReward"),
    ("toy_position", "ToyPositionReward"),
    ("toy_smoothness", "ToySmoothnessReward"),
]:
    register_reward(_name, _lazy_loader(".toy", _class))
