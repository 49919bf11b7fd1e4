"""Hosts on PostgreSQL: the time from the admin call to every worker of every host switched,
side by side with one host on SQLite, and failed requests under load on every host.

    .venv/bin/python -m benchmarks.cluster [--hosts 3] [--workers 2] [--deploys 50]

A throwaway PostgreSQL (pgserver, a test extra) and, sharing it, `hosts` servers of `uvicorn
--workers N` (`create_host_app`), each with its own home and host id, as `hotdeploy serve
--store` runs them. Beside them, one `uvicorn --workers N` host on SQLite. The tiny package (one
route that answers its version) is deployed in distinct versions, each archive packed
beforehand, in turn to each setup: one SQLite host with as many workers as one cluster host,
one SQLite host with as many workers as the whole cluster (what more workers cost on this
machine, apart from the database), and the cluster (each deploy to its next host), so all of
them see the same machine at the same moments. The admin call answers once
every live worker serves the new version: its duration, measured by the client, is the time to
"every worker switched". Then under steady load on every host of the cluster (bounded: the
load stops after the last call), `load_deploys` deploys and `rollbacks` rollbacks, counting
every answer that is not a 200 and every socket error.

Reported: p50/p99/max of each, and the ratio of each cluster deploy to the SQLite deploys of
its round (median and its 5th-95th percentile spread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .common import BenchmarkError, latency_summary, machine, percentile, wait_until, write_results
from .workers_switch import NAME, Load, Server, archives


@dataclass
class ClusterConfig:
    hosts: int = 3
    workers: int = 2  # per host
    deploys: int = 50  # measured, to each setup
    load_deploys: int = 20
    rollbacks: int = 5
    rate: float = 150.0  # requests per second to each host, under load
    connections: int = 3  # per host


def start_postgres(directory: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR
        from pgserver.postgres_server import get_server

        return get_server(directory, cleanup_mode="stop")


def settled(server: Server, version: str) -> None:
    wait_until(f"every worker on {version}", lambda: server.all_on(version) or None, 60)


def deploy(
    server: Server, archive: bytes, version: str, steps: list[dict[str, float]] | None = None
) -> float:
    took, record = server.deploy(archive)
    if record.get("to_version") != version or record.get("outcome") != "succeeded":
        raise BenchmarkError(f"deploy of {version}: {record.get('outcome')} {record.get('error')}")
    if not server.all_on(version):
        raise BenchmarkError(f"after the answer, not every worker reports {version}")
    if steps is not None:
        steps.append(
            {s["name"]: s["duration_ms"] for s in record.get("steps", []) if s["duration_ms"] is not None}
        )
    return took


def steps_p50(steps: list[dict[str, float]]) -> dict[str, float]:
    """The median of each step of the deployments (the drain of the old version excluded)."""
    names = {name for record in steps for name in record if not name.startswith(("drain ", "shutdown "))}
    return {name: round(statistics.median(r[name] for r in steps if name in r), 3) for name in sorted(names)}


def rollback(server: Server, version: str) -> float:
    started = time.perf_counter()
    response = server.admin.post(server.url + f"/_hotdeploy/packages/{NAME}/rollback")
    took = time.perf_counter() - started
    if response.status_code != 200 or response.json().get("to_version") != version:
        raise BenchmarkError(f"rollback answered {response.status_code}: {response.text[:2000]}")
    if not server.all_on(version):
        raise BenchmarkError(f"after the rollback, not every worker reports {version}")
    return took


def spread(ratios: list[float]) -> dict[str, float]:
    values = sorted(ratios)
    return {
        "median": round(statistics.median(values), 3),
        "p5": round(percentile(values, 0.05) or 0.0, 3),
        "p95": round(percentile(values, 0.95) or 0.0, 3),
    }


async def run(config: ClusterConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        workdir = Path(tmp)
        packed = archives(workdir, config.deploys + config.load_deploys)  # and the first one
        postgres = start_postgres(workdir / "pg")
        url = postgres.get_uri()
        single = Server(workdir / "single", config.workers)
        wide = Server(workdir / "wide", config.hosts * config.workers)
        cluster = [
            Server(
                workdir / f"host{n}",
                config.workers,
                store=f"{url}&schema=bench",
                host_id=f"host{n}",
                cluster_workers=config.hosts * config.workers,
            )
            for n in range(config.hosts)
        ]
        servers = [single, wide, *cluster]
        loads = [Load(f"{s.url}/{NAME}/hello", config.rate, config.connections) for s in cluster]
        try:
            for server in servers:
                await anyio.to_thread.run_sync(server.start)
            first_version, first = packed[0]
            for server in (single, wide, cluster[0]):
                await anyio.to_thread.run_sync(server.deploy, first)
                await anyio.to_thread.run_sync(settled, server, first_version)
            print(f"{config.deploys} deploys to each setup, alternating ...", flush=True)
            sqlite_s: list[float] = []
            wide_s: list[float] = []
            cluster_s: list[float] = []
            sqlite_steps: list[dict[str, float]] = []
            wide_steps: list[dict[str, float]] = []
            cluster_steps: list[dict[str, float]] = []
            for n, (version, archive) in enumerate(packed[1 : 1 + config.deploys]):
                sqlite_s.append(
                    await anyio.to_thread.run_sync(deploy, single, archive, version, sqlite_steps)
                )
                wide_s.append(await anyio.to_thread.run_sync(deploy, wide, archive, version, wide_steps))
                target = cluster[n % config.hosts]
                cluster_s.append(
                    await anyio.to_thread.run_sync(deploy, target, archive, version, cluster_steps)
                )
            print(
                f"{config.load_deploys} deploys and {config.rollbacks} rollbacks under "
                f"{config.rate:g} req/s on each of {config.hosts} hosts ...",
                flush=True,
            )
            under_load: list[float] = []
            stop = anyio.Event()
            load_versions = packed[1 + config.deploys :]
            rollback_every = max(1, config.load_deploys // max(config.rollbacks, 1))
            rolled_back = 0
            async with anyio.create_task_group() as tasks:
                for load in loads:
                    tasks.start_soon(load.run, stop, 600.0)
                await anyio.sleep(1.0)  # steady state first
                previous = packed[config.deploys][0]
                for n, (version, archive) in enumerate(load_versions):
                    target = cluster[n % config.hosts]
                    under_load.append(await anyio.to_thread.run_sync(deploy, target, archive, version))
                    if (n + 1) % rollback_every == 0 and rolled_back < config.rollbacks:
                        await anyio.to_thread.run_sync(rollback, cluster[(n + 1) % config.hosts], previous)
                        rolled_back += 1
                        # Forward again, so the next deploy starts from the newest version.
                        under_load.append(await anyio.to_thread.run_sync(deploy, target, archive, version))
                    previous = version
                await anyio.sleep(0.5)
                stop.set()
        finally:
            for server in servers:
                server.stop()
            postgres.cleanup()
    ratios = [c / s for c, s in zip(cluster_s, sqlite_s, strict=True)]
    wide_ratios = [c / s for c, s in zip(cluster_s, wide_s, strict=True)]
    return {
        "config": asdict(config),
        "single_host_sqlite": {**latency_summary(sqlite_s), "steps_p50_ms": steps_p50(sqlite_steps)},
        "single_host_sqlite_all_workers": {**latency_summary(wide_s), "steps_p50_ms": steps_p50(wide_steps)},
        "cluster_postgresql": {**latency_summary(cluster_s), "steps_p50_ms": steps_p50(cluster_steps)},
        "ratio_cluster_to_sqlite": spread(ratios),
        "ratio_cluster_to_sqlite_all_workers": spread(wide_ratios),
        "under_load": {
            "deploys": latency_summary(under_load),
            "rollbacks": rolled_back,
            "requests": sum(load.requests for load in loads),
            "failed": sum(load.failed for load in loads),
            "errors": {k: v for load in loads for k, v in load.errors.items()},
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{'setup':32} {'n':>3} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    for key in ("single_host_sqlite", "single_host_sqlite_all_workers", "cluster_postgresql"):
        s = result[key]
        lines.append(f"{key:32} {s['count']:>3} {s['p50_ms']:>8} {s['p99_ms']:>8} {s['max_ms']:>8}")
        lines.append(f"    steps p50 ms: {s['steps_p50_ms']}")
    for key in ("ratio_cluster_to_sqlite", "ratio_cluster_to_sqlite_all_workers"):
        r = result[key]
        lines.append(f"{key}: {r['median']}x [{r['p5']}-{r['p95']}]")
    load = result["under_load"]
    d = load["deploys"]
    lines.append(
        f"under load: {d['count']} deploys p50 {d['p50_ms']} ms p99 {d['p99_ms']} ms, "
        f"{load['rollbacks']} rollbacks, {load['requests']} requests, {load['failed']} failed {load['errors']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deploys", type=int, default=50)
    parser.add_argument("--load-deploys", type=int, default=20)
    parser.add_argument("--rollbacks", type=int, default=5)
    parser.add_argument("--name", default="cluster", help="the results file's name")
    args = parser.parse_args(argv)
    config = ClusterConfig(
        hosts=args.hosts,
        workers=args.workers,
        deploys=args.deploys,
        load_deploys=args.load_deploys,
        rollbacks=args.rollbacks,
    )
    result = anyio.run(run, config)
    print(table(result))
    path = write_results(args.name, {**result, "machine": machine()})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
