"""Idle CPU of a worker: a plain server against a hot-deploy server with 1 and 1000 packages.

    .venv/bin/python -m benchmarks.idle_cpu [--seconds 20] [--workers 2] [--packages 1,1000]

Each server runs under `uvicorn --workers N` with nothing talking to it: a plain Starlette app
with one route (`plain_app` below), then `create_host_app` on a home seeded with the given
number of tiny packages (benchmarks/restart_many.seed). Once every worker answers and, for
hot deployment, registered with every package, and after a few seconds to settle, the CPU time
(utime + stime, from /proc/<pid>/stat) of every worker process is read at the start and at the
end of `seconds`; the result is the share of one core each worker used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from .common import BenchmarkError, ServerProcess, free_port, machine, wait_until, write_results
from .restart_many import package_name, seed
from .servers import uvicorn_command

TICKS = os.sysconf("SC_CLK_TCK")
SETTLE_S = 3.0


def plain_app() -> Starlette:
    """The comparator: a plain Starlette app, no hot deployment."""

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/hello", hello)])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rpartition(b")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)


def measure(server: ServerProcess, workers: int, seconds: float) -> dict[str, Any]:
    pids = wait_until(
        f"{workers} workers",
        lambda: children(server.pid) if len(children(server.pid)) >= workers else None,
        60,
    )
    time.sleep(SETTLE_S)
    before = {pid: cpu_seconds(pid) for pid in [server.pid, *pids]}
    began = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - began
    after = {pid: cpu_seconds(pid) for pid in before}
    share = {pid: (after[pid] - before[pid]) / elapsed * 100 for pid in before}
    per_worker = [round(share[pid], 3) for pid in pids]
    return {
        "seconds": round(elapsed, 2),
        "worker_cpu_percent": per_worker,
        "mean_worker_cpu_percent": round(sum(per_worker) / len(per_worker), 3),
        "supervisor_cpu_percent": round(share[server.pid], 3),
    }


def run_plain(workdir: Path, workers: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    command = uvicorn_command("benchmarks.idle_cpu:plain_app", port, workers)
    server = ServerProcess(command, workdir / "plain.log")
    server.start()
    try:
        wait_until("the plain server", lambda: _ok(f"http://127.0.0.1:{port}/hello"), 60)
        return {"server": "plain uvicorn", "packages": 0, **measure(server, workers, seconds)}
    finally:
        server.kill()


def run_hotdeploy(workdir: Path, workers: int, seconds: float, packages: int) -> dict[str, Any]:
    home = workdir / f"home-{packages}"
    seed(home, packages)
    port = free_port()
    env = {"HOTDEPLOY_HOME": str(home), "HOTDEPLOY_ADMIN_TOKEN": "bench-token"}
    command = uvicorn_command("starlette_hotdeploy._serve:create_host_app", port, workers)
    server = ServerProcess(command, workdir / f"hotdeploy-{packages}.log", env=env)
    server.start()
    last = package_name(packages - 1)
    try:

        def registered() -> bool | None:
            if not server.alive():
                raise BenchmarkError(f"the server exited:\n{server.log_tail()}")
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/_hotdeploy/packages/{last}",
                    headers={"Authorization": "Bearer bench-token"},
                    timeout=5,
                )
            except httpx.HTTPError:
                return None
            ok = response.status_code == 200 and len(response.json().get("workers", {})) == workers
            return ok or None

        wait_until("every worker with every package", registered, 300, interval=0.2)
        return {"server": "hot deployment", "packages": packages, **measure(server, workers, seconds)}
    finally:
        server.kill()


def _ok(url: str) -> bool | None:
    try:
        return httpx.get(url, timeout=2).status_code == 200 or None
    except httpx.HTTPError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--packages", default="1,1000")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        workdir = Path(tmp)
        results.append(run_plain(workdir, args.workers, args.seconds))
        print(results[-1], flush=True)
        for count in (int(c) for c in args.packages.split(",") if c):
            results.append(run_hotdeploy(workdir, args.workers, args.seconds, count))
            print(results[-1], flush=True)
    config = {"seconds": args.seconds, "workers": args.workers, "settle_s": SETTLE_S}
    path = write_results("idle_cpu", {"config": config, "results": results, "machine": machine()})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
