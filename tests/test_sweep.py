"""Merge-scale sweep: the dual-benchmark rule, the sweep's evaluations, table, plot and final adapter state."""

import json
import math
import re

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

import trl_arcopo.sweep as sweep_module
from trl_arcopo.evaluation import EvaluationResult, evaluate_pipeline
from trl_arcopo.rewards import reward_names
from trl_arcopo.sweep import select_merge_scale, sweep_merge_scale
from trl_arcopo.testing import tiny_causal_wan_pipeline

SIZE = {"num_frames": 9, "height": 32, "width": 32, "progress_bar": False}
RANKS = {"semi": 4, "on_policy": 2}


@pytest.mark.parametrize(
    ("base", "results", "expected"),
    [
        # in-domain rises with s, out-of-domain falls: only 0.2 and 0.4 beat the base on both.
        ((0.1, 0.5), {0.0: (0.0, 0.9), 0.2: (0.2, 0.8), 0.4: (0.4, 0.6), 0.6: (0.6, 0.5), 0.8: (0.8, 0.3)}, 0.4),
        ((0.1, 0.5), {0.2: (0.2, 0.8), 0.6: (0.05, 0.8), 0.8: (0.3, 0.7)}, 0.8),  # not monotone: the largest wins
        ((0.1, 2.0), {0.2: (0.2, 0.8), 0.4: (0.4, 0.6)}, None),  # out-of-domain never improves
        ((0.1, 0.5), {0.2: (0.1, 0.8), 0.4: (0.4, 0.5)}, None),  # ties are not improvements
        ((0.1, 0.5), {0.2: (math.nan, 0.8), 0.4: (0.4, math.nan)}, None),  # NaN never improves
        ((math.nan, 0.5), {0.2: (0.2, 0.8)}, None),
        ((0.1, 0.5), {}, None),
    ],
)
def test_select_merge_scale(base, results, expected):
    assert select_merge_scale(base, results) == expected


def two_adapter_pipeline():
    pipe = tiny_causal_wan_pipeline()
    for seed, (name, rank) in enumerate(RANKS.items()):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["to_q", "to_v"], init_lora_weights=False)
        pipe.transformer.add_adapter(config, adapter_name=name)
    return pipe


def quality(prompts, videos, **kwargs):
    raise AssertionError("scored by the stub evaluator")


def ood(prompts, videos, **kwargs):
    raise AssertionError("scored by the stub evaluator")


# {on_policy scale (None: base): (in-domain, out-of-domain)}: the known answer is 0.4.
SYNTHETIC = {None: (0.1, 0.5), 0.0: (0.0, 0.9), 0.2: (0.2, 0.8), 0.4: (0.4, 0.6), 0.6: (0.6, 0.5), 1.0: (0.9, 0.2)}


@pytest.fixture
def stub_evaluator(monkeypatch):
    """Replace the evaluation by the SYNTHETIC metrics; record the adapters of every call."""
    calls = []

    def fake(pipe, prompts, reward_funcs, *, adapters, **kwargs):
        calls.append((adapters, kwargs))
        values = SYNTHETIC[adapters.get("on_policy") if adapters else None]
        names = reward_names(reward_funcs)
        table = Dataset.from_dict({"prompt": prompts, "seed": [0] * len(prompts)})
        return EvaluationResult(table=table, means=dict(zip(names, values, strict=True)))

    monkeypatch.setattr(sweep_module, "evaluate_pipeline", fake)
    return calls


def lora_layer(pipe):
    return pipe.transformer.blocks[0].attn1.to_q


