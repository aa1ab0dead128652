"""The library's own exceptions, and how a user's exception is labelled on its way to the caller.

A user's exception is never wrapped or replaced: the very object raised in a worker is raised again
to the caller, with one note added that names the stage and the item.
"""

from __future__ import annotations

import os
import reprlib
from types import TracebackType

__all__ = [
    "RunStateError",
    "SourceConsumedError",
    "ThreadpipeError",
    "clear_own_frames",
    "label",
    "strip_own_frames",
]

# Frames of code in this folder are the library's own.
_OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ThreadpipeError(Exception):
    """Raised when threadpipe itself refuses an operation (never for a stage's own failure)."""


class SourceConsumedError(ThreadpipeError):
    """Raised when a pipeline built on a one-shot iterator is started a second time."""


class RunStateError(ThreadpipeError):
    """Raised when a run is used in a way its state does not allow, such as iterating it twice."""


_item_repr = reprlib.Repr()
_item_repr.maxstring = 60
_item_repr.maxother = 60
_item_repr.maxlist = _item_repr.maxtuple = _item_repr.maxdict = _item_repr.maxset = 6


def describe(item: object) -> str:
    """A short, never-failing ``repr`` of ``item`` for notes and messages."""
    try:
        return _item_repr.repr(item)
    except Exception as exc:  # a user's __repr__ may raise; the note must not
        return f"<{type(item).__qualname__} object (repr failed: {type(exc).__name__})>"


def label(exc: BaseException, stage: str, item: object, *, has_item: bool = True) -> None:
    """Add a note to ``exc`` naming the stage (and the item) it was raised for, once.

    Args:
        exc: the user's exception, raised again later as itself.
        stage: the stage's name.
        item: the item being processed.
        has_item: False when no item is involved (the source failed to produce one).
    """
    notes = getattr(exc, "__notes__", ())
    if any(isinstance(n, str) and n.startswith("threadpipe: ") for n in notes):
        return
    if has_item:
        exc.add_note(f"threadpipe: raised in stage {stage!r} while processing item {describe(item)}")
    elif stage == "source":
        exc.add_note(f"threadpipe: raised by the {stage!r} iterator")
    else:
        exc.add_note(f"threadpipe: raised in stage {stage!r}, not while processing an item")


def _own(tb: TracebackType) -> bool:
    return tb.tb_frame.f_code.co_filename.startswith(_OWN)


def strip_own_frames(exc: BaseException) -> None:
    """Drop the library's frames from the head of the tracebacks of ``exc`` and its chain.

    A worker's frame holds its stage, which holds the run's state, which holds the failure: left in
    the traceback, it makes a cycle that only the garbage collector frees, and a failed run's
    buffers would stay alive until it runs. The user's own frames (where it went wrong) stay. A
    traceback made only of library frames (a bug of threadpipe's) is kept whole, to debug it.
    """
    for current in _chain(exc):
        tb = current.__traceback__
        head = tb
        while head is not None and _own(head):
            head = head.tb_next
        if head is not None and head is not tb:
            current.__traceback__ = head


def _chain(exc: BaseException) -> list[BaseException]:
    seen: set[int] = set()
    found: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        todo.append(current.__cause__)
        todo.append(current.__context__)
    return found


def clear_own_frames(exc: BaseException) -> None:
    """Clear the locals of the library's finished frames that the tracebacks of ``exc`` reach.

    A frame that finished while its caller ran links to the caller's frame (``f_back``): the user's
    function's frame in a failure's traceback keeps the worker frame that called it, and that frame
    holds the stage and so the run. Called by a thread once its worker body has returned, so the
    frames cleared are finished ones; a frame still running is left alone.
    """
    for current in _chain(exc):
        tb = current.__traceback__
        while tb is not None:
            frame = tb.tb_frame.f_back
            while frame is not None:
                if frame.f_code.co_filename.startswith(_OWN):
                    try:
                        frame.clear()
                    except RuntimeError:  # still running (the thread's own bottom frames)
                        pass
                frame = frame.f_back
            tb = tb.tb_next
