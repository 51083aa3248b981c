"""The `trl-arcopo` console script: dispatch, help, accelerate relaunching and clear errors."""

import importlib
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
    assert ("--accelerate_config" in out) == command.launchable


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


def test_without_accelerate_options_the_script_runs_in_process(monkeypatch, launched):
    calls = []
    monkeypatch.setattr(train, "main", calls.append)
    assert cli.main(["train", "--config", "run.yaml", "--max_steps", "1"]) == 0
    assert calls == [["--config", "run.yaml", "--max_steps", "1"]] and launched == []


@pytest.mark.parametrize(
    ("name", "distributed_type"),
    [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("fsdp2", "FSDP"), ("zero2", "DEEPSPEED")],
)
def test_shipped_accelerate_configs_load(name, distributed_type):
    config = load_config_from_file(str(cli.resolve_accelerate_config(name)))
    assert config.distributed_type == distributed_type and config.mixed_precision == "bf16"
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "WanTransformerBlock"
    if name == "zero2":
        assert config.deepspeed_config["zero_stage"] == 2


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "trl_arcopo.cli", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("trl-arcopo: error: unknown command 'nope'")