def test_sweep_picks_the_known_scale_plots_and_activates_it(stub_evaluator, tmp_path, capsys):
    pipe = two_adapter_pipeline()
    scales = (1.0, 0.0, 0.2, 0.4, 0.6, 0.6)
    result = sweep_merge_scale(
        pipe, ["a cat"], in_domain=quality, out_of_domain=ood, scales=scales, plot_path=tmp_path / "p" / "sweep.png"
    )
    assert result.selected_scale == 0.4
    assert result.selected_adapters == {"semi": 1.0, "on_policy": 0.4}
    assert [adapters for adapters, _ in stub_evaluator] == [{}] + [
        {"semi": 1.0, "on_policy": s} for s in (0.0, 0.2, 0.4, 0.6, 1.0)
    ]
    assert stub_evaluator[0][1] == {}  # no evaluation arguments were given
    assert (result.base.in_domain, result.base.out_of_domain) == SYNTHETIC[None]
    assert [(p.scale, p.in_domain, p.out_of_domain) for p in result.points] == [
        (s, *SYNTHETIC[s]) for s in (0.0, 0.2, 0.4, 0.6, 1.0)
    ]
    assert result.in_domain_columns == ["quality"] and result.out_of_domain_columns == ["ood"]

    assert result.plot_path == tmp_path / "p" / "sweep.png"
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| on_policy scale | in-domain (quality) | out-of-domain (ood) | selected |" in printed
    assert "| 0.4 | 0.4 | 0.6 | yes |" in printed and "| base | 0.1 | 0.5 |  |" in printed
    assert "Selected scale 0.4" in printed
    assert result.to_dict()["selected_scale"] == 0.4 and len(result.to_dict()["points"]) == 5

    # The pipeline now runs the selected combination: on_policy at 0.4·alpha/r, semi at 1·alpha/r.
    layer = lora_layer(pipe)
    assert not layer.disable_adapters and sorted(layer.active_adapters) == ["on_policy", "semi"]
    assert layer.scaling == {"semi": 2.0, "on_policy": pytest.approx(0.8)}


def test_sweep_reports_when_no_scale_improves_both(stub_evaluator, monkeypatch, capsys):
    monkeypatch.setitem(SYNTHETIC, None, (0.1, 5.0))
    pipe = two_adapter_pipeline()
    result = sweep_merge_scale(pipe, ["a cat"], in_domain=quality, out_of_domain=ood, scales=(0.2, 0.4))
    assert result.selected_scale is None and result.selected_adapters is None and result.plot_path is None
    assert "No scale of 'on_policy' improves both" in capsys.readouterr().out
    assert lora_layer(pipe).disable_adapters  # back to the base model


def heads(prompts, videos, **kwargs):
    means = videos.mean(dim=(1, 2, 3, 4))
    return {"light": means.tolist(), "double": (2 * means).tolist()}


def test_sweep_end_to_end_matches_separate_evaluations():
    pipe = two_adapter_pipeline()
    prompts = ["a red car", "a cat"]
    result = sweep_merge_scale(
        pipe, prompts, in_domain=heads, out_of_domain="sharpness", scales=(0.5,), fixed={"semi": 0.5}, seed=3, **SIZE
    )
    assert result.in_domain_columns == ["heads:light", "heads:double"]
    assert result.out_of_domain_columns == ["sharpness_reward"]
    for adapters, point in (({}, result.base), ({"semi": 0.5, "on_policy": 0.5}, result.points[0])):
        alone = evaluate_pipeline(pipe, prompts, [heads, "sharpness"], adapters=adapters, seed=3, **SIZE)
        assert point.evaluation.table.to_dict() == alone.table.to_dict()
        assert point.in_domain == pytest.approx(3 * alone.means["heads:light"], rel=1e-12)
        assert point.out_of_domain == alone.means["sharpness_reward"]
    assert result.base.in_domain != result.points[0].in_domain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scales": ()}, "`scales` is empty"),
        ({"scales": (0.2, -0.2)}, r"`scales` must be finite numbers >= 0, got -0.2"),
        ({"scales": (math.inf,)}, r"`scales` must be finite numbers >= 0, got inf"),
        ({"fixed": {"semi": 1.0, "on_policy": 1.0}}, "The swept adapter 'on_policy' is also in `fixed`"),
        ({"swept": "policy"}, r"Unknown adapter\(s\) \['policy'\]"),
        ({"fixed": {"semi": -1.0}}, r"`weights\['semi'\]` must be a finite scale >= 0"),
        ({"in_domain": []}, "each need at least one reward"),
        ({"out_of_domain": "nope"}, "Unknown reward 'nope'"),
    ],
)
def test_bad_input_fails_before_any_generation(stub_evaluator, kwargs, message):
    arguments = {"in_domain": quality, "out_of_domain": ood, **kwargs}
    with pytest.raises(ValueError, match=message):
        sweep_merge_scale(two_adapter_pipeline(), ["a cat"], **arguments)
    assert stub_evaluator == []


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    from peft.utils import get_peft_model_state_dict

    from trl_arcopo import CausalWanPipeline

    pipe, root = two_adapter_pipeline(), tmp_path_factory.mktemp("adapters")
    for name in RANKS:
        CausalWanPipeline.save_lora_weights(
            root / name,
            transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name=name),
            transformer_lora_adapter_metadata=pipe.transformer.peft_config[name].to_dict(),
        )
    return {name: root / name for name in RANKS}


