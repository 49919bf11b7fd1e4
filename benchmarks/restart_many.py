"""Restart with many stored packages: time from the server's start to its first answer.

    .venv/bin/python -m benchmarks.restart_many [--packages 1000] [--workers 2] [--starts 4]
    .venv/bin/python -m benchmarks.restart_many --profile   # where an in-process restore goes
    .venv/bin/python -m benchmarks.restart_many --metrics-cost   # the metrics' cost with N packages

A home is seeded with `packages` tiny packages (one route each, `/<name>/hello`), written
straight into the store as a deployment would leave them (archive saved, desired state set), so
the seeding does not count. Then `uvicorn --workers N` serving `create_host_app` is started on it
`starts` times, one after the other (killed in between): the first start unpacks every archive
(a cold home), the later ones find the unpacked copies (a restart). A worker answers only once
its lifespan startup restored every package, so the time from `Popen` to the first 200 of the
last package's route (`/<last>/hello`, polled every 10 ms on new connections) is the time to
first answer. Also timed: until every worker registered with every package.

`--metrics-cost` restores the home in this process, sends one request to every package, and
times what the metrics do with that many loaded versions: the snapshot taken on the event loop
each second, its file write (in a worker thread), and a scrape of the collector.

`--profile` runs the restore in this process (`Deployer.running()` on a seeded home) under
cProfile, and prints the top functions by cumulative and own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx

from starlette_hotdeploy import Deployer, HotDeployMiddleware, pack_directory
from starlette_hotdeploy._store_url import open_store

from .common import BenchmarkError, ServerProcess, free_port, machine, write_results
from .servers import uvicorn_command
from .tiny_packages import write_package


def package_name(n: int) -> str:
    return f"p{n:04d}"


def seed(home: Path, count: int) -> None:
    """`count` packages in the store of `home`, desired at 1.0 (nothing unpacked yet)."""
    home.mkdir(parents=True, exist_ok=True)
    store = open_store(home)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp:
            for n in range(count):
                name = package_name(n)
                packed = pack_directory(write_package(Path(tmp), name, "1.0"))
                store.save_archive(name, "1.0", packed.sha256, packed.data)
                store.set_desired(name, "1.0", packed.sha256, [("1.0", packed.sha256)])
    finally:
        store.close()


def start_once(home: Path, workdir: Path, workers: int, count: int, index: int) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"HOTDEPLOY_HOME": str(home), "HOTDEPLOY_ADMIN_TOKEN": "bench-token"}
    command = uvicorn_command("starlette_hotdeploy._serve:create_host_app", port, workers)
    server = ServerProcess(command, workdir / f"server-{index}.log", env=env)
    last = f"{url}/{package_name(count - 1)}/hello"
    started = time.monotonic()
    server.start()
    try:
        first = _until(server, started, lambda: httpx.get(last, timeout=5).status_code == 200)
        headers = {"Authorization": "Bearer bench-token"}

        def registered() -> bool:
            response = httpx.get(
                f"{url}/_hotdeploy/packages/{package_name(count - 1)}", headers=headers, timeout=5
            )
            return response.status_code == 200 and len(response.json().get("workers", {})) == workers

        every = _until(server, started, registered)
        # A graceful stop (what a deploy tool's SIGTERM does): every worker's lifespan shutdown
        # stops and unloads every package, then the supervisor exits.
        stopping = time.monotonic()
        server.signal(signal.SIGTERM)
        if server.wait(120) is None:
            raise BenchmarkError(f"the server did not stop within 120 s:\n{server.log_tail()}")
        stop = time.monotonic() - stopping
    finally:
        server.kill()
    return {
        "start": index,
        "first_answer_s": round(first, 3),
        "every_worker_s": round(every, 3),
        "graceful_stop_s": round(stop, 3),
    }


def _until(server: ServerProcess, started: float, probe: Any, timeout: float = 300.0) -> float:
    """Seconds from `started` until `probe()` is true (polled every 10 ms, bounded)."""
    deadline = started + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchmarkError(f"the server exited:\n{server.log_tail()}")
        try:
            if probe():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise BenchmarkError(f"no answer after {timeout:g}s:\n{server.log_tail()}")


def run(count: int, workers: int, starts: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        workdir = Path(tmp)
        home = workdir / "home"
        began = time.monotonic()
        seed(home, count)
        seeded = time.monotonic() - began
        print(f"seeded {count} packages in {seeded:.1f}s", flush=True)
        results = []
        for index in range(starts):
            result = start_once(home, workdir, workers, count, index)
            print(f"start {index}: {result}", flush=True)
            results.append(result)
    warm = [r["first_answer_s"] for r in results[1:]]
    stops = [r["graceful_stop_s"] for r in results]
    return {
        "config": {"packages": count, "workers": workers, "starts": starts},
        "seed_s": round(seeded, 2),
        "cold": results[0],
        "restarts": results[1:],
        "restart_first_answer_s": {
            "median": round(statistics.median(warm), 3) if warm else None,
            "min": min(warm, default=None),
            "max": max(warm, default=None),
        },
        "graceful_stop_s": {
            "median": round(statistics.median(stops), 3),
            "min": min(stops),
            "max": max(stops),
        },
    }


async def _restore(home: Path, sampler: Sampler | None = None) -> float:
    """Open a deployer on `home` and restore it; the seconds the restore took (not the stop)."""
    deployer = Deployer(home=home, entry_points=False)
    began = time.perf_counter()
    async with deployer.started():
        if sampler is not None:
            sampler.start()
        await deployer.restore()
        took = time.perf_counter() - began
        if sampler is not None:
            sampler.stop()
    return took


class Sampler:
    """Every millisecond, the innermost frame of every other thread (the restore's imports run in
    worker threads, which cProfile does not see): what the restore spends its time in."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self.ours: Counter[str] = Counter()  # the innermost frame of this project's code
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                code = frame.f_code
                self.counts[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
                walker: Any = frame
                while walker is not None and "starlette_hotdeploy" not in walker.f_code.co_filename:
                    walker = walker.f_back
                if walker is not None:
                    self.ours[
                        f"{Path(walker.f_code.co_filename).name}:{walker.f_lineno} {walker.f_code.co_name}"
                    ] += 1

    def report(self, top: int = 25) -> str:
        lines = [f"{self.samples} samples; innermost frames (all threads):"]
        lines += [f"  {n:6} {where}" for where, n in self.counts.most_common(top)]
        lines.append("innermost frame of starlette_hotdeploy:")
        lines += [f"  {n:6} {where}" for where, n in self.ours.most_common(top)]
        return "\n".join(lines)


def profile(count: int, top: int = 30) -> str:
    """The restore of a warm home (a first restore unpacked everything): cProfile of the event
    loop's thread, and samples of every thread."""
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        home = Path(tmp) / "home"
        seed(home, count)
        cold = anyio.run(_restore, home)
        warm = anyio.run(_restore, home)
        sampler = Sampler()
        sampled = anyio.run(_restore, home, sampler)
        profiler = cProfile.Profile()
        profiler.enable()
        profiled = anyio.run(_restore, home)
        profiler.disable()
    out = io.StringIO()
    out.write(
        f"in-process restore of {count} packages: cold {cold:.2f}s, warm {warm:.2f}s, "
        f"sampled {sampled:.2f}s, under cProfile {profiled:.2f}s (the stop is not counted)\n"
    )
    out.write(sampler.report() + "\n")
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


async def _metrics_cost(home: Path, count: int, rounds: int) -> dict[str, Any]:
    from prometheus_client import generate_latest

    deployer = Deployer(home=home, entry_points=False)
    async with deployer.started():
        await deployer.restore()
        transport = httpx.ASGITransport(app=HotDeployMiddleware(_no_host, deployer=deployer))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for n in range(count):
                (await client.get(f"/{package_name(n)}/hello")).raise_for_status()
        shared, collector = deployer._shared(), deployer.metrics
        assert shared is not None
        assert collector is not None
        times: dict[str, list[float]] = {"snapshot_ms": [], "write_ms": [], "scrape_ms": []}
        size = 0
        for _ in range(rounds):
            began = time.perf_counter()
            snapshot = deployer._snapshot()
            times["snapshot_ms"].append((time.perf_counter() - began) * 1000)
            assert snapshot is not None
            began = time.perf_counter()
            shared.write(snapshot)
            times["write_ms"].append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            size = len(generate_latest(collector))
            times["scrape_ms"].append((time.perf_counter() - began) * 1000)
    summary: dict[str, Any] = {"packages": count, "rounds": rounds, "scrape_bytes": size}
    for name, values in times.items():
        ordered = sorted(values)
        summary[name] = {
            "median": round(statistics.median(ordered), 2),
            "min": round(ordered[0], 2),
            "max": round(ordered[-1], 2),
        }
    return summary


async def _no_host(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return
    raise AssertionError(f"the host app got {scope.get('path')}")


def metrics_cost(count: int, rounds: int = 20) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        home = Path(tmp) / "home"
        seed(home, count)
        result: dict[str, Any] = anyio.run(_metrics_cost, home, count, rounds)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--packages", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--starts", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="profile an in-process restore instead")
    parser.add_argument(
        "--metrics-cost", action="store_true", help="time the metrics with that many packages"
    )
    args = parser.parse_args(argv)
    if args.metrics_cost:
        result = metrics_cost(args.packages)
        print(json.dumps(result, indent=2))
        path = write_results(f"metrics_cost_{args.packages}", {**result, "machine": machine()})
        print(f"written: {path}")
        return 0
    if args.profile:
        print(profile(args.packages))
        return 0
    result = run(args.packages, args.workers, args.starts)
    path = write_results(f"restart_many_w{args.workers}", {**result, "machine": machine()})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
