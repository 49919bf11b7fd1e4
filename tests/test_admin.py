"""The admin API over HTTP: auth, every endpoint and status of docs/admin-api.md, problem details,
the SSE progress stream and the OpenAPI document.

A host Starlette app wraps `HotDeployMiddleware(admin_token="s3cret", admin_read_token="reader")`
and is driven through `httpx.ASGITransport`. Every failed deployment must leave the previous
version serving, both while the failing call runs and after it: a `Witness` asks `/greeter/`
which version answers from inside the call (while the handler reads the upload body, and from the
deployer's check hooks) and the test asks again afterwards. Ordering uses hooks and events, never
sleeps. The SSE stream is read by calling the ASGI app directly (httpx's ASGITransport buffers a
response until the app returns).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import testkit
from packages import DEPLOY_STEPS, write_package, zip_directory
from starlette_hotdeploy import ArchiveLimits, Deployer, HotDeployMiddleware, PackageVersion, hookimpl
from starlette_hotdeploy._sqlite_store import SQLiteStore
from starlette_hotdeploy._types import Message

pytestmark = pytest.mark.anyio

TOKEN, READ_TOKEN = "s3cret", "reader"
PREFIX = "/_hotdeploy"
MAX_UPLOAD = 32 * 1024
ZIP = "application/zip"
ZIP_HEADERS = {"Content-Type": ZIP}
PROBLEM = "application/problem+json"
RECORD_KEYS = (
    "id operation package from_version to_version sha256 worker signer downgrade forced started_at decided_at"
    " finished_at duration_ms"
    " outcome error error_step steps workers canary moved bundle"
)
VERSION_KEYS = "version state in_flight sha256 served terminated loaded_at activated_at error bound_to"
STEPS = DEPLOY_STEPS

Upload = tuple[bytes, str]  # a request body and its content type


# -- the host, clients and packages --------------------------------------------------------------


def make_host(
    deployer: Deployer,
    *,
    admin_token: str | None = TOKEN,
    admin_read_token: str | None = READ_TOKEN,
    max_upload_bytes: int = MAX_UPLOAD,
) -> Starlette:
    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host")

    middleware = Middleware(
        HotDeployMiddleware,
        deployer=deployer,
        admin_token=admin_token,
        admin_read_token=admin_read_token,
        max_upload_bytes=max_upload_bytes,
    )
    return Starlette(routes=[Route("/", home)], middleware=[middleware])


def connect(app: Starlette, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers)


@pytest.fixture
def host(deployer: Deployer) -> Starlette:
    return make_host(deployer)


@pytest.fixture
async def admin(host: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client with the full token (it also reaches the packages and the host app)."""
    async with connect(host) as client:
        yield client


def archive(
    sources: Path,
    version: str = "1.0",
    name: str = "greeter",
    *,
    mount: str | None = None,
    manifest_extra: str = "",
    app: str | None = None,
) -> bytes:
    root = write_package(sources, name, version, mount=mount, manifest_extra=manifest_extra, app=app)
    return zip_directory(root, sources / f"{root.name}.zip").read_bytes()


