"""The hot-deploy folder (Integration Server's inbound directory, Tomcat's autoDeploy).

An archive (`*.zip`, `*.whl`) dropped into the folder is deployed once it is complete, and the
outcome is written beside it: `NAME.deployed` (the deployment record, JSON) or `NAME.failed`
(the error). "Complete" means its size and modification time did not change between two scans
and it opens as a zip; dotfiles and `*.part` / `*.tmp` names are never read, so an upload that
writes to a temporary name and renames at the end is picked up at once. An archive is deployed
again when it is replaced (newer than its outcome file). A signature `NAME.sig` beside an
archive is sent with it (drop the signature first: the archive is deployed once it is complete).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

import anyio

from ._deployment import Deployment
from ._errors import DeploymentError, HotDeployError

logger = logging.getLogger("starlette_hotdeploy")

_SUFFIXES = (".zip", ".whl")
_OUTCOMES = (".deployed", ".failed")


class WatchFolder:
    def __init__(
        self,
        directory: Path,
        deploy: Callable[[Path, bytes | None], Awaitable[Deployment]],
        *,
        interval: float = 0.5,
        lock_path: Path | None = None,
    ) -> None:
        self.directory = directory
        self.deploy = deploy
        self.interval = interval
        self.lock_path = lock_path
        self._seen: dict[Path, tuple[int, int]] = {}
        self._lock_file: IO[bytes] | None = None

    def candidates(self) -> list[Path]:
        """Archives that are complete and have no outcome newer than themselves."""
        ready = []
        current: dict[Path, tuple[int, int]] = {}
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") or path.suffix not in _SUFFIXES or not path.is_file():
                continue
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            current[path] = key
            if self._handled(path, stat.st_mtime_ns):
                continue
            if self._seen.get(path) == key and zipfile.is_zipfile(path):
                ready.append(path)
        self._seen = current
        return ready

    @staticmethod
    def _handled(path: Path, mtime_ns: int) -> bool:
        for suffix in _OUTCOMES:
            outcome = path.with_name(path.name + suffix)
            if outcome.exists() and outcome.stat().st_mtime_ns >= mtime_ns:
                return True
        return False

    async def scan(self) -> list[Path]:
        """Deploy every complete archive once; return those handled."""
        handled = []
        for path in self.candidates():
            signature_file = path.with_name(path.name + ".sig")
            signature = signature_file.read_bytes() if signature_file.is_file() else None
            try:
                record = await self.deploy(path, signature)
            except DeploymentError as exc:
                self._write(path, ".failed", f"{exc}\n\n{json.dumps(exc.deployment.to_dict(), indent=2)}\n")
            except HotDeployError as exc:
                self._write(path, ".failed", f"{exc}\n")
            else:
                self._write(path, ".deployed", json.dumps(record.to_dict(), indent=2) + "\n")
            handled.append(path)
        return handled

    def _write(self, archive: Path, suffix: str, text: str) -> None:
        for other in _OUTCOMES:
            archive.with_name(archive.name + other).unlink(missing_ok=True)
        target = archive.with_name(archive.name + suffix)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(text)
        os.replace(temporary, target)
        logger.info("watch folder: %s -> %s", archive.name, target.name)

    def acquire(self) -> bool:
        """With several workers, only the one holding the lock watches the folder."""
        if self.lock_path is None:
            return True
        handle = open(self.lock_path, "ab")  # noqa: SIM115 - held for the process's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def run(self) -> None:
        """Scan forever (until cancelled); a worker without the lock retries it on each round."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            while True:
                if self._lock_file is not None or self.acquire():
                    try:
                        await self.scan()
                    except OSError as exc:
                        logger.warning("watch folder %s: %s", self.directory, exc)
                await anyio.sleep(self.interval)
        finally:
            self.release()
