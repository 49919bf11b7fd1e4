"""Soak: many hot deployments with rollbacks mixed in, under steady traffic, counting failed requests.

    .venv/bin/python -m benchmarks.soak                         # 200 operations on 1, then on 2 workers
    .venv/bin/python -m benchmarks.soak --swaps 200 --workers 1
    .venv/bin/python -m benchmarks.soak --swaps 200 --workers 2

One real server per worker count: `uvicorn --factory starlette_hotdeploy._serve:create_host_app
--workers N` (what `hotdeploy serve --workers N` runs) on 127.0.0.1 and a free port, with a fresh
home in a temporary directory and an admin token. A tiny package, `soak`, is deployed in version
1, then the soak performs `--swaps` operations through the admin API, one after the other (each
waits for the answer of the one before): deploys of new versions (2, 3, ...) and, every
`--rollback-every` operations (10), a rollback (`POST /_hotdeploy/packages/soak/rollback`) to the
version the deploy just before it replaced. Every version answers `GET /soak/` with its version
and the pid of the worker, and `GET /soak/slow?ms=N` with a stream of two lines N ms apart.

Traffic runs for the whole soak: keep-alive httpx clients on `GET /soak/`, a client that opens a
new connection for every request (the kernel spreads those over the workers), and a client that
keeps a slow streaming request open now and then, so that replaced versions drain while the
next operation comes. The manifests' `drain_timeout` is short (1 s; every slow request is
shorter, so no request is ended by design) and the rollbacks are timed around the end of a
drain, where the reported bug lives (a rollback switching back to a version that the background
retirement has just unloaded):

- `drain-end`: a slow request is opened on the current version, the deploy switches away from
  it, and the rollback is sent once that request has ended (the old version's drain is then
  over and its retirement starts), after a short delay that varies from rollback to rollback
  (0, 1, 2, 5, 10, 20, 50 ms);
- `draining`: the same, but the rollback is sent while the slow request is still open (a warm
  switch back to a draining version);
- `idle`: no slow request is held on purpose; the rollback follows the deploy's answer at once
  (the old version's drain ends as soon as nothing is in flight).

Counted: requests sent, failed requests (a connection or protocol error, a status other than
200, a body that is not the package's answer; the first few are kept with their bodies),
operations by kind and admin status (a 409 "in progress" is a refused operation, reported
apart; it is not a failed request), the admin calls' durations, and at the end whether the
version that the last operation made active answers on every worker (requests on new
connections until every worker's pid answered). Every loop is bounded in count and in time, and
the server's process group is killed at the end, also on errors and Ctrl-C.

Results go to benchmarks/results/soak.json; the exit status is 1 when a run saw a failed request,
a failed operation or a wrong final version. `tests/test_soak.py` runs the same soak, shorter.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
ROLLBACK_TIMINGS = ("drain-end", "drain-end", "draining", "drain-end", "idle")

# A version of the package: its version and the pid of the worker on `/`, and on `/slow?ms=N`
# a stream of two lines N ms apart (an in-flight request that keeps the version draining).
APP = """
import os

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
        yield f"{{VERSION}} start\\n"
        await anyio.sleep(delay)
        yield f"{{VERSION}} end\\n"

    return StreamingResponse(lines(), media_type="text/plain")


