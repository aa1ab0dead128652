"""Describes the machine and the library versions a set of results was measured with."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """Returns the CPU model from /proc/cpuinfo, or the platform's guess elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Returns the cores this process may run on (affinity), falling back to the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def dist_version(dist: str) -> str:
    """Returns an installed distribution's version, or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def threadpipe_version(repo_root: Path) -> str:
    """Returns the version of the threadpipe the children import (the working tree's first).

    Args:
        repo_root: The checkout whose ``threadpipe/`` the children see first.
    """
    init = repo_root / "threadpipe" / "__init__.py"
    if not init.exists():
        return dist_version("threadpipe")
    for line in init.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("'\"") + " (working tree)"
    return "working tree, no __version__"


def machine_info(dists: list[str], repo_root: Path, argv: list[str]) -> dict[str, str]:
    """Collects what a reader needs to compare these results with others.

    Args:
        dists: Distributions of the peers, whose versions are reported.
        repo_root: The checkout being benchmarked.
        argv: The command line of this run.

    Returns:
        Ordered name -> value pairs.
    """
    info = {
        "date (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", *argv]),
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable_cores()} usable",
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "threadpipe": threadpipe_version(repo_root),
    }
    for dist in dists:
        if dist and dist != "threadpipe":
            info[dist] = dist_version(dist)
    for dist in ("psutil", "matplotlib"):
        info[dist] = dist_version(dist)
    return info


def format_info(info: dict[str, str]) -> str:
    """Formats the machine info as aligned ``name: value`` lines."""
    width = max(len(key) for key in info)
    return "\n".join(f"{key:<{width}} : {value}" for key, value in info.items())
