"""Choose the merge scale of the two AR-CoPO adapters, `W = W0 + ΔW_semi + s·ΔW_on` (the `trl-arcopo sweep` script,
runnable from a checkout), then export the chosen combination as one LoRA with `trl-arcopo merge`.

    python examples/merge_sweep.py --preset self-forcing --adapter semi=outputs/semi \\
        --adapter on_policy=outputs/self-forcing-arcopo --in_domain videoalign --out_of_domain pickscore \\
        --prompt_file eval_prompts.txt --batch_size 4 --output_dir outputs/merge-sweep
    trl-arcopo merge --preset self-forcing --adapter semi=outputs/semi \\
        --adapter on_policy=outputs/self-forcing-arcopo --scale on_policy=0.8 --output_dir outputs/merged

The base model and every scale (`--scales`, default 0 0.2 ... 1) generate the same seeded videos; the selected scale
is the largest that improves both the in-domain reward and the out-of-domain metric over the base. The table is
printed, `sweep.png` and `sweep.json` are written to `--output_dir`. `--help` lists every option.
"""

from trl_arcopo.scripts.sweep import main

if __name__ == "__main__":
    main()
