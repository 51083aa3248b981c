"""Shared pytest setup: offline Hub, reference fixtures, a per-session Hub cache."""

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
