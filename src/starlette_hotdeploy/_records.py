"""This worker's deployment records: live in memory, published as events, kept in the store.

A record is written to the store when it is accepted (so a `202` survives a crash), again as
its steps complete (batched by a background writer: one thread hop for many changes, never on
the critical path), and at once when its outcome is decided and when it finishes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from . import _oplog
from ._deployment import Action, Deployment, Step
from ._detail import shorten
from ._events import EventHub
from ._store import Store
from ._thread_hop import thread_hop
from ._worker_figures import WorkerFigures

logger = logging.getLogger("starlette_hotdeploy")

# How long the background writer waits at most for a deployment here to end (seconds).
QUIET_PATIENCE = 1.0


class RecordLog:
    def __init__(self, events: EventHub, history_size: int, tidy: Callable[[str], str] = shorten) -> None:
        self._tidy = tidy
        self.events = events
        self.history: deque[Deployment] = deque(maxlen=history_size)
        self._store: Store | None = None
        self._worker: str | None = None
        self._dirty: dict[str, Deployment] = {}
        self._wake = anyio.Event()
        self.figures: WorkerFigures | None = None  # set: metrics are on (outcomes, durations)
        # Set: awaited (with its patience, seconds) before each background write (see run).
        self.quiet: Callable[[float], Awaitable[None]] | None = None

    def open(self, store: Store, worker: str) -> None:
        self._store = store
        self._worker = worker

    def new(self, action: Action, package: str | None, **fields: Any) -> Deployment:
        record = Deployment(operation=action, package=package, worker=self._worker, **fields)
        record.tidy = self._tidy
        record.on_change = self._changed
        self.history.append(record)
        self.events.publish({"type": "deployment.started", "deployment": record.to_dict()})
        _oplog.started(record)
        return record

    def find(self, deployment_id: str) -> Deployment | None:
        for record in self.history:
            if record.id == deployment_id:
                return record
        return None

    def _changed(self, record: Deployment, step: Step | None) -> None:
        if step is None:
            finished = record.finished_at is not None
            # decide() and finish() each come here once, in that order.
            (_oplog.finished if finished else _oplog.decided)(record)
            if not finished and self.figures is not None:
                self.figures.deployment_decided(record)
            kind = "deployment.finished" if finished else "deployment.decided"
            self.events.publish({"type": kind, "deployment": record.to_dict()})
        else:
            kind = "step.started" if step.ok is None else "step.finished"
            self.events.publish(
                {
                    "type": kind,
                    "deployment_id": record.id,
                    "package": record.package,
                    "to_version": record.to_version,
                    "step": step.to_dict(),
                }
            )
        self._dirty[record.id] = record
        self._wake.set()

    async def save(self, record: Deployment) -> None:
        """Write `record` now (acceptance, outcome, end), with whatever else is pending."""
        self._dirty[record.id] = record
        await self.flush()

    def writer(self, record: Deployment) -> Callable[[], None]:
        """The blocking write of `record` as it is now, for a thread hop of the caller's (one
        hop less on a deployment's critical path). Unless it is called, `record` is no longer
        pending: the caller saves it otherwise."""
        self._dirty.pop(record.id, None)
        return self._write_of([record])

    async def flush(self) -> None:
        write = self._write_of(list(self._dirty.values()))
        self._dirty.clear()
        if write is not _nothing:
            with anyio.CancelScope(shield=True):
                await thread_hop(write)

    def _write_of(self, records: list[Deployment]) -> Callable[[], None]:
        """The blocking write of `records` as they are now."""
        store = self._store
        if store is None or not records:
            return _nothing
        batch = [record.to_dict() for record in records]

        def write() -> None:
            for data in batch:
                store.record(data)

        return write

    async def run(self) -> None:
        """The background writer: steps reach the store within moments, in batches (while a
        deployment runs here, once it ends or a second passed: its own hops go first)."""
        while True:
            await self._wake.wait()
            if self.quiet is not None:
                await self.quiet(QUIET_PATIENCE)
            self._wake = anyio.Event()
            try:
                await self.flush()
            except Exception:
                logger.exception("writing deployment records to the store failed")
            await anyio.sleep(0.05)  # gather the steps of a burst into one write


def _nothing() -> None:
    """No record to write."""
