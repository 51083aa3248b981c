"""`ARCoPOConfig` settings for the generators the package ships: the trained toy-world generator and the tiny random
one. Plain dictionaries, so that `ARCoPOConfig(output_dir, **TOY_TRAINING_ARGS, max_steps=...)` overrides any of
them; the scripts' `--preset toy|tiny` start from them."""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_TRAINING_ARGS", "TOY_TRAINING_ARGS"]

# ARCoPOConfig values for the toy generator (the scripts' `toy` preset; also `trl_arcopo.toy.TOY_TRAINING_ARGS`):
# its video size (9 frames = 3 chunks of its per-frame latents), groups and LoRA for 2 CPU cores, and what keeps the
# optimisation healthy at this scale, chosen from measurements (docs/benchmarks.md, "AR-CoPO on the toy generator"):
# the paper's epsilon 1e-4 would clip every reused update; we train the first sampler step only (where the toy
# sampler's candidates differ most: x̂0 spread 0.38, then 0.05-0.07) with epsilon 0.2 and lr 7e-4. Adam's first step
# moves every LoRA weight by the full learning rate whatever its gradient, and the update that reuses that first
# rollout clipped up to 44 % of its ratios; 4 warmup steps keep every reused update's clipped fraction at or under
# 9 % with ratio/mean within 2.2 % of 1 (on the earlier shape-code weights, lr 1e-3 clipped up to 28 %, 8.5e-4 38 %).
TOY_TRAINING_ARGS: dict[str, Any] = {
    "num_frames": 9,
    "height": 32,
    "width": 32,
    "num_generations": 8,
    "num_anchors": 4,
    "lora_r": 8,
    "lora_alpha": 16,
    "learning_rate": 7e-4,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 4,
    "epsilon": 0.2,
    "train_steps": [0],
    "video_fps": 4,
    "report_to": "none",
}

# ARCoPOConfig settings that make AR-CoPO learn on `tiny_causal_wan_pipeline` (2 chunks of 32x32 pixels): the tiny
# preset of the scripts and the base of the trainer tests (also `trl_arcopo.testing.TINY_TRAINING_ARGS`).
TINY_TRAINING_ARGS: dict[str, Any] = {
    "num_frames": 21,
    "height": 32,
    "width": 32,
    "num_generations": 8,
    "num_anchors": 4,
    "lora_r": 8,
    "lora_alpha": 16,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "constant",
    "report_to": "none",
}