def multipart(files: dict[str, bytes], fields: dict[str, str] | None = None) -> Upload:
    boundary = "hotdeploy-test-boundary"
    body = b""
    for name, value in (fields or {}).items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, data in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.zip"\r\n'
            f"Content-Type: {ZIP}\r\n\r\n"
        )
        body += head.encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def deploy(client: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    response = await client.post(f"{PREFIX}/packages", content=data, headers={"Content-Type": ZIP})
    assert response.status_code == 201, response.text
    record: dict[str, Any] = response.json()
    return record


async def version_of(client: httpx.AsyncClient, path: str = "/greeter/") -> str:
    """The version that answers `path`, or "HTTP <status>" when none does."""
    response = await client.get(path)
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    return str(response.json()["version"])


async def assert_serving(client: httpx.AsyncClient, version: str, path: str = "/greeter/") -> None:
    assert await version_of(client, path) == version


def assert_host_404(response: httpx.Response) -> None:
    """The request reached the host app, which has no such route."""
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Not Found"


def assert_problem(
    response: httpx.Response, status: int, *fragments: str, title: str | None = None
) -> dict[str, Any]:
    """An RFC 9457 problem with `status` whose detail names the cause (each of `fragments`)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert (body["type"], body["status"]) == ("about:blank", status)
    assert isinstance(body["title"], str)
    assert body["title"]
    for fragment in fragments:
        assert fragment in body["detail"]
    if title is not None:
        assert body["title"] == title
    return body


# -- plugins ------------------------------------------------------------------------------------


class Witness:
    """Asks /greeter/ which version answers while a call runs: from the upload body as the handler
    reads it, and from inside each check hook of the deployment."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seen: list[tuple[str, str]] = []

    async def look(self, where: str) -> None:
        self.seen.append((where, await version_of(self.client)))

    async def body(self, data: bytes) -> AsyncIterator[bytes]:
        """`data` as a streamed body (no Content-Length) that looks first."""
        await self.look("upload")
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    @hookimpl
    async def hotdeploy_validate(self) -> None:
        await self.look("validate")

    @hookimpl
    async def hotdeploy_check_before_activate(self) -> None:
        await self.look("before")

    @hookimpl
    async def hotdeploy_check_after_activate(self) -> None:
        await self.look("after")


class Gatekeeper:
    """Vetoes one version before or after its activation."""

    def __init__(self, when: Literal["before", "after"], reason: str, version: str = "2.0") -> None:
        self.when, self.reason, self.version = when, reason, version

    def _answer(self, when: str, version: PackageVersion) -> str | None:
        return self.reason if when == self.when and version.version == self.version else None

    @hookimpl
    def hotdeploy_check_before_activate(self, version: PackageVersion) -> str | None:
        return self._answer("before", version)

    @hookimpl
    def hotdeploy_check_after_activate(self, version: PackageVersion) -> str | None:
        return self._answer("after", version)


class Pause:
    """Holds the pre-activation check of version 2.0: sets "checking", waits for "resume"."""

    @hookimpl
    async def hotdeploy_check_before_activate(self, version: PackageVersion) -> None:
        if version.version == "2.0":
            testkit.event("checking").set()
            await testkit.event("resume").wait()


class Outcomes:
    """Sets "finished" when a deployment ended, "drained <version>" when a version retired."""

    @hookimpl
    def hotdeploy_activated(self) -> None:
        testkit.event("finished").set()

    @hookimpl
    def hotdeploy_failed(self) -> None:
        testkit.event("finished").set()

    @hookimpl
    def hotdeploy_drained(self, version: PackageVersion) -> None:
        testkit.event(f"drained {version.version}").set()


# -- turning it on, auth --------------------------------------------------------------------------


@pytest.fixture
def no_env_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTDEPLOY_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("HOTDEPLOY_ADMIN_READ_TOKEN", raising=False)


@pytest.mark.usefixtures("no_env_tokens")
async def test_the_api_is_off_without_a_token(deployer: Deployer, sources: Path) -> None:
    host = make_host(deployer, admin_token=None)  # a read-only token alone does not turn it on
    async with connect(host) as client:
        for method in ("GET", "POST", "DELETE"):
            assert_host_404(await client.request(method, f"{PREFIX}/packages"))
        assert_host_404(await client.get(f"{PREFIX}/openapi.json"))
        # Nothing is reserved: a package may even mount there.
        await deployer.deploy(write_package(sources, "squatter", mount=PREFIX))
        await assert_serving(client, "1.0", f"{PREFIX}/")


async def test_two_hosts_on_one_deployer_each_serve_their_own_admin_api(deployer: Deployer) -> None:
    def build(token: str, prefix: str) -> Starlette:
        async def home(request: Request) -> PlainTextResponse:
            return PlainTextResponse("host")

        middleware = Middleware(
            HotDeployMiddleware, deployer=deployer, admin_token=token, admin_prefix=prefix
        )
        return Starlette(routes=[Route("/{path:path}", home)], middleware=[middleware])

    first, second = build("first", PREFIX), build("second", PREFIX)
    other = build("other", "/ops/deploys")
    async with (
        connect(first, "first") as one,
        connect(second, "second") as two,
        connect(other, "other") as three,
    ):
        assert (await one.get(f"{PREFIX}/packages")).status_code == 200
        assert (await two.get(f"{PREFIX}/packages")).status_code == 200  # its own token, not the first's
        assert_problem(await one.get(f"{PREFIX}/packages", headers={"Authorization": "Bearer second"}), 401)
        assert (await three.get("/ops/deploys/packages")).status_code == 200
        # Another host's admin prefix is an ordinary path here.
        assert (await three.get(f"{PREFIX}/packages")).text == "host"
        assert (await one.get("/ops/deploys/packages")).text == "host"


@pytest.mark.parametrize("prefix", ["", "/", "admin"])
async def test_an_admin_prefix_must_be_below_the_root(deployer: Deployer, prefix: str) -> None:
    app = Starlette()
    with pytest.raises(ValueError, match="admin_prefix must be a path below the root"):
        HotDeployMiddleware(app, deployer, admin_token=TOKEN, admin_prefix=prefix)


async def test_tokens_from_the_environment(deployer: Deployer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTDEPLOY_ADMIN_TOKEN", "env-admin")
    monkeypatch.setenv("HOTDEPLOY_ADMIN_READ_TOKEN", "env-reader")
    host = make_host(deployer, admin_token=None, admin_read_token=None)
    async with (
        connect(host, None) as anonymous,
        connect(host, "env-admin") as full,
        connect(host, "env-reader") as reader,
    ):
        assert_problem(await anonymous.get(f"{PREFIX}/packages"), 401, "missing Authorization")
        assert (await full.get(f"{PREFIX}/packages")).json() == {"packages": []}
        assert (await reader.get(f"{PREFIX}/packages")).status_code == 200
        assert_problem(await reader.delete(f"{PREFIX}/packages/greeter"), 403, "may only GET")
        assert_problem(await full.delete(f"{PREFIX}/packages/greeter"), 404, "no package named 'greeter'")


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, "missing Authorization: Bearer <token>"),
        ("Bearer wrong", "a valid bearer token is required"),
        (f"Bearer {TOKEN}x", "a valid bearer token is required"),
        (f"Basic {TOKEN}", "a valid bearer token is required (Authorization: Bearer <token>)"),
        (TOKEN, "a valid bearer token is required (Authorization: Bearer <token>)"),
    ],
    ids=["none", "wrong", "longer", "basic", "no scheme"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_missing_or_wrong_token_is_401(
    deployer: Deployer, host: Starlette, sources: Path, authorization: str | None, detail: str, method: str
) -> None:
    headers = {"Content-Type": ZIP} | ({"Authorization": authorization} if authorization else {})
    async with connect(host, None) as client:
        response = await client.request(
            method, f"{PREFIX}/packages", content=archive(sources), headers=headers
        )
        assert_problem(response, 401, detail, title="unauthorized")
        assert response.headers["www-authenticate"] == 'Bearer realm="hotdeploy"'
        assert list(deployer.history) == []
        await assert_serving(client, "HTTP 404")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/packages", "archive"),
        ("POST", "/packages?wait=false", "archive"),
        ("POST", "/packages/greeter/rollback", None),
        ("POST", "/packages/greeter/activate", '{"version": "1.0"}'),
        ("DELETE", "/packages/greeter", None),
    ],
)
async def test_the_read_only_token_may_only_get(
    deployer: Deployer,
    host: Starlette,
    admin: httpx.AsyncClient,
    sources: Path,
    method: str,
    path: str,
    body: str | None,
) -> None:
    await deploy(admin, archive(sources, "1.0"))
    await deploy(admin, archive(sources, "2.0"))
    history = len(deployer.history)
    content = archive(sources, "3.0") if body == "archive" else (body or "").encode()
    async with connect(host, READ_TOKEN) as reader:
        for read in ("/packages", "/packages/greeter", "/deployments", "/openapi.json"):
            assert (await reader.get(PREFIX + read)).status_code == 200
        response = await reader.request(method, PREFIX + path, content=content)
        assert_problem(response, 403, "the read-only token may only GET", title="forbidden")
    assert len(deployer.history) == history
    await assert_serving(admin, "2.0")


# -- POST /packages -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["application/zip", "application/octet-stream", "multipart"])
async def test_deploy_an_upload(admin: httpx.AsyncClient, sources: Path, kind: str) -> None:
    data = archive(sources)
    body, content_type = multipart({"file": data}, {"note": "v1"}) if kind == "multipart" else (data, kind)
    response = await admin.post(f"{PREFIX}/packages", content=body, headers={"Content-Type": content_type})

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    record = response.json()
    assert response.headers["location"] == f"{PREFIX}/deployments/{record['id']}"
    assert set(record) == set(RECORD_KEYS.split())
    assert (record["operation"], record["package"], record["from_version"], record["to_version"]) == (
        "deploy",
        "greeter",
        None,
        "1.0",
    )
    assert (record["outcome"], record["error"], record["error_step"]) == ("succeeded", None, None)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["finished_at"] >= record["started_at"]
    assert [step["name"] for step in record["steps"]] == STEPS
    assert all(step["ok"] is True and step["duration_ms"] >= 0 for step in record["steps"])
    assert (await admin.get(response.headers["location"])).json() == record
    await assert_serving(admin, "1.0")
    assert (await admin.get("/")).text == "host"


async def test_redeploying_the_active_archive_is_unchanged(admin: httpx.AsyncClient, sources: Path) -> None:
    data = archive(sources)
    await deploy(admin, data)
    record = await deploy(admin, data)
    assert [step["name"] for step in record["steps"]] == ["unpack", "unchanged"]
    assert (record["from_version"], record["to_version"], record["outcome"]) == ("1.0", "1.0", "succeeded")
    assert testkit.calls == ["startup greeter 1.0"]


LIFESPAN_FAILS = """
import contextlib
from starlette.applications import Starlette

@contextlib.asynccontextmanager
async def lifespan(app):
    raise RuntimeError("cannot open the database")
    yield

app = Starlette(lifespan=lifespan)
"""


def upgrade(**options: Any) -> Callable[[Path], Upload]:
    """Version 2.0 of greeter (or of `name`), zipped."""
    return lambda sources: (archive(sources, "2.0", **options), ZIP)


def without_manifest(sources: Path) -> Upload:
    root = write_package(sources, version="2.0")
    (root / "hotdeploy.toml").unlink()
    return zip_directory(root, sources / "bare.zip").read_bytes(), ZIP


