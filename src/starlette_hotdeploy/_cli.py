"""The `hotdeploy` command: pack, deploy, inspect and serve packages. See docs/cli.md.

The commands are thin: `pack_directory` builds archives, `AdminClient` talks to the admin API
(docs/admin-api.md), `with_client` turns its errors into `CliError`s with exit codes and hints
in terms of the command's options, `StepPrinter` shows a deployment's steps as they happen, and
`render_*` format the tables.

Exit codes: 0 done; 1 the operation failed or was refused (and `pack` found a bad package);
2 a usage error, or the server could not be reached or understood (connection, token, not
JSON); 3 gave up waiting for a deployment's outcome.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import click
import httpx
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion

from . import __version__
from ._admin import DEFAULT_PREFIX, TOKEN_ENV
from ._archive import ArchiveLimits, pack_directory, read_source
from ._client import DEFAULT_TIMEOUT, AdminClient
from ._detail import redact_url
from ._errors import (
    AdminClientError,
    AdminProblem,
    AdminUnreachable,
    DeploymentTimeout,
    HotDeployError,
    SignatureError,
    StoreError,
    UnreachableReason,
)
from ._manifest import MANIFEST_NAME, load_manifest
from ._serve import HOME_ENV
from ._signing import (
    TRUSTED_KEYS_ENV,
    SigningKeyError,
    TrustedKeys,
    check_signature,
    sign,
    signature_path,
    specs_from_env,
)
from ._store_url import STORE_ENV, open_store

URL_ENV = "HOTDEPLOY_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_HOME = ".hotdeploy"
HOST_APP = "starlette_hotdeploy._serve:create_host_app"

EXIT_FAILED = 1
EXIT_SERVER = 2  # also click's exit code for usage errors
CANARY_WAIT = 7 * 24 * 3600.0  # seconds a canary deploy is followed: as long as it runs
EXIT_TIMEOUT = 3

# `deploy` sends a file as it is: the server applies its own size cap.
UPLOAD_LIMITS = ArchiveLimits(max_archive_bytes=sys.maxsize)

# The client's hints name its Python arguments; the CLI's name its options instead.
SERVER_HINTS: dict[UnreachableReason, str] = {
    "connect": f" (set the URL with --url or ${URL_ENV})",
    "token_refused": f": check --token or ${TOKEN_ENV}",
    "no_token": f": pass the admin token with --token or ${TOKEN_ENV}",
    "not_json": " (it is off unless the server has an admin token; see also --prefix)",
}
WAIT_HINT = " (it may still finish: see `hotdeploy history`)"

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """One line on stderr (`hotdeploy: <message>`) and exit code 1: the operation failed."""

    exit_code = EXIT_FAILED

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"hotdeploy: {self.format_message()}", err=True)


class ServerError(CliError):
    """The server could not be reached or understood (connection, token, not JSON): exit 2."""

    exit_code = EXIT_SERVER


class BadOption(CliError):
    """An option's value cannot be used (a trusted key that is not one): exit 2, like click's
    usage errors."""

    exit_code = EXIT_SERVER


class WaitTimeout(CliError):
    """Gave up waiting for a deployment's outcome: exit 3 (it may still finish)."""

    exit_code = EXIT_TIMEOUT


def cli_error(exc: AdminClientError) -> CliError:
    """The CLI's error for a client error: its exit code, and hints naming the options."""
    if isinstance(exc, AdminUnreachable):
        return ServerError(exc.summary + SERVER_HINTS.get(exc.reason, exc.hint))
    if isinstance(exc, DeploymentTimeout):
        return WaitTimeout(exc.summary + WAIT_HINT)
    return CliError(exc.message)


# -- output ---------------------------------------------------------------------------------------


def _ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "-"


def _version(value: Any) -> str:
    return str(value) if value is not None else "-"


