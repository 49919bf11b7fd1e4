"""EventHub: deployment progress, step by step, for whoever listens (the admin API's SSE)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

Event = dict[str, Any]


class EventHub:
    """Fan-out of events to subscribers. Publishing never blocks and never fails: a subscriber
    whose buffer is full misses events (it can re-read the deployment record)."""

    def __init__(self) -> None:
        self._subscribers: set[MemoryObjectSendStream[Event]] = set()

    def publish(self, event: Event) -> None:
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                continue
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(stream)

    @asynccontextmanager
    async def subscribe(self, buffer: int = 256) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        self._subscribers.add(send)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.discard(send)
            with suppress(Exception):
                send.close()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
