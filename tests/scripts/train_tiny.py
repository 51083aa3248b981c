"""A tiny AR-CoPO run, launched by tests as a separate (possibly multi-process) job: `accelerate launch ... <output_dir>`."""

import json
import sys

import torch
from datasets import Dataset

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.evaluation import evaluate_pipeline
from trl_arcopo.testing import TINY_TRAINING_ARGS, tiny_causal_wan_pipeline

output_dir = sys.argv[1]
args = ARCoPOConfig(
    output_dir=output_dir,
    **{**TINY_TRAINING_ARGS, "num_generations": 4, "num_anchors": 2, "lora_r": 4, "lora_alpha": 8},
    max_steps=4,
    save_strategy="no",
    disable_tqdm=True,
)
prompts = Dataset.from_dict({"prompt": ["a red car", "a blue sea", "a cat", "a dog"]})
trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=args, train_dataset=prompts)
trainer.train()
trainer.save_model()
# 3 prompts over 2 processes: uneven shards, gathered into one evaluation.
eval_prompts = Dataset.from_dict({"prompt": ["a red car", "a blue sea", "a cat"]})
eval_metrics = trainer.evaluate(eval_prompts)
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
state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
lora_sum = sum(v.double().sum().item() for k, v in state.items() if "lora" in k)
result = {
    "rank": trainer.accelerator.process_index,
    "world": trainer.accelerator.num_processes,
    "lora_sum": lora_sum,
    "rewards": [h["reward"] for h in trainer.state.log_history if "reward" in h],
    "pivots": [h["rollout/pivot"] for h in trainer.state.log_history if "rollout/pivot" in h],
    "eval_reward": eval_metrics["eval_reward"],
    "local_eval_reward": local.means["brightness_reward"],
}
with open(f"{output_dir}/rank{result['rank']}.json", "w") as f:
    json.dump(result, f)
torch.distributed.barrier() if torch.distributed.is_initialized() else None
