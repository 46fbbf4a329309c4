"""mkdocs hooks for charlm's documentation (listed under ``hooks:`` in mkdocs.yml).

charlm's docstrings name other objects with Sphinx roles (``:meth:`stream```), which the Google
docstring style that mkdocstrings reads leaves as literal text before the code span. Until the
docstrings use mkdocstrings' own cross-references, the API pages show the code span alone.
"""

from __future__ import annotations

import re
from typing import Any

SPHINX_ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    """Drop a Sphinx role's prefix where it stands before a rendered code span."""
    return SPHINX_ROLE.sub("", html)
