"""What ``import threadpipe`` costs a script, next to its peers.

Usage::

    python bench/imports.py                      # 21 fresh interpreters per library, ~15 s
    python bench/imports.py --reps 41 --libs threadpipe,streamable

Each run is a fresh interpreter that times its own ``import <module>`` with ``time.perf_counter``
(the interpreter's start-up and ``site`` are not counted: a script pays them whatever it imports).
The libraries take turns, run by run, so a change in the machine's load lands on all of them.

The bytecode is written first, as ``pip install`` leaves a package (it compiles every module at
install time), into a private cache directory (``PYTHONPYCACHEPREFIX``) filled by one warm-up
import of each library: so the figure does not depend on whether the source tree's
``__pycache__`` is writable or ``PYTHONDONTWRITEBYTECODE`` is set. (Without bytecode every module
is compiled on every import, which costs several times as much: an editable install on a machine
with ``PYTHONDONTWRITEBYTECODE=1`` pays that.)

Each cell is the median over the runs in milliseconds, with the spread (min-max). The row
``nothing`` imports a module the interpreter has already loaded (``sys``): the timing's own floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence

# Library name -> the module a script imports. ``executor`` is the standard library's
# ``concurrent.futures``, what chaining executors by hand imports.
MODULES = {
    "nothing": "sys",
    "threadpipe": "threadpipe",
    "streamable": "streamable",
    "pypeln": "pypeln",
    "pyper": "pyper",
    "executor": "concurrent.futures",
}

TIMER = (
    "import time\n"
    "start = time.perf_counter()\n"
    "import {module}\n"
    "print(time.perf_counter() - start)\n"
)


def import_seconds(module: str, cache: str) -> float:
    """One fresh interpreter's ``import module``, in seconds.

    Args:
        module: what to import.
        cache: the bytecode cache directory to read (and fill).

    Raises:
        RuntimeError: the import failed (the child's stderr is in the message).
    """
    env = dict(os.environ)
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = cache
    done = subprocess.run(
        [sys.executable, "-c", TIMER.format(module=module)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"import {module} failed: {done.stderr.strip()[-500:]}")
    return float(done.stdout.strip())


def cell(seconds: Sequence[float]) -> str:
    """Median (min-max) in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return f"{statistics.median(ms):6.1f} ({min(ms):.1f}-{max(ms):.1f})"


def main(argv: list[str]) -> int:
    libraries = [name for name in MODULES if name != "nothing"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=21, help="fresh interpreters per library")
    parser.add_argument(
        "--libs", default=",".join(libraries), help=f"comma-separated, from {', '.join(libraries)}"
    )
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    wanted = args.libs.split(",")
    for name in wanted:
        if name not in libraries:
            parser.error(f"--libs: unknown library {name!r}; choose from {', '.join(libraries)}")
    names = []
    with tempfile.TemporaryDirectory(prefix="threadpipe-bench-pycache-") as cache:
        for name in ["nothing", *wanted]:
            try:
                import_seconds(MODULES[name], cache)  # writes the bytecode
            except RuntimeError:  # peers are optional: ``.[bench]``
                print(f"{name}: not installed, skipped (pip install -e '.[bench]')")
                continue
            names.append(name)
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(args.reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(import_seconds(MODULES[name], cache))
    print(
        f"import time, ms, bytecode compiled: median (min-max) of {args.reps} fresh interpreters; "
        f"python {sys.version.split()[0]}"
    )
    print(f"{'library':<12} {'module':<20} {'ms':>22}")
    for name in names:
        print(f"{name:<12} {MODULES[name]:<20} {cell(times[name]):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
