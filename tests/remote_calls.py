"""Functions that the executor tests send to other processes (a process pool, Dask workers).

They live in a module of their own so that a worker process, which imports a function's module to
unpickle it, imports only this one and not pytest and the whole test module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

# A gated call gives up after this long, so that a test that fails before it opens its gate
# cannot leave a worker process busy for good.
GATE_SECONDS = 60.0


def square(x: int) -> int:
    return x * x


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def is_odd(x: int) -> bool:
    return x % 2 == 1


def count_to(x: int) -> Iterator[int]:
    yield from range(x)


def fail_on_five(x: int) -> int:
    if x == 5:
        raise ValueError("five is right out", x)
    return x


def touch(path: str) -> None:
    """An ``each`` function with an effect the test can see from its own process."""
    Path(path).touch()


def gated(job: tuple[str, int]) -> int:
    """Mark call ``x`` started in ``directory``, then wait for ``directory/open`` to exist.

    The test decides when calls end by creating the file: a gate that works across processes.
    """
    directory, x = job
    Path(directory, f"started-{x}").touch()
    gate = Path(directory, "open")
    deadline = time.monotonic() + GATE_SECONDS
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    return x


def parent_pid(x: int) -> int:
    """The pid of the process that started the worker this call runs in."""
    return os.getppid()


class ProcessResource:
    """A per-process resource: says which process made it, and marks its closing with a file."""

    def __init__(self, directory: str) -> None:
        self.pid = os.getpid()
        self.token = os.urandom(8).hex()
        self.directory = directory
        Path(directory, f"made-{self.pid}-{self.token}").touch()

    def close(self) -> None:
        Path(self.directory, f"closed-{self.pid}-{self.token}").touch()


class MakeProcessResource:
    """A picklable factory of ``ProcessResource`` objects writing into ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self) -> ProcessResource:
        return ProcessResource(self.directory)


def which_resource(x: int, resource: ProcessResource) -> tuple[int, int, str]:
    """The worker's pid, and the pid and token of the resource it was given."""
    return os.getpid(), resource.pid, resource.token
