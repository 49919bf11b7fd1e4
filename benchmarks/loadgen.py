"""Clients that put load on a server and record what they saw.

- `WrkLoad`: plain keep-alive requests with `wrk` (one connection per wrk thread, and
  `timeline.lua` writes each response's end time, latency, status and version).
- `HttpxLoad`: the same with built-in httpx clients, for machines without wrk and the smoke test.
- `stream_client`: loops on a slow streaming response (`/greeter/countdown`, 5 lines in 0.5 s).
- `websocket_client`: websocket sessions on `/greeter/echo` (a message every 50 ms, a few
  seconds each, then a normal close and a new session).
- `probe`: a request on a *new* connection every few milliseconds (so the kernel spreads them
  over the workers), to see when the new version answers.

Every loop is bounded in time (a stop event, set by the scenario) and in count. Times are
`time.monotonic()` seconds, the clock wrk's script uses too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws

from .common import BENCHMARKS, BenchmarkError

TIMELINE_SCRIPT = BENCHMARKS / "timeline.lua"
MAX_LOOPS = 1_000_000  # the hard bound of every client loop (the stop event ends them far earlier)

# One response seen by a client: (end time, latency in seconds, HTTP status or 0 for a socket
# error, the version named in the body or "-").
Sample = tuple[float, float, int, str]


def version_of(body: bytes) -> str:
    """The "version" field of a greeter answer ("-" if there is none)."""
    try:
        found = json.loads(body).get("version")
    except (ValueError, AttributeError):
        return "-"
    return str(found) if found is not None else "-"


def error_kind(exc: BaseException) -> str:
    """wrk's names for socket errors, for an httpx exception."""
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.WriteError):
        return "write"
    return "read"  # ReadError, RemoteProtocolError (the server closed the connection), ...


# -- plain requests ---------------------------------------------------------------------------------


@dataclass
class PlainLoadResult:
    """What a plain-request load generator saw."""

    tool: str
    samples: list[Sample]
    errors: dict[str, int]  # connect / read / write / timeout socket errors, status = non-2xx answers
    requests: int

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


class WrkLoad:
    """`wrk -t C -c C -d D -s timeline.lua URL` in its own process group."""

    def __init__(self, url: str, connections: int, duration_s: float, workdir: Path) -> None:
        self.url = url
        self.connections = connections
        self.duration_s = duration_s
        self.prefix = workdir / "wrk-timeline"
        self.output = workdir / "wrk-output.txt"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("wrk") is not None

    def start(self) -> None:
        command = [
            "wrk",
            f"-t{self.connections}",
            f"-c{self.connections}",
            f"-d{max(1, round(self.duration_s))}s",
            "--timeout",
            "10s",
            "-s",
            str(TIMELINE_SCRIPT),
            self.url,
        ]
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "WRK_TIMELINE_PREFIX": str(self.prefix)},
                start_new_session=True,
            )

    async def finish(self) -> PlainLoadResult:
        """Wait for wrk to end (bounded), then read its totals and the timelines."""
        process = self.process
        assert process is not None, "not started"
        try:
            await anyio.to_thread.run_sync(lambda: process.wait(timeout=self.duration_s + 30))
        except subprocess.TimeoutExpired as exc:
            raise BenchmarkError(f"wrk did not end: {self.output.read_text(errors='replace')}") from exc
        finally:
            self.kill()
        return self.result()

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(timeout=10)

    def result(self) -> PlainLoadResult:
        text = self.output.read_text(errors="replace")
        line = next((x for x in text.splitlines() if x.startswith("WRK_SUMMARY ")), None)
        if line is None:
            raise BenchmarkError(f"wrk printed no summary:\n{text[-2000:]}")
        summary = json.loads(line.removeprefix("WRK_SUMMARY "))
        samples: list[Sample] = []
        for path in sorted(self.prefix.parent.glob(self.prefix.name + "-*.log")):
            for row in path.read_text().splitlines():
                end, latency, status, version = row.split(" ", 3)
                samples.append((float(end), float(latency), int(status), version))
        samples.sort()
        errors = {k: int(summary[k]) for k in ("connect", "read", "write", "timeout", "status")}
        return PlainLoadResult("wrk", samples, errors, int(summary["requests"]))


class HttpxLoad:
    """`connections` keep-alive httpx clients, each requesting `url` in a loop until stopped."""

    def __init__(self, url: str, connections: int) -> None:
        self.url = url
        self.connections = connections
        self.samples: list[Sample] = []
        self.errors: Counter[str] = Counter()

    async def run(self, stop: anyio.Event) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(self.connections):
                tg.start_soon(self._client, stop)

    async def _client(self, stop: anyio.Event) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            for _ in range(MAX_LOOPS):
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    response = await client.get(self.url)
                except httpx.HTTPError as exc:
                    self.errors[error_kind(exc)] += 1
                    self.samples.append((time.monotonic(), time.monotonic() - started, 0, "-"))
                    await anyio.sleep(0.005)  # wrk retries at once; we spare the event loop
                    continue
                finished = time.monotonic()
                if not 200 <= response.status_code < 300:
                    self.errors["status"] += 1
                self.samples.append(
                    (finished, finished - started, response.status_code, version_of(response.content))
                )

    def result(self) -> PlainLoadResult:
        errors = {k: self.errors.get(k, 0) for k in ("connect", "read", "write", "timeout", "status")}
        return PlainLoadResult("httpx", sorted(self.samples), errors, len(self.samples))


