"""Real multi-worker servers for test_workers.py: a uvicorn (`--workers N`) or gunicorn (uvicorn
workers) subprocess serving `create_host_app` on a shared home, and the test packages they host.

Every server runs in its own session (process group), so `kill()` reaches the supervisor and
all its workers with one `os.killpg`. Every wait here is bounded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from packages import write_package, zip_directory
from starlette_hotdeploy._store import Store
from starlette_hotdeploy._store_url import open_store

TESTS = Path(__file__).resolve().parent
T = TypeVar("T")

# A package app that says which version and which worker process answered.
APP = """
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

VERSION = "{version}"


async def index(request):
    return JSONResponse({{"name": "{name}", "version": VERSION, "pid": os.getpid()}})


app = Starlette(routes=[Route("/", index)])
"""

# The package's own hooks module: a check that fails, or pauses until released, in the worker
# processes the test names with marker files in $MARKER_DIR. Async, so a paused check does not
# block the worker's event loop (its heartbeats go on).
CHECKS = """
import os
import time
from pathlib import Path

import anyio

from starlette_hotdeploy import hookimpl

MARKERS = Path(os.environ["MARKER_DIR"])


@hookimpl
async def hotdeploy_check_before_activate(version):
    pid = os.getpid()
    if (MARKERS / f"fail-{pid}").exists():
        return f"refusing in pid {pid}"
    if (MARKERS / f"pause-{pid}").exists() or (MARKERS / "pause-all").exists():
        (MARKERS / f"paused-{pid}").touch()
        deadline = time.monotonic() + 8  # under the deployer's 10 s check timeout
        while not (MARKERS / "release").exists():
            if time.monotonic() > deadline:
                return f"pid {pid} was never released"
            await anyio.sleep(0.02)
    return None


@hookimpl
async def hotdeploy_check_after_activate(version, previous):
    # Runs in every worker after the switch, while the coordinator bakes the change.
    pid = os.getpid()
    if (MARKERS / f"fail-after-{pid}").exists():
        return f"post-activation check refusing in pid {pid}"
    if (MARKERS / "pause-after-all").exists():
        (MARKERS / f"paused-after-{pid}").touch()
        deadline = time.monotonic() + 8
        while not (MARKERS / "release").exists() and time.monotonic() < deadline:
            await anyio.sleep(0.02)
    return None
"""


# A gunicorn config file for `--preload` servers: its `when_ready` hook runs in the master, after
# the preload imported the app and called the factory and before any worker is forked, and
# writes down what the master holds then (see Server.master_facts).
GUNICORN_CONFIG = """
import json
import os
import sys
from pathlib import Path


