"""RFC 9457 problem details, and the HTTP status of each error."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from ._detail import shorten
from ._errors import (
    ArchiveError,
    CanaryError,
    CanaryRefused,
    CheckFailed,
    DependentFailed,
    DeploymentError,
    DeploymentInProgress,
    HotDeployError,
    LoadError,
    ManifestError,
    MountConflict,
    NoPreviousVersion,
    NotRunning,
    PackageInUse,
    SignatureError,
    StartupError,
    StoreError,
    UnknownPackage,
    UnknownVersion,
    UnmetRequirement,
    VersionConflict,
)

PROBLEM_TYPE = "application/problem+json"

# Most specific first.
_STATUS: list[tuple[type[HotDeployError], int, str]] = [
    (ManifestError, 400, "invalid manifest"),
    (ArchiveError, 400, "invalid archive"),
    (CanaryError, 400, "invalid canary plan"),
    (CanaryRefused, 409, "canary refused"),
    (SignatureError, 403, "signature refused"),
    (VersionConflict, 409, "version conflict"),
    (DeploymentInProgress, 409, "deployment in progress"),
    (MountConflict, 409, "mount conflict"),
    (NoPreviousVersion, 409, "no previous version"),
    (PackageInUse, 409, "package in use"),
    (UnmetRequirement, 409, "unmet requirement"),
    (UnknownPackage, 404, "unknown package"),
    (UnknownVersion, 404, "unknown version"),
    (LoadError, 422, "package failed to load"),
    (StartupError, 422, "package failed to start"),
    (CheckFailed, 422, "check failed"),
    (DependentFailed, 422, "dependent failed"),
    (NotRunning, 503, "deployer not running"),
    (StoreError, 503, "store unavailable"),
]


def status_of(error: HotDeployError) -> tuple[int, str]:
    """The HTTP status and problem title for an error (a DeploymentError by its cause)."""
    if isinstance(error, DeploymentError) and error.deployment.outcome == "rolled_back":
        return 422, "rolled back"
    cause = error.cause if isinstance(error, DeploymentError) else error
    if isinstance(cause, ArchiveError) and cause.too_large:
        return 413, "archive too large"
    for kind, status, title in _STATUS:
        if isinstance(cause, kind):
            return status, title
    return 422, "deployment failed"


def problem(status: int, title: str, detail: str, **extensions: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": shorten(detail)}
    body.update({k: v for k, v in extensions.items() if v is not None})
    headers = {"WWW-Authenticate": 'Bearer realm="hotdeploy"'} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_TYPE, headers=headers)


def problem_for(error: HotDeployError) -> JSONResponse:
    status, title = status_of(error)
    deployment = getattr(error, "deployment", None)
    record = deployment.to_dict() if deployment is not None else None
    return problem(
        status,
        title,
        str(error),
        package=error.package,
        version=error.version,
        step=error.step,
        deployment=record,
    )
