"""Scenario 1: the same upgrade (greeter 1.0 -> 2.0) under the same load, by four methods.

    .venv/bin/python -m benchmarks.upgrade [--quick] [--methods hotdeploy,uvicorn-hup,...]

For each method (see servers.py): start the server on greeter 1.0, put load on it (keep-alive
plain requests by wrk, or built-in httpx clients; streaming clients on /greeter/countdown;
websocket clients on /greeter/echo; a probe on new connections), let it run in steady state,
run the upgrade command, keep the load on for a while, stop everything and compare:

- failed requests (wrk's non-2xx answers and socket errors), connection errors, websocket
  sessions broken, streams cut;
- time from the command to the first answer from 2.0 and to the last answer from 1.0 (after it,
  every answer is from 2.0), over the plain load and the probe;
- p50 / p99 / max latency of plain requests in the upgrade window against steady state.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .common import BenchmarkError, latency_summary, machine, write_results
from .loadgen import (
    HttpxLoad,
    PlainLoadResult,
    ProbeStats,
    StreamStats,
    WebSocketStats,
    WrkLoad,
    as_dict,
    probe,
    stream_client,
    websocket_client,
)
from .servers import METHODS, Method, UpgradeCommand

OLD, NEW = "1.0", "2.0"
BUCKET_S = 0.1  # the timeline's resolution


@dataclass
class UpgradeConfig:
    """How much load, for how long."""

    workers: int = 2
    connections: int = 8  # keep-alive plain-request clients (wrk: one thread each)
    streams: int = 2
    websockets: int = 2
    warmup_s: float = 2.0  # not measured
    steady_s: float = 8.0  # the steady state before the command
    after_s: float = 12.0  # load after the command
    use_wrk: bool = True
    probe_interval_s: float = 0.02
    ws_session_messages: int = 40  # x 50 ms: 2 s sessions, well within greeter's drain_timeout


@dataclass
class Observed:
    """Everything the clients saw during one run."""

    command: UpgradeCommand
    plain: PlainLoadResult
    probe: ProbeStats
    streams: StreamStats
    websockets: WebSocketStats


# -- running ----------------------------------------------------------------------------------------


async def run_method(name: str, config: UpgradeConfig, workdir: Path) -> dict[str, Any]:
    """Start the method's server on 1.0, upgrade it under load, and analyse what was seen."""
    method = METHODS[name](workdir, config.workers)
    try:
        await anyio.to_thread.run_sync(method.start)
        observed = await under_load(method, config, workdir)
    except BenchmarkError as exc:
        raise BenchmarkError(f"{name}: {exc}\n--- server log:\n{method.log_tail()}") from exc
    finally:
        method.stop()
    return analyse(method, config, observed)


async def under_load(method: Method, config: UpgradeConfig, workdir: Path) -> Observed:
    """Load -> steady state -> the upgrade command -> more load -> stop."""
    stop = anyio.Event()
    plain_url = method.url("/greeter/")
    total_s = config.warmup_s + config.steady_s + config.after_s
    wrk = WrkLoad(plain_url, config.connections, total_s + 1, workdir) if config.use_wrk else None
    builtin = None if config.use_wrk else HttpxLoad(plain_url, config.connections)
    streams, websockets, probed = StreamStats(), WebSocketStats(), ProbeStats()
    try:
        if wrk is not None:
            wrk.start()
        async with anyio.create_task_group() as tg:
            if builtin is not None:
                tg.start_soon(builtin.run, stop)
            for _ in range(config.streams):
                tg.start_soon(stream_client, method.url(), streams, stop)
            for _ in range(config.websockets):
                tg.start_soon(websocket_client, method.url(), websockets, stop, config.ws_session_messages)
            tg.start_soon(probe, plain_url, probed, stop, config.probe_interval_s)
            await anyio.sleep(config.warmup_s + config.steady_s)
            command = await anyio.to_thread.run_sync(method.upgrade)
            await anyio.sleep(max(0.0, command.started + config.after_s - time.monotonic()))
            stop.set()
        plain = await wrk.finish() if wrk is not None else builtin.result()  # type: ignore[union-attr]
    finally:
        if wrk is not None:
            wrk.kill()
    return Observed(command, plain, probed, streams, websockets)