def when_ready(server):
    app = server.app.callable
    deployers = [m.kwargs["deployer"] for m in getattr(app, "user_middleware", []) if "deployer" in m.kwargs]
    home = Path(os.environ["HOTDEPLOY_HOME"])
    facts = {
        "pid": os.getpid(),
        "app_loaded": app is not None,
        "modules": sorted(m for m in sys.modules if m.startswith("starlette_hotdeploy")),
        "deployers": [
            {"running": d.is_running, "store_opened": d._store is not None} for d in deployers
        ],
        "home_exists": home.exists(),
    }
    Path(os.environ["MARKER_DIR"], "master.json").write_text(json.dumps(facts))
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Call `probe` until it returns something other than None (at most `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def build_package(sources: Path, name: str, version: str, *, checks: bool = False) -> bytes:
    """The archive of a test package (with the marker-driven check hooks if `checks`)."""
    directory = write_package(
        sources,
        name,
        version,
        app=APP.format(name=name, version=version),
        manifest_extra=f'hooks = "{name}.checks"\n' if checks else "",
        files={f"{name}/checks.py": CHECKS} if checks else None,
    )
    return zip_directory(directory, sources / f"{name}-{version}.zip").read_bytes()


def worker_pid(worker_id: str) -> int:
    """The pid in a worker id ("host:pid:random")."""
    return int(worker_id.rsplit(":", 2)[1])


def child_pids(pid: int) -> set[int]:
    """The live children of process `pid` (from /proc: Linux only)."""
    children: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rpartition(b")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != b"Z":
            children.add(int(stat.parent.name))
    return children


def open_files_under(pid: int, directory: Path) -> list[str]:
    """The files under `directory` that process `pid` holds open (from /proc: Linux only)."""
    found = []
    directory = directory.resolve()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(OSError):
            target = os.readlink(fd)
            if Path(target).is_relative_to(directory):
                found.append(target)
    return found


def uvicorn_worker_class() -> str:
    if importlib.util.find_spec("uvicorn_worker") is not None:
        return "uvicorn_worker.UvicornWorker"
    return "uvicorn.workers.UvicornWorker"  # deprecated in uvicorn, still shipped


class Server:
    """A multi-worker server subprocess on 127.0.0.1 and a free port, serving the host app on
    `home`. Start it again (after `kill()` or `stop()`) on the same home to test restarts.

    `preload` (gunicorn only): `--preload`, the master imports the app and calls the factory
    before it forks the workers. `env`: more environment variables for the server. `store` and
    `host_id`: one host of a cluster, its state in that database (`$HOTDEPLOY_STORE`), its
    workers' ids starting with `host_id` (`$HOTDEPLOY_HOST_ID`)."""

    def __init__(
        self,
        tmp_path: Path,
        kind: str = "uvicorn",
        workers: int = 3,
        *,
        preload: bool = False,
        env: dict[str, str] | None = None,
        store: str | None = None,
        host_id: str | None = None,
    ) -> None:
        assert kind == "gunicorn" or not preload, "only gunicorn preloads"
        self.extra_env = dict(env or {})
        self.store_url = store
        self.host_id = host_id
        if store is not None:
            self.extra_env["HOTDEPLOY_STORE"] = store
        if host_id is not None:
            self.extra_env["HOTDEPLOY_HOST_ID"] = host_id
        self.kind = kind
        self.workers = workers
        self.preload = preload
        self.home = tmp_path / "home"
        self.markers = tmp_path / "markers"
        self.markers.mkdir(parents=True, exist_ok=True)
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        self.cwd = tmp_path
        self.token = "workers-token-" + os.urandom(8).hex()
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        # A new connection for each admin request: any worker may coordinate, and an idle
        # connection the server closes (keep-alive timeout) is never reused.
        self.admin = httpx.Client(
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.logs / f"server-{self.starts}.log"

    def log(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def command(self) -> list[str]:
        if self.kind == "uvicorn":
            return [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "starlette_hotdeploy._serve:create_host_app",
                "--workers",
                str(self.workers),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ]
        assert self.kind == "gunicorn"
        preload = ["--preload", "--config", str(self.gunicorn_config())] if self.preload else []
        return [
            sys.executable,
            "-m",
            "gunicorn",
            *preload,
            "--workers",
            str(self.workers),
            "--worker-class",
            uvicorn_worker_class(),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "warning",
            "starlette_hotdeploy._serve:create_host_app()",
        ]

    def gunicorn_config(self) -> Path:
        path = self.cwd / "gunicorn_preload.conf.py"
        path.write_text(GUNICORN_CONFIG)
        return path

    def master_facts(self) -> dict[str, Any]:
        """What the `--preload` master held before it forked (written by GUNICORN_CONFIG)."""
        assert self.preload
        facts: dict[str, Any] = json.loads((self.markers / "master.json").read_text())
        return facts

    def worker_pids(self) -> set[int]:
        """The pids of gunicorn's worker processes: the children of its master (the subprocess
        itself). Not for uvicorn, whose supervisor may have other children."""
        assert self.kind == "gunicorn"
        assert self.process is not None
        return child_pids(self.process.pid)

    def start(self) -> None:
        """Start it (on a new free port); wait until GET / answers and every worker registered
        in the store. A worker registers once its start-up cleaning of the home is done: a
        deployment unpacked during that cleaning may lose files (see
        test_workers.test_a_starting_worker_leaves_unpacks_alone)."""
        assert self.process is None, "already running"
        started = time.time()
        self.port = free_port()
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTDEPLOY_")}
        env["HOTDEPLOY_HOME"] = str(self.home)
        env["HOTDEPLOY_ADMIN_TOKEN"] = self.token
        env["MARKER_DIR"] = str(self.markers)
        # The test packages may import `testkit`, from the tests folder.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
        env.update(self.extra_env)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=True,
            )

        def ready() -> bool | None:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(self.url + "/", timeout=2).status_code == 200 or None
            except httpx.TransportError:
                return None

        wait_for("the server to answer GET /", ready, timeout=30)

        seen: list[str] = []

        def registered() -> bool | None:
            store = self.open_store()
            try:
                seen[:] = sorted(w.id for w in store.workers() if w.started_at >= started and self.owns(w.id))
            finally:
                store.close()
            return len(seen) >= self.workers or None

        try:
            wait_for(f"{self.workers} workers to register", registered, timeout=30)
        except pytest.fail.Exception:
            # Fewer ids than workers: two workers share one (an id made before the fork?).
            pytest.fail(f"{self.workers} workers never registered; the store has {seen}\n{self.log()}")

    def open_store(self) -> Store:
        """The store this server's workers share (the caller closes it)."""
        return open_store(self.home, self.store_url)

    def owns(self, worker_id: str) -> bool:
        """A worker of this server (on a shared database, the others are other hosts')."""
        return self.host_id is None or worker_id.startswith(f"{self.host_id}:")

    def kill(self) -> None:
        """SIGKILL the whole process group: the supervisor and every worker, at once."""
        process, self.process = self.process, None
        if process is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        """A graceful stop (SIGTERM to the supervisor), then SIGKILL for anything left."""
        process = self.process
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        self.kill()

    # -- the admin API ------------------------------------------------------------------------------

    def deploy(self, archive: bytes, client: httpx.Client | None = None) -> httpx.Response:
        return (client or self.admin).post(
            self.url + "/_hotdeploy/packages",
            content=archive,
            headers={"Content-Type": "application/zip", "Authorization": f"Bearer {self.token}"},
            timeout=60,
        )

    def deployed(self, archive: bytes) -> dict[str, Any]:
        response = self.deploy(archive)
        assert response.status_code == 201, response.text
        record: dict[str, Any] = response.json()
        return record

    def package(self, name: str) -> dict[str, Any] | None:
        response = self.admin.get(self.url + f"/_hotdeploy/packages/{name}")
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def packages(self) -> dict[str, dict[str, Any]]:
        response = self.admin.get(self.url + "/_hotdeploy/packages")
        assert response.status_code == 200, response.text
        return {p["name"]: p for p in response.json()["packages"]}

    def rollback(self, name: str) -> httpx.Response:
        return self.admin.post(self.url + f"/_hotdeploy/packages/{name}/rollback", timeout=60)

    def wait_for_workers(self, name: str, version: str, timeout: float = 20) -> dict[str, str]:
        """Wait until exactly `self.workers` live workers serve `version` of `name` (dead
        workers drop out of the map 5 s after their last heartbeat); return the map."""
        last: list[Any] = [None]

        def probe() -> dict[str, str] | None:
            found = self.package(name)
            last[0] = found and found["workers"]
            if found is None or found["active_version"] != version:
                return None
            workers: dict[str, str] = found["workers"]
            if len(workers) == self.workers and set(workers.values()) == {version}:
                return workers
            return None

        try:
            return wait_for(f"{self.workers} workers serving {name} {version}", probe, timeout, 0.1)
        except pytest.fail.Exception:
            pytest.fail(f"workers of {name} never all served {version}; last map: {last[0]}\n{self.log()}")

    # -- traffic ----------------------------------------------------------------------------------

    def get(self, name: str, client: httpx.Client | None = None) -> tuple[str, int]:
        """GET /<name>/: (the version that answered, the pid of the worker that answered)."""
        url = self.url + f"/{name}/"
        response = client.get(url) if client is not None else httpx.get(url, timeout=10)
        assert response.status_code == 200, (response.status_code, response.text)
        body = response.json()
        return str(body["version"]), int(body["pid"])

    def sample(self, name: str, count: int = 200, reach: set[int] | None = None) -> Counter[tuple[str, int]]:
        """`count` requests, each on a new connection (so the kernel spreads them over the
        workers), and more (at most 10 times as many) until every pid in `reach` answered:
        how many answers came from each (version, pid)."""
        answers: Counter[tuple[str, int]] = Counter()
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(limits=limits, timeout=10) as client:
            for sent in range(count * 10):
                if sent >= count and not (reach or set()) - {pid for _, pid in answers}:
                    break
                answers[self.get(name, client)] += 1
        return answers


@contextmanager
def running_server(
    tmp_path: Path,
    kind: str = "uvicorn",
    workers: int = 3,
    *,
    preload: bool = False,
    env: dict[str, str] | None = None,
    store: str | None = None,
    host_id: str | None = None,
) -> Iterator[Server]:
    server = Server(tmp_path, kind, workers, preload=preload, env=env, store=store, host_id=host_id)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        server.admin.close()
