"""Live demo: a server keeps answering while its `greeter` package is upgraded, and refuses a
broken release without a hiccup.

    python3 tasks.py demo            # or: python -m example_app [--port 8000] [--seconds 2]

It starts uvicorn on 127.0.0.1, deploys greeter 1.0, keeps clients busy (plain requests, a slow
streaming response, a websocket), hot-upgrades to 2.0, then tries the broken 2.1, and prints a
compact report. The exit status is 0 only if no request failed.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import uvicorn
from httpx_ws import AsyncWebSocketSession, aconnect_ws

from example_app.host import PACKAGES, create_app
from starlette_hotdeploy import Deployer, DeploymentError


@dataclass
class Traffic:
    ok: int = 0
    errors: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    streams: int = 0
    websocket_messages: int = 0
    last_errors: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.errors += 1
        self.last_errors = [*self.last_errors[-4:], what]


async def plain_requests(client: httpx.AsyncClient, traffic: Traffic, stop: anyio.Event) -> None:
    for _ in range(100_000):  # bounded; the demo stops it much earlier
        if stop.is_set():
            return
        try:
            response = await client.get("/greeter/", params={"name": "demo"})
            response.raise_for_status()
            traffic.ok += 1
            traffic.versions[response.json()["version"]] += 1
        except Exception as exc:
            traffic.fail(f"GET /greeter/: {exc!r}")


async def streams(client: httpx.AsyncClient, traffic: Traffic, stop: anyio.Event) -> None:
    for _ in range(1_000):
        if stop.is_set():
            return
        try:
            async with client.stream("GET", "/greeter/countdown") as response:
                lines = [line async for line in response.aiter_lines() if line]
            if len(lines) != 5 or len({line.split()[0] for line in lines}) != 1:
                traffic.fail(f"stream mixed or cut: {lines}")
            else:
                traffic.streams += 1
        except Exception as exc:
            traffic.fail(f"stream: {exc!r}")


async def websocket(client: httpx.AsyncClient, traffic: Traffic, stop: anyio.Event) -> None:
    for _ in range(100):
        if stop.is_set():
            return
        ws: AsyncWebSocketSession
        try:
            async with aconnect_ws("/greeter/echo", client) as ws:
                first = None
                for n in range(20):
                    if stop.is_set():
                        break
                    await ws.send_text(f"ping {n}")
                    reply = await ws.receive_text()
                    version = reply.split(":")[0]
                    first = first or version
                    if version != first:
                        traffic.fail(f"websocket switched versions: {first} -> {version}")
                    traffic.websocket_messages += 1
                    await anyio.sleep(0.05)
        except Exception as exc:
            traffic.fail(f"websocket: {exc!r}")


def report(started: float, traffic: Traffic, deployer: Deployer, previous_ok: int, interval: float) -> None:
    package = deployer.packages.get("greeter")
    loaded = (
        ", ".join(f"{v.version} {v.state.value}({v.in_flight})" for v in package.loaded) if package else "-"
    )
    versions = " ".join(f"{v}:{n}" for v, n in sorted(traffic.versions.items()))
    rps = (traffic.ok - previous_ok) / interval
    print(
        f"  t={time.perf_counter() - started:5.1f}s  {rps:6.0f} req/s  errors={traffic.errors}  "
        f"answered by [{versions}]  loaded: {loaded}",
        flush=True,
    )


async def demo(port: int, phase_seconds: float) -> int:
    with tempfile.TemporaryDirectory(prefix="hotdeploy-demo-") as home:
        deployer = Deployer(home=Path(home), entry_points=False)
        app = create_app(deployer)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this; without it, Nagle's algorithm adds ~40 ms per request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", ws="wsproto"))
        traffic = Traffic()
        stop_traffic = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            for _ in range(500):
                if server.started:
                    break
                await anyio.sleep(0.01)
            print(f"server on http://127.0.0.1:{port}", flush=True)
            record = await deployer.deploy(PACKAGES / "greeter-1.0")
            print(f"deployed greeter {record.to_version} in {record.duration_ms:.0f} ms", flush=True)

            limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client,
                anyio.create_task_group() as clients,
            ):
                for _ in range(6):
                    clients.start_soon(plain_requests, client, traffic, stop_traffic)
                clients.start_soon(streams, client, traffic, stop_traffic)
                clients.start_soon(websocket, client, traffic, stop_traffic)
                started = time.perf_counter()

                async def watch(seconds: float) -> None:
                    interval = 0.5
                    for _ in range(max(1, int(seconds / interval))):
                        before = traffic.ok
                        await anyio.sleep(interval)
                        report(started, traffic, deployer, before, interval)

                print("traffic on greeter 1.0 ...", flush=True)
                await watch(phase_seconds)
                print("hot upgrade to greeter 2.0 ...", flush=True)
                record = await deployer.deploy(PACKAGES / "greeter-2.0")
                steps = ", ".join(f"{s.name} {s.duration_ms:.1f}ms" for s in record.steps)
                print(
                    f"  switched to {record.to_version} in {record.duration_ms:.0f} ms ({steps})", flush=True
                )
                await watch(phase_seconds)
                print("deploying the broken greeter 2.1 ...", flush=True)
                try:
                    await deployer.deploy(PACKAGES / "greeter-2.1-broken")
                    print("  UNEXPECTED: the broken release was accepted", flush=True)
                    traffic.fail("broken release accepted")
                except DeploymentError as exc:
                    print(f"  refused: {exc}", flush=True)
                await watch(phase_seconds)
                stop_traffic.set()  # the clients finish what they are doing, then return
            server.should_exit = True

    print(
        f"done: {traffic.ok} requests, {traffic.streams} streams, {traffic.websocket_messages} websocket "
        f"messages, {traffic.errors} errors; answered by {dict(traffic.versions)}",
        flush=True,
    )
    for error in traffic.last_errors:
        print(f"  error: {error}", flush=True)
    return 0 if traffic.errors == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each phase")
    args = parser.parse_args()
    return anyio.run(demo, args.port, args.seconds, backend="asyncio")


if __name__ == "__main__":
    sys.exit(main())
