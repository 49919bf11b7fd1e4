"""Dispatch overhead, in-process: the same sub-app under a plain Starlette `Mount`, as a package
behind HotDeployMiddleware, and as a package behind HotDeployRoute (in the host's routes).

    .venv/bin/python -m benchmarks.dispatch_overhead [--requests 20000] [--rounds 10]
        [--scales 1,10,100,1000] [--apps tiny,fastapi] [--backend uvloop|asyncio|trio] [--same-task]
    .venv/bin/python benchmarks/dispatch_overhead.py ...   (the same)

Calls the ASGI app directly (no sockets), so what is measured is the routing layer plus the
sub-app. Every request runs in a task of its own, as under a server: on asyncio a bare
`loop.create_task()` (what uvicorn does for every request), on trio a task started in a nursery
(what hypercorn does); the measuring task waits for it. The default backend is asyncio on uvloop
when uvloop is installed (what `uvicorn` picks then), else plain asyncio. `--same-task` calls the app in the
measuring task instead (the earlier benchmark: it misses the per-task costs, for example an anyio
cancel scope entered in a fresh task).

Sub-apps (benchmarks/dispatch_apps.py): `tiny` (Starlette, `GET /hello`) with 1, 10, 100 and
1000 packages, the request going to the *last* one (a Starlette router tries its routes in
order); `fastapi` (FastAPI with pydantic models, `GET /items/{id}` and `POST /items`) with one
package. The Mount imports the package's module the ordinary way, from the same files the
deployer loads. Every case is measured in `rounds` rounds, the order rotated from one round to the
next, so drift on a busy machine hits all alike; the ratio of each round (package against Mount,
same round) gives the spread. `--json` also writes the numbers (`benchmarks/run.py` writes them
to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import sniffio

from starlette_hotdeploy import Deployer
from starlette_hotdeploy._types import ASGIApp, Message

if __package__:
    from .common import against_mount, get_scope, spread
    from .dispatch_apps import CALLS, LABELS, Call, middleware_app, mount_app, package_names, route_app
    from .dispatch_apps import write_package as write_app_package
else:  # run as a script: benchmarks/dispatch_overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import against_mount, get_scope, spread
    from benchmarks.dispatch_apps import (
        CALLS,
        LABELS,
        Call,
        middleware_app,
        mount_app,
        package_names,
        route_app,
    )
    from benchmarks.dispatch_apps import write_package as write_app_package

T = TypeVar("T")

SCALES = (1, 10, 100, 1000)
APPS = ("tiny", "fastapi")


@dataclass
class Case:
    app_name: str
    call: Call
    kind: str
    packages: int
    app: ASGIApp
    path: str

    @property
    def label(self) -> str:
        if self.kind == "host":
            return f"host endpoint /, {self.packages} packages mounted"
        return f"{self.app_name} {self.call.name}: {LABELS[self.kind]}, {self.packages} pkg"


async def measure(case: Case, requests: int, spawn: bool) -> list[float]:
    """Per-request seconds for `requests` calls, after a warm-up of a tenth as many; with `spawn`
    each request runs in a new task (and the time includes starting it and waiting for it)."""
    scope_base = get_scope(case.path)
    call = case.call if case.kind != "host" else Call("GET /", "GET", "/")
    scope_base["method"] = call.method
    scope_base["headers"] = [*scope_base["headers"], *call.headers]
    body = call.body
    statuses: set[int] = set()

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    app = case.app
    timings: list[float] = []
    warmup = requests // 10
    if not spawn:
        for i in range(requests + warmup):
            start = time.perf_counter()
            await app(dict(scope_base), receive, send)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                timings.append(elapsed)
    elif sniffio.current_async_library() == "asyncio":
        loop = asyncio.get_running_loop()

        async def run_asgi() -> None:  # as uvicorn's per-request task does
            await app(dict(scope_base), receive, send)

        for i in range(requests + warmup):
            start = time.perf_counter()
            await loop.create_task(run_asgi())
            elapsed = time.perf_counter() - start
            if i >= warmup:
                timings.append(elapsed)
    else:
        async with anyio.create_task_group() as tg:
            for i in range(requests + warmup):
                done = anyio.Event()

                async def one(done: anyio.Event = done) -> None:
                    try:
                        await app(dict(scope_base), receive, send)
                    finally:
                        done.set()

                start = time.perf_counter()
                tg.start_soon(one)
                await done.wait()
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    timings.append(elapsed)
    expected = 200 if case.kind == "host" else call.status
    assert statuses == {expected}, f"{case.label}: answered {statuses}, expected {expected}"
    return timings


def loop_name() -> str:
    """The running event loop: `trio`, or the asyncio loop's class (uvloop's or asyncio's)."""
    if sniffio.current_async_library() != "asyncio":
        return sniffio.current_async_library()
    loop = type(asyncio.get_running_loop())
    return f"{loop.__module__}.{loop.__qualname__}"


