"""The training script (`trl_arcopo.scripts.train`, `examples/train_selfforcing.py`): presets, YAML configs, an end
to end tiny run (1 and 2 processes), the documented semi-on-policy flow (collect, then train on the buffer), and one
clear line for bad input."""

import contextlib
import io
import json
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from datasets import Dataset
from safetensors.torch import load_file

from trl_arcopo.replay import load_replay_buffer, record_rewards
from trl_arcopo.scripts import train

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train_selfforcing.py"
CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
SEMI_ON_POLICY_CONFIG = REPO / "examples" / "configs" / "tiny_semi_on_policy.yaml"
STEPS = 4


def run_example(command: list[str], cwd: Path) -> str:
    """`python SCRIPT ARGS...` (`command`: the script, relative to `cwd`, and its arguments) run in this process the
    way `python` runs it (as `__main__`, with its `sys.argv` and working directory), which spares the ~8 s of imports
    of a new interpreter; returns what it printed. `test_two_processes_through_the_cli_launcher` runs the train
    script in processes of its own."""
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as stdout:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", command)
        runpy.run_path(command[0], run_name="__main__")
    return stdout.getvalue()


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> tuple[Path, str]:
    """The README's main job (the example on its default preset, the toy generator), shortened to a few steps;
    shared by the assertions below, with what it printed. That it learns is tested with standard errors in
    test_toy_learning.py."""
    output_dir = tmp_path_factory.mktemp("arcopo-toy")
    args = ["--output_dir", str(output_dir), "--max_steps", str(STEPS), "--save_steps", str(STEPS)]
    args += ["--log_videos_steps", str(STEPS // 2), "--disable_tqdm", "true"]
    return output_dir, run_example([str(EXAMPLE), *args], REPO)


@pytest.mark.slow
def test_main_job_saves_a_loadable_lora_and_its_model_card(main_job):
    output_dir, _ = main_job
    files = {p.name for p in output_dir.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "adapter_config.json", "README.md", "training_args.json"} <= files
    lora = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert lora and all(key.startswith("transformer.") and "lora" in key for key in lora)
    assert any(value.abs().sum() > 0 for key, value in lora.items() if "lora_B" in key)  # it trained
    card = (output_dir / "README.md").read_text()
    assert "arcopo" in card and "text-to-video" in card and "redness" in card
    assert "load_toy_pipeline()" in card  # the base model, as a user builds it


@pytest.mark.slow
def test_main_job_writes_the_base_model_and_the_lora_side_by_side(main_job):
    from PIL import Image

    output_dir, stdout = main_job
    (video,) = [p for p in output_dir.iterdir() if p.stem == "before_after"]
    assert video.suffix in (".mp4", ".png") and video.stat().st_size > 0 and video.name in stdout
    frames = Image.open(output_dir / "before_after_frames.png")
    # 4 moments of 4 prompts x (base, LoRA) at 32x32 upscaled 4x, 2-pixel gaps.
    assert frames.size == (4 * 4 * (2 * 34 - 2), 4 * (4 * 34 - 2))
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["step-0", f"step-{STEPS // 2}"]
    history = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    assert len([h for h in history if "reward" in h]) == STEPS // 2  # one rollout per num_iterations=2 steps
    assert history[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-4)  # first update of a rollout: π_θ = π_old


@pytest.mark.slow
def test_main_job_plots_its_training_curves(main_job):
    output_dir, _ = main_job
    assert (output_dir / "training_curves.png").stat().st_size > 0
    assert "training_curves.png" in (output_dir / "README.md").read_text()


def _documented_commands(config: Path) -> list[list[str]]:
    """The `python examples/...` commands of the header comment of an example config."""
    lines = [line.removeprefix("#").strip() for line in config.read_text().splitlines() if line.startswith("#")]
    return [shlex.split(line) for line in lines if line.startswith("python examples/")]


@pytest.fixture(scope="module")
def semi_on_policy_run(tmp_path_factory) -> tuple[Path, str]:
    """The two documented commands of `tiny_semi_on_policy.yaml` (collect a buffer, train on it), run as written
    from a folder laid out like a checkout (relative paths included), with 2 groups and 4 steps; with what the
    second one printed."""
    workdir = tmp_path_factory.mktemp("semi-on-policy")
    (workdir / "examples").symlink_to(REPO / "examples")
    collect, train_on_buffer = _documented_commands(SEMI_ON_POLICY_CONFIG)
    assert collect[1] == "examples/collect_replay_buffer.py" and train_on_buffer[1] == "examples/train_selfforcing.py"
    run_example([*collect[1:], "--num_groups", "2"], workdir)
    return workdir, run_example([*train_on_buffer[1:], "--max_steps", "4", "--disable_tqdm", "true"], workdir)


@pytest.mark.slow
def test_semi_on_policy_flow_trains_the_semi_adapter_on_the_collected_buffer(semi_on_policy_run):
    workdir, stdout = semi_on_policy_run
    buffer = load_replay_buffer(workdir / "outputs" / "replay-tiny")
    output_dir = workdir / "outputs" / "arcopo-tiny-semi"
    args = json.loads((output_dir / "training_args.json").read_text())
    assert args["training_mode"] == "semi_on_policy" and args["replay_dataset"] == "outputs/replay-tiny"
    assert args["adapter_name"] == "semi"
    lora = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert any(value.abs().sum() > 0 for key, value in lora.items() if "lora_B" in key)  # it trained
    # No generation: each rollout's reward is the stored mean of one of the 2 buffer groups.
    (state,) = output_dir.glob("checkpoint-*/trainer_state.json")
    logged = sorted(h["reward"] for h in json.loads(state.read_text())["log_history"] if "reward" in h)
    stored = sorted(record_rewards(buffer[i])["brightness_reward"].mean().item() for i in range(len(buffer)))
    assert len(buffer) == 2 and logged == pytest.approx(stored, abs=1e-6)
    (video,) = output_dir.glob("before_after.*")
    assert video.stat().st_size > 0 and video.name in stdout


@pytest.mark.slow
def test_two_processes_through_the_cli_launcher(tmp_path, free_port):
    """`trl-arcopo train` with accelerate options re-launches itself with `accelerate launch` (DDP over gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port)]
    script = ["--preset", "tiny", "--max_steps", "2", "--num_generations", "4", "--num_anchors", "2"]
    script += ["--output_dir", str(tmp_path), "--save_strategy", "no", "--log_videos_steps", "0"]
    command = [sys.executable, "-m", "trl_arcopo.cli", "train", *launch, *script, "--disable_tqdm", "true"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "README.md").is_file()
    assert result.stdout.count("the base model vs the LoRA") == 1  # written by the main process only
    args = json.loads((tmp_path / "training_args.json").read_text())
    assert args["num_generations"] == 4 and args["max_steps"] == 2


def test_flags_override_the_preset_and_yaml_overrides_the_preset(tmp_path):
    script_args, config = train.parse(["--preset", "tiny", "--num_generations", "4"])
    assert config.num_generations == 4 and config.height == 32 and script_args.reward_funcs == ["brightness"]
    yaml = tmp_path / "run.yaml"
    yaml.write_text("preset: tiny\nmax_steps: 3\nnoise_sigma: 0.25\nreward_funcs: [colorfulness, sharpness]\n")
    script_args, config = train.parse(["--config", str(yaml), "--max_steps", "5"])
    assert config.max_steps == 5 and config.noise_sigma == 0.25 and config.height == 32
    assert script_args.reward_funcs == ["colorfulness", "sharpness"]


def test_the_yaml_preset_chooses_the_defaults(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("preset: self-forcing\nmax_steps: 7\n")
    script_args, config = train.parse(["--config", str(yaml)])
    assert script_args.preset == "self-forcing" and config.max_steps == 7
    assert config.save_steps == 25 and config.transformer_gradient_checkpointing  # the preset's, not the tiny ones
    assert (config.num_frames, config.height, config.width) == (81, 480, 832)
    assert script_args.reward_funcs == ["videoalign"]
    assert config.reward_weights == {"videoalign:VQ": 1.0, "videoalign:MQ": 1.0, "videoalign:TA": 1.0}


def test_the_video_size_is_the_presets_generators():
    """12 frames are 4 chunks of the toy generator's per-frame latents (Wan2.1's VAE would make 3 latent frames)."""
    _, config = train.parse(["--num_frames", "12", "--height", "24"])
    assert (config.num_frames, config.height) == (12, 24)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_parses(path):
    script_args, config = train.parse(["--config", str(path)])
    assert script_args.preset in train.PRESETS and config.output_dir


def test_the_self_forcing_config_has_the_paper_hyper_parameters():
    script_args, config = train.parse(["--config", str(REPO / "examples" / "configs" / "self_forcing_on_policy.yaml")])
    paper = {"num_generations": 12, "noise_sigma": 0.5, "num_anchors": 4, "learning_rate": 1e-5, "epsilon": 1e-4}
    paper |= {"num_iterations": 2, "lora_r": 64, "lora_alpha": 128}
    assert {key: getattr(config, key) for key in paper} == paper
    assert script_args.reward_funcs == ["videoalign"] and set(config.reward_weights) == {
        "videoalign:VQ",
        "videoalign:MQ",
        "videoalign:TA",
    }


def test_prompts_come_from_a_file_or_a_dataset(tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a cat\n\n  a dog  \n")
    script_args, _ = train.parse(["--prompt_file", str(prompt_file)])
    assert train.load_prompts(script_args)["prompt"] == ["a cat", "a dog"]

    Dataset.from_dict({"caption": ["a red car", "a blue sea"]}).to_parquet(tmp_path / "data" / "train.parquet")
    script_args, _ = train.parse(["--dataset_name", str(tmp_path / "data"), "--dataset_prompt_column", "caption"])
    assert train.load_prompts(script_args)["prompt"] == ["a red car", "a blue sea"]


def _exit_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "unknown --preset 'huge'; choose one of ['self-forcing', 'tiny', 'toy']"),
        (["--prompt_file", "/nonexistent/prompts.txt"], "--prompt_file /nonexistent/prompts.txt is not a readable"),
        (["--preset", "tiny", "--max_stepz", "3"], "unrecognized arguments: --max_stepz 3"),
        (["--num_frames", "22"], "--num_frames 22 does not split into whole chunks of the generator: use 3 + 3·k"),
        (["--preset", "tiny", "--num_frames", "12"], "--num_frames 12 does not split into whole chunks of the gener"),
        (["--preset", "tiny", "--height", "24"], "--height 24 is not a multiple of 16: use 16 or 32"),
        (["--model", "/nonexistent/pipeline"], "cannot load --model /nonexistent/pipeline: "),
        (["--model_init_kwargs", '{"dtype": "bfloat16"}'], "--model_init_kwargs is not read by this script"),
        (
            ["--training_mode", "semi_on_policy", "--replay_dataset", "buffer", "--dataset_name", "me/prompts"],
            "semi_on_policy trains on the prompts of the replay buffer --replay_dataset: remove --prompt_file",
        ),
        (["--training_mode", "semi_on_policy", "--replay_dataset", "/nonexistent/buffer"], "/nonexistent/buffer"),
    ],
)
def test_bad_command_line(capsys, argv, message):
    assert message in _exit_line(capsys, argv)


def test_bad_yaml_keys(tmp_path, capsys):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("preset: tiny\nmax_stepz: 3\nnoise_sigmaa: 0.1\n")
    message = _exit_line(capsys, ["--config", str(yaml)])
    assert "unknown key(s) in the --config file: max_stepz, noise_sigmaa" in message


def test_the_real_preset_needs_prompts(capsys):
    assert "needs prompts: pass --prompt_file or --dataset_name" in _exit_line(capsys, ["--preset", "self-forcing"])


def test_missing_real_model_is_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    """The self-forcing preset offline with an empty Hub cache: the generator cannot be found."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a corgi surfing\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # HF_HUB_OFFLINE=1
    message = _exit_line(capsys, ["--preset", "self-forcing", "--prompt_file", str(prompt_file)])
    assert "cannot load the self-forcing generator (gdhe17/Self-Forcing" in message


def test_reward_weights_may_name_the_rewards_as_passed():
    """`--reward_funcs brightness --reward_weights '{"brightness": 2}'` was refused: the column is brightness_reward."""
    from trl_arcopo import ARCoPOTrainer
    from trl_arcopo.testing import tiny_causal_wan_pipeline

    argv = [
        "--reward_funcs",
        "brightness",
        "sharpness",
        "--reward_weights",
        '{"brightness": 2, "sharpness_reward": 1}',
    ]
    script_args, config = train.parse([*argv, "--output_dir", "unused", "--max_steps", "1"])
    prompts = Dataset.from_dict({"prompt": ["a cat"]})
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), script_args.reward_funcs, args=config, train_dataset=prompts)
    assert trainer.reward_func_names == ["brightness_reward", "sharpness_reward"]
    assert trainer.args.reward_weights == {"brightness_reward": 2.0, "sharpness_reward": 1.0}
