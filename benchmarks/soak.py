"""Soak: many hot deployments with rollbacks mixed in, under steady traffic, counting failed requests.

    .venv/bin/python -m benchmarks.soak                         # 200 operations on 1, then on 2 workers
    .venv/bin/python -m benchmarks.soak --swaps 200 --workers 1
    .venv/bin/python -m benchmarks.soak --swaps 200 --workers 2

One real server per worker count: `uvicorn --factory starlette_hotdeploy._serve:create_host_app
--workers N` (what `hotdeploy serve --workers N` runs) on 127.0.0.1 and a free port, with a fresh
home in a temporary directory and an admin token. A tiny package, `soak`, is deployed in version
1; then the soak performs `--swaps` operations through the admin API, each sent after the answer
to the one before: deploys of new versions (2, 3, ...) and, every `--rollback-every`-th operation
(10), a rollback (`POST /_hotdeploy/packages/soak/rollback`) to the version that the deploy just
before it replaced. Every version answers `GET /soak/` with its version and the worker's pid,
and `GET /soak/slow?ms=N` with two lines N ms apart (each with the server's clock).

Traffic runs for the whole soak: keep-alive httpx clients on `GET /soak/`, a client that opens a
new connection for every request (the kernel spreads those over the workers), a client that
keeps a slow request open now and then (so replaced versions drain while the next operations
come), and after every operation a few requests on new connections that must answer the version
it made active. Every version's manifest has a short `drain_timeout` (1 s), longer than every
slow request, so that no request is ended by design.

The rollbacks are timed around the end of the replaced version's drain, where the reported bug
lives (a rollback switching the mount back to a version that the background retirement has just
unloaded). For a rollback, the background slow requests pause; a request is held open on the
current version, the deploy switches away from it (that version now drains, for this one
request), and then, in turn:

- `drain-end` (3 rollbacks in 5): the rollback is sent so that the held request, the drain's
  last, ends while the server handles the rollback: a varying fraction of the way from the
  rollback's start on the server to its `switch` step, as measured on the rollback before
  (`SoakConfig.leads`; beyond 1 for the other worker, which switches later; negative: after the
  drain ended, while the version retires);
- `draining`: the rollback is sent at once, the held request still open (a warm switch back);
- `idle`: nothing held; the rollback follows the deploy's answer at once.

Each rollback's result records where the drain ended relative to it, from the server's clock
(the same host's): `in_window` when it ended between the rollback's start and its switch, on a
warm rollback (one that did not load the version again).

Counted: requests sent, failed requests (a connection or protocol error, a status other than
200, a body that is not the package's answer; the first few are kept with their bodies),
operations by kind and admin status (a 409 "in progress" is a refused operation, reported apart;
it is not a failed request), the admin calls' durations, and at the end whether the version that
the last operation made active answers on every worker (requests on new connections until every
worker's pid answered). Every loop is bounded in count and in time, and the server's process
group is killed at the end, also on errors and Ctrl-C.

Results go to benchmarks/results/soak.json; the exit status is 1 when a run saw a failed
request, a failed operation or a wrong final version. `tests/test_soak.py` runs the same soak,
shorter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from anyio.abc import TaskGroup

from starlette_hotdeploy._archive import pack_directory

from .common import (
    BenchmarkError,
    ServerProcess,
    free_port,
    latency_summary,
    machine,
    wait_until,
    write_results,
)
from .servers import START_TIMEOUT, uvicorn_command

NAME = "soak"
HOST_APP = "starlette_hotdeploy._serve:create_host_app"
ADMIN = "/_hotdeploy"
MAX_LOOPS = 1_000_000  # the hard bound of every client loop; the stop event ends them far earlier
REQUEST_TIMEOUT = 10.0
STARTUP_LINE = "Application startup complete."  # uvicorn, per worker, once its lifespan started
ROLLBACK_TIMINGS = ("drain-end", "drain-end", "draining", "drain-end", "idle")
ROLLBACK_FIELDS = (  # what the results keep of each rollback
    "index",
    "timing",
    "lead",
    "status",
    "ms",
    "to_version",
    "warm",
    "drain_end_ms",
    "switch_ms",
    "in_window",
    "failed_until_next",
    "steps",
)

# A version of the package: its version and the worker's pid on `/`; on `/slow?ms=N` two lines
# N ms apart, each with the server's clock (an in-flight request that keeps the version draining).
APP = """
import os
import time

