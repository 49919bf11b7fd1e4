"""Scenario 2, through a real server: wrk against one uvicorn process serving (i) a Starlette app
with a `Mount` per package and (ii) the same with HotDeployMiddleware, for 1, 10, 100 and 1000
packages.

    .venv/bin/python -m benchmarks.dispatch_uvicorn [--quick] [--scales 1,10,100,1000]

For each package count both servers run at once (one process each, idle while the other is
measured) and are measured in alternating rounds; the request goes to the last package. Where
`taskset` exists, the servers are pinned to CPU 0 and wrk to CPU 1, so that each has a core of
its own. The overhead is the difference in throughput of the saturated server; the
middleware's homes are filled beforehand, in this process, and the server restores them at
start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from starlette_hotdeploy import Deployer

from .common import BENCHMARKS, BenchmarkError, ServerProcess, free_port, machine, wait_until, write_results
from .dispatch_apps import HOME_ENV, PACKAGES_ENV, package_names
from .servers import uvicorn_command
from .tiny_packages import write_package

SUMMARY_SCRIPT = BENCHMARKS / "summary.lua"
KINDS = {"mount": "create_mount_app", "middleware": "create_hotdeploy_app"}


@dataclass
class DispatchConfig:
    scales: tuple[int, ...] = (1, 10, 100, 1000)
    rounds: int = 5
    seconds: float = 3.0  # per wrk run
    warmup_s: float = 1.0
    connections: int = 16
    use_wrk: bool = True


def pinning() -> tuple[list[str], list[str]]:
    """taskset prefixes for the server (CPU 0) and the load generator (CPU 1), if possible."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    return [], []


async def populate_home(home: Path, sources: Path, count: int) -> None:
    """Deploy `count` tiny packages into `home` (then stop): the server restores them."""
    deployer = Deployer(home=home, entry_points=False)
    async with deployer.running():
        for name in package_names(count):
            directory = sources / f"{name}-1.0"
            await deployer.deploy(directory if directory.exists() else write_package(sources, name))


def start_server(
    kind: str, count: int, home: Path, workdir: Path, prefix: list[str]
) -> tuple[ServerProcess, str]:
    port = free_port()
    command = prefix + uvicorn_command(f"benchmarks.dispatch_apps:{KINDS[kind]}", port, None)
    env = {PACKAGES_ENV: str(count), HOME_ENV: str(home)}
    server = ServerProcess(command, workdir / f"{kind}-{count}.log", env=env)
    server.start()
    return server, f"http://127.0.0.1:{port}/pkg{count - 1}/hello"


def wait_ready(server: ServerProcess, url: str) -> None:
    def ready() -> bool | None:
        if not server.alive():
            raise BenchmarkError(f"the server exited:\n{server.log_tail()}")
        try:
            return True if httpx.get(url, timeout=2).status_code == 200 else None
        except httpx.HTTPError:
            return None

    wait_until(f"{url} to answer", ready, timeout=180, interval=0.1)


