"""The library's own exceptions, and how a user's exception is labelled on its way to the caller.

A user's exception is never wrapped or replaced: the very object raised in a worker is raised again
to the caller, with one note added that names the stage and the item.
"""

from __future__ import annotations

import reprlib

__all__ = ["RunStateError", "SourceConsumedError", "ThreadpipeError", "label"]


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
    else:
        exc.add_note(f"threadpipe: raised by the {stage!r} iterator")
