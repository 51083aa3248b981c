"""`trl-arcopo-reward-server`: serve one video reward over HTTP for :class:`~trl_arcopo.rewards.remote.RemoteReward`.

Run the reward in its own environment or on its own GPU::

    export TRL_ARCOPO_REWARD_TOKEN=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    trl-arcopo-reward-server --reward videoalign --device cuda:1 --dtype bfloat16

and score from the trainer with ``RemoteReward("http://127.0.0.1:8008")`` (same ``TRL_ARCOPO_REWARD_TOKEN``).

Endpoints (both require ``Authorization: Bearer <token>`` unless the server runs with ``--no_auth``):

- ``GET /health`` → ``{"name": ..., "heads": [...] | null, "version": ...}`` (``heads`` is known once the reward
  returned a dict of heads);
- ``POST /score`` with the safetensors body described in :mod:`trl_arcopo.rewards.remote` →
  ``{"scores": [...]}`` or ``{"heads": {name: [...]}}`` (``null`` for missing or non-finite scores).
  Errors: ``401`` missing or wrong token, ``413`` payload over the size limit, ``400`` malformed payload (the detail
  names the problem), ``500`` the reward raised or returned malformed scores (the detail gives its message).

Reward calls run one at a time (GPU models are not thread-safe) in a worker thread, so the server keeps answering
(e.g. ``/health``) while a batch is scored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any

import torch

try:
    import uvicorn
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.concurrency import run_in_threadpool
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("The reward server needs fastapi and uvicorn: `pip install 'trl_arcopo[server]'`.") from error

from .. import __version__
from .protocol import normalize_reward_output, reward_name
from .remote import TOKEN_ENV, Videos, decode_score_request

__all__ = ["DEFAULT_MAX_PAYLOAD_MB", "create_app", "main", "serve_in_background"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_MB = 2048
_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
_BEARER = HTTPBearer(auto_error=False)  # parses `Authorization: Bearer <token>`; None when absent


async def _awaited(awaitable: Awaitable) -> Any:
    return await awaitable


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""

    def too_large(size: str) -> HTTPException:
        return HTTPException(
            413,
            detail=f"the payload ({size} bytes) exceeds the limit of {limit} bytes "
            f"(`--max_payload_mb` {limit / 2**20:g}).",
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():  # bodies without Content-Length (chunked) are counted as they arrive
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_scores(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(value) else value for value in values.tolist()]


def create_app(
    reward_fn: Callable,
    *,
    token: str | None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_MB * 2**20,
    name: str | None = None,
    device: str | torch.device | None = None,
) -> FastAPI:
    """The FastAPI app serving ``reward_fn`` (endpoints in the module docstring).

    Args:
        reward_fn: a reward following :mod:`trl_arcopo.rewards.protocol`; it receives float32 videos in ``[0, 1]``:
            a tensor ``[B, F, 3, H, W]``, or a list of ``[F, 3, H, W]`` when the client sent a list.
        token: the secret clients must send as ``Authorization: Bearer <token>`` (compared in constant time);
            ``None`` disables authentication.
        max_payload_bytes: larger request bodies are refused with 413 before they are read.
        name: the name reported by ``/health`` and in error messages; defaults to
            :func:`~trl_arcopo.rewards.reward_name` of ``reward_fn``.
        device: device the videos are moved to before the reward is called (e.g. the reward model's GPU).
    """
    if not callable(reward_fn):
        raise TypeError(f"`reward_fn` must be callable, got {type(reward_fn).__name__}.")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("`token` must be a non-empty string, or None to serve without authentication.")
    if max_payload_bytes <= 0:
        raise ValueError(f"`max_payload_bytes` must be positive, got {max_payload_bytes}.")
    name = name or reward_name(reward_fn)
    expected = token.encode() if token is not None else None
    lock = threading.Lock()
    state: dict[str, list[str] | None] = {"heads": None}

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if expected is None:
            return
        if credentials is None:
            raise HTTPException(
                401, detail="missing token: send the header `Authorization: Bearer <token>`.", headers=_UNAUTHORIZED
            )
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(401, detail="wrong token.", headers=_UNAUTHORIZED)

    def score_batch(prompts: list[str], videos: Videos, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            with lock, torch.no_grad():
                if device is not None:
                    videos = videos.to(device) if isinstance(videos, torch.Tensor) else [v.to(device) for v in videos]
                output = reward_fn(prompts, videos, **kwargs)
                if inspect.isawaitable(output):
                    output = asyncio.run(_awaited(output))  # this worker thread has no running event loop
            columns = normalize_reward_output(output, len(prompts), name)
        except Exception as error:
            logger.exception("Reward %r failed.", name)
            raise HTTPException(500, detail=f"reward '{name}' raised {type(error).__name__}: {error}") from None
        if list(columns) == [""]:
            return {"scores": _json_scores(columns[""])}
        state["heads"] = list(columns)
        return {"heads": {head: _json_scores(values) for head, values in columns.items()}}

    app = FastAPI(
        title=f"trl-arcopo reward server: {name}",
        version=__version__,
        dependencies=[Depends(authorize)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"name": name, "heads": state["heads"], "version": __version__}

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:
        body = await _read_body(request, max_payload_bytes)
        try:
            prompts, videos, kwargs = await run_in_threadpool(decode_score_request, body)
        except ValueError as error:
            raise HTTPException(400, detail=f"malformed payload: {error}") from None
        return await run_in_threadpool(score_batch, prompts, videos, kwargs)

    return app


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread of this process (``port=0``: a free port); yield the base URL.

    For notebooks, tests and benchmarks; the server stops when the ``with`` block ends.
    """
    sock = socket.socket()
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server did not start on {host}:{port}")
            time.sleep(0.005)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-arcopo-reward-server",
        description="Serve a trl_arcopo video reward over HTTP, for `trl_arcopo.rewards.RemoteReward`.",
        epilog=f"Clients authenticate with `Authorization: Bearer <token>`; set the same {TOKEN_ENV} on both sides. "
        "Traffic is plain HTTP unless --ssl_certfile/--ssl_keyfile are given: keep the default loopback --host and "
        "reach remote servers through an SSH tunnel, or use TLS.",
    )
    parser.add_argument(
        "--reward",
        required=True,
        help="The reward to serve: a registered name (e.g. brightness, videoalign, pickscore) or a Hub repo id, "
        "resolved with `trl_arcopo.rewards.load_reward`.",
    )
    parser.add_argument(
        "--reward_kwargs",
        type=_json_object,
        default={},
        help='Keyword arguments for `load_reward`, as a JSON object (e.g. \'{"revision": "main"}\').',
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to listen on (default: %(default)s, local connections only)."
    )
    parser.add_argument("--port", type=int, default=8008, help="Port to listen on (default: %(default)s).")
    parser.add_argument(
        "--token",
        default=None,
        help=f"Secret that clients must send. Defaults to the {TOKEN_ENV} environment variable, which is safer "
        "(command lines are visible to other users of the machine).",
    )
    parser.add_argument(
        "--no_auth",
        action="store_true",
        help="Serve without a token. Anyone who can reach the server can use it: only for trusted networks.",
    )
    parser.add_argument(
        "--max_payload_mb",
        type=float,
        default=DEFAULT_MAX_PAYLOAD_MB,
        help="Largest request body accepted, in MiB; larger ones get 413 (default: %(default)s).",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="Device of the reward (passed to the loader as `device=`) and of the videos given to it, e.g. cuda:0.",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="Dtype of the reward model (passed to the loader as `dtype=`); videos stay float32.",
    )
    parser.add_argument("--name", default=None, help="Name reported by /health (default: the reward's name).")
    parser.add_argument("--ssl_certfile", default=None, help="TLS certificate file (serve HTTPS).")
    parser.add_argument("--ssl_keyfile", default=None, help="TLS private key file (serve HTTPS).")
    parser.add_argument(
        "--log_level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="Log level (default: %(default)s).",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``trl-arcopo-reward-server`` (see ``--help``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.no_auth and token:
        parser.error(f"--no_auth was given together with a token (--token or {TOKEN_ENV}): choose one.")
    if not args.no_auth and not token:
        parser.error(
            f"no token: pass --token or set {TOKEN_ENV} (e.g. to the output of "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"`), '
            "or pass --no_auth to serve without authentication."
        )
    if args.max_payload_mb <= 0:
        parser.error(f"--max_payload_mb must be positive, got {args.max_payload_mb}.")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        parser.error("--ssl_certfile and --ssl_keyfile must be given together.")

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.no_auth:
        logger.warning(
            "Authentication is disabled (--no_auth): anyone who can reach %s:%d can use this server.",
            args.host,
            args.port,
        )
    if not _is_loopback(args.host) and args.ssl_certfile is None:
        logger.warning(
            "Listening on %s over plain HTTP: the token and the videos cross the network unencrypted. "
            "Prefer --host 127.0.0.1 with an SSH tunnel, or pass --ssl_certfile/--ssl_keyfile.",
            args.host,
        )

    from .registry import load_reward

    loader_kwargs = dict(args.reward_kwargs)
    if args.device is not None:
        loader_kwargs["device"] = args.device
    if args.dtype is not None:
        loader_kwargs["dtype"] = getattr(torch, args.dtype)
    reward = load_reward(args.reward, **loader_kwargs)
    app = create_app(
        reward,
        token=token,
        max_payload_bytes=int(args.max_payload_mb * 2**20),
        name=args.name,
        device=args.device,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