app = Starlette(routes=[Route("/", index), Route("/slow", slow)])
"""


@dataclass
class SoakConfig:
    """One soak: `swaps` admin operations, a rollback every `rollback_every`-th, on `workers`."""

    swaps: int = 200
    rollback_every: int = 10
    workers: int = 1
    keepalive_clients: int = 3
    new_connection_clients: int = 1
    slow_clients: int = 1
    slow_ms: tuple[int, ...] = (20, 80, 200)  # the background slow requests, in turn
    slow_pause_ms: int = 50  # between two background slow requests
    held_ms: int = 150  # the slow request held open over the deploy before a rollback
    drain_timeout: float = 1.0  # in every version's manifest; above every slow request
    # drain-end rollbacks, in turn: sent this fraction of a typical operation's duration before
    # the held request ends (negative: after it ended)
    leads: tuple[float, ...] = (0.5, 0.1, 0.9, 0.0, 0.3, -0.1, 0.7, -0.5, 0.2, 1.5, -1.0)
    checks_per_worker: int = 2  # requests on new connections after each operation, per worker
    op_timeout_s: float = 60.0
    max_duration_s: float | None = None  # default: 60 s + 2 s per operation
    keep_errors: int = 10

    def deadline_s(self) -> float:
        return self.max_duration_s if self.max_duration_s is not None else 60.0 + 2.0 * self.swaps


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
    """The archive's bytes: `pack_directory` gives a `Packed` (its `.data`), or before it did,
    a (manifest, bytes) tuple."""
    packed: Any = pack_directory(directory)
    return bytes(packed.data if hasattr(packed, "data") else packed[1])


def build_archives(parent: Path, count: int, drain_timeout: float) -> dict[str, bytes]:
    """The archives of versions 1 ... count (packed before the clock starts)."""
    return {str(i): archive_of(write_version(parent, str(i), drain_timeout)) for i in range(1, count + 1)}


def deploys_in(config: SoakConfig) -> int:
    return config.swaps - rollbacks_in(config)


def rollbacks_in(config: SoakConfig) -> int:
    return config.swaps // config.rollback_every if config.rollback_every > 0 else 0


def open_store(home: Path) -> Any:
    """The home's store, read-only use (its workers): `open_store` where the store is a protocol
    with implementations, the `Store` class before that."""
    module = importlib.import_module("starlette_hotdeploy._store")
    opener = getattr(module, "open_store", None) or module.Store
    return opener(home)


# -- the server -------------------------------------------------------------------------------------


class SoakServer:
    """The package host on uvicorn with `workers` workers, a fresh home and an admin token."""

    def __init__(self, workdir: Path, workers: int) -> None:
        self.workdir = workdir
        self.workers = workers
        self.home = workdir / "home"
        self.token = secrets.token_urlsafe(16)
        self.port = free_port()
        env = {"HOTDEPLOY_HOME": str(self.home), "HOTDEPLOY_ADMIN_TOKEN": self.token}
        command = uvicorn_command(HOST_APP, self.port, workers)
        self.process = ServerProcess(command, workdir / "server.log", env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait (bounded) until it answers GET / and every worker registered (a
        worker registers once its start-up cleaning of the home is done, before it serves)."""
        self.process.start()

        def answers() -> bool | None:
            if not self.process.alive():
                raise BenchmarkError(f"the server exited:\n{self.process.log_tail()}")
            try:
                return True if httpx.get(self.url + "/", timeout=2).status_code == 200 else None
            except httpx.HTTPError:
                return None

        wait_until("the host app to answer GET /", answers, START_TIMEOUT)

        def registered() -> bool | None:
            store = open_store(self.home)
            try:
                return True if len(store.workers()) >= self.workers else None
            finally:
                store.close()

        wait_until(f"{self.workers} workers to register", registered, START_TIMEOUT)

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
    errors: list[dict[str, Any]] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    stale: list[dict[str, Any]] = field(default_factory=list)  # after an operation: another version

    def sent(self, client: str) -> None:
        self.requests[client] += 1

    def fail(self, client: str, cause: str, status: int | None, body: str) -> None:
        self.failed[cause] += 1
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
        """GET the package's index; the version that answered, or None (counted as failed)."""
        self.sent(kind)
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
        self, client: httpx.AsyncClient, url: str, kind: str, started: anyio.Event | None = None
    ) -> bool:
        """GET a slow stream (two lines, the same version); `started` is set once its first line
        arrived (the request is then in flight on the server). True if it completed whole."""
        self.sent(kind)
        text = ""
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    await response.aread()
                    self.fail(kind, f"status {response.status_code}", response.status_code, response.text)
                    return False
                async for chunk in response.aiter_text():
                    text += chunk
                    if started is not None and "\n" in text:
                        started.set()
        except httpx.HTTPError as exc:
            self.fail(kind, type(exc).__name__, None, f"{exc} (after {text!r})")
            return False
        finally:
            if started is not None:
                started.set()  # never leave the operations waiting
        lines = text.splitlines()
        versions = {line.split(" ", 1)[0] for line in lines}
        if (
            len(lines) != 2
            or not lines[0].endswith(" start")
            or not lines[1].endswith(" end")
            or len(versions) != 1
        ):
            self.fail(kind, "incomplete stream", 200, text)
            return False
        self.versions.update(versions)
        return True