import anyio
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

VERSION = "{version}"


async def index(request):
    return JSONResponse({{"name": "{name}", "version": VERSION, "pid": os.getpid()}})


async def slow(request):
    delay = int(request.query_params.get("ms", "100")) / 1000

    async def lines():
        yield f"{{VERSION}} start {{time.time()}}\\n"
        await anyio.sleep(delay)
        yield f"{{VERSION}} end {{time.time()}}\\n"

    return StreamingResponse(lines(), media_type="text/plain")


app = Starlette(routes=[Route("/", index), Route("/slow", slow)])
"""


@dataclass
class SoakConfig:
    """One soak: `swaps` admin operations, every `rollback_every`-th a rollback, on `workers`."""

    swaps: int = 200
    rollback_every: int = 10
    workers: int = 1
    keepalive_clients: int = 3
    new_connection_clients: int = 1
    slow_clients: int = 1
    slow_ms: tuple[int, ...] = (20, 80, 200)  # the background slow requests, in turn
    slow_pause_ms: int = 50  # between two background slow requests
    held_ms: int = 150  # at least, the request held open over the deploy before a rollback
    drain_timeout: float = 1.0  # in every version's manifest; longer than every slow request
    # drain-end rollbacks, in turn: the held request ends this fraction of the way from the
    # rollback's start on the server to its switch (negative: that far after it ended)
    leads: tuple[float, ...] = (0.5, 0.25, 0.75, 0.1, 0.9, 1.3, 0.4, -0.5, 0.6, 2.0, 0.0, 0.3)
    checks_per_worker: int = 2  # requests on new connections after each operation, per worker
    op_timeout_s: float = 60.0
    max_duration_s: float | None = None  # default: 60 s + 2 s per operation
    keep_errors: int = 10

    def deadline_s(self) -> float:
        return self.max_duration_s if self.max_duration_s is not None else 60.0 + 2.0 * self.swaps


def rollbacks_in(config: SoakConfig) -> int:
    return config.swaps // config.rollback_every if config.rollback_every > 0 else 0


def deploys_in(config: SoakConfig) -> int:
    return config.swaps - rollbacks_in(config)


# -- the package ------------------------------------------------------------------------------------


def write_version(parent: Path, version: str, drain_timeout: float) -> Path:
    """Write version `version` of the package under `parent/soak-<version>`; its directory."""
    root = parent / f"{NAME}-{version}"
    (root / NAME).mkdir(parents=True)
    (root / NAME / "__init__.py").write_text("")
    (root / NAME / "app.py").write_text(APP.format(name=NAME, version=version))
    (root / "hotdeploy.toml").write_text(
        f'name = "{NAME}"\nversion = "{version}"\napp = "{NAME}.app:app"\nmount = "/{NAME}"\n'
        f"drain_timeout = {drain_timeout}\n"
    )
    return root


def archive_of(directory: Path) -> bytes:
    """The archive's bytes: `pack_directory` gives a `Packed` (`.data`), or, in releases before
    it, a (manifest, bytes) tuple; both are accepted, to compare with older commits."""
    packed: Any = pack_directory(directory)
    return bytes(packed.data if hasattr(packed, "data") else packed[1])


def build_archives(parent: Path, count: int, drain_timeout: float) -> dict[str, bytes]:
    """The archives of versions 1 ... count, packed before the clock starts."""
    return {str(i): archive_of(write_version(parent, str(i), drain_timeout)) for i in range(1, count + 1)}


# -- the server -------------------------------------------------------------------------------------


class SoakServer:
    """The package host on uvicorn with `workers` workers, a fresh home and an admin token."""

    def __init__(self, workdir: Path, workers: int) -> None:
        self.workers = workers
        self.token = secrets.token_urlsafe(16)
        self.port = free_port()
        command = uvicorn_command(HOST_APP, self.port, workers)
        command[command.index("--log-level") + 1] = "info"  # for the startup lines
        env = {"HOTDEPLOY_HOME": str(workdir / "home"), "HOTDEPLOY_ADMIN_TOKEN": self.token}
        self.process = ServerProcess(command, workdir / "server.log", env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it; wait (bounded) until every worker finished its lifespan startup (the
        deployer then cleaned the home and registered the worker) and GET / answers."""
        self.process.start()

        def started() -> bool | None:
            if not self.process.alive():
                raise BenchmarkError(f"the server exited:\n{self.log_tail()}")
            log = self.process.log_path.read_text(errors="replace")
            return True if log.count(STARTUP_LINE) >= self.workers else None

        def answers() -> bool | None:
            try:
                return True if httpx.get(self.url + "/", timeout=2).status_code == 200 else None
            except httpx.HTTPError:
                return None

        wait_until(f"{self.workers} worker(s) to start", started, START_TIMEOUT)
        wait_until("the host app to answer GET /", answers, START_TIMEOUT)

    def stop(self) -> None:
        self.process.kill()

    def log_tail(self, chars: int = 6000) -> str:
        return self.process.log_tail(chars)


