"""Helpers shared by the benchmark scenarios: ports, server subprocesses, statistics, the machine
description and the results files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
EXAMPLE_PACKAGES = ROOT / "example_app" / "packages"

T = TypeVar("T")


class BenchmarkError(RuntimeError):
    """A scenario could not run (a server did not start, a deployment failed)."""


def get_scope(path: str) -> dict[str, Any]:
    """The ASGI scope of a plain GET of `path`, for calling an app in-process."""
    return {
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


# -- ports and waiting ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Call `probe` until it returns something other than None; at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise BenchmarkError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# -- server subprocesses --------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A server subprocess in its own session (process group), logging to a file.

    `kill()` reaches the supervisor and every worker with one `os.killpg`."""

    command: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTDEPLOY_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send `signum` to the supervisor (the process we started) only."""
        assert self.process is not None, "not started"
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit; its exit code, or None after `timeout` seconds."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the whole process group (the supervisor and all its workers)."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# -- statistics -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values (None if there are none)."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """count, p50, p99 and max of latencies given in seconds, reported in milliseconds."""
    values = sorted(seconds)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "count": len(values),
        "p50_ms": ms(percentile(values, 0.50)),
        "p99_ms": ms(percentile(values, 0.99)),
        "max_ms": ms(values[-1] if values else None),
    }


def spread(ratio: dict[str, float], width: int = 10) -> str:
    """A ratio's median and range, as the benchmark tables print it: `0.987 [0.831-1.216]`."""
    return f"{ratio['median']:>{width}.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]"


# -- the machine and the results files ------------------------------------------------------------


@dataclass(frozen=True)
class Compared:
    """One package dispatch (middleware or route) of a dispatch benchmark, beside the plain
    Mount serving the same request with as many packages, and its own run with the fewest."""

    app: str
    call: str
    kind: str
    packages: int
    result: dict[str, Any]
    mount: dict[str, Any]
    fewest: dict[str, Any]


def against_mount(results: Sequence[dict[str, Any]]) -> list[Compared]:
    """Pair each package dispatch's result with its Mount's (results keyed by app, call, kind
    and packages, as both dispatch benchmarks write them)."""
    by = {(r["app"], r["call"], r["kind"], r["packages"]): r for r in results}
    pairs = []
    for (app, call, kind, n), r in by.items():
        mount = by.get((app, call, "mount", n))
        if kind not in ("middleware", "route", "nometrics") or mount is None:
            continue
        fewest = min(m for a, c, k, m in by if (a, c, k) == (app, call, kind))
        pairs.append(Compared(app, call, kind, n, r, mount, by[(app, call, kind, fewest)]))
    return pairs


def _version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def wrk_version() -> str | None:
    """wrk's version line, or None when wrk is not installed."""
    try:
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            name: _version_of(name)
            for name in (
                "starlette-hotdeploy",
                "starlette",
                "uvicorn",
                "gunicorn",
                "uvicorn-worker",
                "uvloop",
                "httptools",
                "httpx",
                "anyio",
            )
        },
        "wrk": wrk_version(),
    }


def write_results(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    """Write `payload` (plus the machine and a timestamp) to `directory/name.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    document = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), **payload}
    document["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    document.setdefault("machine", machine())
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def read_rss_kib() -> int:
    """This process's resident set size in KiB (VmRSS from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchmarkError("no VmRSS in /proc/self/status")
