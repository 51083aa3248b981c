"""Remote rewards: the real `trl-arcopo-reward-server` app under uvicorn on 127.0.0.1, scored by `RemoteReward`."""

import contextlib
import functools
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
import safetensors.torch
import torch
import urllib3.util.connection
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from trl_arcopo.rewards import RewardFunctionError, brightness_reward, compute_rewards, reward_name
from trl_arcopo.rewards import server as server_module
from trl_arcopo.rewards.remote import (
    TOKEN_ENV,
    RemoteReward,
    RemoteRewardError,
    decode_score_request,
    encode_score_request,
    videos_to_float,
)
from trl_arcopo.rewards.server import create_app, main, serve_in_background

TOKEN = "test-secret-token"
PROMPTS = ["a cat", "a dog", "a boat"]


@pytest.fixture
def start_server() -> Iterator[Callable[..., str]]:
    """``start_server(reward_fn, **create_app_and_server_options) -> url``; every server is stopped at the end of the
    test."""
    with contextlib.ExitStack() as stack:

        def start(reward_fn: Callable, **kwargs) -> str:
            kwargs.setdefault("token", TOKEN)
            options = {key: kwargs.pop(key) for key in ("timeout_keep_alive", "max_connections") if key in kwargs}
            return stack.enter_context(serve_in_background(create_app(reward_fn, **kwargs), **options))

        yield start


@pytest.fixture(scope="module")
def brightness_url() -> Iterator[str]:
    with serve_in_background(create_app(brightness_reward, token=TOKEN, max_payload_bytes=64 * 2**10)) as url:
        yield url


