"""Dispatch overhead, in-process: a package behind HotDeployMiddleware against the same sub-app
under a plain Starlette `Mount`, with 1 and with 1000 packages.

    .venv/bin/python benchmarks/dispatch_overhead.py [--requests 20000] [--json out.json]

Calls the ASGI app directly (no sockets), so what is measured is the routing layer plus the
sub-app, per request. Prints a table; `--json` also writes the numbers.
"""

from __future__ import annotations

import argparse
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
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from starlette_hotdeploy import Deployer, HotDeployMiddleware
from starlette_hotdeploy._types import ASGIApp, Message

SUBAPP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def hello(request):
    return PlainTextResponse("hello")


app = Starlette(routes=[Route("/hello", hello)])
"""


def write_package(parent: Path, name: str) -> Path:
    root = parent / name
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "app.py").write_text(SUBAPP)
    (root / "hotdeploy.toml").write_text(
        f'name = "{name}"\nversion = "1.0"\napp = "{name}.app:app"\nmount = "/{name}"\n'
    )
    return root


def sub_app() -> Starlette:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/hello", hello)])


async def home(request: Any) -> PlainTextResponse:
    return PlainTextResponse("host")


async def measure(app: ASGIApp, path: str, requests: int) -> list[float]:
    """Per-request seconds for `requests` GETs of `path`, after a warm-up."""
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
    }
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


def summary(name: str, timings: list[float]) -> dict[str, Any]:
    timings = sorted(timings)
    return {
        "case": name,
        "requests": len(timings),
        "mean_us": statistics.fmean(timings) * 1e6,
        "p50_us": timings[len(timings) // 2] * 1e6,
        "p99_us": timings[int(len(timings) * 0.99)] * 1e6,
        "rps": 1 / statistics.fmean(timings),
    }


async def run(requests: int, packages: int, rounds: int) -> list[dict[str, Any]]:
    """Measure every case `rounds` times, interleaved, so drift on a busy machine hits all alike."""
    with tempfile.TemporaryDirectory() as tmp:
        sources = Path(tmp) / "sources"
        names = [f"pkg{i}" for i in range(packages)]
        cases: list[tuple[str, ASGIApp, str]] = []
        for n in (1, packages):
            plain = Starlette(
                routes=[Route("/", home), *[Mount(f"/{name}", app=sub_app()) for name in names[:n]]]
            )
            cases.append((f"Starlette Mount, {n} package(s)", plain, f"/{names[n - 1]}/hello"))

        one = Deployer(home=Path(tmp) / "one", entry_points=False)
        many = Deployer(home=Path(tmp) / "many", entry_points=False)
        hot_one = Starlette(routes=[Route("/", home)])
        hot_one.add_middleware(HotDeployMiddleware, deployer=one)
        hot_many = Starlette(routes=[Route("/", home)])
        hot_many.add_middleware(HotDeployMiddleware, deployer=many)
        async with one.running(), many.running():
            await one.deploy(write_package(sources, names[0]))
            for name in names:
                await many.deploy(
                    sources / name if (sources / name).exists() else write_package(sources, name)
                )
            cases += [
                ("HotDeployMiddleware, 1 package", hot_one, "/pkg0/hello"),
                (f"HotDeployMiddleware, {packages} packages", hot_many, f"/{names[-1]}/hello"),
                (f"host route, {packages} packages mounted", hot_many, "/"),
            ]
            samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            for _ in range(rounds):
                for name, app, path in cases:
                    samples[name].extend(await measure(app, path, requests // rounds))
    return [summary(name, timings) for name, timings in samples.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--packages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = anyio.run(run, args.requests, args.packages, args.rounds, backend=args.backend)
    print(f"{'case':42} {'mean us':>9} {'p50 us':>9} {'p99 us':>9} {'req/s':>9}")
    for r in results:
        print(f"{r['case']:42} {r['mean_us']:9.1f} {r['p50_us']:9.1f} {r['p99_us']:9.1f} {r['rps']:9.0f}")
    if args.json:
        machine = {"python": sys.version.split()[0], "platform": platform.platform(), "backend": args.backend}
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
