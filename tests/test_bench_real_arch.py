"""benchmarks/bench_real_arch.py: `--quick` runs the benchmark's whole path (a random original-layout checkpoint in a
local Hub cache, `CausalWanPipeline.from_self_forcing`, VideoAlign scoring, two updates with gradient checkpointing,
checkpoints, a resume) at reduced widths; its real-size configs are the released ones."""

import re


def test_real_mode_builds_the_released_architectures(bench_real_arch):
    from trl_arcopo.models.self_forcing import WAN_1_3B_CONFIG

    real = bench_real_arch.MODELS["real"]
    assert real["transformer"] is WAN_1_3B_CONFIG and real["vae"] == {} and real["text_dim"] == 4096
    assert (
        bench_real_arch.QWEN2_VL_2B["hidden_size"] == 1536
        and bench_real_arch.QWEN2_VL_2B["vision_config"]["depth"] == 32
    )


def test_original_names_invert_the_self_forcing_conversion(bench_real_arch):
    from diffusers import WanTransformer3DModel

    from trl_arcopo.models.self_forcing import convert_self_forcing_state_dict
    from trl_arcopo.testing import tiny_transformer_config

    names = [n for n, _ in WanTransformer3DModel(**tiny_transformer_config()).named_parameters()]
    original = {f"model.{bench_real_arch.original_name(n)}": n for n in names}
    converted = convert_self_forcing_state_dict(dict.fromkeys(original, 0))
    assert sorted(converted) == sorted(names)


def test_quick_mode_trains_checkpoints_and_resumes_to_the_same_lora(bench_real_arch, tmp_path, capsys):
    bench_real_arch.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for phase in ("rollout", "decode", "reward", "update", "save", "resume"):
        assert re.search(rf"^{phase} +\d+\.\d", out, re.MULTILINE), (phase, out)
    difference = float(re.search(r"max \|LoRA - uninterrupted LoRA\| = (\S+)", out).group(1))
    assert difference <= 1e-6