@pytest.fixture
def videos() -> torch.Tensor:
    return torch.rand(3, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _post(url: str, data: bytes, token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.post(f"{url}/score", data=data, headers=headers, timeout=10, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Scores: parity with in-process scoring
# --------------------------------------------------------------------------------------------------------------------


def test_float32_payload_scores_equal_in_process(brightness_url, videos):
    remote = RemoteReward(brightness_url, TOKEN, payload_dtype=torch.float32)
    assert remote(PROMPTS, videos) == brightness_reward(PROMPTS, videos)
    # Through the protocol's collector, under the client's name.
    columns = compute_rewards([remote], PROMPTS, videos)
    assert list(columns) == ["remote"]
    torch.testing.assert_close(
        columns["remote"], torch.tensor(brightness_reward(PROMPTS, videos), dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("dtype", "wire_values"),
    [
        (torch.float16, lambda x: x.half().float()),
        # uint8 carries round(255 · x); the server maps v back to v / 255.
        (torch.uint8, lambda x: (x * 255).round().clamp(0, 255).to(torch.uint8).float() / 255),
    ],
)
def test_reduced_payload_dtypes(brightness_url, videos, dtype, wire_values):
    remote = RemoteReward(brightness_url, TOKEN, payload_dtype=dtype)
    scores = remote(PROMPTS, videos)
    # Exactly the in-process scores of the values that went over the wire ...
    assert scores == brightness_reward(PROMPTS, wire_values(videos))
    # ... hence close to the scores of the original videos.
    torch.testing.assert_close(
        torch.tensor(scores), torch.tensor(brightness_reward(PROMPTS, videos)), atol=2e-3, rtol=0
    )


def test_heads_none_and_kwargs_round_trip(start_server, videos, caplog):
    def heads_reward(prompts, videos, *, weight, **kwargs):
        means = videos.mean(dim=(1, 2, 3, 4)).tolist()
        return {
            "mean": means,
            "weighted": [w * m for w, m in zip(weight, means, strict=True)],
            "prompt_length": [len(p) for p in prompts],
            "partial": [None, math.nan, 1.5],
            "num_kwargs": [len(kwargs)] * len(prompts),
        }

    remote = RemoteReward(start_server(heads_reward), TOKEN, payload_dtype=torch.float32, name="judge")
    weight = [0.5, 2.0, -1.0]
    with caplog.at_level(logging.WARNING, logger="trl_arcopo.rewards.remote"):
        heads = remote(PROMPTS, videos, weight=weight, source=["a", "b", "c"], trainer_state=object())
        remote(PROMPTS, videos, weight=weight, trainer_state=object())
    expected = heads_reward(PROMPTS, videos, weight=weight, source=["a", "b", "c"])
    expected["partial"] = [None, None, 1.5]  # None and non-finite scores both come back as null
    assert heads == expected  # `trainer_state` is not JSON-serialisable: not sent, so the reward saw only `source`
    assert [r.getMessage() for r in caplog.records].count(
        "judge: keyword argument 'trainer_state' (object) is not JSON-serialisable and is not sent to the reward "
        "server."
    ) == 1  # warned once, not at every call
    assert remote.health() == {
        "name": "heads_reward",
        "heads": ["mean", "weighted", "prompt_length", "partial", "num_kwargs"],
        "version": "0.1.0.dev0",
    }

    columns = compute_rewards([remote], PROMPTS, videos, reward_kwargs={"weight": weight})
    assert list(columns) == [f"judge:{head}" for head in expected]
    assert torch.isnan(columns["judge:partial"][:2]).all() and columns["judge:partial"][2] == 1.5


def test_list_of_different_size_videos(start_server):
    def per_video_reward(prompts, videos, **kwargs):
        return {
            "is_list": [float(isinstance(videos, list))] * len(prompts),
            "pixels": [float(v[0, 0].numel()) for v in videos],
            "mean": [float(v.mean()) for v in videos],
        }

    generator = torch.Generator().manual_seed(1)
    clips = [torch.rand(2, 3, 8, 8, generator=generator), torch.rand(3, 3, 4, 6, generator=generator)]
    remote = RemoteReward(start_server(per_video_reward), TOKEN, payload_dtype=torch.float32)
    assert remote(PROMPTS[:2], clips) == per_video_reward(PROMPTS[:2], clips)
    assert remote(PROMPTS[:2], clips)["pixels"] == [64.0, 24.0]


def test_wire_format_round_trip(videos):
    clips = [videos[0], videos[1, :1, :, :4]]
    prompts, decoded, kwargs = decode_score_request(
        encode_score_request(PROMPTS[:2], clips, {"fps": [16, 8]}, dtype=torch.float32)
    )
    assert prompts == PROMPTS[:2] and kwargs == {"fps": [16, 8]}
    assert isinstance(decoded, list) and all(d.equal(c) for d, c in zip(decoded, clips, strict=True))
    # The server keeps the payload's dtype (uint8 by default) until the reward needs floats.
    _, decoded, kwargs = decode_score_request(encode_score_request(PROMPTS, videos))
    assert kwargs == {} and decoded.dtype == torch.uint8
    assert decoded.equal((videos * 255).round().to(torch.uint8))
    assert videos_to_float(decoded).equal(decoded.float() / 255) and videos_to_float(decoded).dtype == torch.float32
    _, decoded, _ = decode_score_request(encode_score_request(PROMPTS, videos, dtype=torch.float16))
    assert decoded.dtype == torch.float16 and videos_to_float(decoded).equal(videos.half().float())


def test_reward_calls_are_serialised_and_off_the_event_loop(start_server, videos):
    entered, release = threading.Event(), threading.Event()
    active, max_active = [0], [0]
    lock = threading.Lock()

    def slow_reward(prompts, videos, **kwargs):
        with lock:
            active[0] += 1
            max_active[0] = max(max_active[0], active[0])
        entered.set()
        release.wait(timeout=10)
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return [1.0] * len(prompts)

    remote = RemoteReward(start_server(slow_reward), TOKEN)
    results = []
    threads = [threading.Thread(target=lambda: results.append(remote(PROMPTS, videos))) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert entered.wait(timeout=10)
    assert remote.health()["name"] == "slow_reward"  # answered while a reward call blocks
    release.set()
    for thread in threads:
        thread.join(timeout=10)
    assert results == [[1.0] * 3] * 3
    assert max_active[0] == 1


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def test_wrong_or_missing_token_is_401(brightness_url, videos, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for token in ("wrong-token", None):
        remote = RemoteReward(brightness_url, token)
        with pytest.raises(RemoteRewardError, match="rejected the token") as info:
            remote(PROMPTS, videos)
        assert info.value.status_code == 401 and TOKEN_ENV in str(info.value)
        with pytest.raises(RemoteRewardError, match="rejected the token"):
            remote.health()
    payload = encode_score_request(PROMPTS, videos)
    missing, wrong = _post(brightness_url, payload, token=None), _post(brightness_url, payload, token="nope")
    assert (missing.status_code, missing.json()["detail"]) == (
        401,
        "missing token: send the header `Authorization: Bearer <token>`.",
    )
    assert (wrong.status_code, wrong.json()["detail"]) == (401, "wrong token.")
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    # The token comes from the environment by default and never shows in repr.
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    remote = RemoteReward(brightness_url)
    assert remote(PROMPTS, videos) == RemoteReward(brightness_url, TOKEN)(PROMPTS, videos)
    assert TOKEN not in repr(remote) and reward_name(remote) == "remote"


def test_oversized_payload_is_413(brightness_url):
    big = torch.rand(4, 8, 3, 32, 32)  # 192 KiB in float16, the server accepts 64 KiB
    with pytest.raises(RemoteRewardError, match="--max_payload_mb") as info:
        RemoteReward(brightness_url, TOKEN)(["p"] * 4, big)
    assert info.value.status_code == 413 and "score smaller batches" in str(info.value)
    # Without Content-Length (chunked upload) the server counts the bytes as they arrive.
    payload = encode_score_request(["p"] * 4, big)
    chunked = _post(brightness_url, (payload[i : i + 8192] for i in range(0, len(payload), 8192)))
    assert chunked.status_code == 413 and "exceeds the limit of 65536 bytes" in chunked.json()["detail"]
    # The server keeps serving.
    assert RemoteReward(brightness_url, TOKEN)(["p"], big[:1, :1, :, :4, :4]) is not None


def test_server_down_retries_then_clear_error(start_server, videos, monkeypatch):
    url = start_server(brightness_reward)
    remote = RemoteReward(url, TOKEN, max_retries=3, backoff_factor=0.01)
    assert remote(PROMPTS, videos) == brightness_reward(PROMPTS, (videos * 255).round() / 255)  # uint8 by default

    with serve_in_background(create_app(brightness_reward, token=TOKEN)) as stopped_url:
        pass  # a port where a server ran and stopped: connections are refused
    remote = RemoteReward(stopped_url, TOKEN, max_retries=3, backoff_factor=0.01)
    attempts = []
    create_connection = urllib3.util.connection.create_connection

    def counting_create_connection(*args, **kwargs):
        attempts.append(args[0])
        return create_connection(*args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counting_create_connection)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match=f"could not reach the reward server at {stopped_url}/score") as info:
        remote(PROMPTS, videos)
    assert len(attempts) == 4  # the first try and 3 retries
    assert time.monotonic() - start >= 0.01 * (2 + 4)  # backoff: 0, 2·0.01, 4·0.01 s
    assert info.value.status_code is None and isinstance(info.value, RewardFunctionError)
    # The trainer sees a RewardFunctionError naming the reward (and follows `reward_error`).
    with pytest.raises(RewardFunctionError, match="reward 'remote' raised RemoteRewardError: could not reach"):
        compute_rewards([remote], PROMPTS, videos)


@pytest.mark.parametrize(("status", "calls"), [(503, 4), (400, 1), (404, 1)])
def test_retries_only_gateway_errors(start_server, status, calls):
    """5xx gateway answers are retried (POST included); client errors are not."""
    count = [0]
    app = FastAPI()

    @app.post("/score")
    async def score():
        count[0] += 1
        return JSONResponse({"detail": f"status {status}"}, status_code=status)

    with serve_in_background(app) as url:
        with pytest.raises(RemoteRewardError, match=f"{status}: status {status}") as info:
            RemoteReward(url, TOKEN, max_retries=3, backoff_factor=0)(["p"], torch.rand(1, 1, 3, 2, 2))
    assert info.value.status_code == status and count[0] == calls


def test_retry_then_success(start_server):
    count = [0]
    app = FastAPI()

    @app.post("/score")
    async def score():
        count[0] += 1
        return {"scores": [0.25]} if count[0] == 3 else JSONResponse({"detail": "busy"}, status_code=502)

    with serve_in_background(app) as url:
        assert RemoteReward(url, TOKEN, backoff_factor=0)(["p"], torch.rand(1, 1, 3, 2, 2)) == [0.25]
    assert count[0] == 3


def _payload(tensors: dict, metadata: dict | None = None) -> bytes:
    metadata = {"prompts": json.dumps(["p"]), **(metadata or {})}
    return safetensors.torch.save(tensors, metadata={k: v for k, v in metadata.items() if v is not None})


VIDEO = torch.rand(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"definitely not safetensors", "not a valid safetensors payload"),
        (_payload({"videos": VIDEO}, {"prompts": None}), "no `prompts` entry"),
        (_payload({"videos": VIDEO}, {"prompts": "[oops"}), "`prompts` is not valid JSON"),
        (_payload({"videos": VIDEO}, {"prompts": json.dumps(["p", "q"])}), "got 2 prompts for 1 videos"),
        (_payload({"videos": VIDEO}, {"kwargs": "[1, 2]"}), "must be a JSON object"),
        (_payload({"videos": VIDEO}, {"kwargs": json.dumps({"videos": 1})}), "must not contain ['videos']"),
        (_payload({"frames": VIDEO}), "one tensor `videos`"),
        (_payload({"video_0": VIDEO[0], "video_2": VIDEO[0].clone()}), "got ['video_0', 'video_2']"),
        (_payload({"videos": VIDEO.double()}), "dtype torch.float64"),
        (_payload({"videos": VIDEO[0]}), "rank 4"),
        (_payload({"videos": VIDEO * 2}), "values in [0"),
        (_payload({"video_0": VIDEO}), "`videos[0]` must be a floating tensor [F, 3, H, W]"),
    ],
    ids=lambda value: value if isinstance(value, str) else "payload",  # bytes make unstable test ids
)
def test_malformed_payload_is_400(brightness_url, body, message):
    response = _post(brightness_url, body)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("malformed payload: ") and message in response.json()["detail"]


def test_reward_exception_is_500(start_server, videos):
    def failing_reward(prompts, videos, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    def short_reward(prompts, videos, **kwargs):
        return [1.0]

    for reward, message in [
        (failing_reward, "reward 'failing_reward' raised RuntimeError: CUDA out of memory (simulated)"),
        (short_reward, "returned 1 values for a batch of 3 videos"),
    ]:
        remote = RemoteReward(start_server(reward), TOKEN)
        with pytest.raises(RemoteRewardError, match=r"failed \(500\)") as info:
            remote(PROMPTS, videos)
        assert message in str(info.value) and TOKEN not in str(info.value) and info.value.status_code == 500


def test_client_checks_input_before_sending(videos):
    remote = RemoteReward("http://127.0.0.1:9", TOKEN, max_retries=0)  # nothing listens on the discard port
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        remote(PROMPTS, videos * 2)
    with pytest.raises(ValueError, match="got 2 prompts for 3 videos"):
        remote(PROMPTS[:2], videos)
    with pytest.raises(
        ValueError, match=r"`videos\[1\]` must be a floating tensor \[F, 3, H, W\], got shape \(3, 4\)"
    ):
        remote(PROMPTS[:2], [videos[0], torch.rand(3, 4)])
    with pytest.raises(ValueError, match="must not contain"):
        encode_score_request(PROMPTS, videos, {"videos": 1})
    with pytest.raises(ValueError, match="`url` must start with http"):
        RemoteReward("127.0.0.1:8008")
    with pytest.raises(ValueError, match="`payload_dtype` must be one of"):
        RemoteReward("http://127.0.0.1:8008", payload_dtype=torch.bfloat16)
    for short in ("", "short-token"):
        with pytest.raises(ValueError, match="`token` must be a string of at least 16 characters"):
            create_app(brightness_reward, token=short)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def test_main_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--reward ",
        "--reward_kwargs",
        "--host",
        "--port",
        "--token",
        "--no_auth",
        "--max_payload_mb",
        "--device",
        "--dtype",
        "--ssl_certfile",
        TOKEN_ENV,
        "127.0.0.1",
        "8008",
    ):
        assert option in text, option


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--reward", "brightness"], None, f"no token: pass --token or set {TOKEN_ENV}"),
        (["--reward", "brightness", "--no_auth"], TOKEN, "--no_auth was given together with a token"),
        (["--reward", "brightness", "--reward_kwargs", "[1]"], TOKEN, "must be a JSON object"),
        (["--reward", "brightness", "--max_payload_mb", "0"], TOKEN, "--max_payload_mb: must be a positive float"),
        (["--reward", "brightness"], "short-token", "the token has 11 characters: use at least 16"),
        (["--reward", "brightness", "--token", "0123456789"], None, "the token has 10 characters"),
        (["--reward", "brightness", "--no_auth", "--host", "0.0.0.0"], None, "--no_auth on --host 0.0.0.0 lets"),
        (["--reward", "brightnes"], TOKEN, "--reward: Unknown reward 'brightnes'. Did you mean 'brightness'?"),
        (["--reward", "brightness", "--port", "70000"], TOKEN, "a port is a number from 1 to 65535, got '70000'"),
        (
            ["--reward", "brightness", "--ssl_certfile", "/nonexistent/cert.pem", "--ssl_keyfile", "/nonexistent/k"],
            TOKEN,
            "--ssl_certfile /nonexistent/cert.pem: no such file.",
        ),
        (["--reward", "brightness", "--max_concurrent_requests", "0"], TOKEN, "must be a positive int, got '0'"),
        (["--reward", "brightness", "--max_pay", "1"], TOKEN, "unrecognized arguments: --max_pay 1"),
    ],
)
def test_main_refuses_bad_setups_in_one_line(monkeypatch, capsys, argv, env, message):
    if env is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, env)
    with pytest.raises(SystemExit) as info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_start_up_failures_are_one_line(tmp_path, free_port, monkeypatch, capsys):
    """A model that is not in the (offline) cache and a busy port were tracebacks."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    cache = json.dumps({"cache_dir": str(tmp_path / "empty-cache")})  # HF_HUB_OFFLINE=1
    argv = ["--reward", "pickscore", "--reward_kwargs", cache, "--port", str(free_port)]
    with pytest.raises(SystemExit) as info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot load the reward 'pickscore'")
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port))
        busy.listen()
        with pytest.raises(SystemExit) as info:
            main(["--reward", "brightness", "--port", str(free_port)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and lines == [
        f"error: cannot listen on 127.0.0.1:{free_port}: [Errno 98] Address already in use"
    ]


def _configured_by_main(argv: list[str]) -> uvicorn.Config:
    """The uvicorn config `main(argv)` serves (`uvicorn.Server.run` replaced; the socket `main` bound is closed)."""
    configs = []

    def run(server, sockets=None):
        configs.append(server.config)
        for sock in sockets or []:
            sock.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uvicorn.Server, "run", run)
        main(argv)
    (config,) = configs
    return config


def test_main_serves_the_loaded_reward(monkeypatch, caplog, videos, free_port):
    """`main` wiring: the real registry (a built-in takes `--device` and `--dtype`), token, limits, uvicorn settings."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = _configured_by_main(
        ["--reward", "brightness", "--device", "cpu", "--dtype", "bfloat16", "--port", str(free_port)]
        + ["--max_payload_mb", "0.0625", "--name", "bright", "--timeout_keep_alive", "3", "--max_connections", "9"]
    )
    assert (config.host, config.port, config.ssl_certfile, config.log_level) == ("127.0.0.1", free_port, None, "info")
    assert (config.timeout_keep_alive, config.limit_concurrency, config.h11_max_incomplete_event_size) == (3, 9, 16384)
    with serve_in_background(config.app) as url:
        remote = RemoteReward(url, TOKEN, payload_dtype=torch.float32)
        assert remote(PROMPTS, videos) == brightness_reward(PROMPTS, videos)
        assert remote.health()["name"] == "bright"
        with pytest.raises(RemoteRewardError, match="rejected the token"):
            RemoteReward(url, "wrong").health()
        with pytest.raises(RemoteRewardError, match="--max_payload_mb"):
            remote(["p"] * 4, torch.rand(4, 8, 3, 32, 32))

    monkeypatch.delenv(TOKEN_ENV)
    with caplog.at_level(logging.WARNING, logger="trl_arcopo.rewards.server"):
        argv = ["--reward", "brightness", "--no_auth", "--host", "0.0.0.0", "--allow_unauthenticated_remote"]
        config = _configured_by_main([*argv, "--port", str(free_port)])
    assert "Authentication is disabled (--no_auth)" in caplog.text and "plain HTTP" in caplog.text
    with serve_in_background(config.app) as url:
        assert RemoteReward(url).health()["name"] == "brightness_reward"


