"""Print the project's requirements (runtime + test extra), one per line.

Used by `make setup` so that pyproject.toml stays the single list of what the
project needs, while insightface can still be installed last with --no-deps.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exclude", action="append", default=[], help="package name to leave out")
    parser.add_argument("--extra", action="append", help="optional extra to include (default: test; 'none': no extra)")
    args = parser.parse_args()
    extras = [e for e in (args.extra if args.extra is not None else ["test"]) if e != "none"]
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    excluded = {name.lower() for name in args.exclude}
    for requirement in requirements:
        if requirement_name(requirement) not in excluded:
            print(requirement)


if __name__ == "__main__":
    main()
