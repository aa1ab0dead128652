"""Progress bars: one tqdm bar per stage, stacked, counting the items out of each stage.

The bars are created in the caller's thread by ``start()`` (so a bad tqdm argument fails there,
before any thread runs) and from then on touched only by the run's monitor thread, which refreshes
them at a bounded rate from the workers' counters. Workers never call tqdm.

The stack goes below the tqdm bars already open (an outer loop's bar, a bar the user made before
``start()``), on the first free lines as tqdm places a bar of its own, unless ``position=`` says
where. Below other bars it is cleared when the run ends, as tqdm clears a nested bar, so that the
bars above stay where they are; ``leave=True`` keeps it instead.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._errors import describe
from ._stage import count_through

if TYPE_CHECKING:
    from tqdm import tqdm

    from ._stage import StageSpec
    from ._stats import StageStats

__all__ = ["Bars", "check_progress", "source_length"]



def check_progress(progress: object) -> dict[str, Any] | None:
    """Validate ``start(progress=...)``: the tqdm keyword arguments to use, or None for no bars.

    Raises:
        TypeError: ``progress`` is not a bool, None or a mapping with str keys.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        return {}
    if isinstance(progress, Mapping) and all(isinstance(k, str) for k in progress):
        return dict(progress)
    raise TypeError(
        "progress must be a bool, None or a dict of tqdm keyword arguments, "
        f"got {describe(progress)} ({type(progress).__qualname__})"
    )


def source_length(iterable: object) -> int | None:
    """The source's length from ``operator.length_hint``, or None when it is not known."""
    try:
        n = operator.length_hint(iterable, -1)
    except Exception:  # a user's __len__ or __length_hint__ may raise; bars just go without a total
        return None
    return n if n >= 0 else None


def _free_block(size: int) -> int:
    """The first line of the first ``size`` free lines below the open tqdm bars.

    tqdm's own rule for a bar without a position (``tqdm._get_free_pos``: the lowest line no open
    bar is on), for a block of lines: a stack that fits in a gap between bars may go there, one that
    does not goes below. Call with tqdm's lock held, so that no bar appears meanwhile.
    """
    from tqdm import tqdm

    taken = {
        abs(bar.pos)
        for bar in list(tqdm._instances)  # type: ignore[attr-defined]
        if getattr(bar, "pos", None) is not None and not getattr(bar, "disable", False)
    }
    line = 0
    while any(line + i in taken for i in range(size)):
        line += 1
    return line


@functools.cache
def _bar_class() -> type[tqdm[Any]]:
    from tqdm import tqdm

    class StageBar(tqdm):  # type: ignore[type-arg]
        """A tqdm bar that starts no monitor thread of its own: the run's monitor refreshes it."""

        monitor_interval = 0

    return StageBar


class Bars:
    """The stacked bars of one run.

    Args:
        specs: the stages, in order.
        options: tqdm keyword arguments applied to every bar. ``position``, if given, is the
            position of the first bar; the others follow it. Without it, the bars go on the first
            free lines among the tqdm bars already open, and when that is not the top line,
            ``leave`` defaults to False: the stage bars are cleared at the end, so that the bars
            above them stay in place.
        length: the source's length, or None when unknown.

    Raises:
        Exception: whatever tqdm raises for a bad keyword argument (``TqdmKeyError``).
    """

    def __init__(
        self, specs: Sequence[StageSpec], options: Mapping[str, Any], length: int | None
    ) -> None:
        from tqdm import tqdm

        cls = _bar_class()
        options = dict(options)
        width = max((len(spec.name) for spec in specs), default=0)
        total = length
        self._bars: list[tqdm[Any]] = []
        # tqdm's lock (shared by every bar, reentrant) is held from choosing the lines to making
        # the last bar, so that a bar made meanwhile by another thread cannot take one of them.
        with tqdm.get_lock():  # type: ignore[no-untyped-call]
            if "position" in options:
                base = options.pop("position")
                leave = True
            else:
                base = _free_block(len(specs))
                # Under other bars, a stack left on screen would be written over the top bar's
                # line: tqdm prints a closing bar's last state where the cursor is, which is there.
                leave = base == 0
            try:
                for i, spec in enumerate(specs):
                    total = count_through(spec, total)
                    kwargs: dict[str, Any] = {
                        "desc": spec.name.ljust(width),
                        "total": total,
                        "position": base + i,
                        "leave": leave,
                        "unit": "it",
                        "dynamic_ncols": True,
                        # The monitor thread already limits the refresh rate; tqdm's own
                        # throttling would drop the postfix updates made without a count change.
                        "mininterval": 0,
                        "miniters": 0,
                    }
                    kwargs.update(options)
                    self._bars.append(cls(**kwargs))
            except BaseException:
                self.close()
                raise

    def update(self, stats: Sequence[StageStats]) -> None:
        """Show ``stats``: the count of items out, in-flight items and input buffer fill."""
        for bar, s in zip(self._bars, stats, strict=True):
            postfix = f"in flight {s.in_flight}, buffer {s.queue_size}/{s.queue_capacity}"
            if s.errors:
                postfix += f", errors {s.errors}"
            bar.set_postfix_str(postfix, refresh=False)
            bar.update(s.items_out - bar.n)

    def close(self) -> None:
        """Close every bar (idempotent); with ``leave=True`` (the default) the final counts stay."""
        # Top to bottom: each bar closed with leave=True prints its final line and moves the
        # cursor down to the next one, so the stack stays in place.
        for bar in self._bars:
            bar.close()
