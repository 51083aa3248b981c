"""Generate `docs/api.md` from the docstrings of the public API: `python docs/make_api_reference.py`.

`tests/test_docs.py` checks that `docs/api.md` is what this script writes, so a changed public signature or docstring
fails the tests until the reference is regenerated.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

API_FILE = Path(__file__).resolve().parent / "api.md"

# (module, public names or None for the module's `__all__`, what the module is for). A name re-exported by an
# earlier module is documented where it is defined, further down.
MODULES: list[tuple[str, list[str] | None, str]] = [
    ("trl_arcopo", None, "The trainer, its configuration and the pipeline."),
    (
        "trl_arcopo.pipelines",
        ["CausalGenerationState", "ChunkTrajectory", "few_step_schedule"],
        "The streaming API's data types and the few-step schedule.",
    ),
    (
        "trl_arcopo.models",
        ["load_self_forcing_transformer", "wan_config_from_original"],
        "Original Self-Forcing checkpoints as diffusers transformers.",
    ),
    ("trl_arcopo.rewards", None, "Reward functions, the reward protocol and the registry of reward names."),
    ("trl_arcopo.replay", None, "Replay buffers of rollout groups for semi-on-policy training."),
    ("trl_arcopo.adapters", None, "Merging, exporting, fusing and pushing the AR-CoPO adapters."),
    ("trl_arcopo.evaluation", None, "Scoring a pipeline on prompts with fixed seeds."),
    ("trl_arcopo.sweep", None, "Choosing the merge scale with the dual-benchmark rule."),
    ("trl_arcopo.utils.videos", None, "Writing videos and sending them to trackers."),
    ("trl_arcopo.utils.plots", None, "Training curves from the log history."),
    (
        "trl_arcopo.testing",
        [
            "tiny_causal_wan_pipeline",
            "tiny_components",
            "tiny_transformer_config",
            "tiny_tokenizer",
            "populate_hub_cache",
        ],
        "Tiny offline components for tests, examples and docs (never imported by library code).",
    ),
]


class _Annotation(str):
    """An annotation kept as the string written in the source (`from __future__ import annotations`)."""

    def __repr__(self) -> str:
        return str(self)


def _signature(obj: object) -> str:
    """The signature as written in the source, without `self` / `cls`."""
    signature = inspect.signature(obj)
    parameters = [
        p.replace(annotation=_Annotation(p.annotation)) if isinstance(p.annotation, str) else p
        for p in signature.parameters.values()
        if p.name not in ("self", "cls")
    ]
    annotation = signature.return_annotation
    if isinstance(annotation, str):
        annotation = _Annotation(annotation)
    return str(signature.replace(parameters=parameters, return_annotation=annotation))


def _docstring(obj: object) -> str:
    doc = inspect.getdoc(obj)
    return f"~~~text\n{doc}\n~~~\n" if doc else ""


def _methods(cls: type) -> list[tuple[str, object]]:
    """Public methods (and `__call__`) defined by the class itself, in source order."""
    methods = []
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        function = value.__func__ if isinstance(value, classmethod | staticmethod) else value
        if inspect.isfunction(function) and function.__doc__:
            methods.append((name, function))
    return methods


def _render_class(qualified: str, cls: type) -> str:
    bases = [f"`{b.__module__}.{b.__qualname__}`" for b in cls.__bases__ if not b.__name__.startswith("_")]
    if issubclass(cls, BaseException) or len(inspect.signature(cls).parameters) > 16:
        header = f"class {qualified}"  # the docstring lists the (many) fields
    else:
        header = f"{qualified}{_signature(cls)}"
    parts = [f"### `{cls.__name__}`\n", f"```python\n{header}\n```\n"]
    if bases and bases != ["`builtins.object`"]:
        parts.append(f"Subclass of {', '.join(bases)}.\n")
    parts.append(_docstring(cls))
    for name, method in _methods(cls):
        parts += [
            f"#### `{cls.__name__}.{name}`\n",
            f"```python\n{cls.__name__}.{name}{_signature(method)}\n```\n",
            _docstring(method),
        ]
    return "\n".join(parts)


def _render_function(qualified: str, function: object) -> str:
    name = qualified.rsplit(".", 1)[-1]
    return "\n".join([f"### `{name}`\n", f"```python\n{qualified}{_signature(function)}\n```\n", _docstring(function)])


def render() -> str:
    """The content of `docs/api.md`."""
    defined_later = {}
    for module_name, names, _ in MODULES:
        module = importlib.import_module(module_name)
        for name in names if names is not None else module.__all__:
            defined_later.setdefault(id(getattr(module, name)), []).append(module_name)

    sections, toc = [], []
    for module_name, names, purpose in MODULES:
        module = importlib.import_module(module_name)
        entries, constants, reexported = [], [], []
        for name in names if names is not None else module.__all__:
            obj = getattr(module, name)
            home = defined_later[id(obj)][-1]
            if home != module_name:
                reexported.append(f"`{name}` (see `{home}`)")
            elif inspect.isclass(obj):
                entries.append(_render_class(f"{module_name}.{name}", obj))
            elif callable(obj):
                entries.append(_render_function(f"{module_name}.{name}", obj))
            else:
                constants.append(f"`{name}`")
        header = [f"## `{module_name}`\n", f"{purpose}\n"]
        if reexported:
            header.append(f"Also exported here: {', '.join(reexported)}.\n")
        if constants:
            header.append(f"Constants: {', '.join(constants)}.\n")
        sections.append("\n".join(header + entries))
        toc.append(f"- [`{module_name}`](#{module_name.replace('.', '')}): {purpose}")

    from trl_arcopo.cli import COMMANDS

    commands = "\n".join(
        f"| `trl-arcopo {name}` | {command.help} | `{command.module}` |" for name, command in COMMANDS.items()
    )
    cli = (
        "## Command line\n\n"
        "Every command prints its options with `--help`; `train` and `collect` also take `accelerate launch` options "
        "(see [distributed training](guides/distributed.md)).\n\n"
        "| command | what | module (`make_parser()`, `main(argv)`) |\n|---|---|---|\n"
        f"{commands}\n"
        "| `trl-arcopo-reward-server` | serve a reward model over HTTP | `trl_arcopo.rewards.server` |\n"
    )
    intro = (
        "# API reference\n\n"
        "Generated from the docstrings by `python docs/make_api_reference.py`; do not edit by hand. Names not listed "
        "here are internal and may change.\n\n" + "\n".join(toc) + "\n- [Command line](#command-line)\n"
    )
    return "\n".join([intro, *sections, cli])


if __name__ == "__main__":
    API_FILE.write_text(render())
    print(f"wrote {API_FILE}")
