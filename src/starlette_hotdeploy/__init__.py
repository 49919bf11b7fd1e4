"""Hot deployment of packages for Starlette and ASGI servers."""

from typing import TYPE_CHECKING

from ._admin import create_admin_app
from ._archive import ArchiveLimits, Packed, pack_directory
from ._cleaners import Unloaded
from ._deployer import Deployer
from ._deployment import Action, Deployment, Outcome, Step
from ._dispatch import HotDeployMiddleware
from ._errors import (
    AdminClientError,
    AdminProblem,
    AdminUnreachable,
    ArchiveError,
    CanaryError,
    CanaryRefused,
    CheckFailed,
    DependentFailed,
    DeploymentError,
    DeploymentInProgress,
    DeploymentTimeout,
    HotDeployError,
    IllegalTransition,
    LoadError,
    ManifestError,
    MountConflict,
    NoPreviousVersion,
    NotRunning,
    PackageInUse,
    RequestAborted,
    SignatureError,
    StartupError,
    StoreError,
    UnknownPackage,
    UnknownVersion,
    UnmetRequirement,
    VersionConflict,
)
from ._hooks import HookSpecs, hookimpl, hookspec
from ._manifest import Manifest, parse_manifest
from ._package import Package
from ._route import HotDeployRoute, hotdeploy_lifespan
from ._serve import create_host_app
from ._status import PackageStatus, VersionStatus
from ._store import Store
from ._version import PackageVersion, VersionState

if TYPE_CHECKING:
    from ._client import AdminClient

__version__ = "0.1.0"

__all__ = [
    "Action",
    "AdminClient",
    "AdminClientError",
    "AdminProblem",
    "AdminUnreachable",
    "ArchiveError",
    "ArchiveLimits",
    "CanaryError",
    "CanaryRefused",
    "CheckFailed",
    "DependentFailed",
    "Deployer",
    "Deployment",
    "DeploymentError",
    "DeploymentInProgress",
    "DeploymentTimeout",
    "HookSpecs",
    "HotDeployError",
    "HotDeployMiddleware",
    "HotDeployRoute",
    "IllegalTransition",
    "LoadError",
    "Manifest",
    "ManifestError",
    "MountConflict",
    "NoPreviousVersion",
    "NotRunning",
    "Outcome",
    "Package",
    "PackageInUse",
    "PackageStatus",
    "PackageVersion",
    "Packed",
    "RequestAborted",
    "SignatureError",
    "StartupError",
    "Step",
    "Store",
    "StoreError",
    "UnknownPackage",
    "UnknownVersion",
    "Unloaded",
    "UnmetRequirement",
    "VersionConflict",
    "VersionState",
    "VersionStatus",
    "__version__",
    "create_admin_app",
    "create_host_app",
    "hookimpl",
    "hookspec",
    "hotdeploy_lifespan",
    "pack_directory",
    "parse_manifest",
]


def __getattr__(name: str) -> object:
    # AdminClient needs httpx, which only the [cli] extra installs: import it on first use.
    if name == "AdminClient":
        try:
            from ._client import AdminClient
        except ModuleNotFoundError as exc:
            if exc.name != "httpx":
                raise
            raise ImportError(
                f'starlette_hotdeploy.{name} needs httpx: pip install "starlette-hotdeploy[cli]"'
            ) from exc
        return AdminClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
