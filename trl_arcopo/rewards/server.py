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
  names the problem), ``408`` the body stalled, ``503`` busy (with ``Retry-After``, which ``RemoteReward`` waits
  for before it retries), ``500`` the reward raised or returned malformed scores (the detail gives its message).

What a client can cost the server is bounded: at most ``max_concurrent_requests`` requests hold a body (of at most
``max_payload_bytes``) at a time, decoded in the payload's dtype (uint8 stays uint8); a request past them is answered
``503`` with ``Retry-After`` at once, its body discarded as it arrives. Reward calls run one at a time (GPU models are
not thread-safe) in a worker thread, which is where the videos become float32, so the server keeps answering (e.g.
``/health``) while a batch is scored. Connections must send their request head within ``timeout_keep_alive`` seconds
(and their body without pausing ``body_timeout`` seconds), an incomplete head is at most 16 KiB, and uvicorn serves at
most ``max_connections`` connections.
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
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import torch

try:
    import h11
    import uvicorn
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.concurrency import run_in_threadpool
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("The reward server needs fastapi and uvicorn: `pip install 'trl_arcopo[server]'`.") from error

from .. import __version__
from ..utils.arguments import ArgumentParser, fail
from .protocol import _validate_video_batch, normalize_reward_output, reward_name
from .remote import TOKEN_ENV, Videos, _check_prompt_strings, decode_score_request, videos_to_float

__all__ = [
    "DEFAULT_MAX_PAYLOAD_MB",
    "MIN_TOKEN_LENGTH",
    "create_app",
    "main",
    "serve_in_background",
    "uvicorn_config",
]

logger = logging.getLogger(__name__)

# One request is one rollout group: 12 videos of 81x480x832 RGB frames are 1111 MiB in uint8 (the client's default
# payload dtype); 1200 MiB leaves 8% for the header and other sizes. float16 needs 2222 MiB: raise the limit.
DEFAULT_MAX_PAYLOAD_MB = 1200
DEFAULT_MAX_CONCURRENT_REQUESTS = 2  # one group scored while the next one arrives
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_TIMEOUT_KEEP_ALIVE = 5  # seconds
DEFAULT_BODY_TIMEOUT = 60  # seconds without a byte of the body
MAX_HEADER_BYTES = 16 * 2**10
MIN_TOKEN_LENGTH = 16
_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
_BEARER = HTTPBearer(auto_error=False)  # parses `Authorization: Bearer <token>`; None when absent


