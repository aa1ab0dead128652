"""MkDocs hook: the benchmark plots of bench/results/ are part of the site, without copies.

The PNGs stay where bench/run.py writes them; this hook adds each one to the site's files under
the same path, ``bench/results/<name>.png``, so that docs/benchmarks.md shows them with
``![...](bench/results/<name>.png)`` and `mkdocs build --strict` checks those links.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent.parent


def on_files(files: Files, config: Any) -> Files:
    for png in sorted((ROOT / "bench" / "results").glob("*.png")):
        files.append(
            File(
                png.relative_to(ROOT).as_posix(),
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