async def check_after(
    client: httpx.AsyncClient, url: str, traffic: Traffic, expected: str | None, count: int
) -> None:
    """Right after an operation answered: `count` requests on new connections (spread over the
    workers), which must answer the version it made active (another one is counted as stale)."""
    for _ in range(count):
        version = await traffic.get(client, url, "after-operation")
        if version is not None and version != expected:
            traffic.stale.append({"operation": traffic.operation, "expected": expected, "answered": version})


async def keepalive_client(url: str, traffic: Traffic, stop: anyio.Event) -> None:
    """Requests in a loop on one keep-alive connection (it reconnects after an error)."""
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
            await traffic.slow(client, f"{base}/{NAME}/slow?ms={ms}", "slow")
            with anyio.move_on_after(config.slow_pause_ms / 1000):
                await stop.wait()


@dataclass
class Held:
    """A slow request held open over a deploy: `started` is set once it runs on the server (its
    first line arrived), `ended` once it is over (the replaced version's drain can end)."""

    ms: int
    started: anyio.Event = field(default_factory=anyio.Event)
    ended: anyio.Event = field(default_factory=anyio.Event)
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def expected_end(self) -> float:
        """When it should end (time.monotonic()), as seen from its start."""
        return self.started_at + self.ms / 1000


async def held_request(base: str, traffic: Traffic, held: Held) -> None:
    try:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
            await traffic.slow(client, f"{base}/{NAME}/slow?ms={held.ms}", "held", held.started)
    finally:
        held.started.set()
        held.ended_at = time.monotonic()
        held.ended.set()


async def start_held(tg: TaskGroup, base: str, traffic: Traffic, ms: int) -> Held:
    """Open a held request and wait (bounded) until it runs on the server's current version."""
    held = Held(ms)
    tg.start_soon(held_request, base, traffic, held)
    with anyio.move_on_after(REQUEST_TIMEOUT):
        await held.started.wait()
    held.started_at = time.monotonic()
    return held


# -- the operations ---------------------------------------------------------------------------------


@dataclass
class Operations:
    """The admin operations done, and the model of which version should be active."""

    keep_errors: int
    records: list[dict[str, Any]] = field(default_factory=list)
    active: str | None = None
    previous: str | None = None

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    def refused(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == 409 and "in progress" in (r.get("detail") or "")]

    def failed(self) -> list[dict[str, Any]]:
        refused = {id(r) for r in self.refused()}
        return [r for r in self.records if not r["ok"] and id(r) not in refused]


async def admin_call(
    admin: httpx.AsyncClient, index: int, kind: str, path: str, expect: int, **kwargs: Any
) -> dict[str, Any]:
    """One admin POST, timed: its record (status 0 when it could not be sent or answered)."""
    started = time.perf_counter()
    record: dict[str, Any] = {"index": index, "kind": kind}
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
            record["from_version"] = body.get("from_version")
            record["to_version"] = body.get("to_version")
            if not record["ok"]:
                record["detail"] = body.get("detail") or json.dumps(body)[:500]
    record["ms"] = round((time.perf_counter() - started) * 1000, 3)
    return record