def step_line(step: dict[str, Any]) -> str:
    """`  load           1.2 ms  ok`; a step still running shows `running`."""
    name = str(step.get("name"))
    ok = step.get("ok")
    if ok is None:
        return f"  {name:<16}{'':>10}  running"
    return f"  {name:<16}{_ms(step.get('duration_ms')):>10}  {'ok' if ok else 'FAILED'}"


class StepPrinter:
    """Prints each step of a deployment once when it is first seen, and again when a step first
    seen running has finished."""

    def __init__(self, echo: Callable[[str], None] = click.echo) -> None:
        self._echo = echo
        self._finished: dict[int, bool] = {}  # step index -> whether its finished line was printed

    def update(self, record: dict[str, Any]) -> None:
        for index, step in enumerate(record.get("steps") or []):
            finished = step.get("ok") is not None
            seen = self._finished.get(index)  # None: not yet; False: seen running; True: done
            if seen is None or (seen is False and finished):
                self._echo(step_line(step))
                self._finished[index] = finished


def summary(record: dict[str, Any]) -> str:
    """`deploy greeter: 1.0 -> 2.0 succeeded in 21.7 ms`, and what else the record says:
    `...: downgrade, forced, signed by alice@example.com (SHA256:...)`."""
    notes = [flag for flag in ("downgrade", "forced") if record.get(flag)]
    if record.get("signer"):
        notes.append(f"signed by {record['signer']}")
    others = [entry for entry in record.get("bundle") or [] if entry.split(" ")[0] != record.get("package")]
    if others:
        notes.append(f"together with {', '.join(others)}")
    if record.get("moved"):
        notes.append(f"moved {', '.join(record['moved'])}")
    return (
        f"{record.get('operation')} {record.get('package')}: {_version(record.get('from_version'))} -> "
        f"{_version(record.get('to_version'))} {record.get('outcome')} in {_ms(record.get('duration_ms'))}"
        + (f": {', '.join(notes)}" if notes else "")
    )


