"""The admin API's server-sent events: deployment progress, and on request live traffic.

`traffic` events carry, for each loaded version of each package, its state, its requests in
flight and its requests served so far, summed over the host's workers (`Deployer.traffic`); a
client turns two of them into each version's share of the traffic in between (the admin web UI
does).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from ._events import Event, EventHub

KEEP_ALIVE_SECONDS = 15.0
TRAFFIC_SECONDS = 1.0


def encode(event: Event) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def event_stream(
    hub: EventHub, traffic: Callable[[], Awaitable[Event]] | None = None
) -> AsyncIterator[str]:
    """Deployment events as they come; with `traffic`, one of its events at once and then each
    second; otherwise a keep-alive comment every 15 seconds."""
    async with hub.subscribe() as events:
        yield ": connected\n\n"
        if traffic is not None:
            yield encode(await traffic())
        wait = TRAFFIC_SECONDS if traffic is not None else KEEP_ALIVE_SECONDS
        deadline = anyio.current_time() + wait
        while True:
            event = None
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                event = await events.receive()
            if event is not None:
                yield encode(event)
                continue
            deadline = anyio.current_time() + wait
            yield encode(await traffic()) if traffic is not None else ": keep-alive\n\n"


__all__ = ["event_stream"]