# --------------------------------------------------------------------------------------------------------------------
# Abuse: what one client can cost the server
# --------------------------------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_400(brightness_url):
    nested = "[" * 10_000 + "]" * 10_000
    for metadata, entry in [({"prompts": nested}, "prompts"), ({"kwargs": '{"a": ' + nested + "}"}, "kwargs")]:
        response = _post(brightness_url, _payload({"videos": VIDEO}, metadata))
        assert response.status_code == 400, response.text  # was 500 with a RecursionError traceback
        assert (
            response.json()["detail"]
            == f"malformed payload: the payload metadata entry `{entry}` is nested too deeply."
        )
    deep = json.loads("[" * 500 + "]" * 500)
    with pytest.raises(ValueError, match="must be JSON-serialisable"):
        encode_score_request(["p"], VIDEO, {"a": functools.reduce(lambda x, _: [x], range(5000), deep)})


def test_a_frozen_server_is_reported_as_such():
    """A server that accepts the request but never answers: the read timeout, not "could not reach"."""
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen()  # connections complete in the backlog; nothing ever answers
        url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        with pytest.raises(
            RemoteRewardError, match=r"did not answer within 0\.5 s \(the read timeout\): it is frozen"
        ):
            RemoteReward(url, TOKEN, timeout=(5, 0.5), max_retries=1)(["p"], VIDEO)


