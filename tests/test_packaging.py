"""The installed distribution's metadata: an SPDX licence expression, an author, project URLs, and
the typing marker. CI runs the suite against the built wheel too, so a file missing from it fails."""

from __future__ import annotations

from importlib import metadata, resources

import threadpipe


def test_metadata_has_an_spdx_licence_an_author_and_project_urls() -> None:
    meta = metadata.metadata("threadpipe")
    assert meta["Version"] == threadpipe.__version__
    assert meta["License-Expression"] == "MIT"
    # PEP 639: the expression replaces the licence classifier (which setuptools warns about).
    assert not [c for c in meta.get_all("Classifier", []) if c.startswith("License ::")]
    assert "LICENSE" in (meta.get_all("License-File") or [])
    assert meta["Author"]
    urls = dict(entry.split(", ", 1) for entry in meta.get_all("Project-URL", []))
    assert {"Homepage", "Source", "Issues"} <= set(urls), urls
    assert all(url.startswith("https://github.com/threadpipe/threadpipe") for url in urls.values())


def test_the_package_ships_its_typing_marker() -> None:
    assert resources.files("threadpipe").joinpath("py.typed").is_file()
