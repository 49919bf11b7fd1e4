"""Exceptions. Each carries the package, version and step it is about, and says what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

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


class CanaryError(HotDeployError):
    """A canary's plan is invalid (its steps, key or thresholds)."""


class CanaryRefused(HotDeployError):
    """A canary operation that cannot be done: none is running, the package's strategy is
    `block`, or a canary is running already."""


class MountConflict(HotDeployError):
    """Two different packages asked for overlapping URL prefixes, or a mount would shadow a
    route of the host app."""


class VersionConflict(HotDeployError):
    """A different archive was deployed under a version number that already has one."""


class SignatureError(HotDeployError):
    """Trusted keys are configured and the archive's signature is missing, malformed, or not
    made by one of them. Nothing of the archive was unpacked."""

    def __init__(self, message: str, *, package: str | None = None) -> None:
        super().__init__(message, package=package, step="signature")


class StoreError(HotDeployError):
    """The store cannot be opened or used: a bad store URL, a missing driver, a database that
    cannot be reached or is newer than this version knows. What is serving keeps serving."""


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


class UnmetRequirement(HotDeployError):
    """The change would leave an active package's `requires` unmet (a package missing, or active
    at a version outside the specifier), or would close a cycle of requirements. Nothing changed."""


class DependentFailed(HotDeployError):
    """A dependent that moves with the package (it imports it) could not be loaded, started or
    checked bound to the new version: the whole operation is aborted and nothing switched."""


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


class RequestAborted(HotDeployError):
    """A response was still being sent when its version's drain timeout expired; the
    connection is aborted so the client sees an error, never a body that looks complete."""


class IllegalTransition(HotDeployError, AssertionError):
    """A version or an operation was asked to move to a state its current state cannot reach:
    a bug in starlette-hotdeploy, never a user error."""


# -- internal: turned into a public error (with context) before they reach a caller -------------


class LifespanFailed(HotDeployError):
    """The app reported lifespan startup or shutdown failure (its message is the text)."""


class LifespanTimeout(HotDeployError):
    """Startup or shutdown took longer than allowed."""


class UploadRefused(HotDeployError):
    """An admin upload that cannot be read: `status` and `title` become the problem details."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title


class UploadTooLarge(HotDeployError):
    """An admin upload over the configured size cap (413)."""


# -- the admin API client (AdminClient) ----------------------------------------------------------

# Why an admin API call could not be made or understood; a front end such as the CLI picks its
# own hint by it (`--token` rather than `AdminClient(url, token)`).
UnreachableReason = Literal[
    "invalid_url", "timeout", "connect", "transport", "no_token", "token_refused", "forbidden", "not_json"
]


class AdminClientError(HotDeployError):
    """A call to the admin API over HTTP (`AdminClient`) failed.

    The message is `summary` (what happened) followed by `hint` (what to do about it, in terms of
    the Python client), kept apart so that a front end can give its own hint."""

    def __init__(self, summary: str, hint: str = "") -> None:
        super().__init__(summary + hint)
        self.summary = summary
        self.hint = hint


class AdminUnreachable(AdminClientError):
    """The admin API could not be reached or understood: an invalid URL, no connection, no answer
    in time, no token or a refused one (401), a read-only token on a write (403), or an answer that
    is not a JSON object (the admin API is off, or the prefix is wrong). `status` is the HTTP
    status when there was an answer."""

    def __init__(
        self, summary: str, hint: str = "", *, reason: UnreachableReason, status: int | None = None
    ) -> None:
        super().__init__(summary, hint)
        self.reason: UnreachableReason = reason
        self.status = status


class AdminProblem(AdminClientError):
    """The admin API refused the operation, or it failed: `status`, and `problem`, the RFC 9457
    problem details (`title`, `detail`, and for a failed deployment its record)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        title = problem.get("title") or "error"
        detail = problem.get("detail") or title
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.problem = problem

    @property
    def deployment(self) -> dict[str, Any] | None:
        """The failed deployment's record, when the problem carries one."""
        record = self.problem.get("deployment")
        return record if isinstance(record, dict) else None


class DeploymentTimeout(AdminClientError):
    """Gave up waiting for a deployment's outcome after `timeout` seconds; it may still finish.
    `deployment` is its last record seen (its outcome still "pending")."""

    def __init__(self, deployment: dict[str, Any], timeout: float) -> None:
        deployment_id = deployment.get("id")
        super().__init__(
            f"deployment {deployment_id} is still pending after {timeout:g} s",
            f" (it may still finish: poll it with AdminClient.deployment({deployment_id!r}))",
        )
        self.deployment = deployment
        self.timeout = timeout
