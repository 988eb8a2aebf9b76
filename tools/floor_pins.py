"""Print the lowest versions pyproject.toml allows for its direct dependencies, as pip constraints.

What ``make test-lowest`` installs where uv (``--resolution lowest-direct``) is not at hand: each
``name>=X`` of the dependencies and extras becomes ``name==X.*``, so that a floor that no longer
works fails a test instead of hiding behind a newer release. ``X.*``, the newest release of the
floor's series, rather than ``X`` itself: a floor need not name a release (no pytest-timeout 2.3
was published; 2.3.1 was), and pip resolves no "lowest" by itself. Packages named on the command line
are left out (torch and torchvision: the Makefile's TORCH line installs the CI build); the
project's own extras (``svp[optim8bit]``) are followed by pip itself. Python 3.11+ (``tomllib``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def floor_pins(pyproject: Path, skip: set[str]) -> list[str]:
    """``name==floor.*`` for every dependency of ``pyproject`` (extras too) that states a ``>=`` floor."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(requirement for extra in extras for requirement in extra)]
    pins = {}
    for requirement in requirements:
        if (match := _FLOOR.match(requirement)) and match.group(1) != project["name"] and match.group(1) not in skip:
            pins[match.group(1)] = f"{match.group(1)}=={match.group(2)}.*"
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(floor_pins(Path(__file__).resolve().parents[1] / "pyproject.toml", set(sys.argv[1:]))))
