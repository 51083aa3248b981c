"""ARCoPOTrainer under `accelerate launch` with 2 CPU processes over gloo: DDP, FSDP2, two loopback machines."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# 1 rollout, 2 updates (see the script); FSDP2 and two machines are compared with DDP on one machine.
TRAIN = Path(__file__).parent / "scripts" / "train_distributed.py"


def _ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


def _assert_same_lora(folder: Path, reference: Path, atol: float) -> None:
    got, expected = (load_file(f / "pytorch_lora_weights.safetensors") for f in (folder, reference))
    assert got.keys() == expected.keys() and len(got) == 40
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, free_port_factory, accelerate_launch) -> Path:
    """The reference: 2 processes on one machine, DDP."""
    output = tmp_path_factory.mktemp("ddp")
    accelerate_launch([TRAIN, output, "ddp"], free_port_factory())
    return output


@pytest.mark.slow
def test_two_process_training_keeps_replicas_in_sync(ddp_run):
    ranks = _ranks(ddp_run)
    assert [r["world"] for r in ranks] == [2, 2]
    # Gradients were all-reduced: both replicas hold the same adapter after training.
    assert ranks[0]["lora_sum"] == ranks[1]["lora_sum"]
    # Rewards are gathered over processes before logging: every rank logs the same global statistics.
    assert ranks[0]["rewards"] == ranks[1]["rewards"] and len(ranks[0]["rewards"]) == 1
    assert (ddp_run / "pytorch_lora_weights.safetensors").exists()
    # Evaluation splits 3 prompts over the 2 processes (2 + 1) and gathers them: the one-process result on both ranks.
    for rank in ranks:
        assert rank["eval_reward"] == pytest.approx(rank["local_eval_reward"], abs=1e-6)


@pytest.mark.slow
def test_fsdp2_rolls_out_updates_resumes_and_exports_like_ddp(ddp_run, tmp_path, free_port_factory, accelerate_launch):
    sharded, resumed = tmp_path / "fsdp2", tmp_path / "resumed"
    accelerate_launch([TRAIN, sharded, "fsdp2", resumed], free_port_factory())
    ranks, reference = _ranks(sharded), _ranks(ddp_run)
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.FSDP"] * 2
    assert [r["distributed_type"] for r in reference] == ["DistributedType.MULTI_CPU"] * 2
    assert [(r["rewards"], r["pivots"]) for r in ranks] == [(r["rewards"], r["pivots"]) for r in reference]
    _assert_same_lora(sharded, ddp_run, atol=1e-5)
    # Resumed after the first update: the second one reuses the rollout group restored from the checkpoint.
    assert [(r["updates_this_run"], r["rollouts_this_run"]) for r in _ranks(resumed)] == [(1, 0), (1, 0)]
    assert [(r["updates_this_run"], r["rollouts_this_run"]) for r in ranks] == [(2, 1), (2, 1)]
    _assert_same_lora(resumed, ddp_run, atol=1e-5)


@pytest.mark.slow
def test_two_machines_train_like_two_processes_on_one(ddp_run, tmp_path, free_port, accelerate_launch):
    output = tmp_path / "two-machines"
    accelerate_launch([TRAIN, output, "ddp"], free_port, machines=2)
    ranks, reference = _ranks(output), _ranks(ddp_run)
    assert [r["world"] for r in ranks] == [2, 2]
    assert [(r["rewards"], r["pivots"]) for r in ranks] == [(r["rewards"], r["pivots"]) for r in reference]
    _assert_same_lora(output, ddp_run, atol=1e-6)
    assert (output / "checkpoint-2" / "rank1_arcopo_state.json").is_file()  # every node's share of the checkpoint