def failure(record: dict[str, Any]) -> CliError:
    """The error of a deployment that did not succeed: its outcome, failed step and error."""
    step = record.get("error_step")
    at = f" at step {step!r}" if step else ""
    outcome = str(record.get("outcome")).replace("_", " ")
    return CliError(f"{record.get('operation')} {outcome}{at}: {record.get('error') or 'no detail'}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _with_sha(version: dict[str, Any]) -> str:
    """`2.0 85d819266b26`: a version and the start of its archive's sha256, which tells two
    archives deployed under one version number apart."""
    sha256 = version.get("sha256")
    return (
        f"{version.get('version')} {sha256[:12]}"
        if isinstance(sha256, str) and sha256
        else str(version.get("version"))
    )


def render_packages(packages: Sequence[dict[str, Any]]) -> list[str]:
    if not packages:
        return ["no packages deployed"]
    rows = []
    for package in packages:
        loaded = ", ".join(
            f"{_with_sha(v)} {v.get('state')} ({v.get('in_flight', 0)} in flight)"
            for v in package.get("versions") or []
        )
        available = ", ".join(_with_sha(v) for v in package.get("available_versions") or [])
        rows.append(
            [
                str(package.get("name")),
                str(package.get("mount")),
                _version(package.get("active_version")),
                loaded or "-",
                available or "-",
            ]
        )
    lines = table(["NAME", "MOUNT", "ACTIVE", "LOADED", "AVAILABLE"], rows)
    for package in packages:
        canary = package.get("canary")
        if canary:
            lines.append(canary_line(str(package.get("name")), canary))
    return lines


def canary_line(name: str, canary: dict[str, Any]) -> str:
    """`shop: canary 1.1 at 25% (step 2 of 5%:30s, 25%:1m, 100%), last analysis: pass (...)`"""
    line = f"{name}: canary {canary.get('version')} at {canary.get('weight_percent'):g}%"
    if canary.get("steps"):
        line += f" (step {canary.get('step')} of {canary.get('steps')})"
    analysis = canary.get("analysis")
    if analysis:
        line += f", last analysis: {analysis.get('verdict')} ({analysis.get('reason')})"
    return line


def render_graph(packages: Sequence[dict[str, Any]]) -> list[str]:
    """Each active package with what it requires (and whether the active version meets it) and
    which packages require it."""
    if not packages:
        return ["no packages deployed"]
    active = {str(p.get("name")): p.get("active_version") for p in packages}
    lines = []
    for package in packages:
        lines.append(f"{package.get('name')} {_version(package.get('active_version'))}")
        for other, spec in (package.get("requires") or {}).items():
            lines.append(
                f"  requires {other} {spec or '(any version)'}: {_requirement_state(active.get(other), spec)}"
            )
        bound = _bound_to(package)
        if bound:
            lines.append(f"  imports from {', '.join(f'{n} {v}' for n, v in bound.items())} (bound)")
        required_by = package.get("required_by") or []
        if required_by:
            lines.append(f"  required by {', '.join(required_by)}")
    return lines


def _bound_to(package: dict[str, Any]) -> dict[str, str]:
    """What the active version imports from: the versions of its requirements it is bound to."""
    for version in package.get("versions") or []:
        if version.get("state") == "active":
            return dict(version.get("bound_to") or {})
    return {}


def _requirement_state(version: str | None, spec: str) -> str:
    if version is None:
        return "UNMET, not active"
    try:
        met = SpecifierSet(spec).contains(version, prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return f"active {version}"
    return f"active {version}" if met else f"UNMET, active {version}"


def render_cluster(view: dict[str, Any]) -> list[str]:
    lines = [f"store: {view.get('store')}  generation: {view.get('generation')}"]
    desired = view.get("desired") or {}
    lines.append(
        "desired: " + (", ".join(f"{n} {d.get('version')}" for n, d in desired.items()) or "nothing")
    )
    rows = []
    for host in view.get("hosts") or []:
        for worker in host.get("workers") or []:
            serving = ", ".join(f"{n} {v}" for n, v in (worker.get("serving") or {}).items())
            rows.append(
                [
                    str(host.get("host")),
                    str(worker.get("id")),
                    f"{worker.get('heartbeat_age', 0):.1f}s",
                    serving or "-",
                    ", ".join(worker.get("lagging") or []) or "-",
                ]
            )
    if not rows:
        return [*lines, "no live workers"]
    return [*lines, *table(["HOST", "WORKER", "HEARTBEAT", "SERVING", "LAGGING"], rows)]


def render_history(deployments: Sequence[dict[str, Any]]) -> list[str]:
    if not deployments:
        return ["no deployments"]
    rows = []
    for record in deployments:
        outcome = str(record.get("outcome"))
        if record.get("error_step"):
            outcome += f" [{record['error_step']}]"
        rows.append(
            [
                str(record.get("id")),
                str(record.get("operation")),
                str(record.get("package") or "-"),
                f"{_version(record.get('from_version'))} -> {_version(record.get('to_version'))}",
                outcome,
                _ms(record.get("duration_ms")),
            ]
        )
    return table(["ID", "OPERATION", "PACKAGE", "VERSIONS", "OUTCOME", "DURATION"], rows)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


# -- deploy -----------------------------------------------------------------------------------------


def read_upload(source: Path) -> tuple[bytes, str]:
    """The archive to upload and how to name it: a directory is packed in memory, like `pack`."""
    if source.is_dir():
        packed = pack_directory(source)
        return packed.data, f"{source} (packed {packed.manifest.name} {packed.manifest.version})"
    try:
        return read_source(source, UPLOAD_LIMITS), str(source)
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror or exc}") from None


def sign_archive(data: bytes, key: Path) -> bytes:
    """The archive's signature by `key`, asking for the passphrase of an encrypted key."""
    try:
        return sign(data, key)
    except SigningKeyError as exc:
        if not exc.needs_passphrase:
            raise CliError(str(exc)) from None
    passphrase = click.prompt(f"passphrase for {key}", hide_input=True, err=True)
    try:
        return sign(data, key, passphrase.encode())
    except SigningKeyError as exc:
        raise CliError(str(exc)) from None


def read_signature(
    source: Path, data: bytes, named: Path | None, key: Path | None
) -> tuple[bytes | None, str]:
    """The signature to send with an archive and how to name it: made with `key`, read from the
    file `named`, else `<archive>.sig` if it is there. A signature that does not sign these bytes
    is refused here, before the upload: it is stale, or of another archive."""
    if key is not None:
        signature = sign_archive(data, key)
        return signature, f"signed with {key} ({check_signature(data, signature).fingerprint})"
    path = named if named is not None else signature_path(source)
    if named is None and (source.is_dir() or not path.is_file()):
        return None, ""
    try:
        signature = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        signer = check_signature(data, signature)
    except SignatureError as exc:
        raise CliError(
            f"{path} is not a signature of {source}: {exc.message}; sign it again, or delete {path}"
        ) from None
    return signature, f"signature {path} by {signer.fingerprint}"


def run_operation(call: Callable[[], dict[str, Any]]) -> None:
    """Run a synchronous operation (rollback, activate, undeploy): its steps and summary, or
    the steps of the failed deployment and the problem."""
    try:
        record = call()
    except AdminProblem as exc:
        if exc.deployment is not None:
            StepPrinter().update(exc.deployment)
        raise
    StepPrinter().update(record)
    if record.get("outcome") != "succeeded":
        raise failure(record)
    click.echo(summary(record))


# -- the commands -------------------------------------------------------------------------------------


def _transport() -> httpx.BaseTransport | None:
    """Tests may pass an httpx transport as the click context's `obj`."""
    ctx = click.get_current_context(silent=True)
    return ctx.find_object(httpx.BaseTransport) if ctx is not None else None


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise click.BadParameter(f"{value!r} must start with http:// or https://")
    return value


def with_client(command: F) -> F:
    """Add the server options (--url, --token, --prefix, --timeout) to a command, which gets an
    `AdminClient` as its first argument instead."""

    @functools.wraps(command)
    def wrapper(url: str, token: str | None, prefix: str, timeout: float, **kwargs: Any) -> Any:
        try:
            with AdminClient(url, token, prefix=prefix, timeout=timeout, transport=_transport()) as client:
                return command(client, **kwargs)
        except AdminClientError as exc:
            raise cli_error(exc) from None

    options = [
        click.option(
            "--url",
            metavar="URL",
            envvar=URL_ENV,
            default=DEFAULT_URL,
            show_default=True,
            callback=_check_url,
            help=f"The server's base URL [env: {URL_ENV}].",
        ),
        click.option(
            "--token", metavar="TOKEN", envvar=TOKEN_ENV, help=f"The admin API token [env: {TOKEN_ENV}]."
        ),
        click.option(
            "--prefix",
            metavar="PATH",
            default=DEFAULT_PREFIX,
            show_default=True,
            help="The admin API's path prefix.",
        ),
        click.option(
            "--timeout",
            metavar="SECONDS",
            type=click.FloatRange(min=0, min_open=True),
            default=DEFAULT_TIMEOUT,
            show_default=True,
            help="Seconds to wait for the server (for deploy: for the outcome).",
        ),
    ]
    decorated: Callable[..., Any] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return cast(F, decorated)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hotdeploy")
def cli() -> None:
    """Hot-deploy packages into a running starlette-hotdeploy server."""


@cli.command(short_help="Validate a package directory and zip it.")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The archive to write [default: ./<name>-<version>.zip].",
)
@click.option(
    "--sign",
    "key",
    metavar="KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sign the archive with this ssh-ed25519 private key: writes <archive>.sig beside it.",
)
def pack(directory: Path, output: Path | None, key: Path | None) -> None:
    """Validate the package DIRECTORY and write it as a zip archive (and its signature, with
    --sign).

    The archive is deterministic: packing the same files twice gives the same sha256."""
    try:
        manifest = load_manifest(directory / MANIFEST_NAME)
        target = output or Path(f"{manifest.name}-{manifest.version}.zip")
        packed = pack_directory(directory, exclude=target)
    except HotDeployError as exc:
        raise CliError(str(exc)) from None
    sig_path = signature_path(target)
    # Signed before anything is written: a key that cannot sign leaves no half result.
    signature = sign_archive(packed.data, key) if key is not None else None
    try:
        target.write_bytes(packed.data)
        if signature is not None:
            sig_path.write_bytes(signature)
    except OSError as exc:
        raise CliError(f"cannot write {exc.filename or target}: {exc.strerror or exc}") from None
    click.echo(f"{target}  {len(packed.data)} bytes  sha256:{packed.sha256}")
    if signature is not None:
        click.echo(f"{sig_path}  signed by {check_signature(packed.data, signature).fingerprint}")
    elif sig_path.is_file():
        drop_stale_signature(sig_path, packed.data)


