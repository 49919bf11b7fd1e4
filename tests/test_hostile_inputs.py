"""Careless and hostile input to the admin API of a real uvicorn server: every one is refused with
a problem that names the cause, and the serving version answers throughout.

Each test runs `greeter 1.0` with a `Probe` asking `/greeter/` for its version while the bad call
runs, so "the old version kept serving" is checked during the failure, not only afterwards.
uvicorn runs in the test's event loop (asyncio only); the in-process checks below it run on both
backends.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from packages import write_package, zip_directory
from starlette_hotdeploy import Deployer, HotDeployMiddleware
from starlette_hotdeploy._signing import sign
from test_e2e_uvicorn import serving

pytestmark = pytest.mark.anyio

TOKEN = "hostile-token"
PREFIX = "/_hotdeploy"
PROBLEM = "application/problem+json"


def archive(sources: Path, version: str = "1.0", **options: Any) -> bytes:
    directory = write_package(sources, version=version, **options)
    return zip_directory(directory, sources / f"greeter-{version}-{len(options)}.zip").read_bytes()


def host(deployer: Deployer, started: anyio.Event) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.set()
        yield

    async def users(request: Request) -> PlainTextResponse:
        return PlainTextResponse("the host's users")

    app = Starlette(
        routes=[Route("/", users), Route("/users", users), Route("/users/{id}", users)], lifespan=lifespan
    )
    app.add_middleware(HotDeployMiddleware, deployer=deployer, admin_token=TOKEN)
    return app


@dataclass
class Probe:
    """Asks `/greeter/` for its version, one request after another, until stopped."""

    client: httpx.AsyncClient
    answers: list[str] = field(default_factory=list)

    async def run(self, stop: anyio.Event) -> None:
        for _ in range(100_000):  # bounded
            if stop.is_set():
                return
            response = await self.client.get("/greeter/")
            self.answers.append(response.json()["version"] if response.status_code == 200 else str(response))
            await anyio.sleep(0.001)

    def assert_served(self, version: str) -> None:
        assert self.answers, "the probe never got an answer"
        assert set(self.answers) == {version}, self.answers


@dataclass
class Server:
    admin: httpx.AsyncClient
    client: httpx.AsyncClient
    deployer: Deployer
    first: dict[str, Any] = field(default_factory=dict)  # the record of the first deployment

    async def during(self, call: Callable[[], Any], serving: str = "1.0") -> httpx.Response:
        """`call()` (an admin request) while a probe checks that `serving` answers throughout."""
        probe = Probe(self.client)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe.run, stop)
            try:
                response: httpx.Response = await call()
            finally:
                stop.set()
        probe.assert_served(serving)
        return response


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs in the test's loop


@asynccontextmanager
async def running(deployer: Deployer, first: bytes, signature: bytes | None = None) -> AsyncIterator[Server]:
    """A real server for `deployer`, serving the archive `first` (1.0) when it is yielded."""
    started = anyio.Event()
    async with serving(host(deployer, started), started, ws="websockets-sansio") as url:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as admin,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            signed = {"Hotdeploy-Signature": base64.b64encode(signature).decode()} if signature else {}
            response = await admin.post(f"{PREFIX}/packages", content=first, headers=signed)
            assert response.status_code == 201, response.text
            yield Server(admin, client, deployer, response.json())


@pytest.fixture
async def server(tmp_path: Path, sources: Path) -> AsyncIterator[Server]:
    async with running(Deployer(home=tmp_path / "home", entry_points=False), archive(sources)) as server:
        yield server


def assert_problem(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("limit=99999999999999999999999", "limit must be between 0 and 10000"),
        ("limit=-1", "limit must be between"),
        ("limit=ten", "limit must be a whole number"),
        ("package=" + "x" * 5000, "is not a package name"),
    ],
)
async def test_history_query_values_out_of_bounds_are_400(server: Server, query: str, fragment: str) -> None:
    response = await server.during(lambda: server.admin.get(f"{PREFIX}/deployments?{query}"))
    body = assert_problem(response, 400, fragment)
    assert len(body["detail"]) < 200


@pytest.mark.parametrize("flag", ["wait", "force", "shadow_host_routes"])
async def test_a_flag_that_is_not_a_boolean_is_400(server: Server, sources: Path, flag: str) -> None:
    data = archive(sources, "2.0")
    response = await server.during(lambda: server.admin.post(f"{PREFIX}/packages?{flag}=maybe", content=data))
    assert_problem(response, 400, f"{flag} must be true or false")


async def test_a_huge_version_string_is_refused_without_echoing_it(server: Server) -> None:
    huge = "1" * (5 * 1024 * 1024)
    response = await server.during(
        lambda: server.admin.post(f"{PREFIX}/packages/greeter/activate", json={"version": huge})
    )
    assert response.status_code in (400, 413), response.text
    assert len(response.text) < 1000


async def test_bad_package_names_in_paths_are_400(server: Server) -> None:
    long_name = "a" * 300
    for method, path in [
        ("GET", f"/packages/{long_name}"),
        ("POST", "/packages/Bad-Name/rollback"),
        ("DELETE", f"/packages/{long_name}"),
    ]:
        response = await server.during(partial(server.admin.request, method, PREFIX + path))
        assert_problem(response, 400, "is not a package name")


async def test_error_details_are_bounded_and_name_no_absolute_path(
    server: Server, sources: Path, tmp_path: Path
) -> None:
    app = "import pathlib\nraise RuntimeError(str(pathlib.Path(__file__).resolve()) + ' ' + 'x' * 100_000)\n"
    data = archive(sources, "2.0", app=app)
    response = await server.during(lambda: server.admin.post(f"{PREFIX}/packages", content=data))
    body = assert_problem(response, 422, "importing 'greeter.app' raised RuntimeError")
    assert len(body["detail"]) < 2200
    assert str(tmp_path) not in response.text
    assert "packages/greeter/2.0-" in body["detail"]  # relative to the home


async def test_a_different_archive_under_the_same_version_is_409_unless_forced(
    server: Server, sources: Path
) -> None:
    other = archive(sources, "1.0", files={"greeter/extra.py": "X = 1\n"})
    response = await server.during(lambda: server.admin.post(f"{PREFIX}/packages", content=other))
    body = assert_problem(response, 409, "greeter 1.0 was deployed before from a different archive", "force")
    assert body["title"] == "version conflict"

    response = await server.admin.post(f"{PREFIX}/packages?force=true", content=other)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["forced"] is True
    status = (await server.admin.get(f"{PREFIX}/packages/greeter")).json()
    assert [v["sha256"] for v in status["versions"] if v["state"] == "active"] == [record["sha256"]]


async def test_a_downgrade_is_marked(server: Server, sources: Path) -> None:
    response = await server.admin.post(f"{PREFIX}/packages", content=archive(sources, "2.0"))
    assert response.status_code == 201, response.text
    assert response.json()["downgrade"] is False
    response = await server.admin.post(f"{PREFIX}/packages", content=archive(sources, "1.5"))
    assert response.status_code == 201, response.text
    assert response.json()["downgrade"] is True


async def test_a_mount_over_a_host_route_is_409_unless_intended(server: Server, sources: Path) -> None:
    directory = write_package(sources, name="users", version="1.0")
    data = zip_directory(directory, sources / "users.zip").read_bytes()
    response = await server.during(lambda: server.admin.post(f"{PREFIX}/packages", content=data))
    assert_problem(
        response, 409, "mount '/users' would shadow the host app's route /users", "shadow_host_routes"
    )
    assert (await server.client.get("/users")).text == "the host's users"

    response = await server.admin.post(f"{PREFIX}/packages?shadow_host_routes=true", content=data)
    assert response.status_code == 201, response.text
    assert (await server.client.get("/users/")).json()["version"] == "1.0"


async def test_the_manifest_may_say_the_shadowing_is_intended(server: Server, sources: Path) -> None:
    directory = write_package(
        sources, name="users", version="1.0", manifest_extra="shadow_host_routes = true\n"
    )
    data = zip_directory(directory, sources / "users.zip").read_bytes()
    response = await server.admin.post(f"{PREFIX}/packages", content=data)
    assert response.status_code == 201, response.text


async def test_a_percent_encoded_mount_overlaps_its_plain_twin(server: Server, sources: Path) -> None:
    directory = write_package(sources, name="other", version="1.0", mount="/%67reeter")
    data = zip_directory(directory, sources / "other.zip").read_bytes()
    response = await server.during(lambda: server.admin.post(f"{PREFIX}/packages", content=data))
    assert_problem(response, 409, "mount '/greeter' overlaps '/greeter' of package 'greeter'")


# -- signed packages ------------------------------------------------------------------------------


def new_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An ssh-ed25519 key pair in OpenSSH files, as `ssh-keygen -t ed25519` writes them."""
    key = Ed25519PrivateKey.generate()
    private = directory / name
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    public = directory / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        + f" {name}@example.com\n".encode()
    )
    return private, public


