"""Shared by the tests and the test packages (a third-party import for a package, so every
version sees the same module): events that order concurrent work without sleeps."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import anyio

_events: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
calls: list[str] = []
gated: set[str] = set()  # lifespan shutdowns ("greeter 1.0") that wait for the event of that name
host: Any = None  # an ASGI app that test packages may call back into (sub-requests)


async def shutdown_gate(label: str) -> None:
    """Called by test packages at the start of their lifespan shutdown: when `label` is gated,
    announce `label:entered` and wait for the event `label`."""
    if label in gated:
        event(label + ":entered").set()
        await event(label).wait()


def event(key: str) -> anyio.Event:
    """The event named `key` (created on first use, in the running event loop)."""
    return _events[key]


def reset() -> None:
    global host
    _events.clear()
    calls.clear()
    gated.clear()
    host = None