def drop_stale_signature(path: Path, data: bytes) -> None:
    """An unsigned pack leaves an earlier `<archive>.sig` beside the archive: `deploy` would send
    it. Kept if it still signs these bytes (the pack is deterministic), removed if not."""
    try:
        signer = check_signature(data, path.read_bytes())
    except SignatureError:
        try:
            path.unlink()
        except OSError as exc:
            raise CliError(
                f"{path} does not sign the new archive, and cannot be removed: {exc.strerror}"
            ) from None
        click.echo(f"{path}  removed: it did not sign the new archive")
        return
    except OSError:
        return  # unreadable: `deploy` will say so, if it is ever sent
    click.echo(f"{path}  kept: it still signs the archive ({signer.fingerprint})")


@cli.command(short_help="Upload a package (or a set) and follow its deployment.")
@click.argument(
    "sources", metavar="FILE...", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path)
)
@click.option("--no-wait", is_flag=True, help="Print the deployment id once it is accepted, and exit.")
@click.option(
    "--signature",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The archive's signature [default: FILE.sig, if it exists].",
)
@click.option(
    "--sign",
    "key",
    metavar="KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sign the archive with this ssh-ed25519 private key and send the signature.",
)
@click.option("--force", is_flag=True, help="Replace a version number that already has a different archive.")
@click.option(
    "--shadow-host-routes", is_flag=True, help="Let the mount cover routes of the host app, on purpose."
)
@click.option(
    "--canary",
    metavar="STEPS",
    is_flag=False,
    flag_value="true",
    default=None,
    help="A canary deploy: its steps (like '5%:30s,25%:1m,100%'), or the manifest's without STEPS.",
)
@click.option("--no-canary", is_flag=True, help="A plain switch, even if the manifest's strategy is canary.")
@with_client
def deploy(
    client: AdminClient,
    sources: tuple[Path, ...],
    no_wait: bool,
    signature: Path | None,
    key: Path | None,
    force: bool,
    shadow_host_routes: bool,
    canary: str | None,
    no_canary: bool,
) -> None:
    """Upload the archive FILE (a directory is packed first) and show the deployment's steps.
    Several FILEs are deployed as one set: all prepared and checked, then all switched at once,
    or none.

    FILE.sig, if it exists, is sent as its signature. A canary deploy is followed through its
    steps until it is promoted or aborted (Ctrl-C stops following, not the canary).
    Exits 0 once the new version is active, 1 if the deployment failed or was aborted."""
    if signature is not None and key is not None:
        raise click.UsageError("give --sign KEY or --signature FILE, not both")
    if canary is not None and no_canary:
        raise click.UsageError("give --canary or --no-canary, not both")
    if len(sources) > 1:
        if canary is not None or signature is not None:
            raise click.UsageError("a set (several FILEs) takes neither --canary nor --signature")
        deploy_set(client, sources, no_wait, key, force, shadow_host_routes)
        return
    [source] = sources
    wanted: bool | str | None = False if no_canary else (True if canary == "true" else canary)
    try:
        data, label = read_upload(source)
    except HotDeployError as exc:
        raise CliError(str(exc)) from None
    signature_bytes, signed = read_signature(source, data, signature, key)
    digest = hashlib.sha256(data).hexdigest()
    if not no_wait:
        signed = f", {signed}" if signed else ""
        click.echo(f"uploading {label}: {len(data)} bytes, sha256:{digest[:12]}{signed} to {client.url}")
    record = client.submit(
        data, signature=signature_bytes, force=force, shadow_host_routes=shadow_host_routes, canary=wanted
    )
    if no_wait:
        click.echo(record.get("id"))
        return
    click.echo(f"deployment {record.get('id')}")
    # A canary takes as long as its steps (or until promoted by hand): no deadline of ours.
    timeout = CANARY_WAIT if wanted not in (None, False) else None
    record = client.wait(record, on_update=StepPrinter().update, timeout=timeout)
    if record.get("outcome") != "succeeded":
        raise failure(record)
    click.echo(summary(record))