@dataclass(frozen=True)
class Failure:
    """A deployment that must fail, and what the answer says."""

    status: int
    title: str
    detail: str | tuple[str, ...]  # parts of the problem's detail
    build: Callable[[Path], Upload]
    outcome: str | None = "failed"  # the record's outcome; None: refused before any deployment
    step: str | None = None  # the record's error_step
    package: str | None = "greeter"  # the problem's `package`
    seen: tuple[str, ...] = ("upload",)  # where the witness looked (it must have seen 1.0)
    streamed: bool = True  # the body is streamed (no Content-Length) by the witness
    veto: Gatekeeper | None = None
    limits: ArchiveLimits | None = None


def refused(status: int, title: str, detail: str, build: Callable[[Path], Upload], **kw: Any) -> Failure:
    """Refused by the handler before a deployment began: no record, no package."""
    return Failure(status, title, detail, build, outcome=None, package=None, **kw)


LOADED = ("upload", "validate")  # the witness looked at these points (load and start come later)
CHECKED = (*LOADED, "before")
FAILURES: dict[str, Failure] = {
    "empty body": refused(400, "invalid archive", "the request body is empty", lambda _: (b"", ZIP)),
    "not a zip": Failure(
        400,
        "invalid archive",
        "upload is not a zip or wheel archive",
        lambda _: (b"PK? certainly not a zip", "application/octet-stream"),
        step="unpack",
        package=None,
    ),
    "no manifest": Failure(
        400,
        "invalid archive",
        "no hotdeploy.toml at the archive root",
        without_manifest,
        step="unpack",
        package=None,
    ),
    "manifest: unknown key": Failure(
        400,
        "invalid manifest",
        "hotdeploy.toml: colour: unknown key",
        upgrade(manifest_extra='colour = "red"\n'),
        step="manifest",
    ),
    "manifest: bad mount": Failure(
        400,
        "invalid manifest",
        "hotdeploy.toml: mount: 'greeter' must start with '/'",
        upgrade(mount="greeter"),
        step="manifest",
    ),
    "multipart without a file": refused(
        400,
        "invalid upload",
        "a multipart upload must hold one archive file, or up to 32 (a set deployed together), and "
        "optionally one part named 'signature' per archive; got 0 file(s) and 0 signature(s)",
        lambda _: multipart({}, {"note": "x"}),
    ),
    "multipart, two files and one signature": refused(
        400,
        "invalid upload",
        "one part named 'signature' per archive; got 2 file(s) and 1 signature(s)",
        lambda s: multipart({"a": archive(s, "2.0"), "b": archive(s, "3.0", "other"), "signature": b"x"}),
    ),
    "multipart with too many files": refused(
        400,
        "invalid upload",
        "Too many files",
        lambda s: multipart({f"f{i}": b"x" for i in range(65)}),
    ),
    "unsupported media type": refused(
        415, "unsupported media type", "got text/plain", lambda s: (archive(s, "2.0"), "text/plain"), seen=()
    ),
    "too large (Content-Length)": refused(
        413,
        "archive too large",
        f"over the {MAX_UPLOAD}-byte limit",
        lambda _: (b"x" * (MAX_UPLOAD + 1), ZIP),
        seen=(),
        streamed=False,
    ),
    "too large (streamed)": refused(
        413, "archive too large", f"over the {MAX_UPLOAD}-byte limit", lambda _: (b"x" * MAX_UPLOAD * 4, ZIP)
    ),
    "unpacks past the limits": Failure(
        413,
        "archive too large",
        "over the 1000-byte limit",
        upgrade(),
        step="unpack",
        package=None,
        limits=ArchiveLimits(max_total_bytes=1000),
    ),
    "mount collision": Failure(
        409,
        "mount conflict",
        "mount '/greeter/sub' overlaps '/greeter' of package 'greeter'",
        upgrade(name="other", mount="/greeter/sub"),
        step="manifest",
        package="other",
    ),
    "mount on the admin prefix": Failure(
        409,
        "mount conflict",
        f"mount '{PREFIX}' overlaps '{PREFIX}', reserved for the admin API",
        upgrade(name="other", mount=PREFIX),
        step="manifest",
        package="other",
    ),
    "mount under the admin prefix": Failure(
        409,
        "mount conflict",
        f"mount '{PREFIX}/x' overlaps '{PREFIX}', reserved for the admin API",
        upgrade(name="other", mount=f"{PREFIX}/x"),
        step="manifest",
        package="other",
    ),
    "syntax error": Failure(
        422,
        "package failed to load",
        "syntax error in 'greeter.app' (app.py:2)",
        upgrade(app="import os\ndef broken(:\n"),
        step="load",
        seen=LOADED,
    ),
    "import raises": Failure(
        422,
        "package failed to load",
        "importing 'greeter.app' raised RuntimeError (app.py:2): no database",
        upgrade(app="import os\nraise RuntimeError('no database')\n"),
        step="load",
        seen=LOADED,
    ),
    "missing module": Failure(
        422,
        "package failed to load",
        ("no module named 'greeter.nothing_here'", "app.py:2"),
        upgrade(app="import os\nimport greeter.nothing_here\n"),
        step="load",
        seen=LOADED,
    ),
    "startup fails": Failure(
        422,
        "package failed to start",
        ("lifespan startup failed:", "RuntimeError: cannot open the database"),
        upgrade(app=LIFESPAN_FAILS),
        step="start",
        seen=LOADED,
    ),
    "health check fails": Failure(
        422,
        "check failed",
        "health check GET /greeter/nope answered 404: Not Found",
        upgrade(manifest_extra='health = "/nope"\n'),
        step="check",
        seen=LOADED,
    ),
    "pre-activation veto": Failure(
        422,
        "check failed",
        "check gatekeeper.hotdeploy_check_before_activate vetoed: schema migration missing",
        upgrade(),
        step="check",
        seen=CHECKED,
        veto=Gatekeeper("before", "schema migration missing"),
    ),
    "post-activation veto": Failure(
        422,
        "rolled back",
        "check gatekeeper.hotdeploy_check_after_activate vetoed: p99 latency doubled",
        upgrade(),
        "rolled_back",
        step="bake",
        seen=(*CHECKED, "after"),
        veto=Gatekeeper("after", "p99 latency doubled"),
    ),
}
FAILURE_PARAMS = [pytest.param(case, id=name) for name, case in FAILURES.items()]


