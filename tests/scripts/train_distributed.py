"""A tiny AR-CoPO run launched by tests with `accelerate launch`: `... OUTPUT_DIR ddp|fsdp2 [RESUMED_DIR]`.

Trains 2 steps (one rollout, two updates, a checkpoint after each), exports the LoRA and writes `rank{i}.json` (logged
rewards and pivots, world size, distributed type). A `ddp` run also writes the sum of the rank's LoRA and evaluates 3
prompts, split unevenly over the processes and gathered, and the same 3 prompts on this process alone
(`evaluate_pipeline`). With RESUMED_DIR, a copy of `checkpoint-1` is then resumed there by a new trainer on a new
pipeline, which exports and writes its own `rank{i}.json` (in this launch: a second launch cost ~18 s of imports).

Accelerate switches to FSDP only for accelerator backends: with `ACCELERATE_USE_CPU=1` it would silently run DDP. For
`fsdp2` this script declares the gloo processes GPU-type before the `Accelerator` exists, so that `Accelerator.prepare`
takes its FSDP2 path (`fsdp2_prepare_model`: `fully_shard` on every `WanTransformerBlock`, then on the transformer),
the one `--accelerate_config fsdp2` takes on GPUs.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.evaluation import evaluate_pipeline
from trl_arcopo.testing import TINY_TRAINING_ARGS, tiny_causal_wan_pipeline

transformers.logging.set_verbosity_error()
output_dir, strategy = sys.argv[1], sys.argv[2]
resumed_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else None
fsdp = {}
if strategy == "fsdp2":
    # The settings of trl_arcopo/accelerate_configs/fsdp2.yaml, as TrainingArguments fields.
    fsdp = {
        "fsdp": "full_shard",
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": ["WanTransformerBlock"],
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


class CountThisRun(transformers.TrainerCallback):
    """Updates and rollouts (logged rewards) of this `train()` call alone: a resumed run restores the earlier logs."""

    def __init__(self):
        self.updates = self.rollouts = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.updates += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.rollouts += "reward" in logs


def train(output_dir: str | Path, resume: Path | None = None) -> None:
    args = ARCoPOConfig(
        output_dir=str(output_dir),
        **{**TINY_TRAINING_ARGS, "num_generations": 4, "num_anchors": 2, "lora_r": 4, "lora_alpha": 8},
        max_steps=2,
        save_steps=1,
        disable_tqdm=True,
        **fsdp,
    )
    if strategy == "fsdp2":  # after the arguments (which set up the processes), before the Accelerator
        state = PartialState()
        if state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.MULTI_GPU
    prompts = Dataset.from_dict({"prompt": ["a red car", "a blue sea", "a cat", "a dog"]})
    this_run = CountThisRun()
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=args, train_dataset=prompts, callbacks=[this_run]
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model()
    result = {
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "rewards": [h["reward"] for h in trainer.state.log_history if "reward" in h],
        "pivots": [h["rollout/pivot"] for h in trainer.state.log_history if "rollout/pivot" in h],
        "updates_this_run": this_run.updates,
        "rollouts_this_run": this_run.rollouts,
    }
    if strategy == "ddp":
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        result["lora_sum"] = sum(v.double().sum().item() for k, v in state.items() if "lora" in k)
        eval_prompts = Dataset.from_dict({"prompt": ["a red car", "a blue sea", "a cat"]})
        result["eval_reward"] = trainer.evaluate(eval_prompts)["eval_reward"]
        local = evaluate_pipeline(
            trainer.pipeline,
            eval_prompts,
            "brightness",
            num_frames=args.num_frames,
            height=args.height,
            width=args.width,
            seed=args.seed,
            progress_bar=False,
        )
        result["local_eval_reward"] = local.means["brightness_reward"]
    with open(f"{output_dir}/rank{result['rank']}.json", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


train(output_dir)
if resumed_dir is not None:
    if PartialState().is_main_process:
        shutil.copytree(Path(output_dir) / "checkpoint-1", resumed_dir / "checkpoint-1")
    PartialState().wait_for_everyone()
    train(resumed_dir, resume=resumed_dir / "checkpoint-1")