def deploy_set(
    client: AdminClient,
    sources: tuple[Path, ...],
    no_wait: bool,
    key: Path | None,
    force: bool,
    shadow_host_routes: bool,
) -> None:
    """`hotdeploy deploy a.zip b.zip`: one upload, one operation."""
    archives: list[tuple[str, bytes, bytes | None]] = []
    for source in sources:
        try:
            data, label = read_upload(source)
        except HotDeployError as exc:
            raise CliError(str(exc)) from None
        signature_bytes, _ = read_signature(source, data, None, key)
        archives.append((label, data, signature_bytes))
        if not no_wait:
            click.echo(
                f"uploading {label}: {len(data)} bytes, sha256:{hashlib.sha256(data).hexdigest()[:12]}"
            )
    if len({signature is None for _, _, signature in archives}) > 1:
        raise CliError("sign every archive of a set, or none (some have a .sig file, some do not)")
    record = client.submit_set(archives, force=force, shadow_host_routes=shadow_host_routes)
    if no_wait:
        click.echo(record.get("id"))
        return
    click.echo(f"deployment {record.get('id')} (a set of {len(archives)})")
    record = client.wait(record, on_update=StepPrinter().update)
    if record.get("outcome") != "succeeded":
        raise failure(record)
    click.echo(summary(record))


