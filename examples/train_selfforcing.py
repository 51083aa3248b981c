"""Align a causal video generator with AR-CoPO (the `trl-arcopo train` script, runnable from a checkout).

    python examples/train_selfforcing.py --preset tiny                    # offline, about a minute on 2 CPU cores
    python examples/train_selfforcing.py --config examples/configs/tiny.yaml
    python examples/collect_replay_buffer.py --preset tiny --output_dir outputs/replay-tiny   # then semi-on-policy:
    python examples/train_selfforcing.py --config examples/configs/tiny_semi_on_policy.yaml
    accelerate launch examples/train_selfforcing.py --config examples/configs/self_forcing_on_policy.yaml \\
        --prompt_file prompts.txt --output_dir self-forcing-arcopo --push_to_hub

Every `ARCoPOConfig` field is a flag (`--num_generations 12`, `--learning_rate 1e-5`, ...); a preset only changes
defaults, and `--config` YAML keys and flags override it. `python examples/train_selfforcing.py --help` lists them all.
"""

from trl_arcopo.scripts.train import main

if __name__ == "__main__":
    main()
