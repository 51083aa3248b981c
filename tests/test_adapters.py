"""Two adapters at inference: W = W0 + ΔW_semi + s·ΔW_on activated, exported as one LoRA, fused, pushed."""

import json
import math
import re

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from trl_arcopo import CausalWanPipeline
from trl_arcopo.adapters import (
    fuse_adapters,
    merge_adapters,
    merged_lora_state_dict,
    push_folder_to_hub,
    save_merged_lora,
)
from trl_arcopo.testing import populate_hub_cache, tiny_causal_wan_pipeline

LORA_FILE = "pytorch_lora_weights.safetensors"
ALL_LAYERS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
# name: (rank, alpha, target modules, seed); "on_policy" targets only attention, so layers get different ranks.
ADAPTERS = {
    "semi": (4, 8, ALL_LAYERS, 1),
    "on_policy": (8, 4, ["to_q", "to_k", "to_v", "to_out.0"], 2),
}
WEIGHTS = {"semi": 1.0, "on_policy": 0.8}


def save_random_lora(directory, name: str) -> None:
    rank, alpha, targets, seed = ADAPTERS[name]
    pipe = tiny_causal_wan_pipeline()
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name=name)
    with torch.no_grad():  # B is as large as A, so that every adapter changes the outputs clearly
        for module_name, param in pipe.transformer.named_parameters():
            if "lora_B" in module_name:
                param.normal_(0, 0.2)
    CausalWanPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name=name),
        transformer_lora_adapter_metadata=config.to_dict(),
    )


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    dirs = {name: tmp_path_factory.mktemp(name) for name in ADAPTERS}
    for name, directory in dirs.items():
        save_random_lora(directory, name)
    return dirs


def loaded_pipeline(adapter_dirs):
    pipe = tiny_causal_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for name, directory in adapter_dirs.items():
        pipe.load_lora_weights(directory, adapter_name=name)
    return pipe


