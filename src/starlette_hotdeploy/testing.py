"""Test your packages the way starlette-hotdeploy tests its own: deployed into a real server.

A pytest plugin, registered through the `pytest11` entry point (installing starlette-hotdeploy
with the `cli` extra is enough; nothing to add to `conftest.py`):

```python
def test_orders_answer(hotdeploy_server):
    hotdeploy_server.deploy("packages/orders-1.0")
    with hotdeploy_server.client("orders") as client:
        assert client.get("/items/1").status_code == 200


def test_orders_upgrade_drops_nothing(hotdeploy_server):
    report = hotdeploy_server.upgrade("packages/orders-1.0", "packages/orders-2.0", path="/items/1")
    assert report.versions_seen == {"1.0", "2.0"}   # if its answers name their version
```

`hotdeploy_server` is a real uvicorn on 127.0.0.1 (a free port, in a background thread) serving
`hotdeploy_host_app` (none by default: an empty Starlette app) behind `HotDeployMiddleware`,
with its home in the test's `tmp_path`. Override `hotdeploy_host_app` in your `conftest.py` to
serve your own app beside the packages, as production does.

`HotDeployServer` is the same thing without pytest: `with HotDeployServer(home) as server: ...`.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ._archive import Source, pack_directory, read_source
from ._dispatch import HotDeployMiddleware
from ._types import ASGIApp

if TYPE_CHECKING:
    import httpx
    import uvicorn

    from ._client import AdminClient

__all__ = ["HotDeployServer", "UpgradeFailed", "UpgradeReport"]

START_TIMEOUT = 30.0


class UpgradeFailed(AssertionError):
    """Requests failed while a package was upgraded under traffic; `.report` says which."""

    def __init__(self, report: UpgradeReport) -> None:
        self.report = report
        super().__init__(report.summary())


@dataclass
class UpgradeReport:
    """What the traffic saw during `HotDeployServer.upgrade`."""

    path: str
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)  # from JSON answers with a "version"
    failures: list[str] = field(default_factory=list)  # the first 20 failures, described
    failed: int = 0
    deployment: dict[str, Any] = field(default_factory=dict)  # the upgrade's record

    @property
    def versions_seen(self) -> set[str]:
        return set(self.versions)

    def summary(self) -> str:
        lines = [
            f"{self.failed} of {self.requests} requests to {self.path} failed during the upgrade "
            f"(statuses {dict(sorted(self.statuses.items()))})"
        ]
        lines += [f"  {failure}" for failure in self.failures]
        return "\n".join(lines)


class HotDeployServer:
    """A real uvicorn serving `host_app` behind HotDeployMiddleware, its admin API on, in a
    background thread of this process.

    `home`: the deployer's home (a fresh directory per server, normally). `admin_read_token`:
    a read-only token beside the admin token (`.token`). `deployer_options`: keyword arguments
    for its `Deployer` (`bake_time`, `plugins`, ...)."""

    def __init__(
        self,
        home: str | Path,
        host_app: ASGIApp | None = None,
        *,
        admin_prefix: str = "/_hotdeploy",
        admin_read_token: str | None = None,
        deployer_options: dict[str, Any] | None = None,
    ) -> None:
        from ._deployer import Deployer

        self.home = Path(home)
        self.token = secrets.token_urlsafe(16)
        self.admin_prefix = admin_prefix
        options = {"entry_points": False, **(deployer_options or {})}
        self.deployer = Deployer(home=self.home, **options)
        self.app = HotDeployMiddleware(
            host_app if host_app is not None else _empty_host(),
            deployer=self.deployer,
            admin_token=self.token,
            admin_read_token=admin_read_token,
            admin_prefix=admin_prefix,
        )
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._admin: AdminClient | None = None

    # -- running ----------------------------------------------------------------------------

    def start(self) -> HotDeployServer:
        import uvicorn

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        config = uvicorn.Config(self.app, lifespan="on", log_level="warning", access_log=False)
        server = self._server = uvicorn.Server(config)

        def serve() -> None:
            try:
                server.run(sockets=[listener])
            except BaseException as exc:  # reported by start(), or by stop()
                self._failure = exc
            finally:
                listener.close()

        self._thread = threading.Thread(target=serve, name="hotdeploy test server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                exited = not self._thread.is_alive()
                self.stop()
                why = self._failure or (
                    "uvicorn exited during startup (its log above says why: a lifespan startup failure?)"
                    if exited
                    else f"not serving after {START_TIMEOUT:g}s"
                )
                raise RuntimeError(f"the test server did not start: {why}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Shut the server down (its packages' lifespans end) and wait for it."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(START_TIMEOUT)
            self._thread = None

    def __enter__(self) -> HotDeployServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- using it ---------------------------------------------------------------------------

    @property
    def admin(self) -> AdminClient:
        """An `AdminClient` with the server's admin token."""
        if self._admin is None:
            from ._client import AdminClient

            self._admin = AdminClient(self.url, self.token, prefix=self.admin_prefix)
        return self._admin

    def deploy(self, source: Source) -> dict[str, Any]:
        """Deploy a package directory, a .zip or .whl path, or archive bytes; the deployment's
        record once it succeeded (`AdminProblem`, naming the cause, if it failed)."""
        return self.admin.upload(read_source(source, self.deployer.limits))

    def mount(self, package: str) -> str:
        return str(self.admin.package(package)["mount"])

    def client(self, package: str | None = None, **options: Any) -> httpx.Client:
        """An httpx client for the server, or for a package's mount (`client.get("/")` is the
        package's root). Close it (use `with`)."""
        import httpx

        base = self.url + (self.mount(package).rstrip("/") if package is not None else "")
        options.setdefault("timeout", 30)
        return httpx.Client(base_url=base, **options)

    def upgrade(
        self,
        previous: Source | None,
        to: Source,
        *,
        path: str = "/",
        package: str | None = None,
        clients: int = 4,
        after: int = 20,
        ok: Callable[[httpx.Response], bool] | None = None,
    ) -> UpgradeReport:
        """Deploy `previous` (unless None: the package is already deployed), then deploy `to`
        while `clients` threads request `path` under the package's mount, and go on until each
        of them sent `after` more requests once the upgrade answered. Raises `UpgradeFailed`
        if any request failed (by default: an error, or a status of 400 or more), and returns
        the report otherwise."""
        archive = read_source(to, self.deployer.limits)
        if previous is not None:
            package = package or self.deploy(previous)["package"]
        if package is None:
            package = _name_of(to)
        report = UpgradeReport(path=path)
        with Traffic(self.url + self.mount(package).rstrip("/") + path, clients, ok, report) as traffic:
            traffic.wait_started()
            report.deployment = self.admin.upload(archive)
            traffic.finish_after(after)
        if report.failed:
            raise UpgradeFailed(report)
        return report