@cli.command(short_help="Show the deployed packages.")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the admin API's JSON as it is.")
@with_client
def status(client: AdminClient, name: str | None, as_json: bool) -> None:
    """The deployed packages (or package NAME): mount, active and loaded versions."""
    if name is not None:
        package = client.package(name)
        if as_json:
            echo_json(package)
        else:
            click.echo("\n".join(render_packages([package])))
        return
    packages = client.packages()
    if as_json:
        echo_json({"packages": packages})
    else:
        click.echo("\n".join(render_packages(packages)))


@cli.group(short_help="Promote or abort a running canary.")
def canary() -> None:
    """A canary deploy (hotdeploy deploy --canary) moves through its steps by itself; these
    move it on now, from any worker."""


@canary.command(short_help="Move the canary to its next step now.")
@click.argument("name")
@click.option("--all", "all_steps", is_flag=True, help="All the way: the canary becomes the active version.")
@with_client
def promote(client: AdminClient, name: str, all_steps: bool) -> None:
    """Move package NAME's canary to its next step without waiting for its analysis."""
    state = client.promote_canary(name, all_steps=all_steps)
    click.echo(
        f"{name}: promoting canary {state.get('version')} " + ("to 100%" if all_steps else "to its next step")
    )


@canary.command(short_help="Stop the canary: everyone gets the active version.")
@click.argument("name")
@with_client
def abort(client: AdminClient, name: str) -> None:
    """Stop package NAME's canary: no new request reaches it, it drains and is unloaded; the
    active version (never touched) serves everyone."""
    state = client.abort_canary(name)
    click.echo(f"{name}: aborting canary {state.get('version')}")


