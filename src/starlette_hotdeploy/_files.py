"""Files replaced in one step: a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path` (named for this process and thread), then
    rename it over `path`. No fsync: for caches and figures that a crash may lose."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    temporary.write_bytes(data)
    os.replace(temporary, path)