def test_requests_past_the_limit_get_503_with_retry_after(start_server, monkeypatch):
    """At most `max_concurrent_requests` requests hold (and decode) a body; the next one is answered 503 with
    `Retry-After` before its body is read, and `RemoteReward` waits that long before it retries."""
    entered, release = threading.Event(), threading.Event()
    decoded = []

    def blocking_reward(prompts, videos, **kwargs):
        assert videos.dtype == torch.float32  # uint8 on the wire, float32 for the reward only
        entered.set()
        release.wait(timeout=20)
        return [1.0] * len(prompts)

    def counting_decode(body):
        decoded.append(len(body))
        return decode_score_request(body)

    monkeypatch.setattr(server_module, "decode_score_request", counting_decode)
    url = start_server(blocking_reward, max_concurrent_requests=1)
    payload = encode_score_request(["p"], VIDEO)
    answers = []
    first = threading.Thread(target=lambda: answers.append(_post(url, payload).status_code))
    first.start()
    assert entered.wait(timeout=10)
    busy = _post(url, payload)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert (
        busy.json()["detail"] == "busy: 1 request(s) already being scored (`--max_concurrent_requests`); retry later."
    )
    assert len(decoded) == 1  # the refused body was not decoded
    threading.Timer(0.5, release.set).start()
    start = time.monotonic()
    assert RemoteReward(url, TOKEN, max_retries=3, backoff_factor=0)(["p"], VIDEO) == [1.0]  # retried after 1 s
    assert time.monotonic() - start >= 1
    first.join(timeout=10)
    assert answers == [200] and len(decoded) == 2


