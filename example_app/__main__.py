"""Live demo: a server keeps answering while its `greeter` package is upgraded over the admin
API, and refuses a broken release without a hiccup.

    python3 tasks.py demo            # or: python -m example_app [--port 8000] [--seconds 2]

It starts uvicorn on 127.0.0.1 with the example host app, deploys greeter 1.0, inventory 1.0 and
orders 1.0 (which imports inventory's code) through the admin API, keeps clients busy (plain
requests, a slow streaming response, a websocket), hot-upgrades greeter to 2.0, upgrades
inventory to 1.1 (orders moves with it, in the same switch), then sends the broken greeter 2.1,
and prints a compact live report. The exit status is 0 only if no request failed, orders moved
with inventory and the broken release was refused.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import uvicorn
from httpx_ws import AsyncWebSocketSession, aconnect_ws

from example_app.host import PACKAGES, create_app
from starlette_hotdeploy import Deployer, pack_directory

ADMIN = "/_hotdeploy"


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
    for n in range(100_000):  # bounded; the demo stops it much earlier
        if stop.is_set():
            return
        path = "/inventory/" if n % 4 == 0 else "/orders/" if n % 4 == 1 else "/greeter/"
        try:
            response = await client.get(path, params={"name": "demo"})
            response.raise_for_status()
            traffic.ok += 1
            if path == "/greeter/":
                traffic.versions[response.json()["version"]] += 1
        except Exception as exc:
            traffic.fail(f"GET {path}: {exc!r}")


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
                    version = (await ws.receive_text()).split(":")[0]
                    first = first or version
                    if version != first:
                        traffic.fail(f"websocket switched versions: {first} -> {version}")
                    traffic.websocket_messages += 1
                    await anyio.sleep(0.05)
        except Exception as exc:
            traffic.fail(f"websocket: {exc!r}")


async def deploy(admin: httpx.AsyncClient, package: str) -> tuple[int, dict[str, Any]]:
    """Upload a package directory's archive through the admin API."""
    archive = pack_directory(PACKAGES / package).data
    response = await admin.post(
        f"{ADMIN}/packages", content=archive, headers={"content-type": "application/zip"}, timeout=60
    )
    return response.status_code, response.json()


async def report(
    admin: httpx.AsyncClient, started: float, traffic: Traffic, previous_ok: int, interval: float
) -> None:
    packages = (await admin.get(f"{ADMIN}/packages")).json()["packages"]
    greeter = next((p for p in packages if p["name"] == "greeter"), None)
    loaded = (
        ", ".join(f"{v['version']} {v['state']}({v['in_flight']})" for v in greeter["versions"])
        if greeter
        else "-"
    )
    versions = " ".join(f"{v}:{n}" for v, n in sorted(traffic.versions.items()))
    rps = (traffic.ok - previous_ok) / interval
    print(
        f"  t={time.perf_counter() - started:5.1f}s {rps:6.0f} req/s  errors={traffic.errors}  "
        f"greeter answered by [{versions}]  loaded: {loaded}",
        flush=True,
    )


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this; without it, Nagle's algorithm adds ~40 ms per request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def demo(port: int, phase_seconds: float) -> int:
    token = secrets.token_urlsafe(16)
    refused = upgraded = False
    traffic = Traffic()
    with tempfile.TemporaryDirectory(prefix="hotdeploy-demo-") as home:
        deployer = Deployer(home=Path(home), entry_points=False)
        app = create_app(deployer, admin_token=token)
        sock = listening_socket(port)
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", ws="wsproto"))
        stop_traffic = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            for _ in range(500):  # bounded wait for uvicorn's startup
                if server.started:
                    break
                await anyio.sleep(0.01)
            print(f"server on {base_url}  (admin API at {base_url}{ADMIN}, token {token})", flush=True)

            limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
            async with (
                httpx.AsyncClient(base_url=base_url, headers={"authorization": f"Bearer {token}"}) as admin,
                httpx.AsyncClient(base_url=base_url, limits=limits) as client,
            ):
                # orders imports inventory's code: it is deployed after it (it requires it).
                for package in ("greeter-1.0", "inventory-1.0", "orders-1.0"):
                    status, record = await deploy(admin, package)
                    print(
                        f"POST {ADMIN}/packages {package}: {status} in {record.get('duration_ms')} ms",
                        flush=True,
                    )

                async with anyio.create_task_group() as clients:
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
                            await report(admin, started, traffic, before, interval)

                    print("traffic on greeter 1.0, inventory 1.0 and orders 1.0 ...", flush=True)
                    await watch(phase_seconds)
                    print(f"hot upgrade: POST {ADMIN}/packages greeter-2.0 ...", flush=True)
                    status, record = await deploy(admin, "greeter-2.0")
                    steps = ", ".join(
                        f"{s['name']} {s['duration_ms']:.1f}ms"
                        for s in record.get("steps", [])
                        if s["duration_ms"] is not None  # the old version's drain may still run
                    )
                    print(f"  {status}: switched to {record.get('to_version')} ({steps})", flush=True)
                    await watch(phase_seconds)
                    print(f"upgrade a requirement: POST {ADMIN}/packages inventory-1.1 ...", flush=True)
                    status, record = await deploy(admin, "inventory-1.1")
                    moved = ", ".join(record.get("moved") or []) or "nothing"
                    print(
                        f"  {status}: switched to {record.get('to_version')}, moved with it: {moved}",
                        flush=True,
                    )
                    skus = (await client.get("/orders/")).json()["skus"]
                    print(f"  orders now imports inventory 1.1's code: skus {skus}", flush=True)
                    upgraded = status == 201 and record.get("moved") == ["orders 1.0"] and "damson" in skus
                    print(f"broken release: POST {ADMIN}/packages greeter-2.1-broken ...", flush=True)
                    status, problem = await deploy(admin, "greeter-2.1-broken")
                    refused = status == 422
                    print(f"  {status} {problem.get('title')}: {problem.get('detail')}", flush=True)
                    await watch(phase_seconds)
                    stop_traffic.set()  # the clients finish what they are doing, then return
            server.should_exit = True

    print(
        f"done: {traffic.ok} requests, {traffic.streams} streams, {traffic.websocket_messages} websocket "
        f"messages, {traffic.errors} errors; greeter answered by {dict(traffic.versions)}; "
        f"orders {'moved' if upgraded else 'did NOT move'} with inventory; "
        f"broken release {'refused' if refused else 'NOT refused'}",
        flush=True,
    )
    for error in traffic.last_errors:
        print(f"  error: {error}", flush=True)
    return 0 if traffic.errors == 0 and refused and upgraded else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each phase")
    args = parser.parse_args()
    return anyio.run(demo, args.port, args.seconds, backend="asyncio")


if __name__ == "__main__":
    sys.exit(main())
