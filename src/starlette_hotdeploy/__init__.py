"""Hot deployment of packages for Starlette and ASGI servers."""

from ._archive import ArchiveLimits
from ._deployer import Deployer
from ._deployment import Deployment, Step
from ._dispatch import HotDeployMiddleware
from ._errors import (
    ArchiveError,
    CheckFailed,
    DeploymentError,
    DeploymentInProgress,
    HotDeployError,
    LoadError,
    ManifestError,
    MountConflict,
    NoPreviousVersion,
    NotRunning,
    PackageInUse,
    StartupError,
    UnknownPackage,
    UnknownVersion,
)
from ._hooks import HookSpecs, hookimpl, hookspec
from ._manifest import Manifest, parse_manifest
from ._package import Package
from ._version import PackageVersion, RequestAborted, VersionState

__version__ = "0.1.0"

__all__ = [
    "ArchiveError",
    "ArchiveLimits",
    "CheckFailed",
    "Deployer",
    "Deployment",
    "DeploymentError",
    "DeploymentInProgress",
    "HookSpecs",
    "HotDeployError",
    "HotDeployMiddleware",
    "LoadError",
    "Manifest",
    "ManifestError",
    "MountConflict",
    "NoPreviousVersion",
    "NotRunning",
    "Package",
    "PackageInUse",
    "PackageVersion",
    "RequestAborted",
    "StartupError",
    "Step",
    "UnknownPackage",
    "UnknownVersion",
    "VersionState",
    "__version__",
    "hookimpl",
    "hookspec",
    "parse_manifest",
]