def sweep_script(*argv):
    from trl_arcopo.scripts.sweep import main

    return main([str(a) for a in argv])


def test_sweep_script_on_the_tiny_preset(saved_adapters, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.csv").write_text("text\na red car\na cat\na dog\n")
    out = tmp_path / "out"
    result = sweep_script(
        "--preset", "tiny", "--adapter", f"semi={saved_adapters['semi']}",
        "--adapter", f"on_policy={saved_adapters['on_policy']}", "--fixed", "semi=0.5",
        "--in_domain", "brightness", "--out_of_domain", "sharpness", "colorfulness", "--scales", "1", "0.5",
        "--dataset_name", tmp_path / "data", "--prompt_column", "text", "--max_prompts", "2",
        "--num_frames", "9", "--batch_size", "2", "--seed", "5", "--output_dir", out,
    )  # fmt: skip
    assert [p.scale for p in result.points] == [0.5, 1.0] and result.fixed == {"semi": 0.5}
    assert result.out_of_domain_columns == ["sharpness_reward", "colorfulness_reward"]
    assert result.base.evaluation.table["prompt"] == ["a red car", "a cat"]
    assert result.base.evaluation.table["seed"] == [5, 6]
    assert json.loads((out / "sweep.json").read_text()) == result.to_dict()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| base |" in printed and f"{out}: sweep.png, sweep.json" in printed

    # The same videos as an evaluation of the tiny generator with the same adapters and seeds.
    pipe = two_adapter_pipeline()
    alone = evaluate_pipeline(
        pipe, ["a red car", "a cat"], ["brightness"], adapters={"semi": 0.5, "on_policy": 1.0}, seed=5, **SIZE
    )
    assert result.points[1].evaluation.table["brightness_reward"] == pytest.approx(
        alone.table["brightness_reward"], abs=1e-6
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--in_domain", "nope"], "Unknown reward 'nope'"),
        (["--fixed", "on_policy=1"], "--swept on_policy is also given in --fixed"),
        (["--fixed", "semi=1", "--fixed", "other=1"], r"--fixed/--swept names \['other'\]"),
        (["--swept", "other"], r"--fixed/--swept names \['other'\]"),
        (["--prompt_file", "{tmp}/missing.txt"], "--prompt_file .*missing.txt is not a readable text file"),
        (["--prompt_file", "{tmp}/empty.txt"], "--prompt_file .*empty.txt has no prompts"),
        (["--max_prompts", "0"], "--max_prompts must be >= 1, got 0"),
        (["--dataset_name", "{tmp}", "--prompt_column", "caption"], "has no column 'caption' .*; set --prompt_column"),
        (["--scales", "0.5", "-1"], r"`scales` must be finite numbers >= 0, got -1"),
        (["--num_frames", "10"], "--num_frames 10 does not split into whole chunks"),
        (["--scales"], "argument --scales: expected at least one argument"),
    ],
)
def test_sweep_script_bad_input_is_one_line_and_exit_2(saved_adapters, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "prompts.csv").write_text("prompt\na cat\n")
    adapters = [f"--adapter=semi={saved_adapters['semi']}", f"--adapter=on_policy={saved_adapters['on_policy']}"]
    defaults = ["--in_domain", "brightness", "--out_of_domain", "sharpness", "--output_dir", tmp_path / "out"]
    with pytest.raises(SystemExit) as exit_info:
        sweep_script("--preset", "tiny", *adapters, *defaults, *[a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), error_lines
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_sweep_script_needs_prompts_for_a_real_model_and_has_full_help(saved_adapters, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep_script("--model", "org/model", "--adapter=on_policy=org/lora", "--adapter=semi=org/lora2",
                     "--in_domain", "brightness", "--out_of_domain", "sharpness")  # fmt: skip
    assert exit_info.value.code == 2
    assert "pass evaluation prompts with --prompt_file or --dataset_name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        sweep_script("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--adapter", "--fixed", "--swept", "--scales", "--in_domain", "--out_of_domain", "--prompt_file"):
        assert flag in text
