"""MkDocs hook: Sphinx roles in the docstrings (``:meth:`start```) read as plain code.

The docstrings name other callables with reST roles; mkdocstrings (Google style, Markdown) keeps
the role's text, so a page would show ``:meth:start``. This drops the role before the code span.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:meth|class|func|attr|exc|data|mod|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("", html)
