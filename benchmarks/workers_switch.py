"""Workers switching together: how long the admin call takes until every worker switched.

    .venv/bin/python -m benchmarks.workers_switch [--workers 2] [--deploys 30] [--rate 200]
        [--app tiny|fastapi] [--gap 0.2]

`uvicorn --workers N` serving `create_host_app` (what `hotdeploy serve --workers N` runs) on a
fresh home; a tiny package (one route, `/tiny/hello`, that answers its version) is deployed in
`deploys` distinct versions through the admin API, one after the other, each archive packed
beforehand. The admin call answers once every live worker serves the new version, so its
duration, measured by the client, is the time to "every worker switched". Two rounds:

- idle: nothing else talks to the server;
- under load: `connections` keep-alive clients send `rate` requests per second in all (a steady,
  bounded load: each client waits for its next slot), counting every answer that is not a 200
  and every socket error.

After every deploy the workers map is read (not timed) to check that each worker reports the
new version, then the next deploy follows `gap` seconds later (0: back to back). `--app fastapi`
deploys the FastAPI package of benchmarks/many_swaps.py (30 routes, 17 pydantic models) instead
of the tiny one: with `--workers 1 --gap 0` that is many_swaps' swap latency through a real
server and its admin API. The comparators (gunicorn -w N and uvicorn --workers N, SIGHUP) are in
benchmarks/upgrade.py, under wrk's load.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx

from starlette_hotdeploy import pack_directory

from .common import (
    BenchmarkError,
    ServerProcess,
    free_port,
    latency_summary,
    machine,
    wait_until,
    write_results,
)
from .many_swaps import write_fastapi_package
from .servers import uvicorn_command
from .tiny_packages import write_package

NAME = "tiny"


@dataclass
class SwitchConfig:
    workers: int = 2
    deploys: int = 30  # per round
    rate: float = 200.0  # requests per second in all, under load
    connections: int = 4
    gap_s: float = 0.2  # between deploys
    app: str = "tiny"  # or "fastapi"


class Server:
    """The hot-deploy host app under `uvicorn --workers N` on a fresh home. With `store` and
    `host_id`: one host of a cluster sharing that database; `cluster_workers` is then how many
    workers all its hosts have together (what `all_on` expects to see)."""

    def __init__(
        self,
        workdir: Path,
        workers: int,
        *,
        store: str | None = None,
        host_id: str | None = None,
        cluster_workers: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.workers = workers
        self.cluster_workers = cluster_workers or workers
        self.token = secrets.token_urlsafe(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"HOTDEPLOY_HOME": str(workdir / "home"), "HOTDEPLOY_ADMIN_TOKEN": self.token}
        if store is not None:
            env["HOTDEPLOY_STORE"] = store
        if host_id is not None:
            env["HOTDEPLOY_HOST_ID"] = host_id
        target = "starlette_hotdeploy._serve:create_host_app"
        command = uvicorn_command(target, self.port, workers)
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = ServerProcess(command, workdir / "server.log", env=env)
        self.admin = httpx.Client(headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def start(self) -> None:
        self.process.start()

        def up() -> bool | None:
            if not self.process.alive():
                raise BenchmarkError(f"the server exited:\n{self.process.log_tail()}")
            try:
                return httpx.get(self.url + "/", timeout=2).status_code in (200, 404) or None
            except httpx.HTTPError:
                return None

        wait_until("the server to answer", up, 60)

    def stop(self) -> None:
        self.process.kill()
        self.admin.close()

    def deploy(self, archive: bytes) -> tuple[float, dict[str, Any]]:
        """POST the archive; (seconds until the answer, the deployment record)."""
        started = time.perf_counter()
        response = self.admin.post(
            self.url + "/_hotdeploy/packages", content=archive, headers={"Content-Type": "application/zip"}
        )
        took = time.perf_counter() - started
        if response.status_code != 201:
            raise BenchmarkError(f"deploy answered {response.status_code}: {response.text[:2000]}")
        record: dict[str, Any] = response.json()
        return took, record

    def all_on(self, version: str) -> bool:
        response = self.admin.get(self.url + f"/_hotdeploy/packages/{NAME}")
        if response.status_code != 200:
            return False
        workers: dict[str, str] = response.json().get("workers", {})
        return len(workers) == self.cluster_workers and set(workers.values()) == {version}


@dataclass
class Load:
    """`connections` clients sharing `rate` requests per second, until stopped (bounded)."""

    url: str
    rate: float
    connections: int
    requests: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()

    async def run(self, stop: anyio.Event, max_seconds: float) -> None:
        async with anyio.create_task_group() as tasks:
            for n in range(self.connections):
                tasks.start_soon(self._client, n, stop, max_seconds)

    async def _client(self, n: int, stop: anyio.Event, max_seconds: float) -> None:
        interval = self.connections / self.rate
        start = time.monotonic() + n * interval / self.connections
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            for slot in range(int(max_seconds / interval) + 1):
                if stop.is_set():
                    return
                await anyio.sleep(max(0.0, start + slot * interval - time.monotonic()))
                self.requests += 1
                try:
                    response = await client.get(self.url)
                except httpx.HTTPError as exc:
                    self.failed += 1
                    self.errors[type(exc).__name__] += 1
                    continue
                if response.status_code != 200:
                    self.failed += 1
                    self.errors[str(response.status_code)] += 1
                else:
                    self.versions[response.text] += 1


def archives(workdir: Path, count: int, app: str = "tiny") -> list[tuple[str, bytes]]:
    """`count` + 1 versions of the package, packed (1.0 is the starting one)."""
    sources = workdir / "sources"
    sources.mkdir()
    write = write_fastapi_package if app == "fastapi" else write_package
    packed = []
    for n in range(count + 1):
        version = f"1.{n}"
        packed.append((version, pack_directory(write(sources, NAME, version)).data))
    return packed


async def deploy_round(
    server: Server, versions: list[tuple[str, bytes]], gap_s: float = 0.0
) -> list[dict[str, Any]]:
    rounds = []
    for version, archive in versions:
        await anyio.sleep(gap_s)  # the load goes on between deploys too
        took, record = await anyio.to_thread.run_sync(server.deploy, archive)
        all_on = await anyio.to_thread.run_sync(server.all_on, version)
        # The deployment's own steps (not the drain and shutdown of the version it replaced).
        steps = {
            s["name"]: s["duration_ms"]
            for s in record.get("steps", [])
            if not s["name"].startswith(("drain ", "shutdown "))
        }
        rounds.append({"version": version, "client_s": took, "all_on": all_on, "steps": steps})
    return rounds


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["client_s"] for r in rounds]
    result = latency_summary(seconds)
    result["min_ms"] = round(min(seconds) * 1000, 3)
    result["stdev_ms"] = round(statistics.stdev(seconds) * 1000, 3) if len(seconds) > 1 else 0.0
    result["all_workers_reported"] = all(r["all_on"] for r in rounds)
    names = {name for r in rounds for name in r["steps"]}
    result["steps_p50_ms"] = {
        name: statistics.median(r["steps"][name] for r in rounds if name in r["steps"])
        for name in sorted(names)
    }
    return result


async def run(config: SwitchConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        workdir = Path(tmp)
        packed = archives(workdir, 2 * config.deploys + 1, config.app)
        server = Server(workdir, config.workers)
        try:
            await anyio.to_thread.run_sync(server.start)
            first_version, first = packed[0]
            await anyio.to_thread.run_sync(server.deploy, first)
            await anyio.to_thread.run_sync(
                lambda: wait_until("every worker on 1.0", lambda: server.all_on(first_version) or None, 30)
            )
            warm = packed[1:2]  # one deploy not measured: first imports in the workers
            idle_versions = packed[2 : 2 + config.deploys]
            load_versions = packed[2 + config.deploys :]
            await deploy_round(server, warm)
            print(f"{config.deploys} deploys, idle ...", flush=True)
            idle = await deploy_round(server, idle_versions, config.gap_s)
            print(f"{len(load_versions)} deploys under {config.rate:g} req/s ...", flush=True)
            load = Load(f"{server.url}/{NAME}/hello", config.rate, config.connections)
            stop = anyio.Event()
            loaded: list[dict[str, Any]] = []
            load_started = time.monotonic()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(load.run, stop, 600.0)
                await anyio.sleep(1.0)  # steady state first
                loaded = await deploy_round(server, load_versions, config.gap_s)
                await anyio.sleep(0.5)
                stop.set()
            load_s = time.monotonic() - load_started
        finally:
            server.stop()
    return {
        "config": asdict(config),
        "idle": {"summary": summary(idle), "deploys": idle},
        "under_load": {
            "summary": summary(loaded),
            "deploys": loaded,
            "requests": load.requests,
            "failed": load.failed,
            "errors": dict(load.errors),
            "achieved_rate": round(load.requests / load_s, 1),
            "versions_seen": len(load.versions),
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{'round':12} {'n':>3} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'min ms':>8} {'failed':>7}"]
    for key in ("idle", "under_load"):
        s = result[key]["summary"]
        failed = result[key].get("failed", "-")
        lines.append(
            f"{key:12} {s['count']:>3} {s['p50_ms']:>8} {s['p99_ms']:>8} {s['max_ms']:>8} {s['min_ms']:>8} {failed:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deploys", type=int, default=30)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--app", choices=("tiny", "fastapi"), default="tiny", help="the package deployed")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between deploys (0: back to back)")
    parser.add_argument("--name", default="workers_switch", help="the results file's name")
    args = parser.parse_args(argv)
    config = SwitchConfig(
        workers=args.workers, deploys=args.deploys, rate=args.rate, gap_s=args.gap, app=args.app
    )
    result = anyio.run(run, config)
    print(table(result))
    path = write_results(args.name, {**result, "machine": machine()})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
