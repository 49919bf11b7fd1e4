"""Shared by the tests and the test packages (a third-party import for a package, so every
version sees the same module): events that order concurrent work without sleeps."""

from __future__ import annotations

from collections import defaultdict

import anyio

_events: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
calls: list[str] = []


def event(key: str) -> anyio.Event:
    """The event named `key` (created on first use, in the running event loop)."""
    return _events[key]


def reset() -> None:
    _events.clear()
    calls.clear()