def run(pipe) -> torch.Tensor:
    """Latents [1, 16, 6, 4, 4] of a 2-chunk video from fixed noise."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0)),
        latents=torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(1)),
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
    ).frames


def expected_deltas(adapter_dirs, weights) -> dict[str, torch.Tensor]:
    """``{linear module: Σ_k s_k·(alpha_k/r_k)·B_k A_k}`` computed from the saved files alone."""
    deltas: dict[str, torch.Tensor] = {}
    for name, scale in weights.items():
        rank, alpha, _, _ = ADAPTERS[name]
        state = load_file(adapter_dirs[name] / LORA_FILE)
        for key, lora_a in state.items():
            if ".lora_A." in key:
                module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                lora_b = state[key.replace(".lora_A.", ".lora_B.")]
                delta = scale * (alpha / rank) * lora_b.double() @ lora_a.double()
                deltas[module] = deltas.get(module, 0) + delta
    return deltas


def linear_weights(pipe) -> dict[str, torch.Tensor]:
    return {
        name.removesuffix(".weight").removesuffix(".base_layer"): param.detach().clone()
        for name, param in pipe.transformer.named_parameters()
        if name.endswith(".weight") and "lora_" not in name
    }


def test_fused_weights_are_w0_plus_weighted_deltas_on_every_layer(adapter_dirs):
    w0 = linear_weights(tiny_causal_wan_pipeline())
    deltas = expected_deltas(adapter_dirs, WEIGHTS)
    assert len(deltas) == 2 * (4 + 4 + 2)  # 2 blocks x (attn1, attn2: q k v out; ffn: 2 linears)
    pipe = loaded_pipeline(adapter_dirs)
    fuse_adapters(pipe, WEIGHTS)
    fused = linear_weights(pipe)
    assert fused.keys() == w0.keys()
    for module, weight in fused.items():
        if module in deltas:
            torch.testing.assert_close(weight.double(), w0[module].double() + deltas[module], atol=1e-6, rtol=0)
            assert (weight - w0[module]).abs().max() > 1e-2, module
        else:
            assert torch.equal(weight, w0[module]), module


def test_active_combination_equals_manually_merged_model(adapter_dirs):
    pipe = loaded_pipeline(adapter_dirs)
    merge_adapters(pipe, WEIGHTS)
    assert sorted(pipe.get_active_adapters()) == ["on_policy", "semi"]
    merged = run(pipe)

    manual = tiny_causal_wan_pipeline()
    modules = dict(manual.transformer.named_modules())
    with torch.no_grad():
        for module, delta in expected_deltas(adapter_dirs, WEIGHTS).items():
            modules[module].weight += delta.float()
    torch.testing.assert_close(merged, run(manual), atol=1e-5, rtol=0)

    # The scale matters: s = 0 is the semi adapter alone, a different model.
    merge_adapters(pipe, {"semi": 1.0, "on_policy": 0.0})
    assert (run(pipe) - merged).abs().max() > 1e-3


def test_exported_lora_loads_and_reproduces_the_combination(adapter_dirs, tmp_path, hf_cache):
    pipe = loaded_pipeline(adapter_dirs)
    merge_adapters(pipe, WEIGHTS)
    merged = run(pipe)
    out = save_merged_lora(pipe, WEIGHTS, tmp_path / "merged", adapter_sources={"semi": "org/semi-lora"})

    with safe_open(out / LORA_FILE, "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 12 and metadata["transformer.lora_alpha"] == 12
    assert set(metadata["transformer.rank_pattern"].values()) == {4}  # feed-forward layers: semi only
    card = (out / "README.md").read_text()
    assert "semi: 1.0" in card and "on_policy: 0.8" in card  # card metadata
    assert "| `on_policy` | 0.8 | 8 |" in card and "org/semi-lora" in card

    fresh = tiny_causal_wan_pipeline()
    fresh.load_lora_weights(out)
    torch.testing.assert_close(run(fresh), merged, atol=1e-5, rtol=0)
    ranks = {name: layer.r["default_0"] for name, layer in fresh.transformer.named_modules() if hasattr(layer, "r")}
    assert ranks["blocks.0.attn1.to_q"] == 12 and ranks["blocks.1.ffn.net.2"] == 4

    # The same file through the Hub loading path (offline cache).
    populate_hub_cache("org/merged-lora", out, cache_dir=hf_cache)
    from_hub = tiny_causal_wan_pipeline()
    from_hub.load_lora_weights("org/merged-lora", weight_name=LORA_FILE, cache_dir=hf_cache)
    torch.testing.assert_close(run(from_hub), merged, atol=1e-5, rtol=0)


def test_export_leaves_out_zero_scales(adapter_dirs):
    pipe = loaded_pipeline(adapter_dirs)
    state, config = merged_lora_state_dict(pipe, {"semi": 0.5, "on_policy": 0.0})
    assert config["r"] == 4 and config["rank_pattern"] == {}
    semi = load_file(adapter_dirs["semi"] / LORA_FILE)
    key = "blocks.0.attn1.to_q.lora_B.weight"
    torch.testing.assert_close(state[key], semi[f"transformer.{key}"] * 0.5 * (8 / 4), atol=0, rtol=0)
    with pytest.raises(ValueError, match="All scales in `weights` are 0"):
        merged_lora_state_dict(pipe, {"semi": 0.0, "on_policy": 0.0})


def test_the_card_names_the_real_base_and_a_quick_start_for_it(adapter_dirs, tmp_path, hf_cache):
    # The tiny preset, built in memory: named, and the quick start builds the same pipeline.
    card = ModelCard.load(save_merged_lora(loaded_pipeline(adapter_dirs), WEIGHTS, tmp_path / "tiny") / "README.md")
    assert card.data.base_model is None and "generator the tiny preset `tiny_causal_wan_pipeline(seed=0)`" in card.text
    assert "pipe = tiny_causal_wan_pipeline(seed=0)" in card.text
    assert f'pipe.load_lora_weights("{tmp_path / "tiny"}")' in card.text  # the folder: no Hub repo was named

    # A pipeline from the Hub is the card's base model; one from a local folder is named, not claimed as a Hub id.
    tiny_causal_wan_pipeline().save_pretrained(tmp_path / "pipeline")
    populate_hub_cache("org/causal-wan", tmp_path / "pipeline", cache_dir=hf_cache)
    for source, kwargs in (("org/causal-wan", {"cache_dir": hf_cache}), (str(tmp_path / "pipeline"), {})):
        pipe = CausalWanPipeline.from_pretrained(source, **kwargs)
        for name, directory in adapter_dirs.items():
            pipe.load_lora_weights(directory, adapter_name=name)
        card = ModelCard.load(save_merged_lora(pipe, WEIGHTS, tmp_path / "card", repo_id="me/merged") / "README.md")
        assert f"CausalWanPipeline.from_pretrained({source!r}, dtype=torch.float32)" in card.text
        assert 'pipe.load_lora_weights("me/merged")' in card.text and "<base pipeline>" not in card.text
    assert card.data.base_model is None and f"generator `{source}` (a local path)" in card.text


def test_fuse_round_trip_and_fused_pipeline_save_load(adapter_dirs, tmp_path):
    pipe = loaded_pipeline(adapter_dirs)
    w0 = linear_weights(pipe)
    merge_adapters(pipe, WEIGHTS)
    merged = run(pipe)

    fuse_adapters(pipe, WEIGHTS, unload=False)
    torch.testing.assert_close(run(pipe), merged, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="fused into the weights"):
        merge_adapters(pipe, WEIGHTS)
    pipe.unfuse_lora()
    for module, weight in linear_weights(pipe).items():
        torch.testing.assert_close(weight, w0[module], atol=1e-6, rtol=0)

    fuse_adapters(pipe, WEIGHTS)
    assert not pipe.get_list_adapters()  # plain transformer: nothing left to double-count
    pipe.save_pretrained(tmp_path / "fused")
    reloaded = CausalWanPipeline.from_pretrained(tmp_path / "fused")
    torch.testing.assert_close(run(reloaded), merged, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"semi": 1.0, "policy": 0.8}, r"Unknown adapter\(s\) \['policy'\].*\['semi', 'on_policy'\]"),
        ({"semi": 1.0, "on_policy": -0.5}, r"`weights\['on_policy'\]` must be a finite scale >= 0, got -0.5"),
        ({"semi": math.nan}, "finite scale >= 0, got nan"),
        ({"semi": math.inf}, "finite scale >= 0, got inf"),
        ({"semi": True}, "finite scale >= 0, got True"),
        ({"semi": "1"}, "finite scale >= 0, got '1'"),
        ({}, "non-empty dict"),
        (["semi"], "non-empty dict"),
    ],
)
def test_bad_weights_raise(adapter_dirs, weights, message):
    pipe = loaded_pipeline(adapter_dirs)
    for function in (merge_adapters, merged_lora_state_dict, fuse_adapters):
        with pytest.raises(ValueError, match=message):
            function(pipe, weights)


def test_no_adapters_loaded_is_named():
    with pytest.raises(ValueError, match="the pipeline has no adapters"):
        merge_adapters(tiny_causal_wan_pipeline(), {"semi": 1.0})


def test_push_folder_to_hub_creates_the_repo_and_uploads(tmp_path, monkeypatch):
    import trl_arcopo.adapters as adapters

    calls = []

    class Repo:
        repo_id = "user/merged"

    class Commit:
        commit_url = "https://huggingface.co/user/merged/commit/abc"

    monkeypatch.setattr(adapters, "create_repo", lambda *a, **k: calls.append(("create", a, k)) or Repo())
    monkeypatch.setattr(adapters, "upload_folder", lambda *a, **k: calls.append(("upload", a, k)) or Commit())
    url = push_folder_to_hub(tmp_path, "merged", token="hf_secret", private=True)
    assert url == Commit.commit_url
    assert calls[0] == ("create", ("merged",), {"token": "hf_secret", "private": True, "exist_ok": True})
    assert calls[1][2]["repo_id"] == "user/merged" and calls[1][2]["folder_path"] == tmp_path
    assert calls[1][2]["token"] == "hf_secret"


def merge_script(*argv):
    from trl_arcopo.scripts.merge import main

    return main([str(a) for a in argv])


def test_merge_script_exports_and_fuses_on_the_tiny_preset(adapter_dirs, tmp_path, capsys):
    adapters = [f"--adapter=semi={adapter_dirs['semi']}", f"--adapter=on_policy={adapter_dirs['on_policy']}"]
    pipe = loaded_pipeline(adapter_dirs)
    merge_adapters(pipe, WEIGHTS)
    merged = run(pipe)

    out = merge_script("--preset", "tiny", *adapters, "--scale", "on_policy=0.8", "--output_dir", tmp_path / "lora")
    assert out == tmp_path / "lora"
    assert capsys.readouterr().out.strip() == f"{out}: merged LoRA W0 + 1·semi + 0.8·on_policy"
    fresh = tiny_causal_wan_pipeline()
    fresh.load_lora_weights(out)
    torch.testing.assert_close(run(fresh), merged, atol=1e-5, rtol=0)
    assert str(adapter_dirs["on_policy"]) in (out / "README.md").read_text()

    # A saved pipeline as --model, fused into a whole pipeline.
    tiny_causal_wan_pipeline().save_pretrained(tmp_path / "base")
    out = merge_script(
        "--model", tmp_path / "base", *adapters, "--scale=on_policy=0.8", "--fuse", "--output_dir", tmp_path / "fused"
    )
    torch.testing.assert_close(run(CausalWanPipeline.from_pretrained(out)), merged, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "fused into its weights, `W = W0 + 1·ΔW_semi + 0.8·ΔW_on_policy`" in card and "fused-lora" in card
    assert str(adapter_dirs["on_policy"]) in card and "load_lora_weights" not in card


def test_merge_script_pushes_the_output_folder(adapter_dirs, tmp_path, monkeypatch, capsys):
    import trl_arcopo.adapters  # the script imports it once its arguments are checked

    pushed = []
    monkeypatch.setattr(
        trl_arcopo.adapters, "push_folder_to_hub", lambda *a, **k: pushed.append((a, k)) or "https://hf.co/commit"
    )
    out = merge_script(
        "--preset", "tiny", f"--adapter=semi={adapter_dirs['semi']}", "--output_dir", tmp_path / "lora",
        "--push_to_hub", "me/merged", "--private",
    )  # fmt: skip
    assert pushed == [((out, "me/merged"), {"private": True, "commit_message": "Upload merged LoRA"})]
    assert "# me/merged" in (out / "README.md").read_text()  # the card is written for the Hub repo
    assert capsys.readouterr().out.splitlines()[-1] == "https://hf.co/commit"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "tiny", "--adapter", "semi={semi}", "--scale", "on_policy=1"], r"--scale names \['on_policy'\]"),
        (["--preset", "tiny", "--adapter", "semi={semi}", "--adapter", "semi={semi}"], "names must be unique"),
        (["--preset", "tiny", "--adapter", "semi={semi}", "--scale", "semi=-1"], "must be a finite number >= 0"),
        (["--preset", "tiny", "--adapter", "semi={semi}", "--scale", "semi=0"], "All scales in `weights` are 0"),
        (["--preset", "tiny", "--adapter", "semi"], "'semi' is not NAME=VALUE"),
        (["--adapter", "semi={semi}"], r"pass --model PATH_OR_REPO or --preset \{toy,tiny,self-forcing\}"),
        (["--preset", "tiny", "--adapter", "semi={tmp}/missing"], "--adapter semi=.*/missing: no such file or folder"),
        (["--model", "{tmp}/missing", "--adapter", "semi={semi}"], "--model .*/missing: "),
        (["--preset", "tiny", "--adapter", "semi={bad}"], "--adapter semi=.*: "),
        (["--preset", "tiny", "--adapter", "semi={other}"], "--adapter semi=.*: .*size mismatch"),
        (["--preset", "tiny"], "the following arguments are required: --adapter"),
    ],
)
def test_merge_script_bad_input_is_one_line_and_exit_2(adapter_dirs, tmp_path, capsys, argv, message):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / LORA_FILE).write_bytes(b"not a safetensors file")
    if "{other}" in " ".join(argv):  # a LoRA of another architecture (head_dim 16 instead of 12)
        other = tiny_causal_wan_pipeline(attention_head_dim=16)
        config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])
        other.transformer.add_adapter(config)
        CausalWanPipeline.save_lora_weights(
            tmp_path / "other", transformer_lora_layers=get_peft_model_state_dict(other.transformer)
        )
    paths = {"semi": adapter_dirs["semi"], "tmp": tmp_path, "bad": tmp_path / "bad", "other": tmp_path / "other"}
    with pytest.raises(SystemExit) as exit_info:
        merge_script(*[a.format(**paths) for a in argv], "--output_dir", tmp_path / "out")
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), error_lines
    assert not (tmp_path / "out").exists()


def test_merge_script_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge_script("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--preset", "--adapter", "--scale", "--fuse", "--fused_component", "--push_to_hub"):
        assert flag in text
