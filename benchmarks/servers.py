"""The four ways to upgrade greeter 1.0 -> 2.0 in a running server, each behind one interface:
`start()` serves 1.0 and waits until every worker is up, `upgrade()` runs the upgrade command
and returns when that command returns, `stop()` kills the process group.

- `HotDeploy`: `uvicorn --factory starlette_hotdeploy._serve:create_host_app --workers N`
  (what `hotdeploy serve --workers N` runs); the upgrade uploads greeter-2.0's archive to the
  admin API, which answers once every worker serves 2.0.
- `UvicornHup`: `uvicorn --workers N` with `restart_host.py`; the upgrade swaps the greeter
  symlink to 2.0 and sends SIGHUP (uvicorn >= 0.51 replaces the workers one by one).
- `GunicornHup`: gunicorn with uvicorn workers and the same host app; symlink swap + SIGHUP.
- `UvicornRestart`: one uvicorn process; symlink swap, SIGTERM, wait for the exit, start again.

Every server listens on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from starlette_hotdeploy import pack_directory

from .common import EXAMPLE_PACKAGES, BenchmarkError, ServerProcess, free_port, wait_until
from .restart_host import GREETER_DIR_ENV

START_TIMEOUT = 60.0


@dataclass
class UpgradeCommand:
    """When the upgrade command started and returned (time.monotonic()), and what it said."""

    started: float
    returned: float
    detail: dict[str, Any] = field(default_factory=dict)


def uvicorn_worker_class() -> str:
    """The `uvicorn-worker` package's worker class, else uvicorn's deprecated one."""
    if importlib.util.find_spec("uvicorn_worker") is not None:
        return "uvicorn_worker.UvicornWorker"
    return "uvicorn.workers.UvicornWorker"


def uvicorn_command(target: str, port: int, workers: int | None, *, factory: bool = True) -> list[str]:
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log"]
    if factory:
        command.append("--factory")
    if workers is not None:
        command += ["--workers", str(workers)]
    return command


class Method:
    """A server and its way to be upgraded from greeter 1.0 to 2.0."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""

    def __init__(self, workdir: Path, workers: int) -> None:
        self.workdir = workdir
        self.workers = workers
        self.port = 0
        self.server: ServerProcess | None = None
        self.client = httpx.Client(timeout=10)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        raise NotImplementedError

    def upgrade(self) -> UpgradeCommand:
        raise NotImplementedError

    def stop(self) -> None:
        if self.server is not None:
            self.server.kill()
        self.client.close()

    def log_tail(self) -> str:
        return self.server.log_tail() if self.server is not None else ""

    # -- helpers ------------------------------------------------------------------------------------

    def _launch(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.server = ServerProcess(command, self.workdir / f"{self.name}.log", env=env or {})
        self.server.start()

    def _get(self, path: str, *, new_connection: bool = False) -> httpx.Response | None:
        """GET path, or None when the server does not answer (yet)."""
        if self.server is not None and not self.server.alive():
            raise BenchmarkError(f"{self.name}: the server exited:\n{self.log_tail()}")
        try:
            if new_connection:
                return httpx.get(self.url(path), timeout=2)
            return self.client.get(self.url(path))
        except httpx.HTTPError:
            return None

    def _greeter_version(self) -> str | None:
        response = self._get("/greeter/", new_connection=True)
        if response is None or response.status_code != 200:
            return None
        return str(response.json()["version"])


class HotDeploy(Method):
    name = "hotdeploy"
    label = "hot deployment (admin API)"

    def __init__(self, workdir: Path, workers: int) -> None:
        super().__init__(workdir, workers)
        self.token = secrets.token_urlsafe(16)
        self.client.headers["Authorization"] = f"Bearer {self.token}"

    def start(self) -> None:
        self.port = free_port()
        env = {"HOTDEPLOY_HOME": str(self.workdir / "home"), "HOTDEPLOY_ADMIN_TOKEN": self.token}
        target = "starlette_hotdeploy._serve:create_host_app"
        self._launch(uvicorn_command(target, self.port, self.workers), env)
        wait_until("the host app to answer GET /", lambda: self._ok("/"), START_TIMEOUT)
        response = self._deploy("greeter-1.0")
        if response.status_code != 201:
            raise BenchmarkError(f"deploying greeter 1.0 answered {response.status_code}: {response.text}")
        wait_until(f"{self.workers} workers serving greeter 1.0", self._all_workers_on_1, START_TIMEOUT)

    def upgrade(self) -> UpgradeCommand:
        archive = pack_directory(EXAMPLE_PACKAGES / "greeter-2.0").data  # packed before the clock starts
        started = time.monotonic()
        response = self._post_archive(archive)
        returned = time.monotonic()
        detail: dict[str, Any] = {"command": "POST /_hotdeploy/packages", "status": response.status_code}
        body = response.json()
        detail["deployment_ms"] = body.get("duration_ms")
        detail["steps"] = {s["name"]: s["duration_ms"] for s in body.get("steps", [])}
        if response.status_code != 201:
            detail["problem"] = body.get("detail")
        return UpgradeCommand(started, returned, detail)

    def _ok(self, path: str) -> bool | None:
        response = self._get(path)
        return True if response is not None and response.status_code == 200 else None

    def _deploy(self, package: str) -> httpx.Response:
        archive = pack_directory(EXAMPLE_PACKAGES / package).data
        return self._post_archive(archive)

    def _post_archive(self, archive: bytes) -> httpx.Response:
        return self.client.post(
            self.url("/_hotdeploy/packages"),
            content=archive,
            headers={"Content-Type": "application/zip"},
            timeout=120,
        )

    def _all_workers_on_1(self) -> bool | None:
        response = self._get("/_hotdeploy/packages/greeter")
        if response is None or response.status_code != 200:
            return None
        workers: dict[str, str] = response.json().get("workers", {})
        return True if len(workers) == self.workers and set(workers.values()) == {"1.0"} else None


class RestartMethod(Method):
    """Methods that restart worker processes after the greeter symlink was swapped to 2.0."""

    def __init__(self, workdir: Path, workers: int) -> None:
        super().__init__(workdir, workers)
        self.link = workdir / "greeter-current"
        self.env = {GREETER_DIR_ENV: str(self.link)}

    def point_to(self, package: str) -> None:
        """Swap the symlink atomically (a new link renamed over the old one)."""
        staged = self.link.with_name(self.link.name + ".new")
        staged.unlink(missing_ok=True)
        staged.symlink_to(EXAMPLE_PACKAGES / package)
        os.replace(staged, self.link)

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.point_to("greeter-1.0")
        self.port = free_port()
        self._launch(self.command(), self.env)
        self._wait_ready()

    def _wait_ready(self) -> None:
        wait_until("greeter 1.0 to answer", lambda: True if self._greeter_version() else None, START_TIMEOUT)
        pids: set[str] = set()

        def all_workers() -> bool | None:
            response = self._get("/_pid", new_connection=True)
            if response is not None and response.status_code == 200:
                pids.add(response.text)
            return True if len(pids) >= self.workers else None

        wait_until(f"{self.workers} worker processes", all_workers, START_TIMEOUT, interval=0.01)

    def upgrade(self) -> UpgradeCommand:
        assert self.server is not None
        started = time.monotonic()
        self.point_to("greeter-2.0")
        self.server.signal(signal.SIGHUP)
        return UpgradeCommand(started, time.monotonic(), {"command": "symlink swap + kill -HUP"})


class UvicornHup(RestartMethod):
    name = "uvicorn-hup"
    label = "uvicorn --workers N, SIGHUP"

    def command(self) -> list[str]:
        return uvicorn_command("benchmarks.restart_host:create_app", self.port, self.workers)


class GunicornHup(RestartMethod):
    name = "gunicorn-hup"
    label = "gunicorn + uvicorn workers, SIGHUP"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(self.workers),
            "--worker-class",
            uvicorn_worker_class(),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "warning",
            "benchmarks.restart_host:create_app()",
        ]


class UvicornRestart(RestartMethod):
    name = "uvicorn-restart"
    label = "single uvicorn, stop + start"

    def __init__(self, workdir: Path, workers: int) -> None:
        super().__init__(workdir, 1)  # one process by definition

    def command(self) -> list[str]:
        return uvicorn_command("benchmarks.restart_host:create_app", self.port, None)

    def upgrade(self) -> UpgradeCommand:
        assert self.server is not None
        started = time.monotonic()
        self.point_to("greeter-2.0")
        self.server.signal(signal.SIGTERM)
        code = self.server.wait(timeout=30)
        stopped = time.monotonic()
        self.server.kill()  # anything left of its group
        self._launch(self.command(), self.env)
        wait_until("the restarted uvicorn to answer", lambda: self._greeter_version(), START_TIMEOUT, 0.01)
        returned = time.monotonic()
        detail: dict[str, Any] = {"command": "symlink swap + SIGTERM + start", "exit_code": code}
        detail["stop_s"] = round(stopped - started, 3)
        return UpgradeCommand(started, returned, detail)


METHODS: dict[str, type[Method]] = {m.name: m for m in (HotDeploy, UvicornHup, GunicornHup, UvicornRestart)}
