"""Package: everything the deployer knows of one package across its versions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._mounts import Mount
from ._version import PackageVersion, VersionState


@dataclass(eq=False)
class Package:
    """A deployed package: its mount, the versions in memory and those on disk."""

    name: str
    prefix: str
    mount: Mount | None = None  # set once a first version is active
    loaded: list[PackageVersion] = field(default_factory=list)  # versions in memory
    available: dict[str, str] = field(default_factory=dict)  # version -> sha256 of its stored archive
    _lineage: list[tuple[str, str]] = field(default_factory=list)  # (version, sha256) activated, in order

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

    def set_lineage(self, lineage: list[tuple[str, str]]) -> None:
        self._lineage = list(lineage)

    @property
    def active(self) -> PackageVersion | None:
        return self.mount.active if self.mount is not None else None

    @property
    def previous(self) -> str | None:
        """The version a rollback goes back to."""
        return self._lineage[-2][0] if len(self._lineage) >= 2 else None

    def loaded_version(self, version: str) -> PackageVersion | None:
        for candidate in reversed(self.loaded):
            if candidate.version == version and candidate.state not in (
                VersionState.RETIRED,
                VersionState.FAILED,
            ):
                return candidate
        return None

    def to_dict(self) -> dict[str, Any]:
        active = self.active
        return {
            "name": self.name,
            "mount": self.prefix,
            "active_version": active.version if active is not None else None,
            "previous_version": self.previous,
            "versions": [v.to_dict() for v in self.loaded],
            "available_versions": [
                {"version": version, "sha256": sha256} for version, sha256 in self.available.items()
            ],
        }
