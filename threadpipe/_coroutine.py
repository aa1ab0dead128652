"""Which stage functions make coroutine stages, decided when the pipeline is built.

This is the build-time half of the coroutine adapter (the runtime is ``_aio.py``). It is a module of
its own so that building and running thread-only pipelines never imports :mod:`asyncio`, which costs
more to import than the rest of threadpipe together: ``_aio`` is imported only by runs that need it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

from ._errors import describe

__all__ = ["ASYNC_GEN", "COROUTINE", "check_timeout", "coroutine_kind"]

COROUTINE = "coroutine"
"""``coroutine_kind`` of an ``async def`` function (a coroutine function)."""

ASYNC_GEN = "async_gen"
"""``coroutine_kind`` of an async generator function (``async def`` with ``yield``)."""


def _target(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The callable that really runs: ``fn`` with its ``functools.partial`` layers removed."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _is(test: Callable[[Any], bool], fn: Callable[..., Any]) -> bool:
    # ``inspect`` already sees through bound methods, partials of functions and (3.12+)
    # ``markcoroutinefunction``; the unwrapped target and an instance's ``__call__`` cover the rest.
    if test(fn):
        return True
    target = _target(fn)
    if test(target):
        return True
    if inspect.isroutine(target) or isinstance(target, type):
        return False
    return test(getattr(type(target), "__call__", None))  # noqa: B004  # not a callable() test


def coroutine_kind(kind: str, fn: Callable[..., Any]) -> str | None:
    """Tell whether ``fn`` makes a coroutine stage, and of which sort.

    ``fn`` counts as a coroutine function when it is an ``async def`` function, a bound method of
    one, a ``functools.partial`` of one, or an object whose ``__call__`` is ``async def``. A plain
    function that merely *returns* a coroutine (``lambda x: fetch(x)``) cannot be told apart from
    any other function: it makes a thread stage whose outputs are coroutine objects.

    Args:
        kind: the stage kind, ``map``, ``filter``, ``flat_map`` or ``each``.
        fn: the user's function.

    Returns:
        ``COROUTINE``, ``ASYNC_GEN`` (``flat_map`` only), or None for a plain function.

    Raises:
        TypeError: ``fn`` is an async generator function and ``kind`` is not ``flat_map``.
    """
    if _is(inspect.iscoroutinefunction, fn):
        return COROUTINE
    if _is(inspect.isasyncgenfunction, fn):
        if kind != "flat_map":
            raise TypeError(
                f"{kind}(fn): fn {describe(fn)} is an async generator function, which yields "
                "several outputs per item; use flat_map for it, or make it a plain async def"
            )
        return ASYNC_GEN
    return None


def check_timeout(timeout: object, executor: bool) -> float | None:
    """Validate the ``timeout=`` argument of a stage.

    A coroutine stage cancels a call that overruns; a thread stage abandons it (see
    ``_timeout.py``); a stage on an executor has no way to do either.

    Args:
        timeout: seconds allowed per call, or None for no limit.
        executor: whether the stage runs its calls on an executor.

    Returns:
        The timeout as a float, or None.

    Raises:
        TypeError: ``timeout`` is not a number, or is given for a stage with ``executor=``.
        ValueError: ``timeout`` is not a finite number > 0.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(
            f"timeout must be a number of seconds > 0 or None, got {describe(timeout)} "
            f"({type(timeout).__qualname__})"
        )
    if executor:
        raise TypeError(
            f"timeout={timeout!r} is not available with executor=: the calls run elsewhere, "
            "where the stage can neither cancel nor abandon them"
        )
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)