@pytest.mark.parametrize("case", FAILURE_PARAMS)
async def test_a_failed_deployment_keeps_the_previous_version_serving(
    deployer: Deployer, admin: httpx.AsyncClient, sources: Path, case: Failure
) -> None:
    await deploy(admin, archive(sources, "1.0"))
    history = len(deployer.history)
    witness = Witness(admin)
    if case.veto is not None:
        deployer.plugins.register(case.veto, name="gatekeeper")
    deployer.plugins.register(witness)  # after the veto: it looks first
    if case.limits is not None:
        deployer.limits = case.limits
    data, content_type = case.build(sources)
    body = witness.body(data) if case.streamed else data

    response = await admin.post(f"{PREFIX}/packages", content=body, headers={"Content-Type": content_type})

    details = (case.detail,) if isinstance(case.detail, str) else case.detail
    problem = assert_problem(response, case.status, *details, title=case.title)
    assert problem.get("package") == case.package
    # During the call, 1.0 answered (only a post-activation check sees the new version live).
    expected = [(where, "2.0" if where == "after" else "1.0") for where in case.seen]
    assert witness.seen == expected
    await assert_serving(admin, "1.0")
    (greeter,) = (await admin.get(f"{PREFIX}/packages")).json()["packages"]
    assert greeter["active_version"] == "1.0"
    assert [v["version"] for v in greeter["versions"]] == ["1.0"]  # the failed version is gone
    if case.outcome is None:
        assert "deployment" not in problem
        assert len(deployer.history) == history  # refused before a deployment began
        return
    record = problem["deployment"]
    assert (record["outcome"], record["error_step"], problem["step"]) == (case.outcome, case.step, case.step)
    assert all(detail in record["error"] for detail in details)
    assert (await admin.get(f"{PREFIX}/deployments/{record['id']}")).json() == record
    if case.status == 422:
        assert (problem["version"], record["from_version"], record["to_version"]) == ("2.0", "1.0", "2.0")
    if case.outcome == "rolled_back":
        assert [step["name"] for step in record["steps"]][-4:] == [
            "bake",
            "switch back",
            "commit",
            "converge",
        ]


@pytest.mark.parametrize("wait", ["false", "0", "no"])
@pytest.mark.parametrize(
    ("app", "outcome", "error"), [(None, "succeeded", None), ("def broken(:\n", "failed", "syntax error")]
)
async def test_wait_false_answers_202_at_once(
    deployer: Deployer,
    admin: httpx.AsyncClient,
    sources: Path,
    wait: str,
    app: str | None,
    outcome: str,
    error: str | None,
) -> None:
    deployer.plugins.register(Outcomes())
    data = archive(sources, app=app)
    response = await admin.post(f"{PREFIX}/packages?wait={wait}", content=data, headers={"Content-Type": ZIP})

    assert response.status_code == 202, response.text
    pending = response.json()
    assert (pending["operation"], pending["outcome"], pending["steps"]) == ("deploy", "pending", [])
    location = response.headers["location"]
    assert location == f"{PREFIX}/deployments/{pending['id']}"
    await testkit.event("finished").wait()
    record = (await admin.get(location)).json()
    assert (record["id"], record["outcome"], record["sha256"]) == (
        pending["id"],
        outcome,
        hashlib.sha256(data).hexdigest(),
    )
    if error is None:
        assert record["error"] is None
        await assert_serving(admin, "1.0")
    else:
        assert error in record["error"]
        assert record["error_step"] == "load"
        await assert_serving(admin, "HTTP 404")


@pytest.mark.parametrize("wait", ["", "?wait=false"])
async def test_a_deployer_that_is_not_running_is_503(tmp_path: Path, sources: Path, wait: str) -> None:
    idle = Deployer(home=tmp_path / "idle", entry_points=False)
    async with connect(make_host(idle)) as client:
        response = await client.post(
            f"{PREFIX}/packages{wait}", content=archive(sources), headers={"Content-Type": ZIP}
        )
        assert_problem(response, 503, "the deployer is not running", title="deployer not running")