async def run_operations(
    base: str,
    admin: httpx.AsyncClient,
    config: SoakConfig,
    archives: dict[str, bytes],
    traffic: Traffic,
    tg: TaskGroup,
    deadline: float,
) -> Operations:
    """`config.swaps` operations, each after the answer to the one before (and the check
    that its version answers)."""
    ops = Operations(config.keep_errors, active="1")
    index_url = f"{base}/{NAME}/"
    checker = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=REQUEST_TIMEOUT)
    async with checker:
        return await _operations(
            base, admin, config, archives, traffic, tg, deadline, ops, checker, index_url
        )


async def _operations(
    base: str,
    admin: httpx.AsyncClient,
    config: SoakConfig,
    archives: dict[str, bytes],
    traffic: Traffic,
    tg: TaskGroup,
    deadline: float,
    ops: Operations,
    checker: httpx.AsyncClient,
    index_url: str,
) -> Operations:
    next_version = 2
    rollbacks = drain_ends = 0

    async def deploy(index: int) -> None:
        nonlocal next_version
        version = str(next_version)
        next_version += 1
        traffic.operation = index
        record = await admin_call(
            admin,
            index,
            "deploy",
            f"{ADMIN}/packages",
            201,
            content=archives[version],
            headers={"Content-Type": "application/zip"},
        )
        record["version"] = version
        ops.add(record)
        if record["ok"]:
            ops.previous, ops.active = ops.active, version
        await check_after(checker, index_url, traffic, ops.active, config.checks_per_worker * config.workers)

    async def rollback(index: int, timing: str, lead_ms: float | None) -> None:
        traffic.operation = index
        record = await admin_call(admin, index, "rollback", f"{ADMIN}/packages/{NAME}/rollback", 200)
        record["timing"] = timing
        record["lead_ms"] = lead_ms
        record["expected"] = ops.previous
        ops.add(record)
        if record["ok"]:
            if record.get("to_version") != ops.previous:
                record["ok"] = False
                record["detail"] = f"rolled back to {record.get('to_version')}, expected {ops.previous}"
            ops.previous, ops.active = ops.active, record.get("to_version") or ops.previous
        await check_after(checker, index_url, traffic, ops.active, config.checks_per_worker * config.workers)

    index = 1
    while index <= config.swaps and time.monotonic() < deadline:
        rollback_next = config.rollback_every > 0 and (index + 1) % config.rollback_every == 0
        if not rollback_next or index + 1 > config.swaps:
            await deploy(index)
            index += 1
            continue
        # A deploy, then the rollback that undoes it, timed around the end of the old version's drain.
        timing = ROLLBACK_TIMINGS[rollbacks % len(ROLLBACK_TIMINGS)]
        rollbacks += 1
        typical = typical_ms(ops)
        held = None
        if timing in ("drain-end", "draining"):
            held = await start_held(tg, base, traffic, held_ms(config, typical))
        await deploy(index)
        lead: float | None = None
        if held is not None and timing == "drain-end":
            fraction = config.leads[drain_ends % len(config.leads)]
            drain_ends += 1
            lead = round(fraction * typical, 3)
            if lead >= 0:  # before the drain ends: a timer, the end is not an event yet
                await anyio.sleep(max(0.0, held.expected_end - lead / 1000 - time.monotonic()))
            else:  # after it ended: its retirement (shutdown, unload) is under way
                with anyio.move_on_after(REQUEST_TIMEOUT):
                    await held.ended.wait()
                await anyio.sleep(-lead / 1000)
        sent = time.monotonic()
        await rollback(index + 1, timing, lead)
        if held is not None:
            with anyio.move_on_after(REQUEST_TIMEOUT):
                await held.ended.wait()
            # > 0: the rollback was sent that long before the held request (the last one on the
            # version it switches back to) ended, < 0: after.
            ops.records[-1]["lead_actual_ms"] = round((held.ended_at - sent) * 1000, 3)
        index += 2
    return ops