def _read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_half_open_connections_are_closed(start_server):
    """40 connections that send nothing or an incomplete head were kept open forever; they are closed after
    `timeout_keep_alive` seconds, and the server keeps serving."""
    url = start_server(brightness_reward, timeout_keep_alive=0.5, max_connections=100)
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
    connections = [socket.create_connection(address) for _ in range(40)]
    for sock in connections[::2]:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")  # the head never completes
    start = time.monotonic()
    assert all(_read_answer(sock) == b"" for sock in connections)  # closed by the server
    assert time.monotonic() - start < 5
    for sock in connections:
        sock.close()
    assert RemoteReward(url, TOKEN).health()["name"] == "brightness_reward"


def test_stalled_bodies_oversized_headers_and_too_many_connections(start_server):
    url = start_server(brightness_reward, body_timeout=0.5, max_connections=4)
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(address) as sock:
        sock.sendall(head.encode() + b"x" * 10)  # then nothing
        answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"no part of the request body arrived for 0.5 s" in answer
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 32 * 2**10)  # still incomplete
        assert _read_answer(sock).startswith(b"HTTP/1.1 400 ")  # over the 16 KiB limit of an incomplete head
    sessions = [requests.Session() for _ in range(3)]  # each keeps its connection open
    for session in sessions:
        assert session.get(f"{url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).ok
    assert requests.get(f"{url}/health", timeout=10).status_code == 503  # the 4th connection: `limit_concurrency`
    for session in sessions:
        session.close()


def test_an_upload_may_take_longer_than_the_connect_timeout():
    """A group of videos over a slow link: the body was sent with one `sendall`, which the connect timeout (10 s by
    default) bounded as a whole; it is sent block by block, each under it."""
    answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"scores": [1]}'
    received = []

    def slow_server(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(1)
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
            size = 0
            while size < length:  # 256 KiB every 20 ms: about 1.3 s for 16 MiB
                size += len(connection.recv(min(256 * 2**10, length - size)))
                time.sleep(0.02)
            received.append(size)
            connection.sendall(answer)

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 2**10)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        thread = threading.Thread(target=slow_server, args=(listener,), daemon=True)
        thread.start()
        videos = torch.rand(4, 16, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # 12 MiB in uint8
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        assert RemoteReward(url, TOKEN, timeout=(0.3, 30), max_retries=0)(["p"] * 4, videos) == [1]
        thread.join(timeout=30)
    assert received and received[0] > 12 * 2**20 and time.monotonic() - start > 0.3
