"""pyproject.toml: what the package imports is declared, and every floor is one `.ci/check_floors` can install."""

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS_WITH_FLOORS = ["server"]  # the extras `.ci/check_floors` installs at their floors


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9_.\-]+", requirement).group())


def test_every_floor_is_pinned_by_the_floor_check():
    pins = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "floor_pins.py"), *EXTRAS_WITH_FLOORS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    requirements = PROJECT["dependencies"] + [
        r for extra in EXTRAS_WITH_FLOORS for r in PROJECT["optional-dependencies"][extra]
    ]
    assert [_name(pin) for pin in pins] == [_name(requirement) for requirement in requirements]
    for pin, requirement in zip(pins, requirements, strict=True):
        assert pin.split("==")[1] == requirement.split(">=")[1]


def test_a_dependency_without_a_floor_is_refused(tmp_path):
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "floor_pins.py").write_text((REPO / ".ci" / "floor_pins.py").read_text())
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["torch>=2.6", "numpy"]\n')
    result = subprocess.run([sys.executable, str(tmp_path / ".ci" / "floor_pins.py")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "'numpy' needs exactly one `>=` floor" in result.stderr


def test_every_imported_distribution_is_declared():
    """A module the package imports (at any depth, lazily too) comes from a dependency or an extra, not from a
    dependency of a dependency."""
    declared = {_name(r) for r in PROJECT["dependencies"]}
    declared |= {_name(r) for extra in PROJECT["optional-dependencies"].values() for r in extra}
    distributions = packages_distributions()
    undeclared = set()
    for path in (REPO / "trl_arcopo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "trl_arcopo":
                    continue
                names = {_normalize(name) for name in distributions.get(top, [top])}
                if not names & declared:
                    undeclared.add(f"{top} ({path.relative_to(REPO)})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"
