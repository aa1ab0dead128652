"""threadpipe: thread-pool pipelines over bounded queues for synchronous Python.

Each stage is a pool of threads reading a bounded ``queue.Queue`` and writing to the next stage's;
stages work eagerly and independently, bounded buffers keep memory flat, the end of input travels as a
private sentinel, and a worker's exception is raised to the caller as itself::

    import threadpipe as tp

    for path in (tp.Pipeline.from_iter(urls)
                 .map(download, workers=4)
                 .map(process, workers=2, ordered=False)
                 .map(save)):
        print("saved", path)
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._errors import RunStateError as RunStateError
from ._errors import SourceConsumedError as SourceConsumedError
from ._errors import ThreadpipeError as ThreadpipeError
from ._pipeline import DEFAULT_BUFFER as DEFAULT_BUFFER
from ._pipeline import Pipeline as Pipeline
from ._run import Run as Run
from ._trace import DEFAULT_TRACE_CAP as DEFAULT_TRACE_CAP

if _TYPE_CHECKING:
    from ._stats import StageStats as StageStats

__version__ = "0.1.0"

__all__ = (
    "DEFAULT_BUFFER",
    "DEFAULT_TRACE_CAP",
    "Pipeline",
    "Run",
    "RunStateError",
    "SourceConsumedError",
    "StageStats",
    "ThreadpipeError",
    "__version__",
)


if not _TYPE_CHECKING:  # hidden from type checkers, which would accept any name through it

    def __getattr__(name: str) -> object:
        # Statistics load when first asked for (``run.stats()`` or this name): most scripts
        # never ask.
        if name == "StageStats":
            from ._stats import StageStats

            return StageStats
        raise AttributeError(f"module 'threadpipe' has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
