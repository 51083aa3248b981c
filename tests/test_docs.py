"""The documentation: runnable code blocks run, links resolve, the API reference is up to date.

A Python block is runnable when the line before its fence is `<!-- runnable -->` (see docs/contributing.md). The
runnable blocks of one file run in order in one namespace, in an empty temporary directory, offline.
"""

import importlib.util
import re
from pathlib import Path

import pytest

from trl_arcopo.rewards import registry

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MARKER = "<!-- runnable -->"
SLOW = {"docs/guides/semi_on_policy_and_merging.md"}  # over ~20 s on 2 CPU cores


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every runnable block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if line != MARKER:
            continue
        assert index + 1 < len(lines) and lines[index + 1].strip() == "```python", (
            f"{path.name}:{index + 1}: {MARKER} must be followed by a ```python fence"
        )
        end = next(i for i in range(index + 2, len(lines)) if lines[i].strip() == "```")
        blocks.append((index + 3, "\n".join(lines[index + 2 : end]) + "\n"))
    return blocks


def _name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


RUNNABLE = [
    pytest.param(path, id=_name(path), marks=[pytest.mark.slow] if _name(path) in SLOW else [])
    for path in DOCS
    if runnable_blocks(path)
]


def test_the_main_documents_have_runnable_examples():
    names = {param.id for param in RUNNABLE}
    assert {
        "README.md",
        "docs/quickstart.md",
        "docs/guides/custom_reward.md",
        "docs/guides/custom_generator.md",
    } <= names


@pytest.mark.parametrize("path", RUNNABLE)
def test_runnable_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Blocks may register rewards: the registry is process-wide, so later tests must not see them.
    monkeypatch.setattr(registry, "_LOADERS", dict(registry._LOADERS))
    monkeypatch.setattr(registry, "_REPO_IDS", dict(registry._REPO_IDS))
    namespace = {"__name__": "__docs__"}
    for line, code in runnable_blocks(path):
        exec(compile(code, f"{_name(path)}:{line}", "exec"), namespace)


def test_links_point_to_existing_files():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"[a-z]+://", target) and not (path.parent / target).exists():
                broken.append(f"{_name(path)} -> {target}")
    assert broken == []


def test_api_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("make_api_reference", REPO / "docs" / "make_api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.API_FILE.read_text() == module.render(), "run `python docs/make_api_reference.py`"