# -- analysis ---------------------------------------------------------------------------------------


def version_times(observed: Observed, t0: float) -> dict[str, Any]:
    """Seconds from the command to the first answer from 2.0, and to the last from 1.0."""
    answers = [(end, version) for end, _, status, version in observed.plain.samples if status == 200]
    answers += [(end, version) for _, end, status, version in observed.probe.samples if status == 200]
    after = sorted(a for a in answers if a[0] >= t0)
    new = [end for end, version in after if version == NEW]
    old = [end for end, version in after if version == OLD]
    first_new = min(new) - t0 if new else None
    last_old = max(old) - t0 if old else None
    all_new = None if first_new is None else max(first_new, last_old or 0.0)
    tail = [version for end, version in after if end >= after[-1][0] - 1.0] if after else []
    return {
        "time_to_first_new_s": _round(first_new),
        "time_to_all_new_s": _round(all_new),
        "converged": bool(tail) and set(tail) == {NEW},  # the last second answered only by 2.0
    }


def window_stats(samples: list[tuple[float, float, int, str]], start: float, end: float) -> dict[str, Any]:
    """Latency of the successful plain requests that ended in [start, end), and their rate."""
    inside = [s for s in samples if start <= s[0] < end]
    ok = [s[1] for s in inside if s[2] == 200]
    summary = latency_summary(ok)
    summary["non_2xx_or_error"] = len(inside) - len(ok)
    summary["rps"] = round(len(ok) / (end - start), 1) if end > start else None
    return summary


def max_gap_ms(samples: list[tuple[float, float, int, str]], start: float, end: float) -> float | None:
    """The longest time no plain request completed successfully, in [start, end)."""
    ends = [start] + [s[0] for s in samples if start <= s[0] < end and s[2] == 200] + [end]
    return round(max(b - a for a, b in itertools.pairwise(ends)) * 1000, 1) if ends else None


def timeline(observed: Observed, t0: float, before_s: float, after_s: float) -> dict[str, list[Any]]:
    """Per 100 ms bucket around the command: p50 and max latency (ms), answers, the share from 2.0,
    failed probes."""
    count = round((before_s + after_s) / BUCKET_S)
    buckets: list[list[tuple[float, str]]] = [[] for _ in range(count)]
    failures = [0] * count
    for end, latency, status, version in observed.plain.samples:
        index = int((end - t0 + before_s) / BUCKET_S)
        if 0 <= index < count:
            if status == 200:
                buckets[index].append((latency, version))
            else:
                failures[index] += 1
    for _, end, status, _ in observed.probe.samples:
        index = int((end - t0 + before_s) / BUCKET_S)
        if 0 <= index < count and status != 200:
            failures[index] += 1
    result: dict[str, list[Any]] = {
        "t_s": [],
        "p50_ms": [],
        "max_ms": [],
        "count": [],
        "new_share": [],
        "failed": [],
    }
    for index, bucket in enumerate(buckets):
        latencies = sorted(latency for latency, _ in bucket)
        result["t_s"].append(round(index * BUCKET_S - before_s, 2))
        result["p50_ms"].append(round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None)
        result["max_ms"].append(round(latencies[-1] * 1000, 2) if latencies else None)
        result["count"].append(len(bucket))
        result["new_share"].append(
            round(sum(v == NEW for _, v in bucket) / len(bucket), 3) if bucket else None
        )
        result["failed"].append(failures[index])
    return result


