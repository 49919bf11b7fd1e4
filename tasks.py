"""Developer entry point that needs nothing but Python.

    python tasks.py demo     run the example server and its live demo
    python tasks.py test     run the whole test suite (asyncio and trio)
    python tasks.py lint     ruff and mypy --strict
    python tasks.py docs     build the docs site (mkdocs build --strict, into site/)

The first run creates `.venv` beside this file and installs the project with its test and docs
extras into it; later runs reinstall only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".installed-pyproject-sha256"


def _pyproject_digest() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_environment() -> None:
    """Create the virtual environment and install the project when needed."""
    if not PYTHON.exists():
        print(f"creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = _pyproject_digest()
    if not STAMP.exists() or STAMP.read_text() != digest:
        print("installing starlette-hotdeploy with its test and docs extras ...", flush=True)
        pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-e", f"{ROOT}[test,docs]"], check=True)
        STAMP.write_text(digest)


def run(*args: str) -> int:
    return subprocess.call([str(PYTHON), *args], cwd=ROOT)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "lint", "docs"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_environment()
    if command == "test":
        return run("-m", "pytest", *rest)
    if command == "docs":
        return run("-m", "mkdocs", "build", "--strict", *rest)
    if command == "lint":
        return (
            run("-m", "ruff", "check", ".")
            or run("-m", "ruff", "format", "--check", ".")
            or run("-m", "mypy")
        )
    return run("-m", "example_app", *rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
