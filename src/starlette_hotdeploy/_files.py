"""Files replaced in one step (a reader sees the old content or the new, never half of either),
and files written with few system calls."""

from __future__ import annotations

import io
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


def write_all(out: io.FileIO, data: bytes | bytearray | memoryview) -> None:
    """All of `data` to an unbuffered file (`open(..., buffering=0)`: no system calls to set up
    a buffer; in a worker thread under load, each one waits to get the GIL back), whose raw
    writes may each take part of it."""
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]