def analyse(method: Method, config: UpgradeConfig, observed: Observed) -> dict[str, Any]:
    t0 = observed.command.started
    plain, probed = observed.plain, observed.probe
    versions = version_times(observed, t0)
    command_s = observed.command.returned - t0
    # The upgrade window: from the command until every answer is from 2.0 and the command
    # returned, plus half a second; within the observed time.
    settled = max(command_s, versions["time_to_all_new_s"] or config.after_s)
    window_s = min(config.after_s, settled + 0.5)
    probe_connect = sum(1 for s in probed.samples if s[2] == 0)
    streams, websockets = observed.streams, observed.websockets
    return {
        "method": method.name,
        "label": method.label,
        "workers": method.workers,
        "load_tool": plain.tool,
        "command": {"duration_s": round(command_s, 3), **observed.command.detail},
        **versions,
        "failed_requests": plain.failed,
        "socket_errors": {k: v for k, v in plain.errors.items() if k != "status"},
        "non_2xx": plain.errors["status"],
        "requests": plain.requests,
        "connection_errors": plain.errors["connect"]
        + streams.connect_errors
        + websockets.connect_errors
        + probe_connect,
        "probe": {"requests": len(probed.samples), "failed": probed.failed},
        "streams": as_dict(streams),
        "websockets": as_dict(websockets),
        "upgrade_window_s": round(window_s, 3),
        "latency": {
            "steady": window_stats(plain.samples, t0 - config.steady_s, t0),
            "upgrade": window_stats(plain.samples, t0, t0 + window_s),
        },
        "max_gap_ms": {
            "steady": max_gap_ms(plain.samples, t0 - config.steady_s, t0),
            "upgrade": max_gap_ms(plain.samples, t0, t0 + window_s),
        },
        "timeline": timeline(observed, t0, min(config.steady_s, 3.0), config.after_s),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# -- the suite --------------------------------------------------------------------------------------


async def run(config: UpgradeConfig, methods: list[str], pause_s: float = 1.0) -> list[dict[str, Any]]:
    """Every method in turn, each in its own temporary directory."""
    results = []
    for name in methods:
        print(f"upgrade under load: {METHODS[name].label} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            results.append(await run_method(name, config, Path(tmp)))
        await anyio.sleep(pause_s)  # let the sockets of the last run close
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The results as a text table."""
    head = (
        f"{'method':36} {'failed':>7} {'conn err':>8} {'ws broken':>9} {'streams cut':>11} "
        f"{'first new':>9} {'all new':>8} {'p50 ms':>13} {'p99 ms':>15} {'max ms':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        steady, upgrade = r["latency"]["steady"], r["latency"]["upgrade"]

        def pair(key: str, s: dict[str, Any] = steady, u: dict[str, Any] = upgrade) -> str:
            return f"{_fmt(s[key])} -> {_fmt(u[key])}"

        lines.append(
            f"{r['label']:36} {r['failed_requests']:>7} {r['connection_errors']:>8} "
            f"{r['websockets']['broken']:>9} {r['streams']['cut']:>11} {_fmt(r['time_to_first_new_s']):>9} "
            f"{_fmt(r['time_to_all_new_s']):>8} {pair('p50_ms'):>13} {pair('p99_ms'):>15} {pair('max_ms'):>15}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 10 else f"{value:.0f}"


def config_for(quick: bool, use_wrk: bool, workers: int) -> UpgradeConfig:
    if quick:
        return UpgradeConfig(workers=workers, warmup_s=1, steady_s=3, after_s=5, use_wrk=use_wrk)
    return UpgradeConfig(workers=workers, use_wrk=use_wrk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short phases")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-wrk", action="store_true", help="built-in httpx load instead of wrk")
    args = parser.parse_args(argv)
    use_wrk = not args.no_wrk and WrkLoad.available()
    config = config_for(args.quick, use_wrk, args.workers)
    results = anyio.run(run, config, args.methods.split(","))
    print(table(results))
    path = write_results("upgrade", {"config": asdict(config), "machine": machine(), "results": results})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
