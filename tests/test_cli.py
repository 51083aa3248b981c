"""The `trl-arcopo` console script: dispatch, help, accelerate relaunching and clear errors."""

import importlib
import json
import re
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from trl_arcopo import cli
from trl_arcopo.scripts import train


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trl-arcopo: error: "), lines
    return lines[0]


def test_console_script_entry_point():
    (entry_point,) = entry_points(group="console_scripts", name="trl-arcopo")
    assert entry_point.load() is cli.main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    with pytest.raises(SystemExit):
        cli.main([])  # no command: the same help


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_prints_its_complete_help(name, capsys):
    command = cli.COMMANDS[name]
    module = importlib.import_module(command.module)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = set(re.findall(r"--[\w-]+", module.make_parser().format_help()))
    assert options and all(option in out for option in options)
    assert ("accelerate launch options" in out) == command.launchable


def test_unknown_command_is_one_line(capsys):
    assert cli.main(["trian", "--preset", "tiny"]) == 2
    assert "unknown command 'trian'; choose one of train, collect" in _error_line(capsys)


def test_missing_script_or_dependency_is_one_line(capsys, monkeypatch, tmp_path):
    (tmp_path / "needs_a_package.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = {"absent": cli.Command("trl_arcopo.scripts.absent", ""), "broken": cli.Command("needs_a_package", "")}
    monkeypatch.setattr(cli, "COMMANDS", commands)
    assert cli.main(["absent"]) == 2
    assert "`trl-arcopo absent` is not available in this installation" in _error_line(capsys)
    assert cli.main(["broken"]) == 2
    assert "needs the package 'a_package_that_is_not_installed'" in _error_line(capsys)


def test_split_launch_args_gives_accelerate_what_the_script_does_not_know():
    argv = ["--num_processes", "2", "--preset", "tiny", "--config", "run.yaml", "--multi_gpu", "--max_steps", "2"]
    launch, script = cli.split_launch_args(train.make_parser(), argv)
    assert launch == ["--num_processes", "2", "--multi_gpu"]
    assert script == ["--config", "run.yaml", "--preset", "tiny", "--max_steps", "2"]
    assert cli.split_launch_args(train.make_parser(), ["--preset", "tiny"]) == ([], ["--preset", "tiny"])


@pytest.fixture
def launched(monkeypatch) -> list:
    """Replace accelerate's `launch_command` by a recorder of the namespace it receives."""
    calls = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", calls.append)
    return calls


def test_accelerate_options_relaunch_the_script_as_a_module(launched):
    argv = [
        "train",
        "--accelerate_config",
        "multi_gpu",
        "--num_processes",
        "2",
        "--preset",
        "tiny",
        "--max_steps",
        "3",
    ]
    assert cli.main(argv) == 0
    (namespace,) = launched
    assert namespace.config_file == str(cli.ACCELERATE_CONFIGS_DIR / "multi_gpu.yaml")
    assert namespace.num_processes == 2 and namespace.module
    assert namespace.training_script == "trl_arcopo.scripts.train"
    assert namespace.training_script_args == ["--preset", "tiny", "--max_steps", "3"]


def test_accelerate_config_accepts_a_path(launched, tmp_path):
    config = tmp_path / "my_cluster.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    assert cli.main(["train", "--accelerate_config", str(config)]) == 0
    assert launched[0].config_file == str(config) and launched[0].training_script_args == []


def test_launch_errors(launched, monkeypatch, capsys):
    assert cli.main(["train", "--accelerate_config", "tpu_pod", "--preset", "tiny"]) == 2
    assert "--accelerate_config 'tpu_pod' is neither a file nor one of ['fsdp2'" in _error_line(capsys)
    assert cli.main(["train", "--num_processes", "2", "--max_stepz", "3"]) == 2
    assert "unrecognized arguments ['--max_stepz', '3']" in _error_line(capsys)
    assert cli.main(["train", "--num_processes", "2", "stray"]) == 2
    assert "unrecognized arguments ['stray']" in _error_line(capsys)
    assert launched == []

    def fail(namespace):
        raise subprocess.CalledProcessError(returncode=3, cmd=["python"])

    monkeypatch.setattr("accelerate.commands.launch.launch_command", fail)
    assert cli.main(["train", "--num_processes", "1"]) == 3  # the launched script's own exit code


def test_without_accelerate_options_the_script_runs_in_process(monkeypatch, launched, tmp_path):
    calls = []
    monkeypatch.setattr(train, "main", calls.append)
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 2\n")
    assert cli.main(["train", "--config", str(config), "--max_steps", "1"]) == 0
    assert calls == [["--config", str(config), "--max_steps", "1"]] and launched == []


@pytest.mark.parametrize(
    ("name", "distributed_type"),
    [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("fsdp2", "FSDP")],
)
def test_shipped_accelerate_configs_load(name, distributed_type):
    config = load_config_from_file(str(cli.resolve_accelerate_config(name)))
    assert config.distributed_type == distributed_type and config.mixed_precision == "bf16"
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "WanTransformerBlock"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "trl_arcopo.cli", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("trl-arcopo: error: unknown command 'nope'")


# Runs `trl-arcopo` on each argv of sys.argv[1] (JSON) in one process: the exit code, the stderr lines and the heavy
# modules imported so far, per case.
_EARLY_CHECKS = """
import contextlib, io, json, sys
from trl_arcopo import cli

results = []
for argv in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code
    heavy = [m for m in ("torch", "diffusers", "datasets", "peft", "accelerate") if m in sys.modules]
    results.append({"code": code, "stderr": stderr.getvalue().strip().splitlines(), "heavy": heavy})
print(json.dumps(results))
"""


def test_bad_input_fails_in_one_line_before_the_heavy_imports(tmp_path):
    """Every command checks what it can before importing torch, diffusers or datasets (seconds): one line, exit 2."""
    adapters = ["--adapter", f"semi={tmp_path}", "--adapter", f"on_policy={tmp_path}"]
    cases = {
        (
            "train",
            "--reward_funcs",
            "brightnes",
        ): "--reward_funcs: Unknown reward 'brightnes'. Did you mean 'brightness'?",
        ("train", "--prompt_file", "/nonexistent/prompts.txt"): "--prompt_file /nonexistent/prompts.txt is not a",
        ("train", "--preset", "huge", "--max_steps", "2"): "unknown --preset 'huge'",
        ("collect", "--num_generations", "1"): "--num_generations must be >= 2",
        ("collect", "--noise_sigma", "0"): "--noise_sigma must be in (0, 1]",
        ("collect", "--noise_sigma", "5"): "--noise_sigma must be in (0, 1] (the paper uses 0.5), got 5.0",
        ("collect", "--preset", "tiny", "--num_frames", "10"): "--num_frames 10 does not split into whole chunks of "
        "the generator: use 9 + 12·k frames, e.g. 9, 21, 33",
        ("collect", "--preset", "tiny", "--height", "40"): "--height 40 is not a multiple of 16: use 32 or 48",
        ("collect", "--num_frames", "10"): "--num_frames 10 does not split into whole chunks of the generator: use "
        "3 + 3·k frames, e.g. 9, 12, 15",
        ("collect", "--height", "36"): "--height 36 is not a multiple of 8: use 32 or 40",
        ("generate", "--height", "0"): "--height must be >= 1, got 0",
        ("generate", "--fps", "0"): "--fps must be >= 1, got 0",
        ("generate", "--num_frames", "22"): "--num_frames 22 does not split into whole chunks",
        ("generate", "--lora", "/nonexistent/lora"): "--lora /nonexistent/lora: no such file or folder",
        ("generate", "--num_fr", "9"): "unrecognized arguments: --num_fr 9",
        ("merge", "--preset", "tiny", "--adapter", "a=/nonexistent"): "--adapter a=/nonexistent: no such file",
        ("sweep", "--preset", "tiny", *adapters, "--in_domain", "brightnes", "--out_of_domain", "sharpness"): (
            "--in_domain: Unknown reward 'brightnes'. Did you mean 'brightness'?"
        ),
    }
    argvs = [list(argv) for argv in cases]
    result = subprocess.run(
        [sys.executable, "-c", _EARLY_CHECKS, json.dumps(argvs)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for (argv, message), outcome in zip(cases.items(), json.loads(result.stdout), strict=True):
        assert outcome["code"] == 2 and len(outcome["stderr"]) == 1, (argv, outcome)
        assert message in outcome["stderr"][0], (argv, outcome)
        assert outcome["heavy"] == [], (argv, outcome)


def test_abbreviations_are_refused_in_one_line(capsys):
    """`--lr` was taken as an ambiguous abbreviation, after 150 lines of usage; it is now an unknown option."""
    with pytest.raises(SystemExit) as exit_info:
        train.parse(["--lr", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines == [
        "error: unrecognized arguments: --lr 1 (`--help` lists the valid ones)"
    ]
    assert cli.main(["--vers"]) == 2  # nor for the top-level options
    assert "unknown command '--vers'" in _error_line(capsys)


def test_negative_numbers_in_scientific_notation_are_values(capsys):
    """`--learning_rate -1e-3` said "expected one argument": `-1e-3` looked like an option."""
    namespace, unknown = train.make_parser().parse_known_args(
        ["--learning_rate", "-1e-3", "--pivot_weights", "-1", "-2e-1"]
    )
    assert namespace.learning_rate == -1e-3 and namespace.pivot_weights == [-1.0, -0.2] and unknown == []
    with pytest.raises(SystemExit) as exit_info:  # then the config's own check names the field
        train.parse(["--beta", "-1e-3"])
    assert exit_info.value.code == 2 and "`beta` (-0.001) must be a finite number >= 0" in capsys.readouterr().err
