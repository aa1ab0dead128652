"""Every ```python block of README.md and of the site's pages (docs/*.md) runs, so an edit that
breaks one fails CI.

Each block runs as a script of its own (``python -W error block.py`` in a fresh temporary
directory, so that a process pool can import it as worker processes do), with a time limit, and
must exit 0 and leave no threadpipe thread running. A block may use names it does not define, as a
snippet does (``urls``, ``records``, the user's ``pipeline``): a hidden HTML comment right before
the block defines them with local, fast stand-ins::

    <!-- test-setup: what the stand-ins are (optional)
    urls = [f"https://example.com/{i}" for i in range(10)]
    -->
    ```python
    ...

The setup runs first, in the main process only, in a namespace of its own. Only the names it
assigns or defines (not those it imports, nor names starting with ``_``) are handed to the block,
so a block that forgets an import it needs still fails.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The README, then the site's pages (MkDocs, docs/*.md), each block with its own hidden setup.
PAGES = [README, *sorted(DOCS.glob("*.md"))]

_BLOCK = re.compile(
    r"(?:^<!-- test-setup:(?P<about>[^\n]*)\n(?P<setup>.*?)^-->\n\s*)?"
    r"^```python\n(?P<code>.*?)^```$",
    re.DOTALL | re.MULTILINE,
)


@dataclass(frozen=True)
class Block:
    page: str  # README.md, or docs/<page>.md
    line: int  # of the opening fence, 1-based
    section: str  # the heading above it
    setup: str
    code: str


def page_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    page = path.relative_to(ROOT).as_posix()
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))  # the fence is the line before the code
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.MULTILINE)
        section = headings[-1] if headings else "top"
        blocks.append(Block(page, line, section, match["setup"] or "", match["code"]))
    return blocks


def provided_names(setup: str) -> list[str]:
    """The names a setup assigns or defines at its top level, except private ones."""
    names: list[str] = []
    for node in ast.parse(setup).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.extend(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return [name for name in names if not name.startswith("_")]


# Runs after a block, in its process: the block must not leave a run's threads behind (they get
# the grace the test suite gives, for calls still returning).
_EPILOGUE = """

if __name__ == "__main__":
    import threading as _threading, time as _time
    _deadline = _time.monotonic() + 10
    for _thread in _threading.enumerate():
        if _thread.name.startswith("threadpipe-"):
            _thread.join(max(0.0, _deadline - _time.monotonic()))
    _alive = [t.name for t in _threading.enumerate() if t.name.startswith("threadpipe-") and t.is_alive()]
    if _alive:
        raise SystemExit(f"the block left threads running: {_alive}")
"""


def script(block: Block) -> str:
    """The block as a script: its setup (main process only), the block as written, the check."""
    prologue = ""
    if block.setup:
        prologue = textwrap.dedent(
            f"""\
            if __name__ == "__main__":
                _setup = {{}}
                exec(compile({block.setup!r}, "{block.page} test-setup", "exec"), _setup)
                globals().update({{_name: _setup[_name] for _name in {provided_names(block.setup)!r}}})
                del _setup

            """
        )
    return prologue + block.code + _EPILOGUE


BLOCKS = [block for path in PAGES for block in page_blocks(path)]


def block_id(block: Block) -> str:
    page = block.page.removesuffix(".md").replace("/", "-")
    return f"{page}-line{block.line}-" + re.sub(r"\W+", "-", block.section).strip("-")


def test_the_site_has_its_pages() -> None:
    # Without docs/ (a copy of the tests that forgot it), the site's blocks would silently not run.
    names = {path.name for path in PAGES}
    assert {"README.md", "index.md", "getting-started.md", "api.md"} <= names


@pytest.mark.parametrize("path", PAGES, ids=[path.name for path in PAGES])
def test_every_block_is_found_and_every_setup_belongs_to_one(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    blocks = page_blocks(path)
    assert len(blocks) == text.count("```python\n")  # the pattern missed none
    # A setup comment separated from its block (by text, or another block) would be ignored.
    assert sum(bool(b.setup) for b in blocks) == text.count("<!-- test-setup:")


def test_the_readme_has_python_blocks() -> None:
    assert page_blocks(README)


def test_the_api_reference_covers_every_public_name() -> None:
    import threadpipe

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: threadpipe\.(\w+)$", text, re.MULTILINE))
    assert documented == set(threadpipe.__all__)


def test_every_page_is_in_the_site_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if p is not README and f": {p.name}\n" not in nav]
    assert not missing


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "block",
    BLOCKS,
    ids=[block_id(b) for b in BLOCKS],
)
def test_block_runs(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "page_block.py"
    path.write_text(script(block), encoding="utf-8")
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        text=True,
        timeout=75,
    )
    assert proc.returncode == 0, (
        f"the block of {block.page} at line {block.line} ({block.section}) failed:\n"
        f"--- script\n{path.read_text()}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
