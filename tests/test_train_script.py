"""`examples/train_selfforcing.py`: the tiny preset end to end, and clear CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_selfforcing.py"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tiny_preset_trains_saves_and_raises_the_reward(tmp_path):
    result = _run("--preset", "tiny", "--output_dir", str(tmp_path), "--disable_tqdm", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "README.md", "adapter_config.json"} <= files
    assert any(name.startswith("sample.") for name in files)
    history = json.loads((tmp_path / "checkpoint-60" / "trainer_state.json").read_text())["log_history"]
    rewards = [h["reward"] for h in history if "reward" in h]
    assert sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5 > 0.006, rewards


def test_flags_override_the_preset_and_yaml_parses(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_selfforcing
    finally:
        sys.path.pop(0)
    script_args, config = train_selfforcing.parse(["--preset", "tiny", "--num_generations", "4"])
    assert config.num_generations == 4 and config.height == 32 and script_args.reward_funcs == ["brightness"]
    yaml = tmp_path / "run.yaml"
    yaml.write_text("preset: tiny\nmax_steps: 3\nnoise_sigma: 0.25\nreward_funcs: [colorfulness, sharpness]\n")
    script_args, config = train_selfforcing.parse(["--config", str(yaml), "--max_steps", "5"])
    assert config.max_steps == 5 and config.noise_sigma == 0.25
    assert script_args.reward_funcs == ["colorfulness", "sharpness"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "huge"], "unknown --preset 'huge'"),
        (["--prompt_file", "/nonexistent/prompts.txt", "--max_steps", "1"], "is not a readable file"),
        (["--preset", "self-forcing"], "needs prompts"),
    ],
)
def test_bad_command_line(args, message):
    result = _run(*args, timeout=300)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("config", sorted((SCRIPT.parent / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_parses(config):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_selfforcing
    finally:
        sys.path.pop(0)
    script_args, args = train_selfforcing.parse(["--config", str(config)])
    assert script_args.preset in train_selfforcing.PRESETS and args.output_dir