# -- one operation at a time ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/packages", "archive"),
        ("POST", "/packages/greeter/rollback", None),
        ("POST", "/packages/greeter/activate", '{"version": "1.0"}'),
        ("DELETE", "/packages/greeter", None),
    ],
    ids=["deploy", "rollback", "activate", "delete"],
)
async def test_operations_are_refused_while_a_deployment_runs(
    deployer: Deployer, admin: httpx.AsyncClient, sources: Path, method: str, path: str, body: str | None
) -> None:
    await deploy(admin, archive(sources, "1.0"))
    await deploy(admin, archive(sources, "1.1"))
    deployer.plugins.register(Pause())
    witness = Witness(admin)
    answers: dict[str, httpx.Response] = {}

    async def upgrade_to_2() -> None:
        answers["2.0"] = await admin.post(
            f"{PREFIX}/packages", content=archive(sources, "2.0"), headers={"Content-Type": ZIP}
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(upgrade_to_2)
        await testkit.event("checking").wait()
        await assert_serving(admin, "1.1")  # 2.0 is loaded and started, not switched to
        content = witness.body(archive(sources, "3.0")) if body == "archive" else (body or "").encode()
        response = await admin.request(method, PREFIX + path, content=content)
        assert_problem(
            response, 409, "another operation on greeter is in progress", title="deployment in progress"
        )
        assert witness.seen == ([("upload", "1.1")] if body == "archive" else [])
        await assert_serving(admin, "1.1")
        testkit.event("resume").set()
    assert answers["2.0"].status_code == 201, answers["2.0"].text
    await assert_serving(admin, "2.0")


async def test_a_refused_deployment_problem_carries_its_record(
    deployer: Deployer, admin: httpx.AsyncClient, sources: Path
) -> None:
    await deploy(admin, archive(sources, "1.0"))
    deployer.plugins.register(Pause())
    async with anyio.create_task_group() as tg:
        tg.start_soon(deploy, admin, archive(sources, "2.0"))
        await testkit.event("checking").wait()
        response = await admin.post(
            f"{PREFIX}/packages", content=archive(sources, "3.0"), headers={"Content-Type": ZIP}
        )
        testkit.event("resume").set()
    problem = assert_problem(response, 409, "another operation on greeter is in progress")
    assert (problem["deployment"]["outcome"], problem["deployment"]["to_version"]) == ("failed", "3.0")


# -- packages: list, get, rollback, activate, delete ------------------------------------------------


async def test_list_and_get_packages(admin: httpx.AsyncClient, sources: Path) -> None:
    assert (await admin.get(f"{PREFIX}/packages")).json() == {"packages": []}
    other = await deploy(admin, archive(sources, "1.0", "other"))
    first = await deploy(admin, archive(sources, "1.0"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(admin.get, "/greeter/hold?key=k")
        await testkit.event("k:entered").wait()  # 1.0 keeps draining while this is held
        second = await deploy(admin, archive(sources, "2.0"))

        response = await admin.get(f"{PREFIX}/packages")
        assert response.status_code == 200
        packages = response.json()["packages"]
        assert [p["name"] for p in packages] == ["greeter", "other"]  # sorted by name
        greeter = packages[0]
        assert {k: greeter[k] for k in ("name", "mount", "active_version", "previous_version")} == {
            "name": "greeter",
            "mount": "/greeter",
            "active_version": "2.0",
            "previous_version": "1.0",
        }
        old, new = greeter["versions"]
        assert set(old) == set(new) == set(VERSION_KEYS.split())
        assert (old["version"], old["state"], old["in_flight"], old["sha256"]) == (
            "1.0",
            "draining",
            1,
            first["sha256"],
        )
        assert (new["version"], new["state"], new["in_flight"], new["sha256"]) == (
            "2.0",
            "active",
            0,
            second["sha256"],
        )
        assert old["loaded_at"] <= old["activated_at"] <= new["activated_at"]
        assert greeter["available_versions"] == [
            {"version": "1.0", "sha256": first["sha256"]},
            {"version": "2.0", "sha256": second["sha256"]},
        ]
        assert (await admin.get(f"{PREFIX}/packages/greeter")).json() == greeter
        assert (await admin.get(f"{PREFIX}/packages/other")).json()["available_versions"] == [
            {"version": "1.0", "sha256": other["sha256"]}
        ]
        testkit.event("k").set()
    problem = assert_problem(
        await admin.get(f"{PREFIX}/packages/nope"), 404, "no package named 'nope'", title="unknown package"
    )
    assert problem["package"] == "nope"


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "from disk"])
async def test_rollback(deployer: Deployer, admin: httpx.AsyncClient, sources: Path, warm: bool) -> None:
    deployer.plugins.register(Outcomes())
    await deploy(admin, archive(sources, "1.0"))
    async with anyio.create_task_group() as tg:
        if warm:
            tg.start_soon(admin.get, "/greeter/hold?key=k")
            await testkit.event("k:entered").wait()
        await deploy(admin, archive(sources, "2.0"))
        if not warm:
            await testkit.event("drained 1.0").wait()

        response = await admin.post(f"{PREFIX}/packages/greeter/rollback")

        assert response.status_code == 200, response.text
        record = response.json()
        assert (record["operation"], record["from_version"], record["to_version"], record["outcome"]) == (
            "rollback",
            "2.0",
            "1.0",
            "succeeded",
        )
        steps = [step["name"] for step in record["steps"]]
        if warm:
            assert steps[:6] == ["prepare", "prepare workers", "switch", "commit", "converge", "bake"]
            assert record["steps"][0]["detail"] == "warm: the version was still loaded"
        else:
            # Steps of the background drain of 2.0 may follow.
            assert steps[:10] == DEPLOY_STEPS[1:]  # no unpack: the archive is in the store
        await assert_serving(admin, "1.0")
        testkit.event("k").set()
    assert testkit.calls.count("startup greeter 1.0") == (1 if warm else 2)
    # Back at the first version: nothing earlier to go back to.
    assert_problem(
        await admin.post(f"{PREFIX}/packages/greeter/rollback"),
        409,
        "greeter has no previous version to roll back to",
        title="no previous version",
    )
    await assert_serving(admin, "1.0")


async def test_rollback_errors(admin: httpx.AsyncClient, sources: Path) -> None:
    assert_problem(await admin.post(f"{PREFIX}/packages/nope/rollback"), 404, "no package named 'nope'")
    await deploy(admin, archive(sources, "1.0"))
    assert_problem(await admin.post(f"{PREFIX}/packages/greeter/rollback"), 409, "no previous version")
    await assert_serving(admin, "1.0")


@pytest.mark.parametrize(
    ("path", "body"),
    [("/packages/greeter/rollback", None), ("/packages/greeter/activate", {"version": "1.0"})],
    ids=["rollback", "activate"],
)
async def test_a_failed_reload_from_disk_is_422(
    deployer: Deployer, admin: httpx.AsyncClient, sources: Path, path: str, body: dict[str, str] | None
) -> None:
    deployer.plugins.register(Outcomes())
    await deploy(admin, archive(sources, "1.0"))
    await deploy(admin, archive(sources, "2.0"))
    await testkit.event("drained 1.0").wait()
    deployer.plugins.register(Gatekeeper("before", "1.0 is banned", version="1.0"), name="gatekeeper")
    witness = Witness(admin)
    deployer.plugins.register(witness)

    response = await admin.post(PREFIX + path, json=body)

    problem = assert_problem(
        response, 422, "check gatekeeper.hotdeploy_check_before_activate vetoed: 1.0 is banned"
    )
    assert (problem["deployment"]["outcome"], problem["deployment"]["error_step"]) == ("failed", "check")
    assert witness.seen == [("validate", "2.0"), ("before", "2.0")]
    await assert_serving(admin, "2.0")


async def test_activate(admin: httpx.AsyncClient, sources: Path) -> None:
    await deploy(admin, archive(sources, "1.0"))
    await deploy(admin, archive(sources, "2.0"))
    response = await admin.post(f"{PREFIX}/packages/greeter/activate", json={"version": "1.0"})
    assert response.status_code == 200, response.text
    record = response.json()
    assert (record["operation"], record["from_version"], record["to_version"], record["outcome"]) == (
        "activate",
        "2.0",
        "1.0",
        "succeeded",
    )
    await assert_serving(admin, "1.0")
    problem = assert_problem(
        await admin.post(f"{PREFIX}/packages/greeter/activate", json={"version": "9.0"}),
        404,
        "greeter has no version '9.0' available (available: 1.0, 2.0)",
        title="unknown version",
    )
    assert problem["version"] == "9.0"
    assert_problem(
        await admin.post(f"{PREFIX}/packages/nope/activate", json={"version": "1.0"}),
        404,
        "no package named 'nope'",
    )
    await assert_serving(admin, "1.0")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", 'send JSON such as {"version": "1.0"}'),
        (b"{not json", 'send JSON such as {"version": "1.0"}'),
        (b"\xff\xfe", 'send JSON such as {"version": "1.0"}'),
        (b'["1.0"]', '"version" is missing'),
        (b"{}", '"version" is missing'),
        (b'{"version": 2}', '"version" is missing'),
        (b'{"version": ""}', '"version" is missing'),
    ],
    ids=["empty", "not json", "not utf-8", "a list", "no version", "a number", "blank"],
)
async def test_activate_needs_a_version(
    deployer: Deployer, admin: httpx.AsyncClient, sources: Path, body: bytes, detail: str
) -> None:
    await deploy(admin, archive(sources, "1.0"))
    await deploy(admin, archive(sources, "2.0"))
    history = len(deployer.history)
    response = await admin.post(
        f"{PREFIX}/packages/greeter/activate", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400, detail, title="invalid body")
    assert len(deployer.history) == history
    await assert_serving(admin, "2.0")


def consumer(sources: Path, version: str, requires: str) -> bytes:
    return archive(sources, version, "consumer", manifest_extra=f"requires = {{ {requires} }}\n")


async def test_a_deploy_whose_requirement_is_missing_or_too_old_is_refused(
    admin: httpx.AsyncClient, sources: Path
) -> None:
    missing = await admin.post(
        f"{PREFIX}/packages", content=consumer(sources, "1.0", 'greeter = ">=1.0"'), headers=ZIP_HEADERS
    )
    problem = assert_problem(
        missing, 409, "consumer 1.0 requires greeter>=1.0, and it is not active", title="unmet requirement"
    )
    assert (problem["package"], problem["step"]) == ("consumer", "requirements")
    assert problem["deployment"]["outcome"] == "failed"
    await deploy(admin, archive(sources, "1.0"))
    too_old = await admin.post(
        f"{PREFIX}/packages", content=consumer(sources, "1.0", 'greeter = ">=2"'), headers=ZIP_HEADERS
    )
    assert_problem(too_old, 409, "consumer 1.0 requires greeter>=2, and greeter 1.0 is active")
    assert (await admin.get(f"{PREFIX}/packages/consumer")).status_code == 404
    assert (await admin.get("/consumer/")).status_code == 404
    # Nothing of the refused upload is kept: the same archive deploys once greeter 2.0 serves.
    await deploy(admin, archive(sources, "2.0"))
    record = await deploy(admin, consumer(sources, "1.0", 'greeter = ">=2"'))
    assert record["outcome"] == "succeeded"
    assert await version_of(admin, "/consumer/") == "1.0"