class Traffic:
    """`clients` threads, each with its own keep-alive connection, requesting `url` until told
    to stop (bounded: at most 100,000 requests each)."""

    def __init__(
        self, url: str, clients: int, ok: Callable[[httpx.Response], bool] | None, report: UpgradeReport
    ) -> None:
        self.url = url
        self.ok = ok or (lambda response: response.status_code < 400)
        self.report = report
        self._lock = threading.Lock()
        self._started = threading.Barrier(clients + 1)
        self._stop_after: int | None = None  # requests each client still sends, once set
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stop_after is None:
            self._stop_after = 0
        for thread in self._threads:
            thread.join(120)

    def wait_started(self) -> None:
        """Until every client answered its first request."""
        self._started.wait(START_TIMEOUT)

    def finish_after(self, count: int) -> None:
        self._stop_after = count

    def _run(self) -> None:
        import httpx

        first = True
        remaining: int | None = None
        with httpx.Client(timeout=30) as client:
            for _ in range(100_000):
                self._one(client)
                if first:
                    first = False
                    self._started.wait(START_TIMEOUT)
                if remaining is None and self._stop_after is not None:
                    remaining = self._stop_after
                if remaining is not None:
                    if remaining <= 0:
                        return
                    remaining -= 1

    def _one(self, client: httpx.Client) -> None:
        import httpx

        report = self.report
        try:
            response = client.get(self.url)
        except httpx.HTTPError as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        version = _version_in(response)
        with self._lock:
            report.requests += 1
            report.statuses[response.status_code] += 1
            if version is not None:
                report.versions[version] += 1
        if not self.ok(response):
            self._failed(f"{response.status_code}: {response.text[:200]}", counted=True)

    def _failed(self, what: str, counted: bool = False) -> None:
        with self._lock:
            report = self.report
            if not counted:
                report.requests += 1
            report.failed += 1
            if len(report.failures) < 20:
                report.failures.append(what)


def _version_in(response: httpx.Response) -> str | None:
    if not response.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    version = body.get("version") if isinstance(body, dict) else None
    return str(version) if version is not None else None


def _name_of(source: Source) -> str:
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return pack_directory(Path(source)).manifest.name
    raise ValueError("upgrade(None, archive): name the package (package=...), or pass `previous`")


def _empty_host() -> ASGIApp:
    from starlette.applications import Starlette

    return Starlette()


# -- the pytest plugin ------------------------------------------------------------------------


@pytest.fixture
def hotdeploy_host_app() -> ASGIApp | None:
    """The host app the packages sit beside (None: an empty Starlette app). Override it in your
    conftest.py to return your own app."""
    return None


@pytest.fixture
def hotdeploy_server(tmp_path: Path, hotdeploy_host_app: ASGIApp | None) -> Iterator[HotDeployServer]:
    """A real uvicorn with starlette-hotdeploy in front of `hotdeploy_host_app`, its home under
    `tmp_path`; stopped (its packages shut down) after the test."""
    with HotDeployServer(tmp_path / "hotdeploy-home", hotdeploy_host_app) as server:
        yield server
