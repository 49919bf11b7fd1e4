"""Scenario 3: 200 swaps in a row, in-process, through the Deployer API.

    .venv/bin/python -m benchmarks.many_swaps [--swaps 200] [--app starlette|fastapi]

A small package is deployed in 200 distinct versions (1.1, 1.2, ...), one after the other, each
from its archive bytes (packed beforehand, as an upload would bring them), with a request
through HotDeployMiddleware after each swap to check that the new version answers. Measured:

- swap latency: from the `deploy()` call to its return (switched; no bake time), and to the
  end of its `switch` step;
- resident memory (VmRSS of this process, after `gc.collect()`) before the first measured swap
  and after the last one, once every replaced version drained (counted with the
  `hotdeploy_drained` hook);
- retired versions still alive: `deployer.retired_alive()` after the drains;
- full (generation 2) collections: each one's start and duration (`gc.callbacks`), who ran it
  (the engine's collector, the benchmark's own settling, or the automatic collector), and how
  many started inside a deploy (between the `deploy()` call and its return), and how many
  between the start of its load step and the end of its switch step (the part the engine's
  collector keeps out of).

`--freeze` does what a host may do after its startup: import fastapi/pydantic, collect, and
`gc.freeze()`, so that full collections no longer scan that heap. `--no-collector` leaves the
retired versions' garbage to the automatic collector, for comparison.

`--app fastapi` swaps a FastAPI package instead (30 routes in 3 routers, 17 pydantic models with
validators, generic `Page[T]` responses, dependencies, a security scheme), with 3 requests after
each swap; `--app starlette` (the default) is the one-route Starlette package.

A few warm-up swaps run before the baseline, so that what the first swaps import once (lazily
imported modules, caches) is not counted as growth.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette

from starlette_hotdeploy import Deployer, HotDeployMiddleware, PackageVersion, hookimpl, pack_directory
from starlette_hotdeploy._cleaners import Collector
from starlette_hotdeploy._types import Message

from .common import BenchmarkError, get_scope, latency_summary, machine, read_rss_kib, write_results
from .tiny_packages import write_package

NAME = "swapper"
APPS = ("starlette", "fastapi")

# The FastAPI package: {version} is replaced (doubled braces are literal ones).
FASTAPI_SUBAPP = """
import enum
from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from fastapi import APIRouter, BackgroundTasks, Body, Depends, FastAPI, Header, HTTPException, Path, Query
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPBearer, HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

VERSION = "{version}"
T = TypeVar("T")


class Status(str, enum.Enum):
    open = "open"
    closed = "closed"


class Tag(BaseModel):
    name: str = Field(min_length=1, max_length=40)


class Money(BaseModel):
    amount: float = Field(ge=0)
    currency: Literal["EUR", "USD", "CHF"] = "EUR"


class Address(BaseModel):
    street: str
    city: str
    zip_code: str = Field(pattern=r"^[0-9]{{4,5}}$")


class Customer(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)
    id: int
    name: str
    email: str
    address: Address | None = None

    @field_validator("email")
    @classmethod
    def has_at(cls, value: str) -> str:
        if "@" not in value:
            raise ValueError("not an e-mail address")
        return value


class ItemIn(BaseModel):
    name: str = Field(min_length=1)
    price: Money
    tags: list[Tag] = []
    status: Status = Status.open


class Item(ItemIn):
    id: int
    version: str = VERSION
    created: datetime | None = None


class OrderLine(BaseModel):
    item_id: int
    quantity: int = Field(gt=0)


class OrderIn(BaseModel):
    customer_id: int
    lines: list[OrderLine]

    @model_validator(mode="after")
    def not_empty(self) -> "OrderIn":
        if not self.lines:
            raise ValueError("an order has lines")
        return self


class Order(OrderIn):
    id: int
    total: Money
    status: Status


class Page(BaseModel, Generic[T]):
    items: list[T]
    limit: int
    offset: int
    total: int


class Paging(BaseModel):
    limit: int = Field(10, ge=1, le=100)
    offset: int = Field(0, ge=0)


class Problem(BaseModel):
    detail: str


class Stats(BaseModel):
    items: int
    orders: int
    by_status: dict[Status, int]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class Event(BaseModel):
    kind: str
    payload: dict[str, str | int | float] = {{}}


