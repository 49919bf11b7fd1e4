"""Scenario 3: 200 swaps in a row, in-process, through the Deployer API.

    .venv/bin/python -m benchmarks.many_swaps [--swaps 200]

A small package is deployed in 200 distinct versions (1.1, 1.2, ...), one after the other, each
from its archive bytes (packed beforehand, as an upload would bring them), with a request
through HotDeployMiddleware after each swap to check that the new version answers. Measured:

- swap latency: from the `deploy()` call to its return (switched; no bake time), and to the
  end of its `switch` step;
- resident memory (VmRSS of this process, after `gc.collect()`) before the first measured swap
  and after the last one, once every replaced version drained (counted with the
  `hotdeploy_drained` hook);
- retired versions still alive: `deployer.retired_alive()` after the drains.

A few warm-up swaps run before the baseline, so that what the first swaps import once (lazily
imported modules, caches) is not counted as growth.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette

from starlette_hotdeploy import Deployer, HotDeployMiddleware, PackageVersion, hookimpl, pack_directory
from starlette_hotdeploy._types import Message

from .common import BenchmarkError, get_scope, latency_summary, machine, read_rss_kib, write_results
from .tiny_packages import write_package

NAME = "swapper"


class DrainCounter:
    """A plugin that counts the `hotdeploy_drained` notifications."""

    def __init__(self) -> None:
        self.drained = 0
        self.terminated = 0
        self._target = 0
        self._reached = anyio.Event()

    @hookimpl
    def hotdeploy_drained(self, version: PackageVersion, terminated: int) -> None:
        self.drained += 1
        self.terminated += terminated
        if self.drained >= self._target:
            self._reached.set()

    async def wait(self, count: int) -> None:
        """Until `count` versions drained in all."""
        self._target = count
        if self.drained >= count:
            return
        self._reached = anyio.Event()
        await self._reached.wait()


async def get(app: Any, path: str) -> tuple[int, bytes]:
    """One GET straight through the ASGI app: (status, body)."""
    scope = get_scope(path)
    status, body = 0, b""

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await app(scope, receive, send)
    return status, body


async def wait_for_drains(counter: DrainCounter, expected: int, timeout: float) -> float:
    """Wait (bounded) until `expected` versions drained; the seconds it took."""
    started = time.perf_counter()
    with anyio.move_on_after(timeout):
        await counter.wait(expected)
    if counter.drained < expected:
        raise BenchmarkError(f"only {counter.drained} of {expected} replaced versions drained in {timeout}s")
    return time.perf_counter() - started


def settled_rss_kib() -> int:
    gc.collect()
    gc.collect()
    return read_rss_kib()


async def swap(deployer: Deployer, app: Any, archive: bytes, version: str) -> dict[str, float]:
    """Deploy one version and check it answers; its latencies in milliseconds."""
    started = time.perf_counter()
    record = await deployer.deploy(archive)
    call_ms = (time.perf_counter() - started) * 1000
    switch = next(s for s in record.steps if s.name == "switch")
    switched_ms = (switch.started_at - record.started_at) * 1000 + (switch.duration_ms or 0.0)
    status, body = await get(app, f"/{NAME}/hello")
    if status != 200 or body.decode() != version:
        raise BenchmarkError(f"after deploying {version}: {status} {body!r}")
    return {"call_ms": call_ms, "switched_ms": switched_ms}


async def run(swaps: int = 200, warmup: int = 5, drain_timeout: float = 60.0) -> dict[str, Any]:
    """Deploy `warmup + swaps + 1` distinct versions; measure the last `swaps` swaps."""
    counter = DrainCounter()
    with tempfile.TemporaryDirectory(prefix="bench-swaps-") as tmp:
        versions = [f"1.{i}" for i in range(warmup + swaps + 1)]
        archives = [pack_directory(write_package(Path(tmp) / "src", NAME, v)).data for v in versions]
        deployer = Deployer(home=Path(tmp) / "home", entry_points=False, plugins=[counter])
        app = Starlette()
        app.add_middleware(HotDeployMiddleware, deployer=deployer)
        async with deployer.running():
            for archive, version in zip(archives[: warmup + 1], versions[: warmup + 1], strict=True):
                await swap(deployer, app, archive, version)
            await wait_for_drains(counter, warmup, drain_timeout)
            rss_before = settled_rss_kib()
            modules_before = len(sys.modules)
            timings: list[dict[str, float]] = []
            rss_curve: list[int] = []
            for archive, version in zip(archives[warmup + 1 :], versions[warmup + 1 :], strict=True):
                timings.append(await swap(deployer, app, archive, version))
                rss_curve.append(read_rss_kib())
            drain_wait_s = await wait_for_drains(counter, warmup + swaps, drain_timeout)
            rss_after = settled_rss_kib()
            alive = deployer.retired_alive()
            modules_after = len(sys.modules)
            loaded = [v.version for p in deployer.status() for v in p.versions]
    calls = [t["call_ms"] / 1000 for t in timings]
    switches = [t["switched_ms"] / 1000 for t in timings]
    return {
        "swaps": swaps,
        "warmup_swaps": warmup,
        "swap_latency": {**latency_summary(calls), "mean_ms": round(statistics.fmean(calls) * 1000, 3)},
        "switch_point": latency_summary(switches),
        "swap_latencies_ms": [round(t["call_ms"], 3) for t in timings],
        "rss_kib": {"before": rss_before, "after": rss_after, "growth": rss_after - rss_before},
        "rss_curve_kib": rss_curve,
        "retired_alive": alive,
        "drained": counter.drained,
        "terminated_at_drain_timeout": counter.terminated,
        "drain_wait_s": round(drain_wait_s, 3),
        "modules": {"before": modules_before, "after": modules_after},
        "loaded_versions_at_end": loaded,
    }


def table(result: dict[str, Any]) -> str:
    latency, rss = result["swap_latency"], result["rss_kib"]
    return "\n".join(
        [
            f"swaps: {result['swaps']} (after {result['warmup_swaps']} warm-up swaps)",
            f"swap latency (deploy call -> switched): p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms, "
            f"max {latency['max_ms']} ms, mean {latency['mean_ms']} ms",
            f"RSS: {rss['before'] / 1024:.1f} MiB -> {rss['after'] / 1024:.1f} MiB "
            f"(growth {rss['growth'] / 1024:.2f} MiB)",
            f"retired versions alive after the drains: {len(result['retired_alive'])} {result['retired_alive']}",
            f"sys.modules: {result['modules']['before']} -> {result['modules']['after']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--swaps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    result = anyio.run(run, args.swaps, args.warmup)
    print(table(result))
    print(f"written: {write_results('many_swaps', {'machine': machine(), 'result': result})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