class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head: a connection that has not sent a complete head
    `timeout_keep_alive` seconds after it opened, or after its previous response, is closed. (uvicorn times out idle
    keep-alive connections only, and stops even that at the first byte received, so half-open connections stayed
    open forever.)"""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._close_without_head)

    def _close_without_head(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


async def _awaited(awaitable: Awaitable) -> Any:
    return await awaitable


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and with 408 when no
    part of it arrives for ``timeout`` seconds."""

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
    while True:  # bodies without Content-Length (chunked) are counted as they arrive
        try:
            message = await asyncio.wait_for(request.receive(), timeout)
        except TimeoutError:
            raise HTTPException(408, detail=f"no part of the request body arrived for {timeout:g} s.") from None
        if message["type"] == "http.disconnect":  # nobody reads the answer: a status for the access log
            raise HTTPException(400, detail="the client disconnected before the end of the body.")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise too_large(f"more than {limit}")
        if not message.get("more_body", False):
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
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """The FastAPI app serving ``reward_fn`` (endpoints and limits in the module docstring).

    Args:
        reward_fn: a reward following :mod:`trl_arcopo.rewards.protocol`; it receives float32 videos in ``[0, 1]``:
            a tensor ``[B, F, 3, H, W]``, or a list of ``[F, 3, H, W]`` when the client sent a list.
        token: the secret clients must send as ``Authorization: Bearer <token>`` (compared in constant time), at
            least 16 characters; ``None`` disables authentication.
        max_payload_bytes: larger request bodies are refused with 413 before they are read.
        name: the name reported by ``/health`` and in error messages; defaults to
            :func:`~trl_arcopo.rewards.reward_name` of ``reward_fn``.
        device: device the videos are moved to (in their payload dtype) before they become float32 and the reward is
            called (e.g. the reward model's GPU).
        max_concurrent_requests: ``/score`` requests that may hold a body at a time (being read, decoded, waiting
            for or in the reward call); past them, 503 with ``Retry-After``.
        body_timeout: seconds a request body may pause before the request is answered 408.
    """
    if not callable(reward_fn):
        raise TypeError(f"`reward_fn` must be callable, got {type(reward_fn).__name__}.")
    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH):
        raise ValueError(
            f"`token` must be a string of at least {MIN_TOKEN_LENGTH} characters (e.g. "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"`), or None to serve without '
            "authentication."
        )
    for argument, value in [
        ("max_payload_bytes", max_payload_bytes),
        ("max_concurrent_requests", max_concurrent_requests),
        ("body_timeout", body_timeout),
    ]:
        if not value > 0:
            raise ValueError(f"`{argument}` must be positive, got {value}.")
    name = name or reward_name(reward_fn)
    expected = token.encode() if token is not None else None
    reward_lock = threading.Lock()
    slots = asyncio.Semaphore(max_concurrent_requests)
    state: dict[str, Any] = {"heads": None, "seconds": 1.0}  # seconds: of the last /score request

    async def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if expected is None:
            return
        if credentials is None:
            raise HTTPException(
                401, detail="missing token: send the header `Authorization: Bearer <token>`.", headers=_UNAUTHORIZED
            )
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(401, detail="wrong token.", headers=_UNAUTHORIZED)

    def score_batch(prompts: list[str], videos: Videos, kwargs: dict[str, Any]) -> dict[str, Any]:
        with reward_lock, torch.no_grad():  # one reward call, and one float copy of the videos, at a time
            try:
                videos = videos_to_float(videos, device)
                _check_prompt_strings(prompts, _validate_video_batch(videos))
            except ValueError as error:
                raise HTTPException(400, detail=f"malformed payload: {error}") from None
            try:
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
        if slots.locked():  # answered before the body is read: uvicorn discards it as it arrives
            raise HTTPException(
                503,
                detail=f"busy: {max_concurrent_requests} request(s) already being scored "
                "(`--max_concurrent_requests`); retry later.",
                headers={"Retry-After": str(max(1, math.ceil(state["seconds"])))},
            )
        await slots.acquire()  # free: acquired at once
        try:
            started = time.monotonic()
            body = await _read_body(request, max_payload_bytes, body_timeout)
            try:
                payload = await run_in_threadpool(decode_score_request, body)
            except ValueError as error:
                raise HTTPException(400, detail=f"malformed payload: {error}") from None
            del body  # the decoded tensors are a copy: hold one of them only
            answer = await run_in_threadpool(score_batch, *payload)
            state["seconds"] = time.monotonic() - started
            return answer
        finally:
            slots.release()

    return app


# --------------------------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------------------------


