"""The `trl-arcopo` command line: one subcommand per script module.

    trl-arcopo train --preset tiny
    trl-arcopo train --config my_run.yaml --accelerate_config multi_gpu --num_processes 8
    trl-arcopo generate --lora outputs/arcopo-tiny
    trl-arcopo <command> --help

Every script module exposes `make_parser()` and `main(argv: list[str] | None = None)`. `train` and `collect` also
accept `accelerate launch` options (like TRL's `trl sft`): with any of them the script is re-launched through
accelerate's own launch command, without them it runs in this process. Their modules also expose `check_args(argv)`,
the checks that need no heavy import, run first so that bad input fails within a second.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from . import __version__
from .utils.arguments import ArgumentParser

# The accelerate configs `--accelerate_config NAME` refers to (`single_gpu`, `multi_gpu`, `fsdp2`).
ACCELERATE_CONFIGS_DIR = Path(__file__).resolve().parent / "accelerate_configs"

_LAUNCH_HELP = """
accelerate launch options (train, collect):
  --accelerate_config NAME|PATH   one of {names} or an accelerate config file
  --num_processes N, --multi_gpu, --num_machines N, --main_process_port P, ...
                                  any `accelerate launch` option (see `accelerate launch --help`); with any of
                                  them the script is re-launched through `accelerate launch`
"""


@dataclass(frozen=True)
class Command:
    """A subcommand: the module holding its `make_parser()` / `main(argv)`, and whether it can be launched on
    several processes through accelerate."""

    module: str
    help: str
    launchable: bool = False


COMMANDS: dict[str, Command] = {
    "train": Command("trl_arcopo.scripts.train", "align a generator with AR-CoPO (LoRA)", launchable=True),
    "collect": Command(
        "trl_arcopo.scripts.collect", "collect a replay buffer from the reference policy", launchable=True
    ),
    "merge": Command("trl_arcopo.scripts.merge", "merge LoRA adapters with scales, export or fuse them"),
    "sweep": Command("trl_arcopo.scripts.sweep", "choose the merge scale (in- and out-of-domain rewards)"),
    "generate": Command("trl_arcopo.scripts.generate", "sample videos from a base model plus LoRAs"),
    "estimate-memory": Command(
        "trl_arcopo.scripts.estimate_memory", "predict a training config's peak GPU memory, per phase and process"
    ),
    "reward-server": Command("trl_arcopo.rewards.server", "serve a reward model over HTTP"),
    "toy-train": Command("trl_arcopo.toy.train", "retrain the toy-world generator shipped in the package (resumable)"),
}


def _error(message: str) -> int:
    print(f"trl-arcopo: error: {message}", file=sys.stderr)
    return 2


def _help_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="trl-arcopo",
        description="Align streaming autoregressive video generators with AR-CoPO.",
        epilog="`trl-arcopo <command> --help` prints the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"trl_arcopo {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="<command>")
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help)
    return parser


def _shipped_configs() -> list[str]:
    return sorted(path.stem for path in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))


def resolve_accelerate_config(name_or_path: str) -> Path:
    """An accelerate config file: a path, or the name of one of the shipped configs (`multi_gpu`, `fsdp2`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = ACCELERATE_CONFIGS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ValueError(f"--accelerate_config {name_or_path!r} is neither a file nor one of {_shipped_configs()}")


def split_launch_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `argv` into (accelerate launch options, script options): what the script's parser does not know is for
    accelerate, as in TRL's CLI. `--config FILE` (read by `TrlParser` itself) stays with the script."""
    args = list(argv)
    config = []
    if "--config" in args:
        index = args.index("--config")
        config = args[index : index + 2]
        del args[index : index + 2]
    unknown = parser.parse_known_args(args)[1]
    launch, remaining = [], list(unknown)
    script = []
    for token in args:
        if remaining and token == remaining[0]:
            launch.append(remaining.pop(0))
        else:
            script.append(token)
    return launch, config + script


def launch(module: ModuleType, launch_args: list[str], script_args: list[str]) -> int:
    """Run `python -m <module> <script_args>` through `accelerate launch <launch_args>`; returns the exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "--accelerate_config" in launch_args:
        index = launch_args.index("--accelerate_config")
        if index + 1 == len(launch_args):
            return _error("--accelerate_config needs a name or a path")
        try:
            config_file = resolve_accelerate_config(launch_args[index + 1])
        except ValueError as error:
            return _error(str(error))
        launch_args = [*launch_args[:index], "--config_file", str(config_file), *launch_args[index + 2 :]]
    parser = launch_command_parser()
    parser.allow_abbrev = False  # `--num_proc` is not `--num_processes`
    namespace, unknown = parser.parse_known_args([*launch_args, "--module", module.__name__, *script_args])
    if namespace.training_script != module.__name__:  # a stray value was taken for the script to launch
        unknown.append(namespace.training_script)
    if unknown:
        return _error(f"unrecognized arguments {unknown}: neither script options nor `accelerate launch` options")
    try:
        launch_command(namespace)
    except subprocess.CalledProcessError as error:  # one process: the script's own exit code
        return error.returncode
    except ChildFailedError as error:  # several processes: the failing ranks reported their errors above
        return _error(f"ranks {sorted(error.failures)} of the launched job failed (their errors are above)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-arcopo` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        _help_parser().parse_args(argv or ["--help"])
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return _error(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} (see trl-arcopo --help)")
    command = COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as error:
        if error.name == command.module:
            return _error(f"`trl-arcopo {name}` is not available in this installation ({command.module} is missing)")
        return _error(f"`trl-arcopo {name}` needs the package {error.name!r}, which is not installed")
    wants_help = "-h" in rest or "--help" in rest
    if command.launchable and not wants_help:
        module.check_args(rest)  # one-line errors before the imports of the parser and of accelerate
        launch_args, script_args = split_launch_args(module.make_parser(), rest)
        if launch_args:
            return launch(module, launch_args, script_args)
    try:
        module.main(rest)
    finally:
        if command.launchable and wants_help:
            print(_LAUNCH_HELP.format(names=", ".join(_shipped_configs())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
