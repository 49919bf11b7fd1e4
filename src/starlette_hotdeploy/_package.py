"""Package: everything this process knows of one package across its versions.

Read-only to everyone but the engine, its owner: the engine changes the versions in memory, the
mount, the lineage and what is available through its named methods; the rest reads these views.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ._mounts import Mount
from ._version import PackageVersion


class Package:
    """A deployed package: its mount, the versions in memory and those in the store."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix
        self._mount: Mount | None = None  # set once a first version is active
        self._loaded: list[PackageVersion] = []  # versions in memory, oldest first
        self._available: dict[str, str] = {}  # version -> sha256 of a version that was active
        self._lineage: list[tuple[str, str]] = []  # (version, sha256) activated, in order

    def __repr__(self) -> str:
        return f"<Package {self.name} {self.prefix!r} active={self.active!r}>"

    @property
    def mount(self) -> Mount | None:
        return self._mount

    @property
    def loaded(self) -> tuple[PackageVersion, ...]:
        return tuple(self._loaded)

    @property
    def available(self) -> Mapping[str, str]:
        return MappingProxyType(self._available)

    @property
    def lineage(self) -> list[str]:
        """Versions in activation order, the active one last: a rollback goes one step back."""
        return [version for version, _ in self._lineage]

    def lineage_pairs(self) -> list[tuple[str, str]]:
        return list(self._lineage)

    def lineage_after(self, version: str, sha256: str, *, rollback: bool = False) -> list[tuple[str, str]]:
        """The lineage once `version` is active: a rollback pops the current version; anything
        else moves `version` to the end."""
        if rollback and len(self._lineage) >= 2 and self._lineage[-2][0] == version:
            return self._lineage[:-1]
        return [pair for pair in self._lineage if pair[0] != version] + [(version, sha256)]

    @property
    def active(self) -> PackageVersion | None:
        return self._mount.active if self._mount is not None else None

    @property
    def previous(self) -> str | None:
        """The version a rollback goes back to."""
        return self._lineage[-2][0] if len(self._lineage) >= 2 else None

    def loaded_version(self, version: str) -> PackageVersion | None:
        """The newest instance of `version` still in memory that can serve (not stopping)."""
        for candidate in reversed(self._loaded):
            if candidate.version == version and candidate.state.loaded:
                return candidate
        return None
