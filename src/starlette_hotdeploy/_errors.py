"""Exceptions. Each carries the package, version and step it is about, and says what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._deployment import Deployment


class HotDeployError(Exception):
    """Base class of every error raised by starlette-hotdeploy."""

    def __init__(
        self,
        message: str,
        *,
        package: str | None = None,
        version: str | None = None,
        step: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.package = package
        self.version = version
        self.step = step

    def __str__(self) -> str:
        where = " ".join(p for p in (self.package, self.version) if p)
        prefix = f"{where}: " if where else ""
        step = f" [{self.step}]" if self.step else ""
        return f"{prefix}{self.message}{step}"


class ManifestError(HotDeployError):
    """The manifest (hotdeploy.toml) is missing, unreadable or invalid."""

    def __init__(self, message: str, *, key: str | None = None, package: str | None = None) -> None:
        text = f"hotdeploy.toml: {key}: {message}" if key else f"hotdeploy.toml: {message}"
        super().__init__(text, package=package, step="manifest")
        self.key = key


class ArchiveError(HotDeployError):
    """The package source is not a usable directory, zip or wheel, or breaks a safety limit."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message, step="unpack")
        self.too_large = too_large


class LoadError(HotDeployError):
    """The package's code could not be imported, or its `app` is not an ASGI application."""


class StartupError(HotDeployError):
    """The package's ASGI lifespan startup failed or timed out."""


class CheckFailed(HotDeployError):
    """A check (the manifest's health path or a pluggy hook) vetoed the version."""

    def __init__(
        self,
        message: str,
        *,
        check: str,
        package: str | None = None,
        version: str | None = None,
        step: str | None = None,
    ) -> None:
        super().__init__(message, package=package, version=version, step=step)
        self.check = check


class MountConflict(HotDeployError):
    """Two different packages asked for overlapping URL prefixes."""


class DeploymentInProgress(HotDeployError):
    """Another operation on the same package has not finished yet; retry when it has.

    `deployment` is the record of the refused operation."""

    deployment: Deployment | None = None


class UnknownPackage(HotDeployError, LookupError):
    """No package of that name is deployed."""


class UnknownVersion(HotDeployError, LookupError):
    """The package has no such version available (loaded or on disk)."""


class PackageInUse(HotDeployError):
    """The package cannot be removed: another deployed package requires it."""


class NoPreviousVersion(HotDeployError):
    """A rollback was asked for, but the package has no earlier version to go back to."""


class NotRunning(HotDeployError, RuntimeError):
    """The deployer's runtime is not open: run the app under a server with lifespan, or use
    `async with deployer.running():`."""


class DeploymentError(HotDeployError):
    """A deployment failed. `deployment` is its record; `__cause__` is the underlying error.

    Whatever was serving before keeps serving."""

    def __init__(self, deployment: Deployment, cause: HotDeployError) -> None:
        super().__init__(cause.message, package=cause.package, version=cause.version, step=cause.step)
        self.deployment = deployment
        self.cause = cause
