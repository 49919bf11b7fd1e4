"""Package dependencies on a real uvicorn with 2 workers, under load: `orders` imports
`inventory`; 20 upgrades and rollbacks of inventory move orders with it on both workers, and 5
sets deploy both together, with 0 failed requests and never a response that pairs an orders
instance with an inventory version other than the one it is bound to, nor, once an operation
has answered, with the old one.

Traffic runs in a thread, on a new connection per request (so both workers get some); it stops
by itself after `LIMIT` requests or when the test says so.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from packages import write_package, zip_directory
from workers_support import Server, running_server, wait_for, worker_pid

WORKERS = 2
LIMIT = 50_000
OPERATIONS = 20
SETS = 5

INVENTORY_APP = """
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from inventory import api


async def index(request):
    return JSONResponse({"inventory": api.VERSION, "pid": os.getpid()})


app = Starlette(routes=[Route("/", index)])
"""

ORDERS_APP = """
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from inventory.api import VERSION as BOUND_AT_LOAD


async def index(request):
    from inventory import api  # lazy: the same bound version, whatever is active now

    return JSONResponse({{"orders": "{version}", "loaded": BOUND_AT_LOAD, "now": api.VERSION, "pid": os.getpid()}})


app = Starlette(routes=[Route("/", index)])
"""


def inventory(sources: Path, version: str) -> bytes:
    directory = write_package(
        sources,
        "inventory",
        version,
        app=INVENTORY_APP,
        manifest_extra="exports = ['inventory.api']\n[canary]\nkey = 'header:x-user'\n",
        files={"inventory/api.py": f'VERSION = "{version}"\n'},
    )
    return zip_directory(directory, sources / f"inventory-{version}.zip").read_bytes()


def orders(sources: Path, version: str = "1.0") -> bytes:
    directory = write_package(
        sources,
        "orders",
        version,
        app=ORDERS_APP.format(version=version),
        manifest_extra='requires = { inventory = ">=1" }\n',
    )
    return zip_directory(directory, sources / f"orders-{version}.zip").read_bytes()


class Traffic:
    """Requests to /orders/ until stopped: (operations answered before it was sent, answer)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.answered = 0  # operations that have answered; set by the test
        self.answers: list[tuple[int, dict[str, object]]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.server.url, timeout=10, limits=limits) as client:
            for _ in range(LIMIT):
                if self.stop.is_set():
                    return
                answered = self.answered
                try:
                    response = client.get("/orders/")
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                        continue
                    self.answers.append((answered, response.json()))
                except (httpx.HTTPError, ValueError) as exc:
                    self.failures.append(repr(exc))


@contextmanager
def traffic(server: Server) -> Iterator[Traffic]:
    load = Traffic(server)
    load.thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        load.thread.join(timeout=30)


def deploy_set(server: Server, *archives: bytes) -> dict[str, object]:
    files = [("archive", (f"{i}.zip", data, "application/zip")) for i, data in enumerate(archives)]
    response = server.admin.post(server.url + "/_hotdeploy/packages", files=files, timeout=60)
    assert response.status_code == 201, response.text
    record: dict[str, object] = response.json()
    return record


def test_upgrades_rollbacks_and_sets_move_the_dependent_on_both_workers_under_load(
    tmp_path: Path, sources: Path
) -> None:
    with running_server(tmp_path, "uvicorn", WORKERS) as server:
        server.deployed(inventory(sources, "1.0"))
        server.deployed(orders(sources))
        workers = server.wait_for_workers("orders", "1.0")
        pids = {worker_pid(w) for w in workers}
        # After each operation: the (orders, inventory) pair every new request must get.
        pairs = [("1.0", "1.0")]
        with traffic(server) as load:
            for i in range(OPERATIONS // 2):
                record = server.deployed(inventory(sources, f"1.{i + 1}"))
                assert record["moved"] == ["orders 1.0"], record
                pairs.append(("1.0", f"1.{i + 1}"))
                load.answered += 1
                response = server.rollback("inventory")
                assert response.status_code == 200, response.text
                assert response.json()["moved"] == ["orders 1.0"]
                pairs.append(("1.0", "1.0"))
                load.answered += 1
            for i in range(SETS):
                version = f"2.{i}"
                record = deploy_set(server, orders(sources, version), inventory(sources, version))
                assert record["bundle"] == [f"inventory {version}", f"orders {version}"], record
                pairs.append((version, version))
                load.answered += 1
            after = len(load.answers)
            for _ in range(10_000):  # a few answers after the last operation, from both workers
                if {a["pid"] for _, a in load.answers[after:]} >= pids:
                    break
                load.stop.wait(0.01)
        assert load.failures == []
        assert len(load.answers) > OPERATIONS + SETS
        for answered, answer in load.answers:
            # One instance, one inventory: loaded and lazily imported alike.
            assert answer["loaded"] == answer["now"], answer
            pair = (answer["orders"], answer["now"])
            # A pair that some operation made (never orders 2.1 with inventory 2.0, say), and
            # sent after an operation answered: its pair or a later one's (the request may have
            # raced the next operation), never one from before it.
            assert pair in pairs[answered:], (answered, answer)
        last = {(a["orders"], a["now"]) for _, a in load.answers[after:]}
        assert last == {pairs[-1]}
        assert {a["pid"] for _, a in load.answers[after:]} >= pids


def test_a_canary_moves_the_dependent_with_it_on_both_workers(tmp_path: Path, sources: Path) -> None:
    with running_server(tmp_path, "uvicorn", WORKERS) as server:
        server.deployed(inventory(sources, "1.0"))
        server.deployed(orders(sources))
        workers = server.wait_for_workers("orders", "1.0")
        pids = {worker_pid(w) for w in workers}
        response = server.admin.post(
            server.url + "/_hotdeploy/packages?canary=50%25",  # until promoted or aborted
            content=inventory(sources, "2.0"),
            headers={"Content-Type": "application/zip"},
        )
        assert response.status_code == 202, response.text
        assert response.json()["moved"] == ["orders 1.0"]
        seen: dict[int, set[str]] = {pid: set() for pid in pids}
        limits = httpx.Limits(max_keepalive_connections=0)  # a new connection (and worker) each
        with httpx.Client(base_url=server.url, timeout=10, limits=limits) as client:
            for n in range(2_000):  # bounded: until both workers served both sides
                user = {"x-user": f"user-{n}"}
                direct = client.get("/inventory/", headers=user).json()
                through = client.get("/orders/", headers=user).json()
                # The same user gets one inventory, whichever worker answers either request.
                assert through["now"] == through["loaded"] == direct["inventory"], (n, direct, through)
                seen[through["pid"]].add(through["now"])
                if all(versions == {"1.0", "2.0"} for versions in seen.values()):
                    break
        assert all(versions == {"1.0", "2.0"} for versions in seen.values()), seen
        aborted = server.admin.post(server.url + "/_hotdeploy/packages/inventory/canary/abort")
        assert aborted.status_code == 202, aborted.text

        def everyone_on_1_0() -> bool | None:
            with httpx.Client(base_url=server.url, timeout=10, limits=limits) as client:
                answers = [client.get("/orders/", headers={"x-user": f"user-{n}"}).json() for n in range(40)]
            ok = {a["pid"] for a in answers} >= pids and {a["now"] for a in answers} == {"1.0"}
            return True if ok else None

        wait_for("every worker's orders back on inventory 1.0", everyone_on_1_0, timeout=20, interval=0.1)
