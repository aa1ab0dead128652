"""The public surface: every public name is exported and listed in ``__all__``."""

from __future__ import annotations

import importlib
import pkgutil

import threadpipe


def test_all_is_a_sorted_tuple_of_existing_names() -> None:
    assert isinstance(threadpipe.__all__, tuple)
    for name in threadpipe.__all__:
        assert hasattr(threadpipe, name), name


def test_every_public_name_is_in_all() -> None:
    public = {n for n in vars(threadpipe) if not n.startswith("_")}
    submodules = {m.name for m in pkgutil.iter_modules(threadpipe.__path__)}
    missing = public - set(threadpipe.__all__) - submodules
    assert not missing, f"public names missing from __all__: {sorted(missing)}"


def test_private_modules_import_and_declare_all() -> None:
    for info in pkgutil.iter_modules(threadpipe.__path__):
        module = importlib.import_module(f"threadpipe.{info.name}")
        if info.name.startswith("_"):
            assert isinstance(getattr(module, "__all__", None), list | tuple), info.name


def test_exceptions_derive_from_exception_and_document_themselves() -> None:
    for cls in (threadpipe.ThreadpipeError, threadpipe.SourceConsumedError, threadpipe.RunStateError):
        assert issubclass(cls, Exception)
        assert cls.__doc__ and cls.__doc__.startswith("Raised when")


def test_typed_marker_is_shipped() -> None:
    from importlib.resources import files

    assert files("threadpipe").joinpath("py.typed").is_file()


def test_import_leaves_what_only_some_runs_need_unloaded() -> None:
    import subprocess
    import sys

    lazy = ("asyncio", "json", "psutil", "tqdm", "multiprocessing", "random")
    # Only stages on an executor need these: concurrent.futures imports logging and more.
    lazy += ("concurrent.futures", "logging", "pickle")
    # Heavy and not needed at all: what coroutine functions are is read from their code flags.
    lazy += ("inspect", "dataclasses")
    lazy += tuple(f"threadpipe.{m}" for m in ("_aio", "_loopchannel", "_monitor", "_report", "_stats"))
    code = f"import sys, threadpipe; print([m for m in {lazy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
