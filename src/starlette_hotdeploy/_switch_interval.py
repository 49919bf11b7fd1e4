"""A short GIL switch interval while an operation, or a store transaction, runs in this process.

Under load the event loop's thread holds the GIL almost all the time. A worker thread that
released it for a system call (each SQLite statement, each file read) gets it back only after the
switch interval (`sys.getswitchinterval()`, 5 ms by default), when the interpreter makes the loop
let go: a store transaction of seven statements then holds the database's write lock for some
35 ms, and the other worker, waiting for that lock, sleeps in SQLite's busy handler in steps of
up to 100 ms. Measured through uvicorn under wrk (2 workers on 2 cores, docs/benchmarks.md), a
deployment's store writes took 20-100 ms each; with 0.5 ms, mostly under 5 ms.

So while at least one operation runs (`Engine.operation`: a deployment's steps, a follower's
part in another worker's) or a SQLite transaction does (`SQLiteStore`), the interval is 0.5 ms
(`operation_switch_interval`); it goes back to what it was when the last one ends. The event
loop then hands the GIL to a waiting thread every 0.5 ms instead of every 5: more switches,
for the time of a deployment only. An interval that is
already as short (set by the application) is left alone, and one changed meanwhile is not
undone. `$HOTDEPLOY_SWITCH_INTERVAL=0` turns this off.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SWITCH_INTERVAL_ENV = "HOTDEPLOY_SWITCH_INTERVAL"
DEFAULT_SWITCH_INTERVAL = 0.0005  # seconds


def operation_switch_interval() -> float:
    """$HOTDEPLOY_SWITCH_INTERVAL (seconds; 0: leave the interval alone), else 0.5 ms."""
    try:
        value = float(os.environ.get(SWITCH_INTERVAL_ENV, ""))
    except ValueError:
        return DEFAULT_SWITCH_INTERVAL
    return max(value, 0.0)


class _Shortened:
    """Process-wide (the interval is): how many operations run, and the interval before them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: float | None = None  # the interval to go back to; None: not changed by us
        self.short = 0.0


_state = _Shortened()


def enter() -> None:
    """An operation starts: the first one shortens the interval."""
    with _state.lock:
        _state.depth += 1
        if _state.depth > 1:
            return
        short = operation_switch_interval()
        current = sys.getswitchinterval()
        if short > 0 and current > short:
            sys.setswitchinterval(short)
            # As the interpreter keeps it (whole microseconds): what `leave` compares with.
            _state.saved, _state.short = current, sys.getswitchinterval()


def leave() -> None:
    """An operation ended: the last one puts the interval back, unless it was changed since."""
    with _state.lock:
        _state.depth -= 1
        if _state.depth > 0 or _state.saved is None:
            return
        saved, _state.saved = _state.saved, None
        if sys.getswitchinterval() == _state.short:
            sys.setswitchinterval(saved)


@contextmanager
def shortened() -> Iterator[None]:
    enter()
    try:
        yield
    finally:
        leave()