app = FastAPI(title="swapper", version=VERSION)
items = APIRouter(prefix="/items", tags=["items"])
orders = APIRouter(prefix="/orders", tags=["orders"])
customers = APIRouter(prefix="/customers", tags=["customers"])
bearer = HTTPBearer(auto_error=False)
_items: dict[int, Item] = {{}}
_orders: dict[int, Order] = {{}}
_customers: dict[int, Customer] = {{}}
_events: list[Event] = []


def paging(limit: int = Query(10, ge=1, le=100), offset: int = Query(0, ge=0)) -> Paging:
    return Paging(limit=limit, offset=offset)


async def user(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    return credentials.credentials if credentials else "anonymous"


def item_or_404(item_id: Annotated[int, Path(ge=1)]) -> Item:
    if item_id not in _items:
        return Item(id=item_id, name=f"item {{item_id}}", price=Money(amount=1.0))
    return _items[item_id]


def page_of(values: list[T], page: Paging) -> dict[str, object]:
    return {{"items": values[page.offset : page.offset + page.limit], "limit": page.limit,
             "offset": page.offset, "total": len(values)}}


@app.get("/hello", response_class=PlainTextResponse)
async def hello() -> str:
    return VERSION


@app.get("/health", response_model=Health)
def health() -> Health:
    return Health(version=VERSION)


@app.get("/stats", response_model=Stats)
async def stats() -> Stats:
    by_status = {{s: sum(1 for o in _orders.values() if o.status is s) for s in Status}}
    return Stats(items=len(_items), orders=len(_orders), by_status=by_status)


@items.get("", response_model=Page[Item])
async def list_items(page: Annotated[Paging, Depends(paging)], status: Status | None = None) -> dict[str, object]:
    values = [i for i in _items.values() if status is None or i.status is status]
    return page_of(values, page)


@items.post("", response_model=Item, status_code=201, responses={{422: {{"model": Problem}}}})
async def create_item(body: ItemIn, who: Annotated[str, Depends(user)], tasks: BackgroundTasks) -> Item:
    item = Item(id=len(_items) + 1, **body.model_dump())
    _items[item.id] = item
    tasks.add_task(_events.append, Event(kind="item created", payload={{"id": item.id, "by": who}}))
    return item


@items.get("/{{item_id}}", response_model=Item, responses={{404: {{"model": Problem}}}})
async def get_item(item: Annotated[Item, Depends(item_or_404)]) -> Item:
    return item


@items.put("/{{item_id}}", response_model=Item)
async def replace_item(item_id: Annotated[int, Path(ge=1)], body: ItemIn) -> Item:
    item = Item(id=item_id, **body.model_dump())
    _items[item_id] = item
    return item


@items.patch("/{{item_id}}/status", response_model=Item)
async def set_status(item: Annotated[Item, Depends(item_or_404)], status: Annotated[Status, Body(embed=True)]) -> Item:
    item.status = status
    return item


@items.delete("/{{item_id}}", status_code=204)
async def delete_item(item_id: int) -> None:
    _items.pop(item_id, None)


@items.get("/{{item_id}}/tags", response_model=list[Tag])
async def item_tags(item: Annotated[Item, Depends(item_or_404)]) -> list[Tag]:
    return item.tags


@items.post("/{{item_id}}/tags", response_model=list[Tag])
async def add_tag(item: Annotated[Item, Depends(item_or_404)], tag: Tag) -> list[Tag]:
    item.tags.append(tag)
    return item.tags


@items.get("/{{item_id}}/price", response_model=Money)
def item_price(item: Annotated[Item, Depends(item_or_404)], currency: Literal["EUR", "USD", "CHF"] = "EUR") -> Money:
    return Money(amount=item.price.amount, currency=currency)


@items.get("/search/by-name", response_model=list[Item])
async def search_items(q: Annotated[str, Query(min_length=1, max_length=50)]) -> list[Item]:
    return [i for i in _items.values() if q in i.name]


@customers.get("", response_model=Page[Customer])
async def list_customers(page: Annotated[Paging, Depends(paging)]) -> dict[str, object]:
    return page_of(list(_customers.values()), page)


@customers.post("", response_model=Customer, status_code=201)
async def create_customer(body: Customer) -> Customer:
    _customers[body.id] = body
    return body


@customers.get("/{{customer_id}}", response_model=Customer, responses={{404: {{"model": Problem}}}})
async def get_customer(customer_id: int) -> Customer:
    if customer_id not in _customers:
        raise HTTPException(404, f"no customer {{customer_id}}")
    return _customers[customer_id]


@customers.put("/{{customer_id}}/address", response_model=Customer)
async def set_address(customer_id: int, address: Address) -> Customer:
    customer = await get_customer(customer_id)
    customer.address = address
    return customer


@customers.get("/{{customer_id}}/orders", response_model=list[Order])
async def customer_orders(customer_id: int) -> list[Order]:
    return [o for o in _orders.values() if o.customer_id == customer_id]


@orders.get("", response_model=Page[Order])
async def list_orders(page: Annotated[Paging, Depends(paging)], status: Status | None = None) -> dict[str, object]:
    return page_of([o for o in _orders.values() if status is None or o.status is status], page)


@orders.post("", response_model=Order, status_code=201)
async def create_order(body: OrderIn, who: Annotated[str, Depends(user)]) -> Order:
    total = sum((item_or_404(line.item_id).price.amount * line.quantity for line in body.lines), 0.0)
    order = Order(id=len(_orders) + 1, total=Money(amount=total), status=Status.open, **body.model_dump())
    _orders[order.id] = order
    return order


@orders.get("/{{order_id}}", response_model=Order)
async def get_order(order_id: int) -> Order:
    if order_id not in _orders:
        raise HTTPException(404, f"no order {{order_id}}")
    return _orders[order_id]


@orders.post("/{{order_id}}/close", response_model=Order)
async def close_order(order_id: int) -> Order:
    order = await get_order(order_id)
    order.status = Status.closed
    return order


@orders.get("/{{order_id}}/lines", response_model=list[OrderLine])
async def order_lines(order_id: int) -> list[OrderLine]:
    return (await get_order(order_id)).lines


@orders.get("/{{order_id}}/total", response_model=Money)
async def order_total(order_id: int) -> Money:
    return (await get_order(order_id)).total


@app.get("/events", response_model=list[Event])
async def list_events(limit: int = 20) -> list[Event]:
    return _events[-limit:]


@app.post("/events", response_model=Event, status_code=201)
async def post_event(event: Event, x_source: Annotated[str | None, Header()] = None) -> Event:
    if x_source:
        event.payload["source"] = x_source
    _events.append(event)
    return event


@app.get("/me")
async def me(who: Annotated[str, Depends(user)]) -> dict[str, str]:
    return {{"user": who, "version": VERSION}}


@app.get("/echo/{{word}}")
def echo(word: str, times: Annotated[int, Query(ge=1, le=5)] = 1) -> dict[str, str]:
    return {{"echo": " ".join([word] * times)}}


@app.get("/version")
async def version() -> dict[str, str]:
    return {{"version": VERSION}}


app.include_router(items)
app.include_router(orders)
app.include_router(customers)
"""

# What is requested after each swap (the first answers the version).
PATHS = {"starlette": ["/hello"], "fastapi": ["/hello", "/items/3", "/items?limit=5"]}


def write_fastapi_package(parent: Path, name: str, version: str) -> Path:
    root = parent / f"{name}-{version}"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "app.py").write_text(textwrap.dedent(FASTAPI_SUBAPP).format(version=version))
    (root / "hotdeploy.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\napp = "{name}.app:app"\nmount = "/{name}"\n'
    )
    return root


class FullCollections:
    """Records every generation-2 collection (`gc.callbacks`): when it started, how long it took
    and who ran it, to be compared with the deploy intervals."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._started: float | None = None
        self._wall = 0.0
        self._by: str = ""

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            self._wall = time.time()  # the records' clock
            caller = sys._getframe(1).f_code
            if caller is Collector.collect.__code__:
                self._by = "collector"
            elif caller is settled_rss_kib.__code__:
                self._by = "benchmark"
            else:
                self._by = (
                    "retired_alive" if caller.co_name in ("retired_alive", "collected") else "automatic"
                )
        elif self._started is not None:
            ended = time.perf_counter()
            self.seen.append(
                {
                    "at": self._started,
                    "wall": self._wall,
                    "ms": (ended - self._started) * 1000,
                    "by": self._by,
                }
            )
            self._started = None

    def summary(
        self, deploys: list[tuple[float, float]], critical: list[tuple[float, float]], since: float
    ) -> dict[str, Any]:
        """`deploys`: (call, return) in perf_counter seconds; `critical`: from the start of the
        load step to the end of the switch step, in the records' wall clock."""
        measured = [c for c in self.seen if c["at"] >= since]
        inside = [c for c in measured if any(start <= c["at"] <= end for start, end in deploys)]
        critical_hits = [c for c in measured if any(start <= c["wall"] <= end for start, end in critical)]
        durations = sorted(c["ms"] for c in measured)
        by: dict[str, int] = {}
        for c in measured:
            by[c["by"]] = by.get(c["by"], 0) + 1
        return {
            "full_collections": len(measured),
            "by": by,
            "inside_deploys": len(inside),
            "inside_deploys_by": sorted({c["by"] for c in inside}),
            "inside_deploys_ms": [round(c["ms"], 2) for c in inside],
            "inside_load_to_switch": len(critical_hits),
            "inside_load_to_switch_by": sorted({c["by"] for c in critical_hits}),
            "p50_ms": round(durations[len(durations) // 2], 2) if durations else None,
            "max_ms": round(durations[-1], 2) if durations else None,
        }


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
    path, _, query = path.partition("?")
    scope = get_scope(path)
    scope["query_string"] = query.encode()
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


async def swap(
    deployer: Deployer, app: Any, archive: bytes, version: str, paths: list[str] | None = None
) -> dict[str, float]:
    """Deploy one version and check it answers; its latencies in milliseconds, the deploy's
    interval (`started`, `ended`: perf_counter seconds) and from its load to its switch
    (`load_at`, `switched_at`: the record's wall clock)."""
    started = time.perf_counter()
    record = await deployer.deploy(archive)
    ended = time.perf_counter()
    call_ms = (ended - started) * 1000
    switch = next(s for s in record.steps if s.name == "switch")
    load = next(s for s in record.steps if s.name == "load")
    switched_ms = (switch.started_at - record.started_at) * 1000 + (switch.duration_ms or 0.0)
    switched_at = switch.started_at + (switch.duration_ms or 0.0) / 1000
    first, *others = paths or ["/hello"]
    status, body = await get(app, f"/{NAME}{first}")
    if status != 200 or body.decode() != version:
        raise BenchmarkError(f"after deploying {version}: {status} {body!r}")
    for path in others:
        status, body = await get(app, f"/{NAME}{path}")
        if status != 200:
            raise BenchmarkError(f"after deploying {version}: GET {path}: {status} {body[:200]!r}")
    return {
        "call_ms": call_ms,
        "switched_ms": switched_ms,
        "started": started,
        "ended": ended,
        "load_at": load.started_at,
        "switched_at": switched_at,
    }


def freeze_startup_heap(app_kind: str) -> None:
    """What a host may do at the end of its startup: import what its packages use, collect, and
    `gc.freeze()` the heap, so that full collections no longer scan it (never a package's
    version: frozen objects are never collected)."""
    if app_kind == "fastapi":
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
    gc.collect()
    gc.freeze()


async def run(
    swaps: int = 200,
    warmup: int = 5,
    drain_timeout: float = 60.0,
    app_kind: str = "starlette",
    freeze: bool = False,
    collector: bool = True,
) -> dict[str, Any]:
    """Deploy `warmup + swaps + 1` distinct versions; measure the last `swaps` swaps."""
    if app_kind not in APPS:
        raise BenchmarkError(f"unknown --app {app_kind!r}: one of {', '.join(APPS)}")
    if freeze:
        freeze_startup_heap(app_kind)
    try:
        return await _run(swaps, warmup, drain_timeout, app_kind, freeze, collector)
    finally:
        if freeze:
            gc.unfreeze()


async def _run(
    swaps: int, warmup: int, drain_timeout: float, app_kind: str, freeze: bool, collector: bool
) -> dict[str, Any]:
    writer = write_fastapi_package if app_kind == "fastapi" else write_package
    paths = PATHS[app_kind]
    counter = DrainCounter()
    with tempfile.TemporaryDirectory(prefix="bench-swaps-") as tmp, FullCollections() as collections:
        versions = [f"1.{i}" for i in range(warmup + swaps + 1)]
        archives = [pack_directory(writer(Path(tmp) / "src", NAME, v)).data for v in versions]
        deployer = Deployer(home=Path(tmp) / "home", entry_points=False, plugins=[counter])
        if not collector:  # for comparison: the garbage is left to the automatic collector
            deployer._engine._schedule_collection = lambda: None  # type: ignore[method-assign]
        app = Starlette()
        app.add_middleware(HotDeployMiddleware, deployer=deployer)
        async with deployer.running():
            for archive, version in zip(archives[: warmup + 1], versions[: warmup + 1], strict=True):
                await swap(deployer, app, archive, version, paths)
            await wait_for_drains(counter, warmup, drain_timeout)
            rss_before = settled_rss_kib()
            measured_from = time.perf_counter()
            modules_before = len(sys.modules)
            timings: list[dict[str, float]] = []
            rss_curve: list[int] = []
            for archive, version in zip(archives[warmup + 1 :], versions[warmup + 1 :], strict=True):
                timings.append(await swap(deployer, app, archive, version, paths))
                rss_curve.append(read_rss_kib())
            drain_wait_s = await wait_for_drains(counter, warmup + swaps, drain_timeout)
            with anyio.fail_after(drain_timeout):
                await deployer._engine.collector.wait()
            rss_after = settled_rss_kib()
            alive = deployer.retired_alive()
            modules_after = len(sys.modules)
            loaded = [v.version for p in deployer.status() for v in p.versions]
            deploys = [(t["started"], t["ended"]) for t in timings]
            critical = [(t["load_at"], t["switched_at"]) for t in timings]
            full = collections.summary(deploys, critical, measured_from)
    calls = [t["call_ms"] / 1000 for t in timings]
    switches = [t["switched_ms"] / 1000 for t in timings]
    return {
        "app": app_kind,
        "startup_heap_frozen": freeze,
        "collector": collector,
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
        "gc": {**full, "thresholds": list(gc.get_threshold()), "frozen": gc.get_freeze_count()},
    }


def table(result: dict[str, Any]) -> str:
    latency, rss, full = result["swap_latency"], result["rss_kib"], result["gc"]
    return "\n".join(
        [
            f"{result['app']} package{' (startup heap frozen)' if result['startup_heap_frozen'] else ''}"
            f"{'' if result['collector'] else ' (no collector: automatic gc only)'}, "
            f"swaps: {result['swaps']} (after {result['warmup_swaps']} warm-up swaps)",
            f"swap latency (deploy call -> switched): p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms, "
            f"max {latency['max_ms']} ms, mean {latency['mean_ms']} ms",
            f"RSS: {rss['before'] / 1024:.1f} MiB -> {rss['after'] / 1024:.1f} MiB "
            f"(growth {rss['growth'] / 1024:.2f} MiB)",
            f"retired versions alive after the drains: {len(result['retired_alive'])} {result['retired_alive']}",
            f"sys.modules: {result['modules']['before']} -> {result['modules']['after']}",
            f"full collections: {full['full_collections']} {full['by']}, p50 {full['p50_ms']} ms, "
            f"max {full['max_ms']} ms; inside a deploy: {full['inside_deploys']} {full['inside_deploys_by']}, "
            f"between its load and its switch: {full['inside_load_to_switch']} {full['inside_load_to_switch_by']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--swaps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--app", choices=APPS, default="starlette", help="the package swapped")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() the heap before the first deploy")
    parser.add_argument("--no-collector", action="store_true", help="leave the garbage to the automatic gc")
    parser.add_argument("--name", help="results file name (default many_swaps, many_swaps_fastapi)")
    args = parser.parse_args(argv)
    result = anyio.run(run, args.swaps, args.warmup, 60.0, args.app, args.freeze, not args.no_collector)
    print(table(result))
    name = args.name or ("many_swaps" if args.app == "starlette" else f"many_swaps_{args.app}")
    print(f"written: {write_results(name, {'machine': machine(), 'result': result})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