async def test_status_shows_what_a_package_requires_and_what_requires_it(
    admin: httpx.AsyncClient, sources: Path
) -> None:
    await deploy(admin, archive(sources, "2.0"))
    await deploy(admin, consumer(sources, "1.0", 'greeter = ">=2,<3"'))
    packages = {p["name"]: p for p in (await admin.get(f"{PREFIX}/packages")).json()["packages"]}
    assert (packages["consumer"]["requires"], packages["consumer"]["required_by"]) == (
        {"greeter": "<3,>=2"},
        [],
    )
    assert (packages["greeter"]["requires"], packages["greeter"]["required_by"]) == ({}, ["consumer"])
    one = (await admin.get(f"{PREFIX}/packages/greeter")).json()
    assert one["required_by"] == ["consumer"]  # asked alone, it still knows its dependants
    await admin.delete(f"{PREFIX}/packages/consumer")
    assert (await admin.get(f"{PREFIX}/packages/greeter")).json()["required_by"] == []


async def test_a_change_of_a_required_package_that_its_dependant_does_not_accept_is_refused(
    admin: httpx.AsyncClient, sources: Path
) -> None:
    await deploy(admin, archive(sources, "1.0"))
    await deploy(admin, archive(sources, "2.0"))
    await deploy(admin, consumer(sources, "1.0", 'greeter = ">=2,<3"'))

    upgrade = await admin.post(f"{PREFIX}/packages", content=archive(sources, "3.0"), headers=ZIP_HEADERS)
    assert_problem(
        upgrade,
        409,
        "consumer 1.0 (active) requires greeter<3,>=2, and greeter 3.0 would be active",
        title="unmet requirement",
    )
    rollback = await admin.post(f"{PREFIX}/packages/greeter/rollback")
    problem = assert_problem(rollback, 409, "and greeter 1.0 would be active", title="unmet requirement")
    assert (problem["package"], problem["version"]) == ("greeter", "1.0")
    assert await version_of(admin) == "2.0"
    assert await version_of(admin, "/consumer/") == "1.0"


async def test_a_cycle_of_requirements_is_refused_and_named(admin: httpx.AsyncClient, sources: Path) -> None:
    await deploy(admin, archive(sources, "1.0"))
    await deploy(admin, consumer(sources, "1.0", 'greeter = ">=1"'))
    cycle = await admin.post(
        f"{PREFIX}/packages",
        content=archive(sources, "2.0", manifest_extra='requires = { consumer = ">=1" }\n'),
        headers=ZIP_HEADERS,
    )
    assert_problem(cycle, 409, "greeter 2.0: its requirements form a cycle: greeter -> consumer -> greeter")
    itself = await admin.post(
        f"{PREFIX}/packages",
        content=archive(sources, "3.0", manifest_extra='requires = { greeter = ">=1" }\n'),
        headers=ZIP_HEADERS,
    )
    assert_problem(itself, 409, "greeter 3.0: its requirements form a cycle: greeter -> greeter")
    assert await version_of(admin) == "1.0"


async def test_delete(admin: httpx.AsyncClient, sources: Path) -> None:
    await deploy(admin, archive(sources, "1.0"))
    await deploy(
        admin, archive(sources, "1.0", "consumer", manifest_extra='requires = { greeter = ">=1.0" }\n')
    )

    problem = assert_problem(
        await admin.delete(f"{PREFIX}/packages/greeter"),
        409,
        "cannot remove greeter: required by consumer",
        title="package in use",
    )
    assert problem["package"] == "greeter"
    await assert_serving(admin, "1.0")

    response = await admin.delete(f"{PREFIX}/packages/consumer")
    assert response.status_code == 200, response.text
    record = response.json()
    assert (record["operation"], record["package"], record["from_version"], record["outcome"]) == (
        "undeploy",
        "consumer",
        "1.0",
        "succeeded",
    )
    assert [step["name"] for step in record["steps"]] == [
        "unmount",
        "drain 1.0",
        "shutdown 1.0",
        "commit",
        "converge",
    ]
    assert_host_404(await admin.get("/consumer/"))
    assert testkit.calls[-1] == "shutdown consumer 1.0"

    assert (await admin.delete(f"{PREFIX}/packages/greeter")).status_code == 200  # no longer required
    assert_host_404(await admin.get("/greeter/"))
    assert_problem(await admin.delete(f"{PREFIX}/packages/greeter"), 404, "no package named 'greeter'")
    assert_problem(await admin.get(f"{PREFIX}/packages/greeter"), 404, "no package named 'greeter'")
    assert (await admin.get(f"{PREFIX}/packages")).json() == {"packages": []}


# -- deployments ----------------------------------------------------------------------------------


async def test_deployments(admin: httpx.AsyncClient, sources: Path) -> None:
    assert (await admin.get(f"{PREFIX}/deployments")).json() == {"deployments": []}
    first = await deploy(admin, archive(sources, "1.0"))
    other = await deploy(admin, archive(sources, "1.0", "other"))
    second = await deploy(admin, archive(sources, "2.0"))

    async def ids(query: str = "") -> list[str]:
        response = await admin.get(f"{PREFIX}/deployments{query}")
        assert response.status_code == 200, response.text
        return [record["id"] for record in response.json()["deployments"]]

    assert await ids() == [second["id"], other["id"], first["id"]]  # newest first
    assert await ids("?package=greeter") == [second["id"], first["id"]]
    assert await ids("?package=nope") == []
    assert await ids("?limit=1") == [second["id"]]
    assert await ids("?package=greeter&limit=1") == [second["id"]]
    assert await ids("?limit=0") == []
    for limit in ("abc", "1.5", ""):
        response = await admin.get(f"{PREFIX}/deployments?limit={limit}")
        assert_problem(response, 400, "limit must be a whole number", title="invalid query")

    assert (await admin.get(f"{PREFIX}/deployments/{other['id']}")).json() == other
    assert (await admin.get(f"{PREFIX}/deployments/{second['id']}")).json()["outcome"] == "succeeded"
    assert_problem(
        await admin.get(f"{PREFIX}/deployments/nope"),
        404,
        "no deployment with id 'nope'",
        title="unknown deployment",
    )


# -- the router's own errors, OpenAPI -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", f"{PREFIX}/nope", 404, None),
        ("GET", PREFIX, 404, None),
        ("GET", f"{PREFIX}/packages/greeter/versions", 404, None),
        ("POST", f"{PREFIX}/deployments", 405, "GET, HEAD"),
        ("GET", f"{PREFIX}/packages/greeter/rollback", 405, "POST"),
        ("PUT", f"{PREFIX}/packages", 405, "GET, HEAD, POST"),
        ("PATCH", f"{PREFIX}/packages/greeter", 405, "DELETE, GET, HEAD"),
    ],
)
async def test_unknown_paths_and_methods_are_problems(
    admin: httpx.AsyncClient, method: str, path: str, status: int, allow: str | None
) -> None:
    response = await admin.request(method, path)
    title = "not found" if status == 404 else "method not allowed"
    assert_problem(response, status, f"{method} {path}", title=title)
    if allow is not None:  # RFC 9110: a 405 lists every method the resource supports
        assert sorted(response.headers["allow"].split(", ")) == allow.split(", ")


