"""Shared pytest setup: offline Hub, reference fixtures, a per-session Hub cache."""

import os

# huggingface_hub reads HF_HUB_OFFLINE once, at import time: set it before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