@pytest.fixture
async def signed_server(tmp_path: Path, sources: Path) -> AsyncIterator[tuple[Server, Path, Path]]:
    keys = tmp_path / "keys"
    keys.mkdir()
    private, public = new_key(keys, "release")
    stranger, _ = new_key(keys, "stranger")
    deployer = Deployer(home=tmp_path / "home", entry_points=False, trusted_keys=[public])
    data = archive(sources)
    async with running(deployer, data, sign(data, private)) as server:
        assert server.first["signer"].startswith("release@example.com (SHA256:")
        yield server, private, stranger


async def test_only_archives_signed_by_a_trusted_key_are_deployed(
    signed_server: tuple[Server, Path, Path], sources: Path
) -> None:
    server, private, stranger = signed_server
    data = archive(sources, "2.0")
    post = partial(server.admin.post, f"{PREFIX}/packages", content=data)

    response = await server.during(post)
    body = assert_problem(response, 403, "not signed")
    assert body["title"] == "signature refused"

    by_stranger = base64.b64encode(sign(data, stranger)).decode()
    response = await server.during(partial(post, headers={"Hotdeploy-Signature": by_stranger}))
    assert_problem(response, 403, "SHA256:")

    of_other_bytes = base64.b64encode(sign(data + b"x", private)).decode()
    response = await server.during(partial(post, headers={"Hotdeploy-Signature": of_other_bytes}))
    assert_problem(response, 403)

    response = await server.during(partial(post, headers={"Hotdeploy-Signature": "not base64!"}))
    assert_problem(response, 400, "base64")
    unpacked = [p.name for p in (server.deployer.home / "packages" / "greeter").iterdir()]
    assert [name for name in unpacked if name.startswith("2.0-")] == []  # nothing was unpacked

    # As a multipart part named `signature`, the way a browser form would send it.
    files = {"file": ("greeter-2.0.zip", data), "signature": ("greeter-2.0.zip.sig", sign(data, private))}
    response = await server.admin.post(f"{PREFIX}/packages", files=files)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["signer"].startswith("release@example.com")
    history = (await server.admin.get(f"{PREFIX}/deployments/{record['id']}")).json()
    assert history["signer"] == record["signer"]