def summary(case: Case, rounds: list[list[float]], loop: str, spawn: bool) -> dict[str, Any]:
    timings = sorted(t for r in rounds for t in r)
    return {
        "case": case.label,
        "loop": loop,
        "task_per_request": spawn,
        "app": case.app_name,
        "call": case.call.name if case.kind != "host" else "GET /",
        "kind": case.kind,
        "packages": case.packages,
        "requests": len(timings),
        "mean_us": statistics.fmean(timings) * 1e6,
        "p50_us": timings[len(timings) // 2] * 1e6,
        "p99_us": timings[int(len(timings) * 0.99)] * 1e6,
        "rps": 1 / statistics.fmean(timings),
        "round_mean_us": [round(statistics.fmean(r) * 1e6, 3) for r in rounds],
    }


async def build_cases(
    tmp: Path, stack: contextlib.AsyncExitStack, scales: tuple[int, ...], apps: tuple[str, ...]
) -> list[Case]:
    sources = Path(tmp) / "sources"
    cases: list[Case] = []
    for app_name in apps:
        counts = scales if app_name == "tiny" else (1,)
        for n in counts:
            names = package_names(n, app_name)
            deployer = Deployer(home=Path(tmp) / f"home-{app_name}-{n}", entry_points=False)
            await stack.enter_async_context(deployer.running())
            for name in names:
                await deployer.deploy(write_app_package(sources, name, app_name))
            hosts: dict[str, ASGIApp] = {
                "mount": mount_app(sources, names),
                "middleware": middleware_app(deployer),
                "route": route_app(deployer),
            }
            for call in CALLS[app_name]:
                for kind, host in hosts.items():
                    cases.append(Case(app_name, call, kind, n, host, f"/{names[-1]}{call.path}"))
            if app_name == "tiny" and n == max(counts):
                cases.append(Case(app_name, CALLS[app_name][0], "host", n, hosts["middleware"], "/"))
    return cases


async def run(
    requests: int,
    scales: tuple[int, ...] = SCALES,
    rounds: int = 10,
    apps: tuple[str, ...] = APPS,
    spawn: bool = True,
) -> list[dict[str, Any]]:
    """Measure every case `rounds` times (`requests // rounds` requests each), the order rotated."""
    with tempfile.TemporaryDirectory() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            cases = await build_cases(Path(tmp), stack, scales, apps)
            samples: list[list[list[float]]] = [[] for _ in cases]
            per_round = max(1, requests // rounds)
            for r in range(rounds):
                shift = r % len(cases)
                for i in [*range(shift, len(cases)), *range(shift)]:
                    samples[i].append(await measure(cases[i], per_round, spawn))
    return [summary(case, samples[i], loop_name(), spawn) for i, case in enumerate(cases)]


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def overheads(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each sub-app, request and package count: HotDeployMiddleware and HotDeployRoute against
    the plain Mount. `rps_ratio` is package req/s over Mount req/s, round by round (median, min,
    max); `vs_mount_pct` the extra time per request on all rounds' means; `vs_one_package_pct` the
    package's mean against its own with the fewest packages."""
    rows = []
    for pair in against_mount(results):
        app, call, kind, n, r, mount = pair.app, pair.call, pair.kind, pair.packages, pair.result, pair.mount
        base = pair.fewest["mean_us"]
        ratios = [m / h for m, h in zip(mount["round_mean_us"], r["round_mean_us"], strict=True)]
        rows.append(
            {
                "app": app,
                "call": call,
                "kind": kind,
                "packages": n,
                "us": round(r["mean_us"], 2),
                "mount_us": round(mount["mean_us"], 2),
                "p50_us": round(r["p50_us"], 2),
                "mount_p50_us": round(mount["p50_us"], 2),
                "p99_us": round(r["p99_us"], 2),
                "mount_p99_us": round(mount["p99_us"], 2),
                "rps_ratio": _spread(ratios),
                "vs_mount_pct": round((r["mean_us"] / mount["mean_us"] - 1) * 100, 1),
                "vs_one_package_pct": round((r["mean_us"] / base - 1) * 100, 1),
            }
        )
    return rows


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'case':58} {'mean us':>8} {'p50 us':>8} {'p99 us':>8} {'req/s':>8}"]
    for r in results:
        lines.append(
            f"{r['case']:58} {r['mean_us']:8.1f} {r['p50_us']:8.1f} {r['p99_us']:8.1f} {r['rps']:8.0f}"
        )
    lines += [
        "",
        f"{'sub-app, request':24} {'pkgs':>5} {'vs Mount':20} {'us':>7} {'Mount us':>8} "
        f"{'req/s ratio med [min-max]':>27} {'p99 us / Mount':>15} {'vs 1 pkg':>9}",
    ]
    for o in overheads(results):
        ratio = o["rps_ratio"]
        lines.append(
            f"{o['app'] + ' ' + o['call']:24} {o['packages']:>5} {LABELS[o['kind']]:20} {o['us']:>7.1f} "
            f"{o['mount_us']:>8.1f} {spread(ratio, 11)} "
            f"{o['p99_us']:>7.1f}/{o['mount_p99_us']:<7.1f} {o['vs_one_package_pct']:>+8.1f}%"
        )
    return "\n".join(lines)


def anyio_run(backend: str, function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`anyio.run` on `backend`: `uvloop` is asyncio with uvloop's event loop."""
    if backend == "uvloop":
        import uvloop

        return anyio.run(
            function, *args, backend="asyncio", backend_options={"loop_factory": uvloop.new_event_loop}
        )
    return anyio.run(function, *args, backend=backend)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000, help="per case, over all rounds")
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="package counts (tiny)")
    parser.add_argument("--apps", default=",".join(APPS))
    parser.add_argument("--rounds", type=int, default=10)
    default = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    parser.add_argument("--backend", default=default, choices=["uvloop", "asyncio", "trio"])
    parser.add_argument("--same-task", action="store_true", help="no task per request")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scales = tuple(int(n) for n in args.scales.split(","))
    apps = tuple(a for a in args.apps.split(",") if a)
    spawn = not args.same_task
    results = anyio_run(args.backend, run, args.requests, scales, args.rounds, apps, spawn)
    print(table(results))
    if args.json:
        machine = {"python": sys.version.split()[0], "platform": platform.platform(), "backend": args.backend}
        config = {"requests": args.requests, "rounds": args.rounds, "task_per_request": spawn}
        document = {"machine": machine, "config": config, "results": results, "overheads": overheads(results)}
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