# The paths and answers of docs/admin-api.md.
REFERENCE: dict[str, dict[str, set[int]]] = {
    "/packages": {"get": {200}, "post": {201, 202, 400, 409, 413, 415, 422}},
    "/packages/{name}": {"get": {200, 404}, "delete": {200, 404, 409}},
    "/packages/{name}/rollback": {"post": {200, 404, 409, 422}},
    "/packages/{name}/activate": {"post": {200, 400, 404, 409, 422}},
    "/packages/{name}/canary/promote": {"post": {202, 400, 404, 409}},
    "/packages/{name}/canary/abort": {"post": {202, 400, 404, 409}},
    "/deployments": {"get": {200, 400}},
    "/deployments/{id}": {"get": {200, 404}},
    "/events": {"get": {200, 400}},
    "/cluster": {"get": {200, 503}},
    "/metrics": {"get": {200, 404}},
    "/whoami": {"get": {200}},
    "/openapi.json": {"get": {200}},
}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


async def test_openapi_document(host: Starlette) -> None:
    async with connect(host, READ_TOKEN) as reader:
        response = await reader.get(f"{PREFIX}/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"]
    assert document["info"]["version"]
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert document["security"] == [{"bearer": []}]
    assert set(document["paths"]) == {PREFIX + path for path in REFERENCE}
    for path, operations in REFERENCE.items():
        item = document["paths"][PREFIX + path]
        assert set(item) - {"parameters"} == set(operations), path
        for method, statuses in operations.items():
            responses = item[method]["responses"]
            assert {str(status) for status in statuses} <= set(responses), (path, method)
            assert all(str(status) in responses for status in statuses if status >= 400)
    for ref in refs(document):
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict), ref
    assert f"at most {MAX_UPLOAD} bytes" in document["paths"][f"{PREFIX}/packages"]["post"]["description"]
    if importlib.util.find_spec("openapi_spec_validator") is not None:
        importlib.import_module("openapi_spec_validator").validate(document)


# -- GET /events ----------------------------------------------------------------------------------


class EventStream:
    """GET /events called as an ASGI app: the body's chunks as they are sent, and a disconnect."""

    def __init__(self, app: Starlette, token: str, query: str = "") -> None:
        self.app = app
        self.token = token
        self.query = query
        self.send_chunk, self.chunks = anyio.create_memory_object_stream[bytes](math.inf)
        self.disconnected = anyio.Event()
        self.requested = False
        self.start: Message = {}
        self.buffer = ""

    async def serve(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"{PREFIX}/events",
            "raw_path": f"{PREFIX}/events".encode(),
            "root_path": "",
            "query_string": self.query.encode(),
            "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {self.token}".encode())],
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 123),
        }
        with self.send_chunk:
            await self.app(scope, self.receive, self.send)

    async def receive(self) -> Message:
        if not self.requested:
            self.requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        else:
            self.send_chunk.send_nowait(message.get("body", b""))

    async def block(self) -> str:
        while "\n\n" not in self.buffer:
            self.buffer += (await self.chunks.receive()).decode()
        block, _, self.buffer = self.buffer.partition("\n\n")
        return block

    async def event(self) -> tuple[str, dict[str, Any]]:
        """The next event (comments skipped): its type and its data."""
        while True:
            lines = [line for line in (await self.block()).split("\n") if not line.startswith(":")]
            if lines:
                fields = dict(line.split(": ", 1) for line in lines)
                assert set(fields) == {"event", "data"}
                return fields["event"], json.loads(fields["data"])


async def read_until_finished(stream: EventStream) -> list[tuple[str, dict[str, Any]]]:
    events = [await stream.event()]
    while events[-1][0] != "deployment.finished":
        events.append(await stream.event())
    return events


async def test_events_stream_the_progress_of_a_deployment(
    deployer: Deployer, host: Starlette, admin: httpx.AsyncClient, sources: Path
) -> None:
    stream = EventStream(host, READ_TOKEN)
    with anyio.fail_after(10):  # a guard against a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.serve)
            assert await stream.block() == ": connected"
            assert stream.start["status"] == 200
            assert (b"content-type", b"text/event-stream; charset=utf-8") in stream.start["headers"]
            assert deployer.events.subscribers == 1

            record = await deploy(admin, archive(sources, "1.0"))
            events = await read_until_finished(stream)
            failure = await admin.post(
                f"{PREFIX}/packages",
                content=archive(sources, "2.0", app="x = ("),
                headers={"Content-Type": ZIP},
            )
            failed = await read_until_finished(stream)
            stream.disconnected.set()  # the client goes away: the stream ends
    assert deployer.events.subscribers == 0

    assert [(kind, data["type"]) for kind, data in events] == [(kind, kind) for kind, _ in events]
    assert [(kind, data.get("step", {}).get("name")) for kind, data in events] == [
        ("deployment.started", None),
        *[(kind, step) for step in STEPS for kind in ("step.started", "step.finished")],
        ("deployment.decided", None),
        ("deployment.finished", None),
    ]
    started, *steps, decided, finished = (data for _, data in events)
    assert (decided["deployment"]["outcome"], decided["deployment"]["finished_at"]) == ("succeeded", None)
    assert (started["deployment"]["id"], started["deployment"]["outcome"]) == (record["id"], "pending")
    assert all(step["deployment_id"] == record["id"] for step in steps)
    assert all((s["package"], s["to_version"]) == ("greeter", "1.0") for s in steps[2:])
    assert all(s["step"]["ok"] is None for s in steps[::2])
    assert all(s["step"]["ok"] is True and s["step"]["duration_ms"] >= 0 for s in steps[1::2])
    assert finished["deployment"] == record

    assert failure.status_code == 422
    assert [kind for kind, _ in failed][-4:] == [
        "step.started",
        "step.finished",
        "deployment.decided",
        "deployment.finished",
    ]
    assert failed[-3][1]["step"]["name"] == "load"
    assert failed[-3][1]["step"]["ok"] is False
    assert failed[-1][1]["deployment"]["outcome"] == "failed"
    assert "syntax error" in failed[-1][1]["deployment"]["error"]


async def test_traffic_events_count_each_loaded_version_at_once_and_then_each_second(
    deployer: Deployer, host: Starlette, admin: httpx.AsyncClient, sources: Path
) -> None:
    await deploy(admin, archive(sources, "1.0"))
    for _ in range(3):
        assert (await admin.get("/greeter/")).status_code == 200
    stream = EventStream(host, READ_TOKEN, query="traffic=true")
    with anyio.fail_after(10):  # a guard against a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.serve)
            assert await stream.block() == ": connected"
            first = await stream.event()  # sent at once
            await admin.get("/greeter/")
            second = await stream.event()  # each second: until one has counted the request
            while second[1]["packages"]["greeter"]["1.0"]["served"] == 3:
                second = await stream.event()
            stream.disconnected.set()
    assert first[0] == second[0] == "traffic"
    assert (first[1]["worker"], first[1]["workers"]) == (deployer.worker_id, 1)
    assert first[1]["packages"] == {"greeter": {"1.0": {"state": "active", "in_flight": 0, "served": 3}}}
    assert second[1]["packages"]["greeter"]["1.0"]["served"] == 4
    assert second[1]["at"] > first[1]["at"]


async def test_traffic_must_be_a_boolean(admin: httpx.AsyncClient) -> None:
    response = await admin.get(f"{PREFIX}/events", params={"traffic": "often"})
    assert_problem(response, 400, "traffic must be true or false", title="invalid query")


# -- GET /whoami ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "role"), [(TOKEN, "admin"), (READ_TOKEN, "read")])
async def test_whoami_names_the_role_of_the_token(
    deployer: Deployer, host: Starlette, token: str, role: str
) -> None:
    async with connect(host, token) as client:
        answer = (await client.get(f"{PREFIX}/whoami")).json()
    assert answer == {"role": role, "can_change": role == "admin", "worker": deployer.worker_id}


