"""Package: everything the deployer knows of one package across its versions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._archive import Unpacked
from ._mounts import Mount
from ._version import PackageVersion, VersionState


@dataclass(eq=False)
class Package:
    """A deployed package: its mount, the versions in memory and those on disk."""

    name: str
    prefix: str
    mount: Mount | None = None  # set once a first version is active
    loaded: list[PackageVersion] = field(default_factory=list)  # versions in memory
    available: dict[str, Unpacked] = field(default_factory=dict)  # versions on disk, by version
    lineage: list[str] = field(default_factory=list)  # versions in activation order: rollback pops

    @property
    def active(self) -> PackageVersion | None:
        return self.mount.active if self.mount is not None else None

    @property
    def previous(self) -> str | None:
        """The version a rollback goes back to."""
        return self.lineage[-2] if len(self.lineage) >= 2 else None

    def loaded_version(self, version: str) -> PackageVersion | None:
        for candidate in reversed(self.loaded):
            if candidate.version == version and candidate.state not in (
                VersionState.RETIRED,
                VersionState.FAILED,
            ):
                return candidate
        return None

    def record_activation(self, version: str) -> None:
        if version in self.lineage:
            self.lineage.remove(version)
        self.lineage.append(version)

    def to_dict(self) -> dict[str, Any]:
        active = self.active
        return {
            "name": self.name,
            "mount": self.prefix,
            "active_version": active.version if active is not None else None,
            "previous_version": self.previous,
            "versions": [v.to_dict() for v in self.loaded],
            "available_versions": [
                {"version": version, "sha256": unpacked.sha256}
                for version, unpacked in self.available.items()
            ],
        }
