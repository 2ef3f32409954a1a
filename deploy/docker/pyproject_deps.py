"""Print the project's dependencies from pyproject.toml, one requirement a line (for pip -r).

The Dockerfile installs torch/torchvision first from the wheel index that matches the base image
(CPU or CUDA), then the remaining dependencies, then the project, so the three steps cache apart
and the versions are always pyproject's (never restated in the Dockerfile).

    python deploy/docker/pyproject_deps.py --only torch torchvision
    python deploy/docker/pyproject_deps.py --exclude torch torchvision
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement ('ray[default]>=2.9' -> 'ray')."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def dependencies(pyproject: Path, only=(), exclude=()) -> list[str]:
    """pyproject's [project] dependencies, filtered by distribution name."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    only_names = {requirement_name(n) for n in only}
    excluded = {requirement_name(n) for n in exclude}
    out = []
    for dep in deps:
        name = requirement_name(dep)
        if (not only_names or name in only_names) and name not in excluded:
            out.append(dep)
    missing = only_names - {requirement_name(d) for d in out}
    if missing:
        raise SystemExit(f"{pyproject}: no dependency named {sorted(missing)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--exclude", nargs="*", default=[])
    args = parser.parse_args(argv)
    sys.stdout.write(
        "".join(f"{d}\n" for d in dependencies(args.pyproject, args.only, args.exclude))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
