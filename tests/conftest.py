"""Shared pytest setup: offline Hub, torch threads per xdist worker, reference fixtures, a per-session Hub cache, free
ports and `accelerate launch` over loopback."""

import os

# huggingface_hub reads HF_HUB_OFFLINE once, at import time: set it before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `pytest -n N` runs N worker processes: each gets an equal share of the cores for torch's (OpenMP) threads, set before
# torch is imported and inherited by the processes tests launch. Left at torch's default, every worker starts one thread
# per core and their spin-waiting threads took 3.6x the CPU time on 2 cores (the suite: 1,597 s against 446 s of user
# time; tests/test_toy_world.py: 480 s against 26 s).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """`tests/fixtures`: reference outputs of the original implementations (each folder has a README)."""
    return Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def bench_real_arch():
    """`benchmarks/bench_real_arch.py` as a module (its folder on `sys.path` for its sibling imports meanwhile)."""
    import importlib.util
    import sys

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        spec = importlib.util.spec_from_file_location("bench_real_arch", benchmarks / "bench_real_arch.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(benchmarks))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty Hugging Face Hub cache directory for this test session (one per xdist worker)."""
    return tmp_path_factory.mktemp("hf_cache")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A free TCP port on loopback (for the rendezvous of multi-process `accelerate launch` runs)."""
    return _free_port()


@pytest.fixture(scope="session")
def free_port_factory():
    """A function returning a free TCP port on loopback, for fixtures broader than one test."""
    return _free_port


def _launch(args: list, port: int, *, machines: int = 1) -> list[str]:
    """`accelerate launch` 2 CPU processes (gloo) in all over `machines` loopback "machines" (one command per machine
    rank, run together), check they succeed and return each command's stdout.

    A run whose worker was killed by a signal (gloo aborting a worker on a loaded 2-core machine, seen once in ~10
    suite runs) is run once more on a fresh port; any other failure, or a second one, fails the test."""
    launch = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    options = ("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        commands = [
            [*launch, *options, "--num_machines", str(machines), "--machine_rank", str(rank)]
            + ["--main_process_port", str(port), *map(str, args)]
            for rank in range(machines)
        ]
        jobs = [
            subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands
        ]
        results = [(*job.communicate(timeout=600), job.returncode) for job in jobs]
        if all(code == 0 for _, _, code in results):
            return [stdout for stdout, _, _ in results]
        killed = any(re.search(r"exitcode: -\d+", stderr) for _, stderr, _ in results)
        if attempt or not killed:
            break
        port = _free_port()
    raise AssertionError(next(stderr for _, stderr, code in results if code != 0)[-4000:])


@pytest.fixture(scope="session")
def accelerate_launch():
    """A function that runs `accelerate launch` on CPU over loopback: `(args, port, *, machines=1) -> stdouts`."""
    return _launch
