"""Print `name==floor` for each dependency of pyproject.toml (and of the extras named as arguments), one a line.

Every requirement must have exactly one `>=` floor: `.ci/check_floors` installs these pins. Python 3.11+ (tomllib).
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [
    req for extra in sys.argv[1:] for req in project["optional-dependencies"][extra]
]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?>=([0-9][0-9A-Za-z.]*)", requirement.replace(" ", ""))
    if match is None:
        sys.exit(
            f"pyproject.toml: {requirement!r} needs exactly one `>=` floor (e.g. 'numpy>=1.24') for .ci/check_floors"
        )
    name, extras, floor = match.groups()
    print(f"{name}{extras or ''}=={floor}")