async def test_whoami_needs_a_token(host: Starlette) -> None:
    async with connect(host, "wrong") as client:
        assert (await client.get(f"{PREFIX}/whoami")).status_code == 401


# -- the web UI's files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "media_type", "marker"),
    [
        ("/ui/", "text/html", "<title>starlette-hotdeploy</title>"),
        ("/ui/app.js", "text/javascript", "sessionStorage"),
        ("/ui/app.css", "text/css", ":root"),
    ],
)
async def test_the_ui_files_are_served_without_a_token_and_allow_only_this_origin(
    host: Starlette, path: str, media_type: str, marker: str
) -> None:
    async with connect(host, None) as anonymous:
        response = await anonymous.get(f"{PREFIX}{path}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert marker in response.text
    policy = response.headers["content-security-policy"].split("; ")
    assert {"default-src 'none'", "connect-src 'self'", "frame-ancestors 'none'"} <= set(policy)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in response.headers


async def test_the_ui_path_without_its_slash_redirects_and_other_methods_need_the_token(
    host: Starlette,
) -> None:
    async with connect(host, None) as anonymous:
        redirect = await anonymous.get(f"{PREFIX}/ui")
        post = await anonymous.post(f"{PREFIX}/ui/")
        beside = await anonymous.get(f"{PREFIX}/uix")
    assert (redirect.status_code, redirect.headers["location"]) == (308, f"{PREFIX}/ui/")
    assert post.status_code == 401  # only reading the files is open
    assert beside.status_code == 401  # a path that merely starts like the UI's is not open
    async with connect(host) as admin:
        assert (await admin.post(f"{PREFIX}/ui/")).status_code == 405


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("HEAD", "/ui/", 200),  # reading the page is open
        ("GET", "/ui/%2e%2e/packages", 404),  # the router's answer: no route, no data
        ("GET", "/ui//packages", 404),
        ("OPTIONS", "/ui/", 401),
    ],
)
async def test_only_the_ui_files_are_open_not_the_api_through_a_ui_path(
    host: Starlette, method: str, path: str, status: int
) -> None:
    async with connect(host, None) as anonymous:
        response = await anonymous.request(method, f"{PREFIX}{path}")
    assert response.status_code == status
    assert '{"packages"' not in response.text  # the listing is not served


async def test_no_ui_without_an_admin_token(deployer: Deployer) -> None:
    async with connect(make_host(deployer, admin_token=None, admin_read_token=None), None) as client:
        response = await client.get(f"{PREFIX}/ui/")
    assert response.status_code == 404  # the host app's answer: the admin API is off


# -- no blocking call on the event loop ---------------------------------------------------------


class LoopGuardedStore(SQLiteStore):
    """The SQLite store, failing any call made on the event loop's thread (a blocking call there
    stalls every request of every package)."""

    loop_thread: threading.Thread | None = None
    offences: list[str] = []  # noqa: RUF012 - set per test

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if not callable(attribute) or name.startswith("_"):
            return attribute

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is type(self).loop_thread:
                type(self).offences.append(name)
            return attribute(*args, **kwargs)

        return guarded


async def test_the_admin_api_makes_no_blocking_call_on_the_event_loop(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    store = LoopGuardedStore(home)
    LoopGuardedStore.offences = []
    deployer = Deployer(home=home, store=store, entry_points=False)
    app = Starlette()
    app.add_middleware(HotDeployMiddleware, deployer=deployer, admin_token=TOKEN)
    async with deployer.running():
        LoopGuardedStore.loop_thread = threading.current_thread()
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as admin:
            for version in ("1.0", "2.0"):
                response = await admin.post(f"{PREFIX}/packages", content=archive(sources, version))
                assert response.status_code == 201, response.text
            record = response.json()
            calls = [
                ("GET", "/packages", None),
                ("GET", "/packages/greeter", None),
                ("GET", "/deployments?limit=5", None),
                ("GET", f"/deployments/{record['id']}", None),
                ("POST", "/packages/greeter/rollback", None),
                ("POST", "/packages/greeter/activate", {"version": "2.0"}),
                ("DELETE", "/packages/greeter", None),
            ]
            for method, path, body in calls:
                response = await admin.request(method, PREFIX + path, json=body)
                assert response.status_code < 300, (path, response.text)
        LoopGuardedStore.loop_thread = None
    assert LoopGuardedStore.offences == []


async def test_the_cluster_of_one_host_shows_its_worker_and_what_it_serves(
    host: Starlette, deployer: Deployer, sources: Path
) -> None:
    async with connect(host) as client, connect(host, READ_TOKEN) as reader:
        await deploy(client, archive(sources, "1.0"))
        response = await reader.get(f"{PREFIX}/cluster")
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["store"].startswith("sqlite: ")
    assert view["worker"] == deployer.worker_id
    assert view["desired"]["greeter"]["version"] == "1.0"
    [only] = view["hosts"]
    assert only["host"] == view["host"] == deployer.worker_id.partition(":")[0]
    [worker] = only["workers"]
    assert worker["id"] == deployer.worker_id
    assert worker["serving"] == {"greeter": "1.0"}
    assert worker["lagging"] == []
    assert only["lagging"] == []


async def test_a_multipart_upload_of_several_archives_deploys_them_as_one_set(
    admin: httpx.AsyncClient, sources: Path, deployer: Deployer
) -> None:
    body, content_type = multipart(
        {"consumer": consumer(sources, "1.0", 'greeter = ">=1"'), "greeter": archive(sources, "1.0")}
    )
    response = await admin.post(f"{PREFIX}/packages", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["bundle"] == ["greeter 1.0", "consumer 1.0"]
    assert record["package"] == "greeter"
    assert response.headers["location"] == f"{PREFIX}/deployments/{record['id']}"
    packages = (await admin.get(f"{PREFIX}/packages")).json()["packages"]
    assert {p["name"]: p["active_version"] for p in packages} == {"consumer": "1.0", "greeter": "1.0"}

    body, content_type = multipart(
        {"a": archive(sources, "2.0"), "b": consumer(sources, "2.0", 'greeter = ">=2"')}
    )
    async with deployer.events.subscribe() as events:
        accepted = await admin.post(
            f"{PREFIX}/packages?wait=false", content=body, headers={"Content-Type": content_type}
        )
        assert accepted.status_code == 202, accepted.text
        async for event in events:  # until the background deployment is decided
            decided = event["type"] in ("deployment.decided", "deployment.finished")
            if decided and event["deployment"]["id"] == accepted.json()["id"]:
                break
    record = (await admin.get(accepted.headers["location"])).json()
    assert record["outcome"] == "succeeded", record
    assert record["bundle"] == ["greeter 2.0", "consumer 2.0"]


async def test_a_set_upload_with_a_canary_is_refused(admin: httpx.AsyncClient, sources: Path) -> None:
    body, content_type = multipart({"a": archive(sources, "1.0"), "b": archive(sources, "1.0", "other")})
    response = await admin.post(
        f"{PREFIX}/packages?canary=true", content=body, headers={"Content-Type": content_type}
    )
    assert_problem(response, 400, "a set of packages is deployed without a canary", title="invalid query")
