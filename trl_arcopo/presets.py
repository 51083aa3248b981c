"""`ARCoPOConfig` settings for the generators the package ships: the trained toy-world generator and the tiny random
one. Plain dictionaries, so that `ARCoPOConfig(output_dir, **TOY_TRAINING_ARGS, max_steps=...)` overrides any of
them; the scripts' `--preset toy|tiny` start from them."""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_TRAINING_ARGS", "TOY_TRAINING_ARGS"]

# ARCoPOConfig values for the toy generator (the scripts' `toy` preset; also `trl_arcopo.toy.TOY_TRAINING_ARGS`):
# its video size (9 frames = 3 chunks of its per-frame latents), groups and LoRA for 2 CPU cores, and what keeps the
# optimisation healthy at this scale, chosen from measurements (docs/benchmarks.md, "AR-CoPO on the toy generator"):
# the paper's epsilon 1e-4 would clip every reused update; training the first sampler step only (where the toy
# sampler's candidates differ most: x̂0 spread 0.42-0.47, then 0.09-0.13) with epsilon 0.2 and lr 7e-4 keeps every
# reused-rollout update's ratio/mean within 5 % of 1 with at most 13 % of the ratios clipped over the main job's 60
# steps (lr 1e-3: two updates clip 31 % and 37.5 %; 5e-4: nothing clipped, a noisier rise).
TOY_TRAINING_ARGS: dict[str, Any] = {
    "num_frames": 9,
    "height": 32,
    "width": 32,
    "num_generations": 8,
    "num_anchors": 4,
    "lora_r": 8,
    "lora_alpha": 16,
    "learning_rate": 7e-4,
    "lr_scheduler_type": "constant",
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