# -- streams ----------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    """Slow streaming responses (`/greeter/countdown`: 5 lines over 0.5 s)."""

    completed: int = 0
    cut: int = 0  # the response started but ended early, with an error, or mixed two versions
    failed: int = 0  # failed before any response: refused, reset, closed keep-alive connection
    connect_errors: int = 0  # of those, the connection could not be opened
    non_2xx: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    last_errors: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.last_errors = [*self.last_errors[-4:], what]


async def stream_client(base_url: str, stats: StreamStats, stop: anyio.Event, lines: int = 5) -> None:
    """Read `/greeter/countdown` again and again until `stop`."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        for _ in range(MAX_LOOPS):
            if stop.is_set():
                return
            received: list[str] = []
            started = False
            try:
                async with client.stream("GET", "/greeter/countdown") as response:
                    started = True
                    if response.status_code != 200:
                        stats.non_2xx += 1
                        stats.note(f"stream answered {response.status_code}")
                        await anyio.sleep(0.01)
                        continue
                    received = [line async for line in response.aiter_lines() if line]
            except httpx.HTTPError as exc:
                if started or received:
                    stats.cut += 1
                else:
                    stats.failed += 1
                    stats.connect_errors += isinstance(exc, httpx.ConnectError)
                stats.note(f"stream: {exc!r}")
                await anyio.sleep(0.01)
                continue
            versions = {line.split()[0] for line in received}
            if len(received) != lines or len(versions) != 1:
                stats.cut += 1
                stats.note(f"stream cut or mixed: {received}")
            else:
                stats.completed += 1
                stats.versions[versions.pop()] += 1


# -- websockets -------------------------------------------------------------------------------------


@dataclass
class WebSocketStats:
    """Websocket sessions on `/greeter/echo`."""

    sessions: int = 0  # completed: every message answered, closed by the client
    messages: int = 0
    broken: int = 0  # ended by the server or the network in the middle of a session
    connect_errors: int = 0  # the handshake failed
    mixed: int = 0  # a session answered by two versions
    close_codes: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    last_errors: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.last_errors = [*self.last_errors[-4:], what]


async def websocket_client(
    base_url: str,
    stats: WebSocketStats,
    stop: anyio.Event,
    session_messages: int = 40,
    interval_s: float = 0.05,
) -> None:
    """Sessions of `session_messages` echoes, one every `interval_s`, until `stop`."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        for _ in range(MAX_LOOPS):
            if stop.is_set():
                return
            await _websocket_session(client, stats, stop, session_messages, interval_s)


async def _websocket_session(
    client: httpx.AsyncClient,
    stats: WebSocketStats,
    stop: anyio.Event,
    session_messages: int,
    interval_s: float,
) -> None:
    opened = False
    first: str | None = None
    ws: AsyncWebSocketSession
    try:
        async with aconnect_ws("/greeter/echo", client, keepalive_ping_interval_seconds=None) as ws:
            opened = True
            for n in range(session_messages):
                if stop.is_set():
                    break
                await ws.send_text(f"ping {n}")
                with anyio.fail_after(10):
                    answer = await ws.receive_text()
                version = answer.split(":")[0]
                first = first or version
                if version != first:
                    stats.mixed += 1
                    stats.note(f"websocket switched versions: {first} -> {version}")
                stats.messages += 1
                with anyio.move_on_after(interval_s):
                    await ws.receive()  # nothing is expected: this raises if the server closes
                    stats.note("websocket: an unexpected message")
    except Exception as exc:  # the handshake, a close by the server, a reset, a timeout
        error = leaf_exception(exc)
        if isinstance(error, WebSocketDisconnect):
            stats.broken += 1
            stats.close_codes[str(error.code)] += 1
        elif opened:
            stats.broken += 1
            stats.close_codes[type(error).__name__] += 1
        else:
            stats.connect_errors += 1
        stats.note(f"websocket: {error!r}")
        await anyio.sleep(0.01)
    else:
        stats.sessions += 1
        if first is not None:
            stats.versions[first] += 1


def leaf_exception(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: httpx-ws wraps what escapes its
    context manager in one."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


# -- the probe --------------------------------------------------------------------------------------


@dataclass
class ProbeStats:
    """Requests on new connections: (sent, ended, status or 0 for an error, version)."""

    samples: list[tuple[float, float, int, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.samples if not 200 <= s[2] < 300)


async def probe(url: str, stats: ProbeStats, stop: anyio.Event, interval_s: float = 0.02) -> None:
    """GET `url` on a new connection every `interval_s` until `stop`."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=2) as client:
        for _ in range(MAX_LOOPS):
            if stop.is_set():
                return
            sent = time.monotonic()
            try:
                response = await client.get(url)
                stats.samples.append(
                    (sent, time.monotonic(), response.status_code, version_of(response.content))
                )
            except httpx.HTTPError:
                stats.samples.append((sent, time.monotonic(), 0, "-"))
            await anyio.sleep(interval_s)


def as_dict(stats: Any) -> dict[str, Any]:
    """A stats dataclass as a JSON-ready dict (`dataclasses.asdict` would mangle its Counters)."""
    return {f.name: _plain(getattr(stats, f.name)) for f in fields(stats)}


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Counter) else value