# -- traffic ----------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """What the clients saw: requests, failures (the first few kept whole), versions answered."""

    keep_errors: int
    started: float = field(default_factory=time.monotonic)
    operation: int = 0  # the admin operation under way (0: before the first), for the errors
    requests: Counter[str] = field(default_factory=Counter)  # by client kind
    failed: Counter[str] = field(default_factory=Counter)  # by cause
    failed_during: Counter[int] = field(default_factory=Counter)  # by operation under way
    errors: list[dict[str, Any]] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    stale: list[dict[str, Any]] = field(default_factory=list)  # right after an operation: another version
    # Held by each background slow request, and by a deploy + rollback pair for its whole length,
    # so that during the pair the held request is the last one open on the version it replaces.
    quiet: anyio.Lock = field(default_factory=anyio.Lock)

    def fail(self, client: str, cause: str, status: int | None, body: str) -> None:
        self.failed[cause] += 1
        self.failed_during[self.operation] += 1
        if len(self.errors) < self.keep_errors:
            self.errors.append(
                {
                    "t_s": round(time.monotonic() - self.started, 3),
                    "operation": self.operation,
                    "client": client,
                    "cause": cause,
                    "status": status,
                    "body": body[:500],
                }
            )

    async def get(self, client: httpx.AsyncClient, url: str, kind: str) -> str | None:
        """GET the package's index: the version that answered, or None (counted as failed)."""
        self.requests[kind] += 1
        try:
            response = await client.get(url)
        except httpx.HTTPError as exc:
            self.fail(kind, type(exc).__name__, None, str(exc))
            return None
        if response.status_code != 200:
            self.fail(kind, f"status {response.status_code}", response.status_code, response.text)
            return None
        try:
            version = str(response.json()["version"])
        except (ValueError, KeyError, TypeError):
            self.fail(kind, "not the package's answer", 200, response.text)
            return None
        self.versions.add(version)
        return version

    async def slow(
        self,
        client: httpx.AsyncClient,
        url: str,
        kind: str,
        on_start: Callable[[float], None] | None = None,
    ) -> tuple[float, float] | None:
        """GET a slow stream: its start and end on the server's clock, or None (counted as
        failed). `on_start` gets the start as soon as the first line arrived."""
        self.requests[kind] += 1
        text = ""
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    await response.aread()
                    self.fail(kind, f"status {response.status_code}", response.status_code, response.text)
                    return None
                async for chunk in response.aiter_text():
                    first = "\n" not in text
                    text += chunk
                    if first and "\n" in text and on_start is not None:
                        on_start(_clock(text.splitlines()[0]))
        except httpx.HTTPError as exc:
            self.fail(kind, type(exc).__name__, None, f"{exc} (after {text!r})")
            return None
        lines = [line.split(" ") for line in text.splitlines()]
        if (
            len(lines) != 2
            or [line[1:2] for line in lines] != [["start"], ["end"]]
            or lines[0][0] != lines[1][0]
        ):
            self.fail(kind, "incomplete stream", 200, text)
            return None
        self.versions.add(lines[0][0])
        return _clock(text.splitlines()[0]), _clock(text.splitlines()[1])


def _clock(line: str) -> float:
    """The server's clock in a line of the slow stream ("<version> start|end <time>"); 0 if none."""
    try:
        return float(line.split(" ")[2])
    except (IndexError, ValueError):
        return 0.0