@cli.command(short_help="Show what each package requires, and what requires it.")
@click.option("--json", "as_json", is_flag=True, help="Print each package's requirements as JSON.")
@with_client
def graph(client: AdminClient, as_json: bool) -> None:
    """The dependency graph of the active packages: for each, the packages its active version
    requires (with the version active there) and the packages that require it."""
    packages = client.packages()
    if as_json:
        keys = ("name", "active_version", "requires", "required_by")
        echo_json(
            {
                "packages": [
                    {**{key: package.get(key) for key in keys}, "bound_to": _bound_to(package)}
                    for package in packages
                ]
            }
        )
    else:
        click.echo("\n".join(render_graph(packages)))


@cli.command(short_help="Show every host and worker, and what each serves.")
@click.option("--json", "as_json", is_flag=True, help="Print the admin API's JSON as it is.")
@with_client
def cluster(client: AdminClient, as_json: bool) -> None:
    """The hosts and workers sharing the server's store: the versions each serves, the age of
    its heartbeat, and the packages where it lags behind the desired state."""
    view = client.cluster()
    if as_json:
        echo_json(view)
    else:
        click.echo("\n".join(render_cluster(view)))


@cli.command(short_help="Go back to a package's previous version.")
@click.argument("name")
@with_client
def rollback(client: AdminClient, name: str) -> None:
    """Switch package NAME back to the version that was active before."""
    run_operation(lambda: client.rollback(name))


@cli.command(short_help="Activate an available version of a package.")
@click.argument("name")
@click.argument("version")
@with_client
def activate(client: AdminClient, name: str, version: str) -> None:
    """Make VERSION of package NAME active (it must still be available)."""
    run_operation(lambda: client.activate(name, version))


@cli.command(short_help="Unmount and remove a package.")
@click.argument("name")
@with_client
def undeploy(client: AdminClient, name: str) -> None:
    """Unmount package NAME, drain and shut down its versions."""
    run_operation(lambda: client.undeploy(name))


@cli.command()
@click.option("--package", "package", metavar="NAME", help="Only this package's deployments.")
@click.option(
    "--limit",
    metavar="N",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="How many to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the admin API's JSON as it is.")
@with_client
def history(client: AdminClient, package: str | None, limit: int, as_json: bool) -> None:
    """List the deployments (deploy, rollback, activate, undeploy), newest first."""
    deployments = client.deployments(package, limit)
    if as_json:
        echo_json({"deployments": deployments})
    else:
        click.echo("\n".join(render_history(deployments)))


