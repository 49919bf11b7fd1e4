"""A plugin that lets a test wait for the background drains of replaced versions."""

from __future__ import annotations

import anyio

from starlette_hotdeploy import PackageVersion, hookimpl


class Drained:
    """Counts `hotdeploy_drained` calls: which versions drained, and how many requests each had
    ended at its drain timeout."""

    def __init__(self) -> None:
        self.versions: list[str] = []
        self.terminated: list[int] = []
        self.terminated_by: dict[str, int] = {}
        self.event = anyio.Event()

    @hookimpl
    def hotdeploy_drained(self, version: PackageVersion, terminated: int) -> None:
        self.versions.append(version.version)
        self.terminated.append(terminated)
        self.terminated_by[version.version] = terminated
        self.event.set()

    async def wait(self, count: int) -> None:
        """Until `count` versions drained (30 s at most)."""
        with anyio.fail_after(30):
            while len(self.versions) < count:
                self.event = anyio.Event()
                await self.event.wait()

    async def wait_for(self, version: str) -> None:
        """Until `version` drained (30 s at most)."""
        with anyio.fail_after(30):
            while version not in self.terminated_by:
                self.event = anyio.Event()
                await self.event.wait()
