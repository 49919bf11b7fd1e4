"""The workers of one host share their figures through files: whichever worker is scraped reports
them all.

Every worker writes its snapshot (_figures.py) to `<home>/metrics/<worker>.json` once a second,
replacing the file in one step (an unchanged snapshot only touches it). A scrape adds the files of
the other workers to its own live figures: counters and histograms from every file, also a worker
that died (so that a sum over the host never goes down when one worker is replaced), gauges (in
flight, loaded versions) only from workers that wrote within `LIVE_FOR` seconds and did not stop.
A file not written for `KEEP_FOR` seconds is deleted: the host's counters then drop by what that
worker had counted, which Prometheus reads as a counter reset.

Why not prometheus_client's multiprocess mode: it must be configured before the client is
imported (an environment variable for every process of the server), it supports no custom
collectors, and its gauges need the server to report dead workers. The figures here exist in the
process anyway, for the versions that are loaded; sharing them is one small file per worker.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio

from ._files import replace_file
from ._thread_hop import thread_hop

logger = logging.getLogger("starlette_hotdeploy.metrics")

INTERVAL = 1.0  # seconds between writes
LIVE_FOR = 3 * INTERVAL + 2.0  # a worker's gauges count while its file is this recent
KEEP_FOR = 3600.0  # a dead worker's counters are kept this long


def _file_name(worker: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in worker) + ".json"


class SharedFigures:
    """This worker's file among its host's, and the others' files."""

    def __init__(self, directory: Path, worker: str) -> None:
        self.directory = directory
        self.worker = worker
        self.path = directory / _file_name(worker)
        self._last: bytes | None = None

    def write(self, snapshot: dict[str, Any]) -> None:
        """Replace this worker's file with `snapshot` (blocking). Metrics are not worth an fsync:
        a crash loses at most the last second of them."""
        data = json.dumps(snapshot, separators=(",", ":")).encode()
        if data == self._last and self.path.exists():
            os.utime(self.path)  # unchanged: only show that this worker is alive
            return
        replace_file(self.path, data)
        self._last = data

    def others(self, now: float | None = None) -> list[tuple[dict[str, Any], bool]]:
        """The other workers' snapshots, each with whether it is live (blocking); deletes files
        not written for `KEEP_FOR` seconds."""
        now = time.time() if now is None else now
        found = []
        try:
            paths = [p for p in self.directory.iterdir() if p.suffix == ".json" and p != self.path]
        except FileNotFoundError:
            return []
        for path in paths:
            try:
                age = now - path.stat().st_mtime
                if age > KEEP_FOR:
                    path.unlink(missing_ok=True)
                    continue
                snapshot = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue  # replaced or deleted meanwhile, or cut short: skip it this time
            if not isinstance(snapshot, dict):
                continue
            found.append((snapshot, age <= LIVE_FOR and not snapshot.get("stopped", False)))
        return found

    async def run(
        self,
        take: Callable[[], dict[str, Any] | None],
        quiet: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        """Write this worker's snapshot (taken on the event loop) every `INTERVAL` seconds; with
        `quiet`, once it returns (see Engine.until_quiet), at most `INTERVAL` later."""
        warned = False
        while True:
            if quiet is not None:
                await quiet(INTERVAL)
            snapshot = take()
            try:
                if snapshot is not None:
                    await thread_hop(self.write, snapshot)
                warned = False
            except OSError as exc:
                if not warned:  # once, not every second
                    logger.warning("cannot write this worker's metrics to %s: %s", self.path, exc)
                warned = True
            await anyio.sleep(INTERVAL)

    def stopped(self, snapshot: dict[str, Any]) -> None:
        """The worker stops: its counters stay for the others to report, its gauges go now."""
        with suppress(OSError):
            self.write({**snapshot, "stopped": True})


def host_traffic(snapshots: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each loaded version's requests in flight and HTTP requests counted, summed over the
    given snapshots (this worker's first: a version's state is the first worker's that has it
    loaded). What the admin UI turns into traffic shares for the whole host."""
    packages: dict[str, dict[str, dict[str, Any]]] = {}
    for snapshot in snapshots:
        served = {(r["package"], r["version"]): sum(r["by_class"]) for r in snapshot.get("requests", ())}
        for loaded in snapshot.get("versions", ()):
            name, version = loaded["package"], loaded["version"]
            entry = packages.setdefault(name, {}).setdefault(
                version, {"state": loaded["state"], "in_flight": 0, "served": 0}
            )
            entry["in_flight"] += loaded["in_flight"]
            entry["served"] += served.get((name, version), 0)
    return packages
