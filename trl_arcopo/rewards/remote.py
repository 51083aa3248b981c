"""A reward computed by a remote `trl-arcopo-reward-server`, and the wire format both sides share.

Large reward models (VideoAlign, VLM judges) often need their own environment or GPU. `trl-arcopo-reward-server`
(:mod:`trl_arcopo.rewards.server`) serves any reward over HTTP; :class:`RemoteReward` is a reward function, following
the protocol of :mod:`trl_arcopo.rewards.protocol`, that forwards each call to such a server.

Wire format of ``POST /score`` (``Content-Type: application/octet-stream``, ``Authorization: Bearer <token>``): the
body is a safetensors payload (never pickle) holding

- the videos: one tensor ``videos`` ``[B, F, 3, H, W]``, or ``video_0`` ... ``video_{B-1}`` ``[F, 3, H, W]`` for a
  list of videos (which may differ in size); dtype ``float16`` or ``float32`` (values in ``[0, 1]``) or ``uint8``
  (``round(255 · x)``; the server maps a value ``v`` back to ``v / 255`` in float32);
- in the safetensors metadata, ``prompts``: a JSON list of ``B`` strings, and ``kwargs``: a JSON object of extra
  keyword arguments for the reward (dataset columns and other JSON-serialisable values).

The server keeps the videos in their payload dtype until the reward is called (:func:`videos_to_float`), then calls
it with float32 videos of the same structure (tensor or list) and answers ``{"scores": [...]}`` or
``{"heads": {name: [...]}}``, ``null`` for a missing or non-finite score.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import requests
import safetensors
import safetensors.torch
import torch
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ReadTimeoutError
from urllib3.util.retry import Retry

from .protocol import _RESERVED_KWARGS, RewardFunctionError, _check_prompts, _validate_video_batch

__all__ = [
    "TOKEN_ENV",
    "RemoteReward",
    "RemoteRewardError",
    "decode_score_request",
    "encode_score_request",
    "videos_to_float",
]

logger = logging.getLogger(__name__)

TOKEN_ENV = "TRL_ARCOPO_REWARD_TOKEN"
PAYLOAD_DTYPES = (torch.float16, torch.float32, torch.uint8)

Videos = torch.Tensor | list[torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------------------------------


def _check_prompt_strings(prompts: Any, batch_size: int) -> None:
    _check_prompts(prompts, batch_size)
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"`prompts` must be a list of {batch_size} strings, got {prompts!r:.200}.")


def _check_kwargs(kwargs: Any) -> None:
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"the reward keyword arguments must be a JSON object, got {type(kwargs).__name__}.")
    reserved = [key for key in _RESERVED_KWARGS if key in kwargs]
    if reserved:
        raise ValueError(f"the reward keyword arguments must not contain {reserved}: they are passed positionally.")


def _to_payload(video: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return video.detach().to("cpu", torch.float32).mul(255).round_().clamp_(0, 255).to(torch.uint8)
    # A copy: the same tensor may appear twice in a list, and safetensors refuses tensors that share memory.
    return video.detach().to("cpu", dtype, copy=True, memory_format=torch.contiguous_format)


def encode_score_request(
    prompts: Sequence[str],
    videos: Videos,
    kwargs: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.uint8,
) -> bytes:
    """Serialise one ``POST /score`` request body (see the module docstring for the format).

    Args:
        prompts: ``B`` prompts.
        videos: a floating tensor ``[B, F, 3, H, W]`` or a list of ``B`` floating tensors ``[F, 3, H, W]``, values in
            ``[0, 1]``.
        kwargs: extra keyword arguments for the reward; must be JSON-serialisable.
        dtype: payload dtype of the videos, one of ``torch.uint8`` (default), ``torch.float16``, ``torch.float32``.

    Raises:
        ValueError: bad videos, prompts, kwargs or dtype, naming the argument.
    """
    if dtype not in PAYLOAD_DTYPES:
        raise ValueError(f"`dtype` must be one of {PAYLOAD_DTYPES}, got {dtype}.")
    _check_prompt_strings(prompts, _validate_video_batch(videos))
    kwargs = dict(kwargs or {})
    _check_kwargs(kwargs)
    try:
        metadata = {"prompts": json.dumps(list(prompts)), "kwargs": json.dumps(kwargs)}
    except (TypeError, ValueError, RecursionError) as error:
        raise ValueError(f"the reward keyword arguments must be JSON-serialisable: {error}") from None
    if isinstance(videos, torch.Tensor):
        tensors = {"videos": _to_payload(videos, dtype)}
    else:
        tensors = {f"video_{i}": _to_payload(video, dtype) for i, video in enumerate(videos)}
    return safetensors.torch.save(tensors, metadata=metadata)


def _metadata(data: bytes) -> dict[str, str]:
    # The safetensors layout: an 8-byte little-endian header length, then a JSON header whose optional
    # "__metadata__" entry holds the metadata (the safetensors API only exposes it for files, not for bytes).
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def _check_payload_dtype(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in PAYLOAD_DTYPES:
        raise ValueError(
            f"tensor `{name}` has dtype {tensor.dtype}; the payload dtype must be one of {PAYLOAD_DTYPES}."
        )
    return tensor


def videos_to_float(videos: Videos, device: torch.device | str | None = None) -> Videos:
    """Payload videos (uint8, float16 or float32; a tensor or a list) as float32 in ``[0, 1]`` on ``device``: a uint8
    value ``v`` becomes ``v / 255``. The videos move to ``device`` before they are converted (a GPU receives the
    uint8 bytes, a quarter of the float32 ones)."""

    def convert(video: torch.Tensor) -> torch.Tensor:
        video = video.to(device) if device is not None else video
        return video.to(torch.float32).div_(255) if video.dtype == torch.uint8 else video.to(torch.float32)

    return convert(videos) if isinstance(videos, torch.Tensor) else [convert(video) for video in videos]


def _json_entry(metadata: Mapping[str, str], key: str, default: str | None = None) -> Any:
    text = metadata.get(key, default)
    if text is None:
        raise ValueError(f"the payload metadata has no `{key}` entry.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"the payload metadata entry `{key}` is not valid JSON: {error}.") from None
    except RecursionError:
        raise ValueError(f"the payload metadata entry `{key}` is nested too deeply.") from None


def decode_score_request(data: bytes) -> tuple[list[str], Videos, dict[str, Any]]:
    """Parse a ``POST /score`` request body into ``(prompts, videos, kwargs)``.

    Returns:
        ``prompts``, ``videos`` as CPU tensors in their payload dtype (uint8, float16 or float32; see
        :func:`videos_to_float`): a tensor ``[B, F, 3, H, W]`` for a ``videos`` payload or a list of
        ``[F, 3, H, W]`` for ``video_i`` payloads, and the keyword arguments. The prompts (``B`` strings), shapes
        and value ranges are checked with the float videos, where the server calls the reward
        (``_check_prompt_strings(prompts, _validate_video_batch(videos_to_float(videos)))``).

    Raises:
        ValueError: naming what is malformed (not safetensors, missing or invalid metadata, unexpected tensor names or
            dtypes, keyword arguments that are not an object).
    """
    try:
        tensors = safetensors.torch.load(data)
    except safetensors.SafetensorError as error:
        raise ValueError(f"the request body is not a valid safetensors payload ({error}).") from None
    metadata = _metadata(data)
    prompts = _json_entry(metadata, "prompts")
    kwargs = _json_entry(metadata, "kwargs", default="{}")
    if set(tensors) == {"videos"}:
        videos = _check_payload_dtype("videos", tensors["videos"])
    elif tensors and set(tensors) == {f"video_{i}" for i in range(len(tensors))}:
        videos = [_check_payload_dtype(f"video_{i}", tensors[f"video_{i}"]) for i in range(len(tensors))]
    else:
        raise ValueError(
            "the payload must hold one tensor `videos` [B, F, 3, H, W] or tensors `video_0` ... `video_{B-1}` "
            f"[F, 3, H, W], got {sorted(tensors)[:8]}."
        )
    _check_kwargs(kwargs)
    return prompts, videos, dict(kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------------------------------


class RemoteRewardError(RewardFunctionError):
    """A call to a reward server failed; ``status_code`` is the HTTP status (``None`` when no answer came)."""

    def __init__(self, message: str, *, reward_name: str, status_code: int | None = None):
        super().__init__(message, reward_name=reward_name)
        self.status_code = status_code


def _timed_out(error: requests.RequestException) -> bool:
    """Whether no answer came within the read timeout (with retries configured, requests reports it as a
    ``ConnectionError`` wrapping urllib3's ``MaxRetryError``)."""
    reason = error.args[0] if error.args else None
    reason = reason.reason if isinstance(reason, MaxRetryError) else reason
    return isinstance(error, requests.ReadTimeout) or isinstance(reason, ReadTimeoutError)


def _detail(response: requests.Response) -> str:
    try:
        return str(response.json()["detail"]).rstrip(".")  # embedded in a sentence below
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


class RemoteReward:
    """A reward function that scores videos on a `trl-arcopo-reward-server`.

    Follows the reward protocol: ``reward(prompts, videos, **kwargs)`` with ``videos`` a floating tensor
    ``[B, F, 3, H, W]`` in ``[0, 1]`` (or a list of ``[F, 3, H, W]`` tensors, passed on as a list to rewards that
    accept one), returning what the served reward returns (``B`` scores or a dict of heads; ``None`` for missing
    or non-finite scores). Keyword arguments that are JSON-serialisable (dataset columns, numbers, strings) are
    forwarded; others (like the trainer's ``trainer_state``) are dropped with a one-time warning.

    Connection errors and ``502``/``503``/``504`` answers are retried ``max_retries`` times with exponential backoff
    (urllib3 ``Retry``; the first retry is immediate, then ``backoff_factor · 2^(n-1)`` seconds, or the server's
    ``Retry-After`` when it is busy); other answers, and answers that do not come within the read timeout (the server
    may be scoring), are not retried. Every failure raises :class:`RemoteRewardError` (a
    :class:`~trl_arcopo.rewards.RewardFunctionError`), so the trainer handles it according to ``reward_error``.

    Example::

        # trl-arcopo-reward-server --reward videoalign --device cuda:1   (token in TRL_ARCOPO_REWARD_TOKEN)
        reward = RemoteReward("http://127.0.0.1:8008", name="videoalign")
        trainer = ARCoPOTrainer(..., reward_funcs=[reward])

    Args:
        url: base URL of the server, e.g. ``"http://127.0.0.1:8008"``.
        token: the server's token; defaults to the ``TRL_ARCOPO_REWARD_TOKEN`` environment variable. Never logged
            nor shown in ``repr``.
        timeout: seconds to wait for the connection and for the answer (one number for both, or a pair
            ``(connect, read)``). Scoring a large batch with a large model takes a while: the read timeout is long.
        max_retries: retries after a connection error or a ``502``/``503``/``504`` answer.
        backoff_factor: base of the exponential backoff between retries, in seconds.
        name: the reward's name in logs and reward columns (:func:`~trl_arcopo.rewards.reward_name`); ``"remote"``
            by default.
        payload_dtype: dtype of the videos on the wire: ``torch.uint8`` (default: ``round(255·x)``, a quarter of the
            bytes of float32 and what a saved video holds; a group of 12 videos of 81x480x832 fits the server's
            default limit; rewards that quantise frames to 8 bits themselves, like VideoAlign, see the same pixels),
            ``torch.float16`` (twice the bytes; scores within the float16 rounding of the inputs) or
            ``torch.float32`` (exact).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float | tuple[float, float] = (10.0, 600.0),
        max_retries: int = 3,
        backoff_factor: float = 0.5,
        name: str | None = None,
        payload_dtype: torch.dtype = torch.uint8,
    ):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"`url` must start with http:// or https://, got {url!r}.")
        if payload_dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"`payload_dtype` must be one of {PAYLOAD_DTYPES}, got {payload_dtype}.")
        if max_retries < 0 or backoff_factor < 0:
            raise ValueError(
                f"`max_retries` and `backoff_factor` must be >= 0, got {max_retries} and {backoff_factor}."
            )
        self.url = url.rstrip("/")
        self.name = name or "remote"
        self.timeout = timeout
        self.max_retries = max_retries
        self.payload_dtype = payload_dtype
        self._dropped_kwargs: set[str] = set()

        retry = Retry(
            total=max_retries,
            connect=max_retries,
            read=0,  # the server may have started scoring: do not score twice
            status=max_retries,
            other=0,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET", "POST"}),  # scoring is idempotent; POST is not retried by default
            backoff_factor=backoff_factor,
            raise_on_status=False,  # give back the last answer: its status becomes a clear error below
        )
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(url={self.url!r}, name={self.name!r}, payload_dtype={self.payload_dtype}, "
            f"timeout={self.timeout}, max_retries={self.max_retries})"
        )

    def _request(self, method: str, path: str, payload: bytes | None = None) -> dict[str, Any]:
        """Send one request; return the JSON answer or raise a :class:`RemoteRewardError` saying what to do."""
        url = f"{self.url}{path}"
        kwargs = {}
        if payload is not None:
            # As a file, which urllib3 sends block by block (and rewinds to retry): `bytes` go in one `sendall`,
            # whose timeout (the connect timeout) would bound the whole upload, seconds for a group of videos.
            kwargs = {"data": io.BytesIO(payload), "headers": {"Content-Type": "application/octet-stream"}}
        try:
            response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            if _timed_out(error):
                read_timeout = self.timeout[1] if isinstance(self.timeout, tuple) else self.timeout
                raise RemoteRewardError(
                    f"the reward server at {url} did not answer within {read_timeout:g} s (the read timeout): it is "
                    "frozen, or scoring takes longer. Check its log; raise `timeout=` for slow rewards.",
                    reward_name=self.name,
                ) from error
            raise RemoteRewardError(
                f"could not reach the reward server at {url} (after {self.max_retries} retries): {error}. "
                "Check that `trl-arcopo-reward-server` runs there.",
                reward_name=self.name,
            ) from error
        if response.ok:
            try:
                return response.json()
            except ValueError:
                raise RemoteRewardError(
                    f"the reward server at {url} answered {response.status_code} with a body that is not JSON: "
                    f"{response.text[:200]!r}",
                    reward_name=self.name,
                    status_code=response.status_code,
                ) from None
        status, detail = response.status_code, _detail(response)
        if status == 401:
            message = (
                f"the reward server at {url} rejected the token (401: {detail}). Pass the server's token as "
                f"`token=` or in the {TOKEN_ENV} environment variable."
            )
        elif status == 413:
            size = len(payload or b"") / 2**20
            message = (
                f"the reward server at {url} refused a payload of {size:.1f} MiB as too large (413: {detail}). "
                "Start the server with a larger `--max_payload_mb`, score smaller batches, or send "
                "`payload_dtype=torch.uint8`."
            )
        elif status == 500:
            message = f"the reward on the server at {url} failed (500): {detail}"
        elif status == 503:
            message = (
                f"the reward server at {url} stayed busy through {self.max_retries} retries (503: {detail}). Raise "
                "`max_retries`, or the server's `--max_concurrent_requests`."
            )
        else:
            message = f"the reward server at {url} answered {status}: {detail}"
        raise RemoteRewardError(message, reward_name=self.name, status_code=status)

    def health(self) -> dict[str, Any]:
        """``GET /health``: the served reward's ``name``, its ``heads`` (``None`` until known) and the ``version``.

        Checks the connection and the token, e.g. before training starts.
        """
        return self._request("GET", "/health")

    def _sendable(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        sendable = {}
        for key, value in kwargs.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError, RecursionError):
                if key not in self._dropped_kwargs:
                    self._dropped_kwargs.add(key)
                    logger.warning(
                        "%s: keyword argument %r (%s) is not JSON-serialisable and is not sent to the reward server.",
                        self.name,
                        key,
                        type(value).__name__,
                    )
                continue
            sendable[key] = value
        return sendable

    def __call__(
        self, prompts: Sequence[str], videos: Videos, **kwargs: Any
    ) -> list[float | None] | dict[str, list[float | None]]:
        """Score ``videos`` (``[B, F, 3, H, W]`` or a list of ``[F, 3, H, W]``, in ``[0, 1]``) on the server.

        Returns:
            ``B`` scores, or ``{head: B scores}``; ``None`` where the served reward gave no finite score.
        """
        payload = encode_score_request(prompts, videos, self._sendable(kwargs), dtype=self.payload_dtype)
        answer = self._request("POST", "/score", payload=payload)
        return answer["scores"] if "scores" in answer else answer["heads"]
