"""ARCoPOTrainer under `accelerate launch` with 2 CPU processes (DDP over gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


@pytest.mark.slow
def test_two_process_training_keeps_replicas_in_sync(tmp_path, free_port):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port),
        str(SCRIPT),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # Gradients were all-reduced: both replicas hold the same adapter after training.
    assert ranks[0]["lora_sum"] == ranks[1]["lora_sum"]
    # Rewards are gathered over processes before logging: every rank logs the same global statistics.
    assert ranks[0]["rewards"] == ranks[1]["rewards"] and len(ranks[0]["rewards"]) == 2
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    # Evaluation splits 3 prompts over the 2 processes (2 + 1) and gathers them: the one-process result on both ranks.
    for rank in ranks:
        assert rank["eval_reward"] == pytest.approx(rank["local_eval_reward"], abs=1e-6)