def typical_ms(ops: Operations) -> float:
    """The median duration of the last successful operations (0 before the first)."""
    recent = sorted(r["ms"] for r in ops.records[-10:] if r["ok"])
    return float(recent[len(recent) // 2]) if recent else 0.0


def held_ms(config: SoakConfig, typical: float) -> int:
    """How long a held request stays open: `config.held_ms`, or longer when operations take
    longer (several workers), so that it ends after the deploy answered, with room for the
    largest lead; always well within the drain timeout."""
    room = (1 + max(1.0, *config.leads)) * typical + 30
    return int(min(max(config.held_ms, room), 0.8 * config.drain_timeout * 1000))


# -- the final check --------------------------------------------------------------------------------


def worker_pid(worker_id: str) -> int:
    """The pid in a worker id ("host:pid:random")."""
    return int(worker_id.rsplit(":", 2)[1])


async def final_check(
    base: str, admin: httpx.AsyncClient, workers: int, expected: str | None
) -> dict[str, Any]:
    """Does `expected` answer on every worker? Waits (bounded) for the workers map to show it
    everywhere, then sends requests on new connections until every worker's pid answered."""
    found: dict[str, Any] = {"expected": expected}
    workers_map: dict[str, str] = {}
    with anyio.move_on_after(20):
        for _ in range(MAX_LOOPS):
            try:
                response = await admin.get(f"{ADMIN}/packages/{NAME}")
                if response.status_code == 200:
                    package = response.json()
                    workers_map = package.get("workers", {})
                    found["active_version"] = package.get("active_version")
                    if (
                        package.get("active_version") == expected
                        and len(workers_map) == workers
                        and set(workers_map.values()) == {expected}
                    ):
                        break
            except httpx.HTTPError:
                pass
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
    found["answers"] = dict(answers)
    found["failed"] = failed[:10]
    found["failed_count"] = len(failed)
    found["pids_reached"] = sorted(reached)
    versions = {a.split("@", 1)[0] for a in answers}
    found["ok"] = (
        expected is not None
        and not failed
        and versions == {expected}
        and len(pids) == workers
        and pids <= reached
        and found.get("active_version") == expected
    )
    return found


# -- one soak ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_server(workdir: Path, workers: int) -> AsyncIterator[SoakServer]:
    """The server, started in a worker thread; killed on the way out whatever happens."""
    server = SoakServer(workdir, workers)
    try:
        await anyio.to_thread.run_sync(server.start)
        yield server
    finally:
        server.stop()  # synchronous: a cancellation (Ctrl-C) cannot interrupt it


async def run_soak(config: SoakConfig, workdir: Path) -> dict[str, Any]:
    """One soak on a new server under `workdir`; what it saw (see `summary`)."""
    archives = await anyio.to_thread.run_sync(
        build_archives, workdir / "sources", deploys_in(config) + 1, config.drain_timeout
    )
    async with running_server(workdir, config.workers) as server:
        headers = {"Authorization": f"Bearer {server.token}"}
        limits = httpx.Limits(max_keepalive_connections=0)  # any worker may coordinate
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, limits=limits, timeout=config.op_timeout_s
        ) as admin:
            first = await admin_call(
                admin, 0, "deploy", f"{ADMIN}/packages", 201, content=archives["1"],
                headers={"Content-Type": "application/zip"},
            )  # fmt: skip
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
            deadline = started + config.deadline_s()
            async with anyio.create_task_group() as tg:
                for _ in range(config.keepalive_clients):
                    tg.start_soon(keepalive_client, index_url, traffic, stop)
                for _ in range(config.new_connection_clients):
                    tg.start_soon(new_connection_client, index_url, traffic, stop)
                for _ in range(config.slow_clients):
                    tg.start_soon(slow_client, server.url, config, traffic, stop)
                try:
                    ops = await run_operations(server.url, admin, config, archives, traffic, tg, deadline)
                finally:
                    stop.set()
            duration = time.monotonic() - started
            final = await final_check(server.url, admin, config.workers, ops.active)
        log_tail = server.log_tail()
    return summary(config, traffic, ops, final, duration, log_tail)


def summary(
    config: SoakConfig, traffic: Traffic, ops: Operations, final: dict[str, Any], duration: float, log: str
) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    for record in ops.records:
        statuses = by_kind.setdefault(record["kind"], {})
        statuses[str(record["status"])] = statuses.get(str(record["status"]), 0) + 1
    seconds = {kind: [r["ms"] / 1000 for r in ops.of(kind)] for kind in ("deploy", "rollback")}
    failed_ops = ops.failed()
    failed = sum(traffic.failed.values())
    result: dict[str, Any] = {
        "workers": config.workers,
        "swaps": len(ops.records),
        "deploys": len(ops.of("deploy")),
        "rollbacks": len(ops.of("rollback")),
        "completed": len(ops.records) == config.swaps,
        "requests": sum(traffic.requests.values()),
        "requests_by_client": dict(traffic.requests),
        "failed": failed,
        "failed_by_cause": dict(traffic.failed),
        "errors": traffic.errors,
        "versions_answered": len(traffic.versions),
        "stale_after_operation": len(traffic.stale),
        "stale_examples": traffic.stale[: config.keep_errors],
        "operations": by_kind,
        "refused_in_progress": len(ops.refused()),
        "operations_failed": len(failed_ops),
        "failed_operations": failed_ops[: config.keep_errors],
        "rollback_timings": dict(Counter(r.get("timing") for r in ops.of("rollback"))),
        "rollback_details": [
            {
                k: r.get(k)
                for k in ("index", "timing", "lead_ms", "lead_actual_ms", "status", "ms", "to_version")
            }
            for r in ops.of("rollback")
        ],
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
    admin = result["admin_latency"]
    final = result["final"]
    lines = [
        f"workers={result['workers']}: {result['swaps']} operations ({result['deploys']} deploys, "
        f"{result['rollbacks']} rollbacks {result['rollback_timings']}) in {result['duration_s']:.1f} s"
        + ("" if result["completed"] else " (stopped at the time limit)"),
        f"  requests {result['requests']} {result['requests_by_client']}, failed {result['failed']} "
        f"{result['failed_by_cause'] or ''}",
        f"  admin statuses {result['operations']}; refused 409 in progress: {result['refused_in_progress']}, "
        f"operations failed: {result['operations_failed']}; stale answers right after an operation: "
        f"{result['stale_after_operation']}",
        f"  admin call p50/p99: all {admin['all']['p50_ms']}/{admin['all']['p99_ms']} ms, deploy "
        f"{admin['deploy']['p50_ms']}/{admin['deploy']['p99_ms']} ms, rollback "
        f"{admin['rollback']['p50_ms']}/{admin['rollback']['p99_ms']} ms",
        f"  final: expected {final['expected']}, answers {final['answers']}, "
        f"workers {final['workers_map']} -> {'ok' if final['ok'] else 'WRONG'}",
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
            f"soak: {one.swaps} operations, a rollback every {one.rollback_every}, {workers} worker(s) ..."
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
    parser.add_argument("--drain-timeout", type=float, default=SoakConfig.drain_timeout)
    parser.add_argument("--held-ms", type=int, default=SoakConfig.held_ms)
    parser.add_argument(
        "--clients", type=int, default=SoakConfig.keepalive_clients, help="keep-alive clients"
    )
    parser.add_argument("--max-duration", type=float, default=None, help="seconds per soak (a bound)")
    args = parser.parse_args(argv)
    if args.held_ms / 1000 >= args.drain_timeout or max(SoakConfig.slow_ms) / 1000 >= args.drain_timeout:
        parser.error("--drain-timeout must be longer than every slow request (ended by design otherwise)")
    config = SoakConfig(
        swaps=args.swaps,
        rollback_every=args.rollback_every,
        drain_timeout=args.drain_timeout,
        held_ms=args.held_ms,
        keepalive_clients=args.clients,
        max_duration_s=args.max_duration,
    )
    counts = [1, 2] if args.workers == "both" else [int(args.workers)]
    results = anyio.run(run_all, config, counts, lambda line: print(line, flush=True))
    payload = {"machine": machine(), "results": results}
    print(f"written: {write_results('soak', payload)}")
    return 0 if all(r["clean"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
