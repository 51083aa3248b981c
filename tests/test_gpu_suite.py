"""benchmarks/gpu_suite.sh at tiny sizes on CPU: the GPU suite runs end to end and writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


@pytest.mark.slow  # ~70 s on 2 cores (a subprocess: imports, the VideoAlign fixture, a tiny training run)
def test_gpu_suite_runs_at_tiny_size_and_writes_its_report(tmp_path):
    env = {
        **os.environ,
        "GPU_SUITE_TINY": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3: this interpreter
    }
    output = tmp_path / "suite.json"
    result = subprocess.run(["bash", str(SUITE), str(output)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["environment"]["tiny"] and not report["environment"]["compile"]
    assert report["original"]["batch_1"] == {"seconds_per_video": 2.81, "peak_gib": 8.7}
    for batch in ("batch_1", "batch_4"):
        assert report["pipeline"][batch]["seconds_per_video"] > 0
    assert set(report["group"]) == {"pivot_0", "pivot_1", "mean_seconds"}
    assert set(report["training"]) == {"rollout", "decode", "reward", "update"}
    for phase in report["training"].values():
        assert phase["seconds"] > 0 and phase["peak_gib"] > 0 and phase["estimated_gib"] > 0
