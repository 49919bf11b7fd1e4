"""What `Deployer.status()` answers: typed snapshots, JSON-ready through `to_dict()`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ._package import Package
from ._version import PackageVersion, VersionState


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One version of a package in this worker's memory."""

    version: str
    state: VersionState
    in_flight: int
    sha256: str
    served: int
    terminated: int
    loaded_at: float
    activated_at: float | None
    error: str | None
    # The versions of its requirements it imports from (package -> version): it is bound to
    # them, and moves when they change.
    bound_to: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, version: PackageVersion) -> VersionStatus:
        return cls(
            version.version,
            version.state,
            version.in_flight,
            version.sha256,
            version.served,
            version.terminated,
            version.loaded_at,
            version.activated_at,
            version.error,
            {name: required.version for name, required in sorted(version.bound_to.items())},
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}


@dataclass(frozen=True, slots=True)
class PackageStatus:
    """A package: its mount, active and previous version, what is loaded and what is stored,
    which version each live worker serves, what its active version requires and which active
    packages require it."""

    name: str
    mount: str
    active_version: str | None
    previous_version: str | None
    versions: tuple[VersionStatus, ...]
    available_versions: Mapping[str, str]  # version -> sha256
    workers: Mapping[str, str | None]  # worker id -> the version it serves
    requires: Mapping[str, str] = field(default_factory=dict)  # package -> PEP 440 specifier
    required_by: tuple[str, ...] = ()  # active packages whose active version requires it
    # A running canary: version, weight_percent, step of steps, key, the last analysis...
    canary: Mapping[str, Any] | None = None

    @classmethod
    def of(
        cls,
        package: Package,
        workers: Mapping[str, str | None],
        required_by: tuple[str, ...] = (),
        canary: Mapping[str, Any] | None = None,
    ) -> PackageStatus:
        active = package.active
        requires = active.manifest.requires if active is not None else {}
        return cls(
            name=package.name,
            mount=package.prefix,
            active_version=active.version if active is not None else None,
            previous_version=package.previous,
            versions=tuple(VersionStatus.of(v) for v in package.loaded),
            available_versions=dict(package.available),
            workers=dict(workers),
            requires={other: str(spec) for other, spec in sorted(requires.items())},
            required_by=required_by,
            canary=canary,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mount": self.mount,
            "active_version": self.active_version,
            "previous_version": self.previous_version,
            "versions": [v.to_dict() for v in self.versions],
            "available_versions": [
                {"version": version, "sha256": sha256} for version, sha256 in self.available_versions.items()
            ],
            "workers": dict(self.workers),
            "requires": dict(self.requires),
            "required_by": list(self.required_by),
            "canary": dict(self.canary) if self.canary is not None else None,
        }
