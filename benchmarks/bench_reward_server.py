"""Load test of `trl-arcopo-reward-server` on loopback: N clients x M requests of one rollout group each.

The server runs as its own process (`trl-arcopo-reward-server --reward brightness`, a cheap reward, so that the
figures measure the server: receiving, decoding, the float32 copy, answering), with its default limits unless
overridden. Each client sends the same uint8 payload (`RemoteReward`'s default wire format) of a group
``[G, F, 3, H, W]`` through the HTTP session of a `RemoteReward` (its retries: a busy server's 503 is retried after
its `Retry-After`) and counts its answers; the server's peak RSS (``VmHWM``) is read from ``/proc`` (Linux).

    python benchmarks/bench_reward_server.py                               # a real group: 12 x 81 x 480 x 832
    python benchmarks/bench_reward_server.py --clients 4 --requests 3 --height 240 --width 416

Printed: the payload size, the server's RSS at rest and at its peak (and the peak over the payload size), the
latency of each request, retries included (p50, p99, max), the 503 answers that were retried and the errors. A real group needs about 1.1 GiB per
client for its payload and about 9 x the payload in the server (the float32 copy and the reward's own temporaries):
check `free -g` first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests
import safetensors.torch
import torch

from trl_arcopo.rewards.remote import RemoteReward


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_gib(pid: int, field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak) of process `pid`, in GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def group_payload(num_videos: int, frames: int, height: int, width: int) -> bytes:
    """The body of one `POST /score`: a random uint8 group ``[G, F, 3, H, W]`` and its prompts (the wire format of
    `trl_arcopo.rewards.remote`, built directly: `encode_score_request` would need the float videos, 4x the size)."""
    videos = torch.randint(0, 256, (num_videos, frames, 3, height, width), dtype=torch.uint8)
    prompts = [f"a video of a red car number {i}" for i in range(num_videos)]
    return safetensors.torch.save({"videos": videos}, metadata={"prompts": json.dumps(prompts), "kwargs": "{}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients (N)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (M)")
    parser.add_argument("--num-videos", type=int, default=12, help="videos per request: the group size G")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--server-args", default="", help="extra server options, e.g. '--max_concurrent_requests 1'")
    args = parser.parse_args()

    payload = group_payload(args.num_videos, args.frames, args.height, args.width)
    size_gib = len(payload) / 2**30
    token = secrets.token_urlsafe(32)
    port = _free_port()
    command = [sys.executable, "-c", "from trl_arcopo.rewards.server import main; main()"]
    command += ["--reward", args.reward, "--port", str(port), "--log_level", "warning", *args.server_args.split()]
    server = subprocess.Popen(command, env={**os.environ, "TRL_ARCOPO_REWARD_TOKEN": token})
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", headers=headers, timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the reward server did not start")
            time.sleep(0.2)
        rest = _rss_gib(server.pid, "VmRSS")

        latencies: list[float] = []
        errors: Counter[str] = Counter()
        retried = Counter()
        lock = threading.Lock()

        def client() -> None:
            session = RemoteReward(url, token, max_retries=10).session  # RemoteReward's retries and token
            for _ in range(args.requests):
                start = time.perf_counter()
                try:
                    body = io.BytesIO(payload)  # sent block by block, as RemoteReward does
                    response = session.post(f"{url}/score", data=body, timeout=(10, 1800))
                    outcome = "ok" if response.ok else f"HTTP {response.status_code}"
                    history = response.raw.retries.history if response.raw.retries else ()
                except requests.RequestException as error:
                    outcome, history = type(error).__name__, ()
                with lock:
                    retried.update(f"HTTP {entry.status}" for entry in history if entry.status)
                    if outcome == "ok":
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors[outcome] += 1

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        peak = _rss_gib(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(timeout=60)

    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] if latencies else float("nan")
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"reward {args.reward}, server options [{args.server_args}]"
    )
    print(
        f"group [{args.num_videos}, {args.frames}, 3, {args.height}, {args.width}] uint8: payload {size_gib:.3f} GiB; "
        f"{args.clients} clients x {args.requests} requests in {wall:.1f} s"
    )
    print(
        f"server RSS at rest {rest:.2f} GiB, peak {peak:.2f} GiB: (peak - rest) / payload = {(peak - rest) / size_gib:.1f}"
    )
    if latencies:
        print(
            f"latency p50 {statistics.median(latencies):.2f} s, p99 {p99:.2f} s, max {latencies[-1]:.2f} s "
            f"({len(latencies)} answered)"
        )
    print(f"retried answers: {dict(retried) or 0}; errors: {dict(errors) or 0}")


if __name__ == "__main__":
    main()
