"""Set-up for the benchmarks: the Python packages of benchmarks/requirements.txt and the `wrk`
load generator (Debian package).

    .venv/bin/python -m benchmarks.setup_env

`benchmarks/run.py` calls `ensure()` first. The Python packages are installed with pip into the
interpreter that runs the benchmarks. `wrk` is installed with apt-get when we are root; where it
cannot be installed, the scenarios fall back to a built-in httpx load generator and say so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .common import BENCHMARKS

REQUIRED_MODULES = ("matplotlib", "httpx_ws", "uvicorn_worker", "gunicorn", "httpx", "uvicorn")


@dataclass
class Setup:
    """What the benchmarks can use."""

    python_ok: bool
    wrk: bool
    notes: list[str]


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def install_requirements() -> str | None:
    """pip-install benchmarks/requirements.txt; an error message, or None when it worked."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    command += ["-r", str(BENCHMARKS / "requirements.txt")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pip install failed: {exc}"
    if done.returncode != 0:
        return f"pip install failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    return None


def install_wrk() -> str | None:
    """apt-get install wrk (as root); an error message, or None when it worked."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install wrk (run: sudo apt-get install -y wrk)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(command)} failed: {exc}"
        if done.returncode != 0:
            return f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-300:]}"
    return None if shutil.which("wrk") else "apt-get finished but wrk is not on PATH"


def ensure(*, install: bool = True) -> Setup:
    """Make sure the Python packages and wrk are there (installing them if `install`)."""
    notes: list[str] = []
    missing = missing_modules()
    if missing and install:
        print(f"set-up: installing benchmarks/requirements.txt (missing: {', '.join(missing)}) ...")
        error = install_requirements()
        if error:
            notes.append(error)
        importlib.invalidate_caches()
        missing = missing_modules()
    if missing:
        notes.append(f"missing Python packages: {', '.join(missing)}")
    has_wrk = shutil.which("wrk") is not None
    if not has_wrk and install:
        print("set-up: installing wrk with apt-get ...")
        error = install_wrk()
        has_wrk = shutil.which("wrk") is not None
        if error and not has_wrk:
            notes.append(
                f"wrk unavailable ({error}): plain-request load falls back to built-in httpx clients"
            )
    elif not has_wrk:
        notes.append("wrk not installed: plain-request load falls back to built-in httpx clients")
    return Setup(python_ok=not missing, wrk=has_wrk, notes=notes)


def main() -> int:
    setup = ensure()
    for note in setup.notes:
        print(f"set-up: {note}")
    print(
        f"set-up: python packages {'ok' if setup.python_ok else 'MISSING'}, wrk {'ok' if setup.wrk else 'missing'}"
    )
    return 0 if setup.python_ok else 1


if __name__ == "__main__":
    sys.exit(main())