def uvicorn_config(
    app: FastAPI,
    *,
    timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    **kwargs: Any,
) -> uvicorn.Config:
    """The uvicorn configuration of the reward server: its h11 protocol closes connections that send no complete
    request head within ``timeout_keep_alive`` seconds (also the idle time of a kept-alive connection); headers are at
    most 16 KiB; past ``max_connections`` connections (or requests), uvicorn answers 503. ``kwargs`` go to
    ``uvicorn.Config`` (``log_level``, ``ssl_certfile``, ...)."""
    return uvicorn.Config(
        app,
        http=_H11Protocol,
        timeout_keep_alive=timeout_keep_alive,
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        **kwargs,
    )


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread of this process (``port=0``: a free port); yield the base URL.

    For notebooks, tests and benchmarks; the server stops when the ``with`` block ends. ``options`` go to
    :func:`uvicorn_config` (e.g. ``timeout_keep_alive``, ``max_connections``).
    """
    sock = socket.socket()
    sock.bind((host, port))
    port = sock.getsockname()[1]
    options = {"log_config": None, "log_level": "warning", "lifespan": "off", "host": host, "port": port, **options}
    server = uvicorn.Server(uvicorn_config(app, **options))
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


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return int(text)


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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
    parser.add_argument("--port", type=_port, default=8008, help="Port to listen on (default: %(default)s).")
    parser.add_argument(
        "--token",
        default=None,
        help=f"Secret that clients must send, at least {MIN_TOKEN_LENGTH} characters. Defaults to the {TOKEN_ENV} "
        "environment variable, which is safer (command lines are visible to other users of the machine).",
    )
    parser.add_argument(
        "--no_auth",
        action="store_true",
        help="Serve without a token: anyone who can reach the server can use it. Only on a loopback --host, unless "
        "--allow_unauthenticated_remote is given too.",
    )
    parser.add_argument(
        "--allow_unauthenticated_remote",
        action="store_true",
        help="Allow --no_auth on a --host other networks can reach (a trusted network only).",
    )
    limits = parser.add_argument_group("limits (what one client can cost the server)")
    limits.add_argument(
        "--max_payload_mb",
        type=_positive(float),
        default=DEFAULT_MAX_PAYLOAD_MB,
        help="Largest request body accepted, in MiB; larger ones get 413 (default: %(default)s, one group of 12 "
        "videos of 81x480x832 in uint8, RemoteReward's default payload dtype; float16 needs 2300).",
    )
    limits.add_argument(
        "--max_concurrent_requests",
        type=_positive(int),
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        help="Requests holding a body at a time, more get 503 with Retry-After (default: %(default)s). The server's "
        "memory is about this times twice the payload, plus the float32 copy of the one being scored.",
    )
    limits.add_argument(
        "--max_connections",
        type=_positive(int),
        default=DEFAULT_MAX_CONNECTIONS,
        help="Open connections (uvicorn's limit_concurrency); more requests get 503 (default: %(default)s).",
    )
    limits.add_argument(
        "--timeout_keep_alive",
        type=_positive(float),
        default=DEFAULT_TIMEOUT_KEEP_ALIVE,
        help="Seconds a connection may take to send its request head, or stay idle between requests "
        "(default: %(default)s).",
    )
    limits.add_argument(
        "--body_timeout",
        type=_positive(float),
        default=DEFAULT_BODY_TIMEOUT,
        help="Seconds a request body may pause before the request is answered 408 (default: %(default)s).",
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


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The token (None with `--no_auth`), after the checks that need no model: every mistake is one line."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.no_auth and token:
        parser.error(f"--no_auth was given together with a token (--token or {TOKEN_ENV}): choose one.")
    if not args.no_auth and not token:
        parser.error(
            f"no token: pass --token or set {TOKEN_ENV} (e.g. to the output of "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"`), '
            "or pass --no_auth to serve without authentication."
        )
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        parser.error(
            f"the token has {len(token)} characters: use at least {MIN_TOKEN_LENGTH} (e.g. "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"`).'
        )
    if args.no_auth and not _is_loopback(args.host) and not args.allow_unauthenticated_remote:
        parser.error(
            f"--no_auth on --host {args.host} lets anyone who can reach it use the server: set a token, listen on "
            "127.0.0.1, or add --allow_unauthenticated_remote on a trusted network."
        )
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        parser.error("--ssl_certfile and --ssl_keyfile must be given together.")
    if args.ssl_certfile is not None:
        for flag, path in (("--ssl_certfile", args.ssl_certfile), ("--ssl_keyfile", args.ssl_keyfile)):
            if not Path(path).is_file():
                parser.error(f"{flag} {path}: no such file.")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        except (ssl.SSLError, OSError) as error:
            parser.error(f"--ssl_certfile {args.ssl_certfile} / --ssl_keyfile {args.ssl_keyfile}: {error}.")
    from .registry import check_reward_name

    try:
        check_reward_name(args.reward)
    except ValueError as error:
        parser.error(f"--reward: {error}")
    return token


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` (before the reward loads: a busy port fails at once)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        fail(f"cannot listen on {host}:{port}: {error}")
    return sock


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``trl-arcopo-reward-server`` (see ``--help``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    token = _check_args(parser, args)
    sock = _listen(args.host, args.port)

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
    try:
        reward = load_reward(args.reward, **loader_kwargs)
    except (OSError, ValueError, ImportError, TypeError) as error:  # not found (offline?), bad options
        sock.close()
        fail(f"cannot load the reward {args.reward!r}: {error}")
    app = create_app(
        reward,
        token=token,
        max_payload_bytes=int(args.max_payload_mb * 2**20),
        name=args.name,
        device=args.device,
        max_concurrent_requests=args.max_concurrent_requests,
        body_timeout=args.body_timeout,
    )
    config = uvicorn_config(
        app,
        host=args.host,
        port=args.port,
        timeout_keep_alive=args.timeout_keep_alive,
        max_connections=args.max_connections,
        log_level=args.log_level,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    uvicorn.Server(config).run(sockets=[sock])