async def keepalive_client(url: str, traffic: Traffic, stop: anyio.Event) -> None:
    """Requests in a loop on one keep-alive connection (reconnecting after an error)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as client:
        for _ in range(MAX_LOOPS):
            if stop.is_set():
                return
            if await traffic.get(client, url, "keep-alive") is None:
                await anyio.sleep(0.005)  # after a failure: do not spin


async def new_connection_client(url: str, traffic: Traffic, stop: anyio.Event) -> None:
    """A request on a new connection every few milliseconds."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as client:
        for _ in range(MAX_LOOPS):
            if stop.is_set():
                return
            await traffic.get(client, url, "new-connection")
            await anyio.sleep(0.005)


async def slow_client(base: str, config: SoakConfig, traffic: Traffic, stop: anyio.Event) -> None:
    """Slow streaming requests now and then (in turn `config.slow_ms` long, with pauses)."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        for i in range(MAX_LOOPS):
            if stop.is_set():
                return
            ms = config.slow_ms[i % len(config.slow_ms)]
            async with traffic.quiet:
                await traffic.slow(client, f"{base}/{NAME}/slow?ms={ms}", "slow")
            with anyio.move_on_after(config.slow_pause_ms / 1000):
                await stop.wait()


@dataclass
class Held:
    """A slow request held open over a deploy, with its start and end on the server's clock:
    `started` is set once it runs on the server, `ended` once it is over."""

    ms: int
    started: anyio.Event = field(default_factory=anyio.Event)
    ended: anyio.Event = field(default_factory=anyio.Event)
    server_start: float = 0.0
    server_end: float = 0.0

    def began(self, server_start: float) -> None:
        self.server_start = server_start
        self.started.set()


async def held_request(base: str, traffic: Traffic, held: Held) -> None:
    try:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
            seen = await traffic.slow(client, f"{base}/{NAME}/slow?ms={held.ms}", "held", held.began)
        if seen is not None:
            held.server_start, held.server_end = seen
    finally:
        held.started.set()  # also after a failure: never leave the operations waiting
        held.ended.set()


# -- the operations ---------------------------------------------------------------------------------


def steps_of(record: dict[str, Any]) -> list[list[Any]]:
    """A deployment record's steps as [name, ms from the record's start, duration ms]."""
    start = record.get("started_at")
    steps: list[list[Any]] = []
    for step in record.get("steps") or []:
        at = step.get("started_at") if isinstance(step, dict) else None
        if isinstance(start, int | float) and isinstance(at, int | float):
            steps.append([step.get("name"), round((at - start) * 1000, 3), step.get("duration_ms")])
    return steps


async def admin_call(
    admin: httpx.AsyncClient, index: int, kind: str, path: str, expect: int, **kwargs: Any
) -> dict[str, Any]:
    """One admin POST, timed: what it answered (status 0 when it could not be sent or answered)."""
    record: dict[str, Any] = {"index": index, "kind": kind, "sent_at": time.time()}
    started = time.perf_counter()
    try:
        response = await admin.post(path, **kwargs)
    except httpx.HTTPError as exc:
        record.update(status=0, ok=False, detail=f"{type(exc).__name__}: {exc}")
    else:
        record["status"] = response.status_code
        record["ok"] = response.status_code == expect
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:500]}
        if isinstance(body, dict):
            record["to_version"] = body.get("to_version")
            record["server_started_at"] = body.get("started_at")
            record["steps"] = steps_of(body)
            if not record["ok"]:
                record["detail"] = str(body.get("detail") or json.dumps(body)[:500])
    record["ms"] = round((time.perf_counter() - started) * 1000, 3)
    return record


class Soak:
    """The operations of one soak, against a running server, with traffic already flowing."""

    def __init__(
        self,
        config: SoakConfig,
        base: str,
        admin: httpx.AsyncClient,
        archives: dict[str, bytes],
        traffic: Traffic,
        tg: TaskGroup,
    ) -> None:
        self.config = config
        self.base = base
        self.admin = admin
        self.archives = archives
        self.traffic = traffic
        self.tg = tg
        self.records: list[dict[str, Any]] = []
        self.active: str | None = "1"  # the version the operations so far made active
        self.previous: str | None = None  # and the one before it: where a rollback goes
        self.next_version = 2
        self.rollbacks = self.drain_ends = 0
        self.checker = httpx.AsyncClient(
            limits=httpx.Limits(max_keepalive_connections=0), timeout=REQUEST_TIMEOUT
        )

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    def refused(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == 409 and "in progress" in r.get("detail", "")]

    def failed(self) -> list[dict[str, Any]]:
        refused = [id(r) for r in self.refused()]
        return [r for r in self.records if not r["ok"] and id(r) not in refused]

    async def run(self, deadline: float) -> None:
        """`config.swaps` operations, each after the answer to the one before (and the check that
        its version answers), unless `deadline` (time.monotonic()) comes first."""
        every, swaps = self.config.rollback_every, self.config.swaps
        async with self.checker:
            index = 1
            while index <= swaps and time.monotonic() < deadline:
                if every > 0 and (index + 1) % every == 0 and index + 1 <= swaps:
                    timing = ROLLBACK_TIMINGS[self.rollbacks % len(ROLLBACK_TIMINGS)]
                    self.rollbacks += 1
                    async with self.traffic.quiet:  # no background slow request is open now
                        await self.rollback_pair(index, timing)
                    index += 2
                else:
                    await self.deploy(index)
                    index += 1

    async def deploy(self, index: int) -> None:
        version = str(self.next_version)
        self.next_version += 1
        self.traffic.operation = index
        record = await admin_call(
            self.admin,
            index,
            "deploy",
            f"{ADMIN}/packages",
            201,
            content=self.archives[version],
            headers={"Content-Type": "application/zip"},
        )
        self.records.append(record)
        if record["ok"]:
            self.previous, self.active = self.active, version
        await self.check_after()

    async def rollback(self, index: int, timing: str, lead: float | None) -> dict[str, Any]:
        self.traffic.operation = index
        record = await admin_call(self.admin, index, "rollback", f"{ADMIN}/packages/{NAME}/rollback", 200)
        record.update(timing=timing, lead=lead, expected=self.previous)
        self.records.append(record)
        if record["ok"] and record.get("to_version") != self.previous:
            record["ok"] = False
            record["detail"] = f"rolled back to {record.get('to_version')}, expected {self.previous}"
        if record["ok"]:
            self.previous, self.active = self.active, self.previous
        await self.check_after()
        return record

    async def rollback_pair(self, index: int, timing: str) -> None:
        """A deploy, then the rollback that undoes it, timed around the end of the drain of the
        version that the deploy replaced (see the module's docstring)."""
        held: Held | None = None
        pre, switch = self.rollback_window()
        if timing != "idle":
            held = Held(self.held_ms(pre, switch))
            self.tg.start_soon(held_request, self.base, self.traffic, held)
            with anyio.move_on_after(REQUEST_TIMEOUT):
                await held.started.wait()  # it runs on the version the deploy replaces
        await self.deploy(index)
        lead: float | None = None
        if held is not None and timing == "drain-end":
            lead = self.config.leads[self.drain_ends % len(self.config.leads)]
            self.drain_ends += 1
            if lead >= 0:  # a timer on the server's clock: the end to aim at is not an event yet
                send_at = held.server_start + held.ms / 1000 - (pre + lead * switch) / 1000
                await anyio.sleep(max(0.0, send_at - time.time()))
            else:  # after the drain ended: the version retires (shuts down, unloads)
                with anyio.move_on_after(REQUEST_TIMEOUT):
                    await held.ended.wait()
                await anyio.sleep(-lead * switch / 1000)
        record = await self.rollback(index + 1, timing, lead)
        if held is not None:
            with anyio.move_on_after(REQUEST_TIMEOUT):
                await held.ended.wait()
        self.place(record, held)

    def place(self, record: dict[str, Any], held: Held | None) -> None:
        """Where the held request (the drain's end) fell in the rollback, on the server's clock."""
        names = [step[0] for step in record.get("steps", [])]
        switch = next((step[1] for step in record.get("steps", []) if step[0] == "switch"), None)
        record["warm"] = bool(names) and "load" not in names  # not loaded again: switched back to it
        record["switch_ms"] = switch
        start = record.get("server_started_at")
        if held is None or not held.server_end or not isinstance(start, int | float) or switch is None:
            record["drain_end_ms"] = record["in_window"] = None
            return
        record["drain_end_ms"] = round((held.server_end - start) * 1000, 3)
        record["in_window"] = record["warm"] and 0 <= record["drain_end_ms"] <= switch

    def rollback_window(self) -> tuple[float, float]:
        """(ms from sending a rollback until the server starts it, ms from there to its switch),
        from the last warm rollback; before one: rough guesses."""
        for record in reversed(self.of("rollback")):
            start = record.get("server_started_at")
            if record.get("warm") and record.get("switch_ms") is not None and isinstance(start, int | float):
                return max(0.0, (start - record["sent_at"]) * 1000), float(record["switch_ms"])
        recent = sorted(r["ms"] for r in self.records[-10:] if r["ok"])
        return 2.0, 0.3 * (recent[len(recent) // 2] if recent else 10.0)

    def held_ms(self, pre: float, switch: float) -> int:
        """How long a held request stays open: long enough to end after the deploy answered,
        with room for the largest lead, and well within the drain timeout."""
        recent = sorted(r["ms"] for r in self.records[-10:] if r["ok"])
        typical = recent[len(recent) // 2] if recent else 0.0
        room = 2 * typical + pre + max(1.0, *self.config.leads) * switch + 30
        return int(min(max(self.config.held_ms, room), 0.8 * self.config.drain_timeout * 1000))

    async def check_after(self) -> None:
        """Right after an operation answered: requests on new connections (spread over the
        workers), which must answer the version it made active (another is counted as stale)."""
        url = f"{self.base}/{NAME}/"
        for _ in range(self.config.checks_per_worker * self.config.workers):
            version = await self.traffic.get(self.checker, url, "after-operation")
            if version is not None and version != self.active:
                stale = {"operation": self.traffic.operation, "expected": self.active, "answered": version}
                self.traffic.stale.append(stale)


# -- the final check --------------------------------------------------------------------------------


def worker_pid(worker_id: str) -> int:
    """The pid in a worker id ("host:pid:random")."""
    return int(worker_id.rsplit(":", 2)[1])


async def final_check(
    base: str, admin: httpx.AsyncClient, workers: int, expected: str | None
) -> dict[str, Any]:
    """Does `expected` answer on every worker? Waits (bounded) until the workers map shows it
    everywhere, then sends requests on new connections until every worker's pid answered."""
    found: dict[str, Any] = {"expected": expected, "active_version": None}
    workers_map: dict[str, str] = {}
    with anyio.move_on_after(20):
        for _ in range(MAX_LOOPS):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await admin.get(f"{ADMIN}/packages/{NAME}")
                if response.status_code == 200:
                    package = response.json()
                    workers_map = package.get("workers") or {}
                    found["active_version"] = package.get("active_version")
                    if (
                        found["active_version"] == expected
                        and len(workers_map) == workers
                        and set(workers_map.values()) == {expected}
                    ):
                        break
            await anyio.sleep(0.1)
    found["workers_map"] = workers_map
    pids = {worker_pid(w) for w in workers_map}
    answers: Counter[str] = Counter()
    failed: list[str] = []
    reached: set[int] = set()
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as client:
        for sent in range(200 * max(workers, 1)):
            if sent >= 20 * workers and pids <= reached:
                break
            try:
                response = await client.get(f"{base}/{NAME}/")
            except httpx.HTTPError as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
                continue
            try:
                body: dict[str, Any] = response.json() if response.status_code == 200 else {}
                answers[f"{body['version']}@{body['pid']}"] += 1
                reached.add(int(body["pid"]))
            except (ValueError, KeyError, TypeError):
                failed.append(f"{response.status_code}: {response.text[:300]}")
    versions = {answer.split("@", 1)[0] for answer in answers}
    found.update(
        answers=dict(answers), failed=failed[:10], failed_count=len(failed), pids_reached=sorted(reached)
    )
    found["ok"] = (
        expected is not None
        and found["active_version"] == expected
        and not failed
        and versions == {expected}
        and len(pids) == workers
        and pids <= reached
    )
    return found


# -- one soak ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_server(workdir: Path, workers: int) -> AsyncIterator[SoakServer]:
    """The server, started from a worker thread; killed on the way out, whatever happens."""
    server = SoakServer(workdir, workers)
    try:
        await anyio.to_thread.run_sync(server.start)
        yield server
    finally:
        server.stop()  # synchronous: a cancellation (Ctrl-C) cannot interrupt it


async def run_soak(config: SoakConfig, workdir: Path) -> dict[str, Any]:
    """One soak on a new server under `workdir`: what it saw (see `summary`)."""
    archives = await anyio.to_thread.run_sync(
        build_archives, workdir / "sources", deploys_in(config) + 1, config.drain_timeout
    )
    async with running_server(workdir, config.workers) as server:
        headers = {"Authorization": f"Bearer {server.token}"}
        limits = httpx.Limits(max_keepalive_connections=0)  # a new connection each: any worker coordinates
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, limits=limits, timeout=config.op_timeout_s
        ) as admin:
            first = await admin_call(
                admin,
                0,
                "deploy",
                f"{ADMIN}/packages",
                201,
                content=archives["1"],
                headers={"Content-Type": "application/zip"},
            )
            if not first["ok"]:
                raise BenchmarkError(f"deploying {NAME} 1 failed: {first}\n{server.log_tail()}")
            ready = await final_check(server.url, admin, config.workers, "1")
            if not ready["ok"]:
                raise BenchmarkError(
                    f"{NAME} 1 does not answer on every worker: {ready}\n{server.log_tail()}"
                )

            traffic = Traffic(config.keep_errors)
            stop = anyio.Event()
            index_url = f"{server.url}/{NAME}/"
            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                for _ in range(config.keepalive_clients):
                    tg.start_soon(keepalive_client, index_url, traffic, stop)
                for _ in range(config.new_connection_clients):
                    tg.start_soon(new_connection_client, index_url, traffic, stop)
                for _ in range(config.slow_clients):
                    tg.start_soon(slow_client, server.url, config, traffic, stop)
                soak = Soak(config, server.url, admin, archives, traffic, tg)
                try:
                    await soak.run(started + config.deadline_s())
                finally:
                    stop.set()
            duration = time.monotonic() - started
            final = await final_check(server.url, admin, config.workers, soak.active)
        log_tail = server.log_tail()
    return summary(config, traffic, soak, final, duration, log_tail)


def summary(
    config: SoakConfig, traffic: Traffic, soak: Soak, final: dict[str, Any], duration: float, log: str
) -> dict[str, Any]:
    statuses: dict[str, Counter[str]] = {}
    for record in soak.records:
        statuses.setdefault(record["kind"], Counter())[str(record["status"])] += 1
    seconds = {kind: [r["ms"] / 1000 for r in soak.of(kind)] for kind in ("deploy", "rollback")}
    rollbacks = soak.of("rollback")
    for record in rollbacks:  # what failed from the rollback until the next operation's end
        record["failed_until_next"] = sum(traffic.failed_during[record["index"] + i] for i in (0, 1))
    failed_ops = soak.failed()
    failed = sum(traffic.failed.values())
    result: dict[str, Any] = {
        "workers": config.workers,
        "swaps": len(soak.records),
        "deploys": len(soak.of("deploy")),
        "rollbacks": len(rollbacks),
        "completed": len(soak.records) == config.swaps,
        "requests": sum(traffic.requests.values()),
        "requests_by_client": dict(traffic.requests),
        "failed": failed,
        "failed_by_cause": dict(traffic.failed),
        "errors": traffic.errors,
        "failed_during_operation": {str(k): v for k, v in sorted(traffic.failed_during.items())},
        "versions_answered": len(traffic.versions),
        "stale_after_operation": len(traffic.stale),
        "stale_examples": traffic.stale[: config.keep_errors],
        "operations": {kind: dict(counts) for kind, counts in statuses.items()},
        "refused_in_progress": len(soak.refused()),
        "operations_failed": len(failed_ops),
        "failed_operations": [
            {k: r.get(k) for k in ("index", "kind", "status", "detail", "ms")} for r in failed_ops
        ][: config.keep_errors],
        "rollback_timings": dict(Counter(r["timing"] for r in rollbacks)),
        "rollbacks_warm": sum(1 for r in rollbacks if r.get("warm")),
        "rollbacks_in_window": sum(1 for r in rollbacks if r.get("in_window")),
        "rollback_details": [{k: r.get(k) for k in ROLLBACK_FIELDS} for r in rollbacks],
        "admin_latency": {
            "all": latency_summary(seconds["deploy"] + seconds["rollback"]),
            "deploy": latency_summary(seconds["deploy"]),
            "rollback": latency_summary(seconds["rollback"]),
        },
        "final": final,
        "duration_s": round(duration, 3),
        "config": asdict(config),
    }
    result["clean"] = failed == 0 and not failed_ops and result["completed"] and final["ok"]
    if not result["clean"]:
        result["server_log_tail"] = log
    return result


def describe(result: dict[str, Any]) -> str:
    """A few lines about one soak."""
    admin, final = result["admin_latency"], result["final"]
    lines = [
        f"workers={result['workers']}: {result['swaps']} operations ({result['deploys']} deploys, "
        f"{result['rollbacks']} rollbacks {result['rollback_timings']}: {result['rollbacks_warm']} warm, "
        f"{result['rollbacks_in_window']} with the drain ending between their start and their switch) "
        f"in {result['duration_s']:.1f} s" + ("" if result["completed"] else " (stopped at the time limit)"),
        f"  requests {result['requests']} {result['requests_by_client']}: failed {result['failed']}"
        + (f" {result['failed_by_cause']}" if result["failed"] else ""),
        f"  admin statuses {result['operations']}; refused (409 in progress) {result['refused_in_progress']}, "
        f"failed {result['operations_failed']}; stale answers right after an operation "
        f"{result['stale_after_operation']}",
        f"  admin call p50/p99 ms: all {admin['all']['p50_ms']}/{admin['all']['p99_ms']}, deploy "
        f"{admin['deploy']['p50_ms']}/{admin['deploy']['p99_ms']}, rollback "
        f"{admin['rollback']['p50_ms']}/{admin['rollback']['p99_ms']}",
        f"  final: expected {final['expected']}, answers {final['answers']}, workers {final['workers_map']}: "
        + ("ok" if final["ok"] else "WRONG"),
    ]
    for error in result["errors"]:
        lines.append(
            f"  failed request at {error['t_s']} s (operation {error['operation']}, {error['client']}): "
            f"{error['cause']}: {error['body'][:200]!r}"
        )
    for op in result["failed_operations"]:
        lines.append(f"  failed operation {op['index']} {op['kind']}: {op['status']} {op.get('detail')}")
    return "\n".join(lines)


async def run_all(
    config: SoakConfig, worker_counts: list[int], progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    results = []
    for workers in worker_counts:
        one = SoakConfig(**{**asdict(config), "workers": workers})
        progress(
            f"soak: {one.swaps} operations, every {one.rollback_every}th a rollback, {workers} worker(s) ..."
        )
        with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
            result = await run_soak(one, Path(tmp))
        progress(describe(result))
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--swaps", type=int, default=200, help="admin operations in all (default 200)")
    parser.add_argument("--rollback-every", type=int, default=10, help="every Nth operation is a rollback")
    parser.add_argument("--workers", default="both", choices=["1", "2", "both"], help="default: 1, then 2")
    parser.add_argument("--drain-timeout", type=float, default=SoakConfig.drain_timeout, help="seconds")
    parser.add_argument(
        "--clients", type=int, default=SoakConfig.keepalive_clients, help="keep-alive clients"
    )
    parser.add_argument("--max-duration", type=float, default=None, help="seconds per soak, at most")
    args = parser.parse_args(argv)
    if max(SoakConfig.held_ms, *SoakConfig.slow_ms) / 1000 >= args.drain_timeout:
        parser.error("--drain-timeout must be longer than every slow request (or they are ended by design)")
    config = SoakConfig(
        swaps=args.swaps,
        rollback_every=args.rollback_every,
        drain_timeout=args.drain_timeout,
        keepalive_clients=args.clients,
        max_duration_s=args.max_duration,
    )
    counts = [1, 2] if args.workers == "both" else [int(args.workers)]
    results = anyio.run(run_all, config, counts, lambda line: print(line, flush=True))
    print(f"written: {write_results('soak', {'machine': machine(), 'results': results})}")
    return 0 if all(r["clean"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
