"""The request's own task, on asyncio: what a drain timeout cancels there.

anyio can end a task's work only through a cancel scope entered in that task, and entering one
per request costs about 7 µs on asyncio (a new `TaskState` in a `WeakKeyDictionary` for every
task, and servers start a task per request): more than the rest of the dispatch. An asyncio task
can be cancelled from outside, so on asyncio the request path only records `current_task()`
(well under a microsecond) and a drain timeout cancels the tasks still open. On any other
backend (trio) the request path enters an anyio cancel scope as before.

This is the one module of the project that uses asyncio directly.
"""

from __future__ import annotations

import asyncio
from asyncio import CancelledError, Task, current_task

__all__ = ["CancelledError", "Task", "current_task", "on_asyncio"]


def on_asyncio() -> bool:
    """Whether the caller runs in an asyncio task (False on trio, or outside any loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return current_task() is not None