def wrk_run(url: str, config: DispatchConfig, seconds: float, prefix: list[str]) -> dict[str, Any]:
    """One wrk run: requests per second and latency percentiles (microseconds)."""
    command = [*prefix, "wrk", "-t1", f"-c{config.connections}", f"-d{max(1, round(seconds))}s"]
    command += ["-s", str(SUMMARY_SCRIPT), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_SUMMARY ")), None)
    if line is None:
        raise BenchmarkError(f"wrk printed no summary: {done.stdout[-1000:]} {done.stderr[-1000:]}")
    summary: dict[str, Any] = json.loads(line.removeprefix("WRK_SUMMARY "))
    errors = sum(summary[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "rps": summary["requests"] / (summary["duration_us"] / 1e6),
        "mean_us": summary["mean_us"],
        "p50_us": summary["p50_us"],
        "p99_us": summary["p99_us"],
        "errors": errors,
    }


def httpx_run(url: str, config: DispatchConfig, seconds: float) -> dict[str, Any]:
    """The fallback without wrk: `connections` async httpx clients for `seconds` (this measures
    the Python client as much as the server; only for the smoke test and machines without wrk)."""

    async def load() -> list[float]:
        latencies: list[float] = []
        deadline = time.monotonic() + seconds

        async def client() -> None:
            async with httpx.AsyncClient(timeout=10) as http:
                for _ in range(1_000_000):
                    if time.monotonic() >= deadline:
                        return
                    started = time.perf_counter()
                    (await http.get(url)).raise_for_status()
                    latencies.append(time.perf_counter() - started)

        async with anyio.create_task_group() as tg:
            for _ in range(config.connections):
                tg.start_soon(client)
        return sorted(latencies)

    latencies = anyio.run(load)
    return {
        "rps": len(latencies) / seconds,
        "mean_us": statistics.fmean(latencies) * 1e6,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "errors": 0,
    }


def measure_scale(count: int, config: DispatchConfig, workdir: Path) -> list[dict[str, Any]]:
    """Both servers with `count` packages, measured in alternating rounds."""
    home = workdir / f"home-{count}"
    anyio.run(populate_home, home, workdir / "sources", count)
    server_prefix, load_prefix = pinning()
    servers: dict[str, tuple[ServerProcess, str]] = {}
    try:
        for kind in KINDS:
            servers[kind] = start_server(kind, count, home, workdir, server_prefix)
        for server, url in servers.values():
            wait_ready(server, url)

        def run_load(url: str, seconds: float) -> dict[str, Any]:
            if config.use_wrk:
                return wrk_run(url, config, seconds, load_prefix)
            return httpx_run(url, config, seconds)

        for _, url in servers.values():
            run_load(url, config.warmup_s)
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for _ in range(config.rounds):
            for kind, (_, url) in servers.items():
                runs[kind].append(run_load(url, config.seconds))
    finally:
        for server, _ in servers.values():
            server.kill()
    return [summarise(kind, count, kind_runs) for kind, kind_runs in runs.items()]


def summarise(kind: str, count: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round by throughput, and the spread of the rounds."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    median = ordered[len(ordered) // 2]
    return {
        "kind": kind,
        "packages": count,
        "rps": round(median["rps"], 1),
        "rps_rounds": [round(r["rps"], 1) for r in runs],
        "us_per_request": round(1e6 / median["rps"], 2),
        "mean_us": median["mean_us"],
        "p50_us": median["p50_us"],
        "p99_us": median["p99_us"],
        "errors": sum(r["errors"] for r in runs),
    }


def overheads(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per package count: the middleware's cost per request against the Mount's, and against its
    own with the fewest packages."""
    by = {(r["kind"], r["packages"]): r for r in results}
    scales = sorted(n for kind, n in by if kind == "middleware")
    base = by[("middleware", scales[0])]["us_per_request"]
    rows = []
    for n in scales:
        hot, plain = by[("middleware", n)]["us_per_request"], by[("mount", n)]["us_per_request"]
        rows.append(
            {
                "packages": n,
                "middleware_rps": by[("middleware", n)]["rps"],
                "mount_rps": by[("mount", n)]["rps"],
                "vs_mount_pct": round((hot / plain - 1) * 100, 1),
                "vs_one_package_pct": round((hot / base - 1) * 100, 1),
            }
        )
    return rows


def run(config: DispatchConfig) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        for count in config.scales:
            print(f"dispatch through uvicorn: {count} package(s) ...", flush=True)
            results += measure_scale(count, config, Path(tmp))
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'server':34} {'req/s':>8} {'us/req':>8} {'p50 us':>8} {'p99 us':>8} {'errors':>6}"]
    for r in results:
        name = f"{'Starlette Mount' if r['kind'] == 'mount' else 'HotDeployMiddleware'}, {r['packages']} pkg"
        lines.append(
            f"{name:34} {r['rps']:>8.0f} {r['us_per_request']:>8.1f} {r['p50_us']:>8} {r['p99_us']:>8} {r['errors']:>6}"
        )
    lines.append("")
    lines.append(
        f"{'packages':>8} {'middleware req/s':>16} {'Mount req/s':>11} {'vs Mount':>9} {'vs 1 package':>13}"
    )
    for o in overheads(results):
        lines.append(
            f"{o['packages']:>8} {o['middleware_rps']:>16.0f} {o['mount_rps']:>11.0f} "
            f"{o['vs_mount_pct']:>+8.1f}% {o['vs_one_package_pct']:>+12.1f}%"
        )
    return "\n".join(lines)


def config_for(quick: bool, use_wrk: bool) -> DispatchConfig:
    if quick:
        return DispatchConfig(rounds=1, seconds=2, warmup_s=1, use_wrk=use_wrk)
    return DispatchConfig(use_wrk=use_wrk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scales", default="1,10,100,1000")
    parser.add_argument("--no-wrk", action="store_true")
    args = parser.parse_args(argv)
    config = config_for(args.quick, not args.no_wrk and shutil.which("wrk") is not None)
    config.scales = tuple(int(n) for n in args.scales.split(","))
    results = run(config)
    print(table(results))
    payload = {
        "config": asdict(config),
        "machine": machine(),
        "results": results,
        "overheads": overheads(results),
    }
    print(f"written: {write_results('dispatch_uvicorn', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