def _absolute(spec: str) -> str:
    """A key file's path made absolute, for the worker processes; a key line as it is (the specs
    were loaded: what is not a file is a key line)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def home_option(what: str) -> Callable[[F], F]:
    """`--home DIR` ($HOTDEPLOY_HOME, else .hotdeploy), for the commands that work on a home."""
    return click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=HOME_ENV,
        default=DEFAULT_HOME,
        show_default=True,
        help=f"{what} [env: {HOME_ENV}].",
    )


def _http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@cli.command(short_help="Run the package host on uvicorn.")
@home_option("Where unpacked versions are kept")
@click.option(
    "--store",
    metavar="URL",
    envvar=STORE_ENV,
    help=(
        "Share the state through this database (postgresql://...): every host pointing at it "
        f"converges on one state. Default: SQLite under the home [env: {STORE_ENV}]."
    ),
)
@click.option(
    "--host", metavar="HOST", default="127.0.0.1", show_default=True, help="The interface to listen on."
)
@click.option(
    "--port", metavar="PORT", type=click.IntRange(0, 65535), default=8000, show_default=True, help="The port."
)
@click.option(
    "--workers",
    metavar="N",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes; they share the home and converge on one state.",
)
@click.option(
    "--token",
    metavar="TOKEN",
    envvar=TOKEN_ENV,
    help=f"The admin API token [env: {TOKEN_ENV}; default: a new one, printed].",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug", "trace"]),
    default="info",
    show_default=True,
    help="uvicorn's log level.",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    metavar="SPEC",
    multiple=True,
    help=(
        "Accept only archives signed by this key: a public key file, an allowed_signers file, or a "
        f"key line 'ssh-ed25519 AAAA...'. Repeatable [env: {TRUSTED_KEYS_ENV}, {os.pathsep}-separated]."
    ),
)
def serve(
    home: Path,
    store: str | None,
    host: str,
    port: int,
    workers: int,
    token: str | None,
    log_level: str,
    trusted_keys: tuple[str, ...],
) -> None:
    """Run the package host on uvicorn: an empty app that serves hot-deployed packages and the
    admin API."""
    import uvicorn  # only this command needs it

    # Read here as well as in every worker: a bad key stops `serve` with one line, before uvicorn.
    # Not click's envvar: it would split a key line at its spaces.
    specs = list(trusted_keys) or specs_from_env(os.environ.get(TRUSTED_KEYS_ENV))
    try:
        keys = TrustedKeys.load(specs)
    except SigningKeyError as exc:
        raise BadOption(f"trusted key {exc}") from None
    if not token:
        token = secrets.token_urlsafe(24)
        click.echo(f"admin token: {token}")
    # The app factory runs in each worker process and reads its settings from the environment.
    os.environ[HOME_ENV] = str(home.resolve())
    os.environ[TOKEN_ENV] = token
    if store:
        try:  # here too: a bad URL or an unreachable database stops `serve` with one line
            open_store(home, store).close()
        except StoreError as exc:
            raise BadOption(str(exc)) from None
        os.environ[STORE_ENV] = store
    else:
        os.environ.pop(STORE_ENV, None)
    if keys:
        os.environ[TRUSTED_KEYS_ENV] = os.pathsep.join(_absolute(spec) for spec in specs)
        click.echo(f"trusted keys: {', '.join(signer.describe() for signer in keys)}")
    else:
        os.environ.pop(TRUSTED_KEYS_ENV, None)
    where = f"  store: {redact_url(store)}" if store else ""
    admin = f"{_http_url(host, port)}{DEFAULT_PREFIX}"
    click.echo(f"admin API: {admin}  home: {os.environ[HOME_ENV]}{where}")
    click.echo(f"web UI: {admin}/ui/ (sign in with the token)")
    uvicorn.run(
        HOST_APP, factory=True, host=host, port=port, workers=workers, lifespan="on", log_level=log_level
    )


@cli.group()
def store() -> None:
    """The store a server keeps its state in (SQLite under the home, or PostgreSQL)."""


@store.command("migrate", short_help="Copy a home's packages and history into another store.")
@home_option("The home whose store is copied")
@click.option(
    "--from",
    "source_url",
    metavar="URL",
    help="Copy from this database instead of the home's SQLite store.",
)
@click.option(
    "--to", "target_url", metavar="URL", required=True, help="The store to copy into: postgresql://..."
)
def store_migrate(home: Path, source_url: str | None, target_url: str) -> None:
    """Copy every package (its activated archives, active version and rollback lineage) and the
    deployment history into an empty store. Stop the servers of both first; then start the new
    hosts with --store URL: they restore from it."""
    import tempfile

    from ._store_migrate import migrate

    if source_url is None and not (home / "state.db").is_file():
        raise BadOption(f"{home} has no state.db: nothing to migrate (is --home right?)")
    try:
        source = open_store(home, source_url)
        try:
            with tempfile.TemporaryDirectory(prefix="hotdeploy-migrate-") as cache:
                target = open_store(Path(cache), target_url)
                try:
                    done = migrate(source, target)
                finally:
                    target.close()
        finally:
            source.close()
    except StoreError as exc:
        raise CliError(str(exc)) from None
    for name, version in done.packages.items():
        click.echo(f"{name} {version}")
    click.echo(
        f"migrated {len(done.packages)} package(s), {done.archives} archive(s), {done.records} record(s) "
        f"to {redact_url(target_url)}"
    )


def main() -> None:
    """The console script `hotdeploy`."""
    cli(prog_name="hotdeploy")


if __name__ == "__main__":
    main()
