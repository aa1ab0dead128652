"""Which stage functions make coroutine stages, decided when the pipeline is built.

This is the build-time half of the coroutine adapter (the runtime is ``_aio.py``). It is a module of
its own so that building and running thread-only pipelines never imports :mod:`asyncio`, which costs
more to import than the rest of threadpipe together: ``_aio`` is imported only by runs that need it.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from types import BuiltinFunctionType, CodeType, FunctionType, MethodType
from typing import Any, Final

from ._errors import describe

__all__ = ["ASYNC_GEN", "COROUTINE", "check_timeout", "coroutine_kind"]

COROUTINE = "coroutine"
"""``coroutine_kind`` of an ``async def`` function (a coroutine function)."""

ASYNC_GEN = "async_gen"
"""``coroutine_kind`` of an async generator function (``async def`` with ``yield``)."""


# The code flags of ``async def`` (``inspect.CO_COROUTINE``) and of an async generator function
# (``inspect.CO_ASYNC_GENERATOR``): read here without importing ``inspect``, which costs more than
# the rest of ``import threadpipe``.
_CO_COROUTINE: Final = 0x0080
_CO_ASYNC_GENERATOR: Final = 0x0200


def _target(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The callable that really runs: ``fn`` with its ``functools.partial`` layers removed."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _has_flag(fn: object, flag: int) -> bool:
    """Whether ``fn``, through bound methods and partials, is a function whose code has ``flag``
    (as ``inspect``'s tests decide it, for functions and function-like objects with a
    ``__code__``)."""
    while True:
        if isinstance(fn, MethodType):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        else:
            break
    code = getattr(fn, "__code__", None)
    return isinstance(code, CodeType) and bool(code.co_flags & flag)


def _is(flag: int, fn: Callable[..., Any]) -> bool:
    # The function itself, through bound methods and partials; else an instance's ``__call__``.
    if _has_flag(fn, flag):
        return True
    if flag == _CO_COROUTINE and "inspect" in sys.modules:
        # Marked with ``inspect.markcoroutinefunction`` (3.12+): only possible once the caller
        # imported ``inspect``, whose own test then decides.
        if sys.modules["inspect"].iscoroutinefunction(fn):
            return True
    target = _target(fn)
    if isinstance(target, type | FunctionType | MethodType | BuiltinFunctionType):
        return False
    return _has_flag(getattr(type(target), "__call__", None), flag)  # noqa: B004  # not callable()


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
    if _is(_CO_COROUTINE, fn):
        return COROUTINE
    if _is(_CO_ASYNC_GENERATOR, fn):
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
