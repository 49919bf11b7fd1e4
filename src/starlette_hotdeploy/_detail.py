"""Error details fit to send: bounded in length, and without the server's absolute paths.

Details reach admin clients, logs and the deployment history. A package can make them huge (an
exception message of megabytes, a 5 MiB version string echoed back), and file paths in them tell
a client how the server's disk is laid out; paths under the home are named relative to it. A
database URL is shown without its password.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

MAX_DETAIL = 2000  # characters


def shorten(text: str, limit: int = MAX_DETAIL) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


class Redactor:
    """Rewrites the absolute paths this server knows of, then shortens."""

    def __init__(self, home: Path) -> None:
        roots: dict[str, str] = {}
        for path in {home, home.resolve()}:
            roots[str(Path(os.path.abspath(path)))] = ""  # relative to the home
        for where, name in (
            (sys.prefix, "<python>"),
            (sys.base_prefix, "<python>"),
            (tempfile.gettempdir(), "<tmp>"),
            (os.getcwd(), "<cwd>"),
        ):
            roots.setdefault(str(Path(where).resolve()), name)
            roots.setdefault(where, name)
        # Longest first: the home may lie under the working directory or the temp directory.
        self._roots = sorted(
            ((r, n) for r, n in roots.items() if r not in ("", "/")), key=lambda rn: -len(rn[0])
        )

    def __call__(self, text: str) -> str:
        for root, name in self._roots:
            if root in text:
                text = text.replace(root + os.sep, f"{name}{os.sep}" if name else "")
                text = text.replace(root, name or ".")
        return shorten(text)


def redact_url(url: str) -> str:
    """The URL without its password, fit for an error message or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
