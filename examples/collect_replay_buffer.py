"""Collect a replay buffer of rollout groups from the reference policy (the `trl-arcopo collect` script, runnable
from a checkout); train on it with `training_mode: semi_on_policy` and `replay_dataset: <output_dir>`.

    python examples/collect_replay_buffer.py --preset tiny                 # offline, a few seconds: outputs/replay-tiny
    python examples/train_selfforcing.py --config examples/configs/tiny_semi_on_policy.yaml
    accelerate launch examples/collect_replay_buffer.py --preset self-forcing --prompt_file prompts.txt \\
        --output_dir outputs/replay-self-forcing --push_to_hub --hub_dataset_id me/self-forcing-replay

An interrupted collection resumes where it stopped when rerun with the same arguments. `--help` lists every option.
"""

from trl_arcopo.scripts.collect import main

if __name__ == "__main__":
    main()
