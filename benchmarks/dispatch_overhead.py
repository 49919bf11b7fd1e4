"""Dispatch overhead, in-process: a package behind HotDeployMiddleware against the same sub-app
under a plain Starlette `Mount`, with 1, 10, 100 and 1000 packages.

    .venv/bin/python -m benchmarks.dispatch_overhead [--requests 20000] [--scales 1,10,100,1000]
    .venv/bin/python benchmarks/dispatch_overhead.py ...   (the same)

Calls the ASGI app directly (no sockets), so what is measured is the routing layer plus the
sub-app, per request. The request goes to the *last* package mounted (a Starlette router tries
its routes in order). Every case is measured `rounds` times, interleaved, so drift on a busy
machine hits all alike. Prints a table; `--json` also writes the numbers (`benchmarks/run.py`
writes them to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from starlette_hotdeploy import Deployer, HotDeployMiddleware
from starlette_hotdeploy._types import ASGIApp, Message

if __package__:
    from .common import get_scope
    from .tiny_packages import sub_app, write_package
else:  # run as a script: benchmarks/dispatch_overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import get_scope
    from benchmarks.tiny_packages import sub_app, write_package

SCALES = (1, 10, 100, 1000)


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host")


async def measure(app: ASGIApp, path: str, requests: int) -> list[float]:
    """Per-request seconds for `requests` GETs of `path`, after a warm-up of a tenth as many."""
    scope_base = get_scope(path)
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    timings: list[float] = []
    for i in range(requests + requests // 10):
        start = time.perf_counter()
        await app(dict(scope_base), receive, send)
        elapsed = time.perf_counter() - start
        if i >= requests // 10:
            timings.append(elapsed)
    assert status == 200, f"{path} answered {status}"
    return timings


def summary(name: str, timings: list[float], **extra: Any) -> dict[str, Any]:
    timings = sorted(timings)
    return {
        "case": name,
        **extra,
        "requests": len(timings),
        "mean_us": statistics.fmean(timings) * 1e6,
        "p50_us": timings[len(timings) // 2] * 1e6,
        "p99_us": timings[int(len(timings) * 0.99)] * 1e6,
        "rps": 1 / statistics.fmean(timings),
    }


def plain_app(names: list[str]) -> Starlette:
    """A Starlette app with a `Mount` per package name."""
    return Starlette(routes=[Route("/", home), *[Mount(f"/{name}", app=sub_app()) for name in names]])


async def hot_app(deployer: Deployer, sources: Path, names: list[str]) -> Starlette:
    """A Starlette app with HotDeployMiddleware and the packages deployed (deployer running)."""
    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(HotDeployMiddleware, deployer=deployer)
    for name in names:
        directory = sources / f"{name}-1.0"
        await deployer.deploy(directory if directory.exists() else write_package(sources, name))
    return app


async def run(requests: int, scales: tuple[int, ...] = SCALES, rounds: int = 5) -> list[dict[str, Any]]:
    """Measure every case `rounds` times, interleaved."""
    biggest = max(scales)
    names = [f"pkg{i}" for i in range(biggest)]
    with tempfile.TemporaryDirectory() as tmp:
        sources = Path(tmp) / "sources"
        deployers = {n: Deployer(home=Path(tmp) / f"home-{n}", entry_points=False) for n in scales}
        cases: list[tuple[str, dict[str, Any], ASGIApp, str]] = []
        for n in scales:
            cases.append(
                (
                    f"Starlette Mount, {n} package(s)",
                    {"kind": "mount", "packages": n},
                    plain_app(names[:n]),
                    f"/{names[n - 1]}/hello",
                )
            )
        async with contextlib.AsyncExitStack() as stack:
            for n in scales:
                await stack.enter_async_context(deployers[n].running())
                hot: ASGIApp = await hot_app(deployers[n], sources, names[:n])
                cases.append(
                    (
                        f"HotDeployMiddleware, {n} package(s)",
                        {"kind": "middleware", "packages": n},
                        hot,
                        f"/{names[n - 1]}/hello",
                    )
                )
            cases.append(
                (
                    f"host route, {biggest} packages mounted",
                    {"kind": "host", "packages": biggest},
                    cases[-1][2],
                    "/",
                )
            )
            samples: dict[str, list[float]] = {name: [] for name, _, _, _ in cases}
            for _ in range(rounds):
                for name, _, app, path in cases:
                    samples[name].extend(await measure(app, path, requests // rounds))
    return [summary(name, samples[name], **extra) for name, extra, _, _ in cases]


def overheads(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per package count: the middleware's mean against the plain Mount's, and against its own
    mean with the fewest packages."""
    by = {(r["kind"], r["packages"]): r for r in results}
    scales = sorted(n for kind, n in by if kind == "middleware")
    base = by[("middleware", scales[0])]["mean_us"]
    rows = []
    for n in scales:
        hot, plain = by[("middleware", n)]["mean_us"], by[("mount", n)]["mean_us"]
        rows.append(
            {
                "packages": n,
                "middleware_us": round(hot, 2),
                "mount_us": round(plain, 2),
                "vs_mount_pct": round((hot / plain - 1) * 100, 1),
                "vs_one_package_pct": round((hot / base - 1) * 100, 1),
            }
        )
    return rows


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'case':42} {'mean us':>9} {'p50 us':>9} {'p99 us':>9} {'req/s':>9}"]
    for r in results:
        lines.append(
            f"{r['case']:42} {r['mean_us']:9.1f} {r['p50_us']:9.1f} {r['p99_us']:9.1f} {r['rps']:9.0f}"
        )
    lines.append("")
    lines.append(
        f"{'packages':>8} {'middleware us':>13} {'Mount us':>9} {'vs Mount':>9} {'vs 1 package':>13}"
    )
    for o in overheads(results):
        lines.append(
            f"{o['packages']:>8} {o['middleware_us']:>13.1f} {o['mount_us']:>9.1f} "
            f"{o['vs_mount_pct']:>+8.1f}% {o['vs_one_package_pct']:>+12.1f}%"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="package counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scales = tuple(int(n) for n in args.scales.split(","))
    results = anyio.run(run, args.requests, scales, args.rounds, backend=args.backend)
    print(table(results))
    if args.json:
        machine = {"python": sys.version.split()[0], "platform": platform.platform(), "backend": args.backend}
        document = {"machine": machine, "results": results, "overheads": overheads(results)}
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
