"""The generation script (`trl_arcopo.scripts.generate`, `examples/generate.py`): a base model plus LoRAs with
scales, videos written to disk, one clear line for bad input."""

import itertools
import json
import runpy
import shutil
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from trl_arcopo import CausalWanPipeline
from trl_arcopo.scripts import generate
from trl_arcopo.scripts.utils import check_video_size
from trl_arcopo.testing import populate_hub_cache, tiny_causal_wan_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--preset", "tiny"]  # the LoRAs of these tests are trained on the tiny generator
SIZE = ["--num_frames", "9", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A random (non-zero) LoRA of the tiny transformer, saved the way ARCoPOTrainer saves one."""
    pipe = tiny_causal_wan_pipeline()
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]), "trained")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    path = tmp_path_factory.mktemp("lora")
    CausalWanPipeline.save_lora_weights(
        path,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="trained"),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["trained"].to_dict(),
    )
    return path


def _frames(pipe: CausalWanPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red car", num_frames=9, height=32, width=32, generator=generator, output_type="pt").frames


def test_parse_lora_reads_an_optional_scale():
    assert generate.parse_lora("outputs/arcopo") == ("outputs/arcopo", 1.0)
    assert generate.parse_lora("org/lora=0.8") == ("org/lora", 0.8)
    assert generate.parse_lora("dir=with=equals=-1") == ("dir=with=equals", -1.0)
    for bad in ("org/lora=", "=0.5", "org/lora=nan", "org/lora=big"):
        with pytest.raises(Exception, match="path_or_repo"):
            generate.parse_lora(bad)


def test_loras_are_applied_at_their_scales(lora_dir):
    base = _frames(generate.load_pipeline(generate.make_parser().parse_args([*TINY, "--device", "cpu"])))
    manual = tiny_causal_wan_pipeline()
    manual.load_lora_weights(lora_dir)
    with_lora = _frames(manual)
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA changes the video

    args = generate.make_parser().parse_args([*TINY, "--device", "cpu", "--lora", str(lora_dir)])
    torch.testing.assert_close(_frames(generate.load_pipeline(args)), with_lora, rtol=0, atol=1e-6)
    args = generate.make_parser().parse_args([*TINY, "--device", "cpu", "--lora", f"{lora_dir}=0"])
    torch.testing.assert_close(_frames(generate.load_pipeline(args)), base, rtol=0, atol=1e-6)
    # Two LoRAs at 0.5 each add up to the LoRA at 1 (W0 + 0.5·ΔW + 0.5·ΔW).
    args = generate.make_parser().parse_args(
        [*TINY, "--device", "cpu", "--lora", f"{lora_dir}=0.5", "--lora", f"{lora_dir}=0.5"]
    )
    torch.testing.assert_close(_frames(generate.load_pipeline(args)), with_lora, rtol=0, atol=1e-5)


def test_a_hub_model_loads_at_its_revision_from_the_cache(tmp_path, hf_cache, monkeypatch, capsys):
    tiny_causal_wan_pipeline().save_pretrained(tmp_path / "pipe")
    populate_hub_cache("me/tiny-causal-wan", tmp_path / "pipe", cache_dir=hf_cache, revision="v1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))  # HF_HUB_OFFLINE=1
    args = generate.make_parser().parse_args(
        ["--device", "cpu", "--model", "me/tiny-causal-wan", "--model_revision", "v1"]
    )
    torch.testing.assert_close(
        _frames(generate.load_pipeline(args)), _frames(tiny_causal_wan_pipeline()), rtol=0, atol=1e-5
    )

    with pytest.raises(SystemExit) as exit_info:  # "main" is not in the cache
        generate.load_pipeline(
            generate.make_parser().parse_args([*TINY, "--device", "cpu", "--model", "me/tiny-causal-wan"])
        )
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines[-1].startswith("error: cannot load --model me/tiny-causal-wan: ")


def test_generate_writes_one_video_per_prompt_and_seed(tmp_path, lora_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    argv = [*SIZE, "--prompt_file", str(prompts), "--num_videos_per_prompt", "2", "--lora", f"{lora_dir}=0.5"]
    paths = generate.main([*TINY, *argv, "--seed", "3", "--output_dir", str(tmp_path / "videos")])
    assert [p.stem for p in paths] == ["video_000", "video_001", "video_002", "video_003"]
    assert all(p.parent == tmp_path / "videos" and p.stat().st_size > 0 for p in paths)
    lora_line, *out = capsys.readouterr().out.splitlines()
    assert lora_line == f"LoRA {lora_dir} loaded as adapter lora_0 at scale 0.5"
    assert [line.rsplit(", ", 2)[1:] for line in out] == [
        ["seed 3", "'a cat'"],
        ["seed 4", "'a cat'"],
        ["seed 5", "'a dog'"],
        ["seed 6", "'a dog'"],
    ]
    assert "9 frames of 32x32" in out[0]


def test_the_size_defaults_to_the_one_the_lora_was_trained_at(tmp_path, lora_dir, capsys):
    trained = tmp_path / "trained-lora"
    shutil.copytree(lora_dir, trained)
    (trained / "training_args.json").write_text(json.dumps({"num_frames": 9, "height": 32, "width": 48}))
    assert generate.trained_size(str(trained)) == (9, 32, 48) and generate.trained_size(str(lora_dir)) is None
    (path,) = generate.main([*TINY, "--lora", str(trained), "--output_dir", str(tmp_path / "videos")])
    out = capsys.readouterr().out
    assert f"default size 9 frames of 48x32: the one {trained} was trained at" in out
    assert f"{path}: 9 frames of 48x32, seed 0" in out
    generate.main([*TINY, "--lora", str(trained), "--num_frames", "21", "--output_dir", str(tmp_path / "videos")])
    assert "21 frames of 48x32" in capsys.readouterr().out  # flags win


def test_the_example_script_runs_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["generate.py", *TINY, *SIZE, "--output_dir", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "generate.py"), run_name="__main__")
    (video,) = tmp_path.iterdir()
    assert video.stem == "video_000" and "a red car driving on a road at night" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora", "/nonexistent/lora"], "/nonexistent/lora"),
        (["--prompt_file", "/nonexistent/prompts.txt"], "--prompt_file /nonexistent/prompts.txt is not a readable"),
        (["--num_videos_per_prompt", "0"], "--num_videos_per_prompt must be >= 1"),
        (["--num_frames", "10"], "--num_frames 10 does not split into whole chunks of the generator: use 9 + 12·k"),
        (["--height", "0"], "--height must be >= 1, got 0"),  # was the preset's height, silently
        (["--width", "40"], "--width 40 is not a multiple of 16: use 32 or 48"),
        (["--fps", "0"], "--fps must be >= 1, got 0"),  # was 16 fps, silently
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*TINY, *argv, "--output_dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_the_early_size_check_agrees_with_the_pipeline(capsys):
    """The scripts check sizes before loading a preset's generator; the loaded pipeline's own check agrees."""
    pipe = tiny_causal_wan_pipeline()
    for num_frames, height in itertools.product(range(1, 90), (0, 16, 24, 32, 40, 48)):
        try:
            pipe.check_inputs(
                prompt="a", prompt_embeds=None, num_frames=num_frames, height=height, width=32, latents=None,
                output_type="pt",
            )  # fmt: skip
            accepted = height > 0  # the pipeline takes 0 as a multiple of 16
        except ValueError:
            accepted = False
        try:
            check_video_size(num_frames, height, 32)
            early = True
        except SystemExit:
            early = False
        assert early == accepted, (num_frames, height)
    capsys.readouterr()
