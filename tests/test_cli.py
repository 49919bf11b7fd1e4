"""The `hotdeploy` command: pack, the admin API client against a fake server, and end to end
against a real `hotdeploy serve` process.

The unit tests run the click commands in process with CliRunner. Those that need a server pass
an `httpx.MockTransport` as the click context's `obj` (the CLI's test seam). The end-to-end test
starts `python -m starlette_hotdeploy._cli serve` as a subprocess on a free port, waits until it
answers (bounded polling: the only wait on time in this file), and drives every command against
it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from packages import DEPLOY_STEPS, write_package
from starlette_hotdeploy._archive import pack_directory
from starlette_hotdeploy._cli import cli
from starlette_hotdeploy._signing import TrustedKeys, sign


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    # `serve` hands its settings to the worker processes through os.environ: whatever a test's
    # serve sets there must not reach the Deployers of later tests.
    saved = {k: v for k, v in os.environ.items() if k.startswith("HOTDEPLOY_")}
    yield
    for key in [k for k in os.environ if k.startswith("HOTDEPLOY_")]:
        del os.environ[key]
    os.environ.update(saved)


TESTS = Path(__file__).resolve().parent
CLEAN_ENV: dict[str, str | None] = {
    "HOTDEPLOY_URL": None,
    "HOTDEPLOY_ADMIN_TOKEN": None,
    "HOTDEPLOY_HOME": None,
}
PACKAGE_FILES = ["greeter/__init__.py", "greeter/app.py", "greeter/models.py", "hotdeploy.toml"]


def run(
    *args: str, env: Mapping[str, str | None] | None = None, transport: httpx.BaseTransport | None = None
) -> Result:
    """Run `hotdeploy ARGS` in process, with no HOTDEPLOY_* variables but those in `env`."""
    return runner().invoke(cli, list(args), env={**CLEAN_ENV, **(env or {})}, obj=transport)


def runner() -> CliRunner:
    """A runner that keeps stderr apart (click 8.2+ always does; 8.1 needs mix_stderr=False)."""
    legacy: dict[str, Any] = {"mix_stderr": False}
    try:
        return CliRunner(**legacy)
    except TypeError:
        return CliRunner()


def assert_clean_error(result: Result, exit_code: int, *fragments: str) -> None:
    """A failure reported on one stderr line: the exit code, the fragments, no traceback."""
    assert result.exit_code == exit_code, (result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- pack -----------------------------------------------------------------------------------------


def test_pack_is_deterministic(tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_package(sources)
    cache = source / "greeter" / "__pycache__"
    cache.mkdir()
    (cache / "app.cpython-311.pyc").write_bytes(b"bytecode")
    (source / "greeter" / "stale.pyc").write_bytes(b"bytecode")
    monkeypatch.chdir(tmp_path)

    first = run("pack", str(source))
    assert first.exit_code == 0, first.output
    archive = tmp_path / "greeter-1.0.zip"  # the default name, in the current directory
    data = archive.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert first.stdout.split() == ["greeter-1.0.zip", str(len(data)), "bytes", f"sha256:{digest}"]

    # Other timestamps and permissions on disk, another output file: the same bytes.
    for path in source.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (source / "greeter" / "app.py").chmod(0o755)
    second = run("pack", str(source), "-o", str(tmp_path / "again.zip"))
    assert second.exit_code == 0, second.output
    assert (tmp_path / "again.zip").read_bytes() == data
    assert f"sha256:{digest}" in second.stdout

    with zipfile.ZipFile(archive) as zipped:
        infos = zipped.infolist()
        assert [info.filename for info in infos] == PACKAGE_FILES
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == stat.S_IFREG | 0o644
            assert info.compress_type == zipfile.ZIP_DEFLATED
        assert zipped.read("greeter/app.py") == (source / "greeter" / "app.py").read_bytes()
        assert zipped.read("hotdeploy.toml") == (source / "hotdeploy.toml").read_bytes()


def test_pack_leaves_its_own_output_out(sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hotdeploy pack .` writes into the package directory: a second run must not pack the first
    archive."""
    source = write_package(sources)
    monkeypatch.chdir(source)
    first = run("pack", ".")
    second = run("pack", ".")
    assert first.exit_code == second.exit_code == 0, (first.output, second.output)
    assert first.stdout == second.stdout
    with zipfile.ZipFile(source / "greeter-1.0.zip") as zipped:
        assert zipped.namelist() == PACKAGE_FILES


def test_pack_refuses_a_bad_manifest(tmp_path: Path, sources: Path) -> None:
    source = write_package(sources, mount="greeter")  # no leading '/'
    target = tmp_path / "out.zip"
    result = run("pack", str(source), "-o", str(target))
    assert_clean_error(result, 1, "hotdeploy: ", "hotdeploy.toml: mount: 'greeter' must start with '/'")
    assert not target.exists()


def test_pack_refuses_an_unknown_key(sources: Path) -> None:
    source = write_package(sources, manifest_extra="colour = 'blue'\n")
    assert_clean_error(run("pack", str(source)), 1, "hotdeploy.toml: colour: unknown key")


def test_pack_needs_the_app_module(sources: Path) -> None:
    source = write_package(sources)
    (source / "greeter" / "app.py").unlink()
    assert_clean_error(
        run("pack", str(source)),
        1,
        "hotdeploy.toml: app: module 'greeter.app' not found",
        "greeter/app.py or greeter/app/__init__.py",
    )


def test_pack_needs_a_manifest(sources: Path) -> None:
    source = write_package(sources)
    (source / "hotdeploy.toml").unlink()
    assert_clean_error(run("pack", str(source)), 1, "no hotdeploy.toml found")


def test_pack_refuses_links(tmp_path: Path, sources: Path) -> None:
    source = write_package(sources)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (source / "greeter" / "data.txt").symlink_to(outside)
    assert_clean_error(
        run("pack", str(source), "-o", str(tmp_path / "out.zip")), 1, "links and special files are refused"
    )
    assert not (tmp_path / "out.zip").exists()


def test_pack_reports_an_unwritable_output(tmp_path: Path, sources: Path) -> None:
    source = write_package(sources)
    result = run("pack", str(source), "-o", str(tmp_path / "missing" / "out.zip"))
    assert_clean_error(result, 1, "cannot write")


# -- usage errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pack"], "Missing argument 'DIRECTORY'"),
        (["pack", "does-not-exist"], "does not exist"),
        (["deploy", "does-not-exist.zip"], "does not exist"),
        (["activate", "greeter"], "Missing argument 'VERSION'"),
        (["rollback"], "Missing argument 'NAME'"),
        (["status", "--url", "127.0.0.1:8000"], "must start with http:// or https://"),
        (["history", "--limit", "0"], "0 is not in the range x>=1"),
        (["status", "--timeout", "0"], "--timeout"),
        (["serve", "--workers", "0"], "--workers"),
        (["serve", "--port", "70000"], "--port"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ["pack", "deploy", "status", "rollback", "activate", "undeploy", "history", "serve"]:
        assert f"  {command} " in result.stdout


# -- talking to a server: failures ------------------------------------------------------------------


def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    result = run("status", "--url", url, "--token", "t")
    assert_clean_error(result, 2, f"cannot connect to {url}", "is the server running?")
    assert result.stderr.count("\n") == 1


class FakeServer:
    """An httpx MockTransport that answers each request with the next of `answers` and keeps
    the requests."""

    def __init__(self, answers: Sequence[httpx.Response | Callable[[httpx.Request], httpx.Response]]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert self.answers, f"unexpected request {request.method} {request.url}"
        answer = self.answers.pop(0)
        return answer(request) if callable(answer) else answer


def problem_response(status: int, title: str, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json"})


def test_unauthorized_without_a_token_gives_a_hint() -> None:
    server = FakeServer([problem_response(401, "unauthorized", "missing Authorization: Bearer <token>")])
    result = run("status", transport=server.transport)
    assert_clean_error(
        result, 2, "401 unauthorized", "pass the admin token with --token or $HOTDEPLOY_ADMIN_TOKEN"
    )
    assert "authorization" not in server.requests[0].headers


def test_unauthorized_with_a_token_says_it_was_refused() -> None:
    server = FakeServer([problem_response(401, "unauthorized", "a valid bearer token is required")])
    result = run("history", transport=server.transport, env={"HOTDEPLOY_ADMIN_TOKEN": "secret"})
    assert_clean_error(result, 2, "the server refused the token")
    assert server.requests[0].headers["authorization"] == "Bearer secret"


def test_read_only_token_on_a_write() -> None:
    server = FakeServer([problem_response(403, "forbidden", "the read-only token may only GET")])
    result = run("rollback", "greeter", "--token", "reader", transport=server.transport)
    assert_clean_error(result, 2, "403 forbidden", "may only read")


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, text="Not Found", headers={"Content-Type": "text/plain"}),
        httpx.Response(200, text="<html>hello</html>", headers={"Content-Type": "text/html"}),
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(502, content=b"\xff\xfe", headers={"Content-Type": "application/json"}),
    ],
)
def test_an_answer_that_is_not_json_is_one_line(answer: httpx.Response) -> None:
    server = FakeServer([answer])
    result = run("status", "--token", "t", transport=server.transport)
    assert_clean_error(
        result, 2, "not a JSON object", "is the admin API served at http://127.0.0.1:8000/_hotdeploy?"
    )


def test_a_refused_operation_prints_the_problem_detail() -> None:
    detail = "greeter: greeter has no previous version to roll back to [rollback]"
    server = FakeServer([problem_response(409, "no previous version", detail, package="greeter")])
    result = run("rollback", "greeter", "--token", "t", transport=server.transport)
    assert_clean_error(result, 1, f"409 no previous version: {detail}")
    assert server.requests[0].method == "POST"
    assert server.requests[0].url.path == "/_hotdeploy/packages/greeter/rollback"


# -- deploy against a fake server ----------------------------------------------------------------------


def step(name: str, ok: bool | None, duration_ms: float | None = None) -> dict[str, Any]:
    return {"name": name, "started_at": 1.0, "duration_ms": duration_ms, "ok": ok, "detail": None}


def record(outcome: str, steps: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "abc123",
        "operation": "deploy",
        "package": "greeter",
        "from_version": "1.0",
        "to_version": "2.0",
        "duration_ms": None if outcome == "pending" else 12.5,
        "outcome": outcome,
        "error": None,
        "error_step": None,
        "steps": steps,
    }
    return {**base, **fields}


def accepted(pending: dict[str, Any]) -> httpx.Response:
    return httpx.Response(202, json=pending, headers={"Location": "/_hotdeploy/deployments/abc123"})


@pytest.fixture
def archive(tmp_path: Path, sources: Path) -> Path:
    path = tmp_path / "greeter-2.0.zip"
    result = run("pack", str(write_package(sources, version="2.0")), "-o", str(path))
    assert result.exit_code == 0, result.output
    return path


def test_deploy_uploads_and_prints_each_step_as_it_happens(archive: Path) -> None:
    server = FakeServer(
        [
            accepted(record("pending", [])),
            httpx.Response(200, json=record("pending", [step("unpack", None)])),
            httpx.Response(200, json=record("pending", [step("unpack", True, 2.8), step("load", None)])),
            httpx.Response(
                200,
                json=record(
                    "succeeded",
                    [step("unpack", True, 2.8), step("load", True, 1.25), step("switch", True, 0.01)],
                ),
            ),
        ]
    )
    result = run("deploy", str(archive), "--token", "t", transport=server.transport)
    assert result.exit_code == 0, (result.output, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"uploading {archive}: {archive.stat().st_size} bytes")
    assert lines[1] == "deployment abc123"
    assert [line.split() for line in lines[2:-1]] == [
        ["unpack", "running"],
        ["unpack", "2.8", "ms", "ok"],
        ["load", "running"],
        ["load", "1.2", "ms", "ok"],
        ["switch", "0.0", "ms", "ok"],
    ]
    assert lines[-1] == "deploy greeter: 1.0 -> 2.0 succeeded in 12.5 ms"

    upload = server.requests[0]
    assert (upload.method, upload.url.path, upload.url.params["wait"]) == (
        "POST",
        "/_hotdeploy/packages",
        "false",
    )
    assert upload.headers["content-type"] == "application/zip"
    assert upload.headers["authorization"] == "Bearer t"
    assert upload.content == archive.read_bytes()
    assert [r.url.path for r in server.requests[1:]] == ["/_hotdeploy/deployments/abc123"] * 3


def test_deploy_of_several_files_uploads_them_as_one_set(sources: Path, archive: Path) -> None:
    done = record(
        "succeeded",
        [step("unpack", True, 2.0), step("prepare orders 1.0", True, 3.0), step("switch", True, 0.01)],
        bundle=["greeter 2.0", "orders 1.0"],
        moved=["reports 1.0"],
    )
    server = FakeServer([accepted(record("pending", [])), httpx.Response(200, json=done)])
    orders = write_package(sources, "orders", "1.0", manifest_extra='requires = { greeter = ">=2" }\n')
    result = run("deploy", str(archive), str(orders), "--token", "t", transport=server.transport)
    assert result.exit_code == 0, (result.output, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[1].startswith("uploading ")
    assert "(packed orders 1.0)" in lines[1]
    assert lines[2] == "deployment abc123 (a set of 2)"
    assert lines[-1] == (
        "deploy greeter: 1.0 -> 2.0 succeeded in 12.5 ms: together with orders 1.0, moved reports 1.0"
    )
    upload = server.requests[0]
    assert upload.url.params["wait"] == "false"
    assert upload.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert upload.content.count(b'name="archive"') == 2
    assert archive.read_bytes() in upload.content
    assert b'name="signature"' not in upload.content


def test_a_set_takes_no_canary(archive: Path, sources: Path) -> None:
    server = FakeServer([])
    other = write_package(sources, "orders")
    result = run("deploy", str(archive), str(other), "--canary", "--token", "t", transport=server.transport)
    assert result.exit_code == 2
    assert "a set (several FILEs) takes neither --canary nor --signature" in result.stderr
    assert server.requests == []


def test_deploy_packs_a_directory_on_the_fly(sources: Path, archive: Path) -> None:
    done = record("succeeded", [step("unchanged", True, 0.1)])
    server = FakeServer([accepted(done)])
    result = run("deploy", str(sources / "greeter-2.0"), "--token", "t", transport=server.transport)
    assert result.exit_code == 0, result.output
    assert "(packed greeter 2.0)" in result.stdout
    assert server.requests[0].content == archive.read_bytes()  # the same bytes as `pack`
    assert len(server.requests) == 1  # a finished record is not polled


def test_deploy_of_a_bad_directory_uploads_nothing(sources: Path) -> None:
    server = FakeServer([])
    result = run("deploy", str(write_package(sources, mount="x")), "--token", "t", transport=server.transport)
    assert_clean_error(result, 1, "hotdeploy.toml: mount:")
    assert server.requests == []


def test_deploy_failure_prints_the_error_and_step(archive: Path) -> None:
    error = "greeter 2.0: syntax error in 'greeter.app' (app.py:1): invalid syntax [load]"
    failed = record(
        "failed", [step("unpack", True, 1.0), step("load", False, 0.5)], error=error, error_step="load"
    )
    server = FakeServer([accepted(record("pending", [])), httpx.Response(200, json=failed)])
    result = run("deploy", str(archive), "--token", "t", transport=server.transport)
    assert_clean_error(result, 1, f"deploy failed at step 'load': {error}")
    assert result.stdout.splitlines()[-1].split() == ["load", "0.5", "ms", "FAILED"]


def test_deploy_no_wait_prints_the_id_only(archive: Path) -> None:
    server = FakeServer([accepted(record("pending", []))])
    result = run("deploy", str(archive), "--no-wait", "--token", "t", transport=server.transport)
    assert result.exit_code == 0, result.output
    assert result.stdout == "abc123\n"
    assert len(server.requests) == 1


def test_deploy_gives_up_after_the_timeout(archive: Path) -> None:
    pending = record("pending", [step("check", None)])
    started = time.monotonic()
    server = FakeServer([accepted(pending)] + [httpx.Response(200, json=pending)] * 100)
    result = run("deploy", str(archive), "--token", "t", "--timeout", "0.3", transport=server.transport)
    assert_clean_error(result, 3, "deployment abc123 is still pending after 0.3 s")
    assert time.monotonic() - started < 5
    assert result.stdout.count("check") == 1  # a step still running is shown once


def test_deploy_refused_by_the_server(archive: Path) -> None:
    server = FakeServer([problem_response(413, "archive too large", "the upload is over the 10-byte limit")])
    result = run("deploy", str(archive), "--token", "t", transport=server.transport)
    assert_clean_error(result, 1, "413 archive too large: the upload is over the 10-byte limit")


# -- signatures, sha256s, and the deploy flags ------------------------------------------------------


def signing_key(directory: Path, name: str = "alice") -> Path:
    """An unencrypted ssh-ed25519 private key file in OpenSSH's format, as `ssh-keygen -t ed25519
    -N ''` writes it (made in process: these tests do not need ssh-keygen; test_signing.py does)."""
    path = directory / name
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    path.with_name(name + ".pub").write_text(f"{public} {name}@example.com\n")
    return path


def trusting(key: Path) -> TrustedKeys:
    return TrustedKeys.load([key.with_name(key.name + ".pub")])


def test_pack_sign_writes_the_signature_beside_the_archive(tmp_path: Path, sources: Path) -> None:
    key = signing_key(tmp_path)
    archive = tmp_path / "greeter-1.0.zip"
    result = run("pack", str(write_package(sources)), "-o", str(archive), "--sign", str(key))
    assert result.exit_code == 0, (result.output, result.stderr)
    signature = (tmp_path / "greeter-1.0.zip.sig").read_bytes()
    signer = trusting(key).verify(archive.read_bytes(), signature)
    assert signer.name == "alice@example.com"
    assert result.stdout.splitlines()[1] == f"{archive}.sig  signed by {signer.fingerprint}"


def test_pack_sign_with_a_key_that_cannot_sign_writes_nothing(tmp_path: Path, sources: Path) -> None:
    key = signing_key(tmp_path)
    archive = tmp_path / "greeter-1.0.zip"
    result = run("pack", str(write_package(sources)), "-o", str(archive), "--sign", f"{key}.pub")
    assert_clean_error(result, 1, "this is a public key: sign with the private key")
    assert not archive.exists()
    assert not (tmp_path / "greeter-1.0.zip.sig").exists()


def test_pack_without_sign_removes_a_stale_signature(tmp_path: Path, sources: Path) -> None:
    key = signing_key(tmp_path)
    archive = tmp_path / "greeter-1.0.zip"
    sig = tmp_path / "greeter-1.0.zip.sig"
    assert run("pack", str(write_package(sources)), "-o", str(archive), "--sign", str(key)).exit_code == 0

    # The same files: the same bytes, so the signature still holds and is kept.
    again = run("pack", str(sources / "greeter-1.0"), "-o", str(archive))
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[1].startswith(f"{sig}  kept: it still signs the archive (SHA256:")
    assert sig.exists()

    # Changed files: `deploy` would send a signature of the old archive; it goes.
    changed = run("pack", str(write_package(sources, app="app = None  # changed\n")), "-o", str(archive))
    assert changed.exit_code == 0, changed.output
    assert changed.stdout.splitlines()[1] == f"{sig}  removed: it did not sign the new archive"
    assert not sig.exists()


def test_deploy_sends_the_signature_beside_the_archive(tmp_path: Path, archive: Path) -> None:
    key = signing_key(tmp_path)
    signature = sign(archive.read_bytes(), key)
    (tmp_path / "greeter-2.0.zip.sig").write_bytes(signature)
    signer = trusting(key).verify(archive.read_bytes(), signature)
    done = record("succeeded", [step("switch", True, 0.1)], signer=signer.describe())
    server = FakeServer([accepted(done)])
    result = run("deploy", str(archive), "--token", "t", transport=server.transport)
    assert result.exit_code == 0, (result.output, result.stderr)
    upload = server.requests[0]
    assert base64.b64decode(upload.headers["hotdeploy-signature"]) == signature
    assert "force" not in upload.url.params
    assert "shadow_host_routes" not in upload.url.params
    lines = result.stdout.splitlines()
    assert f"signature {archive}.sig by {signer.fingerprint} to " in lines[0]
    assert lines[-1] == (
        f"deploy greeter: 1.0 -> 2.0 succeeded in 12.5 ms: signed by alice@example.com ({signer.fingerprint})"
    )


def test_deploy_without_a_signature_sends_none(archive: Path) -> None:
    server = FakeServer([accepted(record("succeeded", []))])
    assert run("deploy", str(archive), "--token", "t", transport=server.transport).exit_code == 0
    assert "hotdeploy-signature" not in server.requests[0].headers


def test_deploy_a_directory_signed_on_the_fly_with_the_flags(
    tmp_path: Path, sources: Path, archive: Path
) -> None:
    key = signing_key(tmp_path)
    server = FakeServer([accepted(record("succeeded", [], downgrade=True, forced=True))])
    args = ["deploy", str(sources / "greeter-2.0"), "--sign", str(key), "--force", "--shadow-host-routes"]
    result = run(*args, "--token", "t", transport=server.transport)
    assert result.exit_code == 0, (result.output, result.stderr)
    upload = server.requests[0]
    assert upload.content == archive.read_bytes()
    signature = base64.b64decode(upload.headers["hotdeploy-signature"])
    assert trusting(key).verify(upload.content, signature).name == "alice@example.com"
    assert (upload.url.params["force"], upload.url.params["shadow_host_routes"]) == ("true", "true")
    assert f"signed with {key} (SHA256:" in result.stdout.splitlines()[0]
    assert (
        result.stdout.splitlines()[-1] == "deploy greeter: 1.0 -> 2.0 succeeded in 12.5 ms: downgrade, forced"
    )


def test_deploy_with_a_named_signature_file(tmp_path: Path, archive: Path) -> None:
    key = signing_key(tmp_path)
    named = tmp_path / "elsewhere.sig"
    named.write_bytes(sign(archive.read_bytes(), key))
    server = FakeServer([accepted(record("succeeded", []))])
    result = run(
        "deploy", str(archive), "--signature", str(named), "--token", "t", transport=server.transport
    )
    assert result.exit_code == 0, (result.output, result.stderr)
    assert base64.b64decode(server.requests[0].headers["hotdeploy-signature"]) == named.read_bytes()


def test_deploy_refuses_a_stale_signature_before_uploading(tmp_path: Path, archive: Path) -> None:
    key = signing_key(tmp_path)
    (tmp_path / "greeter-2.0.zip.sig").write_bytes(sign(b"an older archive", key))
    server = FakeServer([])
    result = run("deploy", str(archive), "--token", "t", transport=server.transport)
    assert_clean_error(
        result,
        1,
        f"{archive}.sig is not a signature of {archive}",
        "does not match the archive",
        "sign it again",
    )
    assert server.requests == []


def test_deploy_takes_sign_or_signature_not_both(tmp_path: Path, archive: Path) -> None:
    key = signing_key(tmp_path)
    result = run("deploy", str(archive), "--sign", str(key), "--signature", str(archive), "--token", "t")
    assert result.exit_code == 2
    assert "give --sign KEY or --signature FILE, not both" in result.stderr


def test_a_refused_signature_is_the_servers_problem_not_a_token_one(archive: Path) -> None:
    detail = "the archive is not signed; this server accepts only archives signed by its trusted key: ..."
    server = FakeServer([problem_response(403, "signature refused", detail, step="signature")])
    result = run("deploy", str(archive), "--token", "t", transport=server.transport)
    assert_clean_error(result, 1, f"403 signature refused: {detail}")
    assert "may only read" not in result.stderr


def test_status_shows_the_short_sha256_of_each_version() -> None:
    sha = {"1.0": "45b67c083111" + "0" * 52, "2.0": "85d819266b26" + "1" * 52}
    package = {
        "name": "greeter",
        "mount": "/greeter",
        "active_version": "2.0",
        "versions": [
            {"version": "1.0", "state": "draining", "in_flight": 3, "sha256": sha["1.0"]},
            {"version": "2.0", "state": "active", "in_flight": 5, "sha256": sha["2.0"]},
        ],
        "available_versions": [{"version": v, "sha256": s} for v, s in sha.items()],
    }
    server = FakeServer([httpx.Response(200, json={"packages": [package]})])
    result = run("status", "--token", "t", transport=server.transport)
    assert result.exit_code == 0, (result.output, result.stderr)
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "MOUNT", "ACTIVE", "LOADED", "AVAILABLE"]
    loaded = "1.0 45b67c083111 draining (3 in flight), 2.0 85d819266b26 active (5 in flight)"
    assert row.split("  ")[0:1] == ["greeter"]
    assert f"  {loaded}  " in row
    assert row.endswith("  1.0 45b67c083111, 2.0 85d819266b26")


def test_graph_shows_each_packages_requirements_and_dependants() -> None:
    packages = [
        {"name": "inventory", "active_version": "1.3", "requires": {}, "required_by": ["orders", "reports"]},
        {
            "name": "orders",
            "active_version": "2.0",
            "requires": {"inventory": ">=1.2"},
            "required_by": [],
            "versions": [
                {"version": "1.9", "state": "draining", "bound_to": {"inventory": "1.2"}},
                {"version": "2.0", "state": "active", "bound_to": {"inventory": "1.3"}},
            ],
        },
        {
            "name": "reports",
            "active_version": "0.9",
            "requires": {"inventory": ">=2", "billing": ""},
            "required_by": [],
        },
    ]
    server = FakeServer([httpx.Response(200, json={"packages": packages})])
    result = run("graph", "--token", "t", transport=server.transport)
    assert result.exit_code == 0, (result.output, result.stderr)
    assert result.stdout.splitlines() == [
        "inventory 1.3",
        "  required by orders, reports",
        "orders 2.0",
        "  requires inventory >=1.2: active 1.3",
        "  imports from inventory 1.3 (bound)",
        "reports 0.9",
        "  requires inventory >=2: UNMET, active 1.3",
        "  requires billing (any version): UNMET, not active",
    ]
    server = FakeServer([httpx.Response(200, json={"packages": packages})])
    as_json = run("graph", "--json", "--token", "t", transport=server.transport)
    assert json.loads(as_json.stdout)["packages"][1] == {
        "name": "orders",
        "active_version": "2.0",
        "requires": {"inventory": ">=1.2"},
        "required_by": [],
        "bound_to": {"inventory": "1.3"},
    }


def test_serve_passes_trusted_keys_to_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = signing_key(tmp_path)
    line = key.with_name("alice.pub").read_text().strip()
    seen: list[str | None] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.append(os.environ.get("HOTDEPLOY_TRUSTED_KEYS")))
    monkeypatch.chdir(tmp_path)
    result = run(
        "serve", "--trusted-key", "alice.pub", "--trusted-key", line, env={"HOTDEPLOY_ADMIN_TOKEN": "t"}
    )
    assert result.exit_code == 0, (result.output, result.stderr)
    # Paths made absolute for the worker processes; the Deployer reads the variable.
    assert seen == [f"{tmp_path / 'alice.pub'}{os.pathsep}{line}"]
    fingerprint = next(iter(trusting(key))).fingerprint
    assert result.stdout.splitlines()[0] == f"trusted keys: alice@example.com ({fingerprint})"


def test_serve_reads_trusted_keys_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = signing_key(tmp_path)
    seen: list[str | None] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.append(os.environ.get("HOTDEPLOY_TRUSTED_KEYS")))
    env = {"HOTDEPLOY_ADMIN_TOKEN": "t", "HOTDEPLOY_TRUSTED_KEYS": f"{key}.pub"}
    result = run("serve", env=env)
    assert result.exit_code == 0, (result.output, result.stderr)
    assert seen == [f"{key}.pub"]


def test_serve_refuses_a_bad_trusted_key_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(a))
    result = run("serve", "--trusted-key", str(tmp_path / "nope.pub"), env={"HOTDEPLOY_ADMIN_TOKEN": "t"})
    assert_clean_error(result, 2, f"trusted key {tmp_path / 'nope.pub'}: no such file")
    assert started == []


# -- serve, without a server ---------------------------------------------------------------------------


def test_serve_generates_a_token_and_passes_settings_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any], dict[str, str | None]]] = []

    def fake_run(*args: Any, **kwargs: Any) -> None:
        seen = {key: os.environ.get(key) for key in ("HOTDEPLOY_HOME", "HOTDEPLOY_ADMIN_TOKEN")}
        calls.append((args, kwargs, seen))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    result = run("serve", "--home", str(tmp_path / "home"), "--port", "9999", "--workers", "3")
    assert result.exit_code == 0, result.output
    token = result.stdout.splitlines()[0].removeprefix("admin token: ")
    assert len(token) >= 32
    assert "web UI: http://127.0.0.1:9999/_hotdeploy/ui/" in result.stdout
    assert "warning" not in result.stderr  # the workers converge through the shared home
    [(args, kwargs, seen)] = calls
    assert args == ("starlette_hotdeploy._serve:create_host_app",)
    assert kwargs == {
        "factory": True,
        "host": "127.0.0.1",
        "port": 9999,
        "workers": 3,
        "lifespan": "on",
        "log_level": "info",
    }
    assert seen == {"HOTDEPLOY_HOME": str(tmp_path / "home"), "HOTDEPLOY_ADMIN_TOKEN": token}


def test_serve_keeps_a_given_token_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens: list[str | None] = []
    monkeypatch.setattr(
        uvicorn, "run", lambda *a, **k: tokens.append(os.environ.get("HOTDEPLOY_ADMIN_TOKEN"))
    )
    result = run("serve", env={"HOTDEPLOY_ADMIN_TOKEN": "from-env"})
    assert result.exit_code == 0, result.output
    assert tokens == ["from-env"]
    assert "from-env" not in result.output
    assert "admin token" not in result.output
    assert "warning" not in result.stderr


# -- end to end: a real `hotdeploy serve` ------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A `hotdeploy serve` subprocess on a free port: (its URL, its admin token)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = "e2e-token-" + os.urandom(8).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTDEPLOY_")}
    env["HOTDEPLOY_ADMIN_TOKEN"] = token
    # The test packages import `testkit`, from the tests folder.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "starlette_hotdeploy._cli", "serve"]
    command += ["--home", str(tmp_path / "home"), "--port", str(port), "--log-level", "warning"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            wait_until_ready(url, process, log_path)
            yield url, token
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll GET / until the server answers (at most 20 s), failing early if it exited."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"hotdeploy serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"hotdeploy serve did not answer within 20 s:\n{log_path.read_text()}")


def greeter(url: str) -> tuple[int, str]:
    """GET /greeter/: the status and the version that answered (or the body)."""
    response = httpx.get(url + "/greeter/", timeout=10)
    if response.status_code != 200:
        return response.status_code, response.text
    return 200, str(response.json()["version"])


def test_end_to_end_against_hotdeploy_serve(server: tuple[str, str], tmp_path: Path, sources: Path) -> None:
    url, token = server
    env = {"HOTDEPLOY_URL": url, "HOTDEPLOY_ADMIN_TOKEN": token}

    def hotdeploy(*args: str) -> Result:
        return run(*args, "--timeout", "60", env=env)

    def ok(result: Result) -> list[str]:
        assert result.exit_code == 0, (result.output, result.stderr)
        return result.stdout.splitlines()

    # pack + deploy 1.0 from the archive.
    archive = tmp_path / "greeter-1.0.zip"
    ok(run("pack", str(write_package(sources, version="1.0")), "-o", str(archive)))
    lines = ok(hotdeploy("deploy", str(archive)))
    assert lines[-1].startswith("deploy greeter: - -> 1.0 succeeded in ")
    finished = [line.rsplit(maxsplit=3)[0].strip() for line in lines if line.endswith(" ok")]
    assert finished == DEPLOY_STEPS
    assert not [line for line in lines if line.endswith("FAILED")]
    assert greeter(url) == (200, "1.0")

    # 2.0 from its directory, packed on the fly.
    lines = ok(hotdeploy("deploy", str(write_package(sources, version="2.0"))))
    assert lines[-1].startswith("deploy greeter: 1.0 -> 2.0 succeeded in ")
    assert greeter(url) == (200, "2.0")

    [header, row] = ok(hotdeploy("status"))
    assert header.split() == ["NAME", "MOUNT", "ACTIVE", "LOADED", "AVAILABLE"]
    sha1 = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    sha2 = pack_directory(sources / "greeter-2.0").sha256[:12]
    assert row.split()[:6] == ["greeter", "/greeter", "2.0", "2.0", sha2, "active"]
    assert row.endswith(f"1.0 {sha1}, 2.0 {sha2}")  # available again from disk
    package = json.loads("\n".join(ok(hotdeploy("status", "greeter", "--json"))))
    assert (package["name"], package["active_version"], package["previous_version"]) == (
        "greeter",
        "2.0",
        "1.0",
    )

    history = ok(hotdeploy("history"))
    assert history[0].split() == ["ID", "OPERATION", "PACKAGE", "VERSIONS", "OUTCOME", "DURATION"]
    assert [line.split()[1:7] for line in history[1:]] == [
        ["deploy", "greeter", "1.0", "->", "2.0", "succeeded"],  # newest first
        ["deploy", "greeter", "-", "->", "1.0", "succeeded"],
    ]

    # A broken release: refused at the load step, 2.0 keeps serving.
    broken = write_package(sources, version="2.1", app="def broken(:\n    pass\n")
    result = hotdeploy("deploy", str(broken))
    assert_clean_error(
        result,
        1,
        "deploy failed at step 'load'",
        "greeter 2.1: syntax error in 'greeter.app' (app.py:1)",
    )
    assert result.stdout.splitlines()[-1].split()[0::3] == ["load", "FAILED"]
    assert greeter(url) == (200, "2.0")
    assert ok(hotdeploy("history", "--package", "greeter", "--limit", "1"))[1].split()[5:8] == [
        "2.1",
        "failed",
        "[load]",
    ]

    lines = ok(hotdeploy("rollback", "greeter"))
    assert lines[-1].startswith("rollback greeter: 2.0 -> 1.0 succeeded in ")
    assert greeter(url) == (200, "1.0")

    lines = ok(hotdeploy("activate", "greeter", "2.0"))
    assert lines[-1].startswith("activate greeter: 1.0 -> 2.0 succeeded in ")
    assert greeter(url) == (200, "2.0")

    assert_clean_error(hotdeploy("activate", "greeter", "9.9"), 1, "404 unknown version")

    lines = ok(hotdeploy("undeploy", "greeter"))
    assert lines[-1].startswith("undeploy greeter: 2.0 -> - succeeded in ")
    assert greeter(url)[0] == 404
    assert ok(hotdeploy("status")) == ["no packages deployed"]
    assert_clean_error(hotdeploy("rollback", "greeter"), 1, "404 unknown package")

    # Talking to the server wrongly: one line, exit 2.
    wrong = run("status", env={"HOTDEPLOY_URL": url, "HOTDEPLOY_ADMIN_TOKEN": "wrong"})
    assert_clean_error(wrong, 2, "401 unauthorized", "the server refused the token")
    assert_clean_error(hotdeploy("status", "--prefix", "/nope"), 2, "not a JSON object")


def test_canary_deploy_status_promote_and_abort_against_hotdeploy_serve(
    server: tuple[str, str], sources: Path
) -> None:
    url, token = server
    env = {"HOTDEPLOY_URL": url, "HOTDEPLOY_ADMIN_TOKEN": token}

    def ok(*args: str) -> list[str]:
        result = run(*args, "--timeout", "60", env=env)
        assert result.exit_code == 0, (result.output, result.stderr)
        return result.stdout.splitlines()

    ok("deploy", str(write_package(sources, version="1.0")))
    [deployment] = ok(
        "deploy", "--canary", "25%,100%", "--no-wait", str(write_package(sources, version="2.0"))
    )
    record = wait_for_record(
        url, token, deployment, lambda r: any(s["name"] == "converge" for s in r["steps"])
    )
    assert record["outcome"] == "pending"
    lines = ok("status")
    assert lines[-1] == "greeter: canary 2.0 at 25% (step 1 of 25% (until promoted), 100%)"
    assert ok("canary", "promote", "greeter", "--all") == ["greeter: promoting canary 2.0 to 100%"]
    record = wait_for_record(url, token, deployment, lambda r: r["outcome"] != "pending")
    assert record["outcome"] == "succeeded"
    assert greeter(url) == (200, "2.0")

    [second] = ok("deploy", "--canary", "--no-wait", str(write_package(sources, version="3.0")))
    wait_for_record(url, token, second, lambda r: any(s["name"] == "converge" for s in r["steps"]))
    assert ok("canary", "abort", "greeter") == ["greeter: aborting canary 3.0"]
    record = wait_for_record(url, token, second, lambda r: r["outcome"] != "pending")
    assert record["outcome"] == "aborted"
    assert greeter(url) == (200, "2.0")
    result = run("canary", "abort", "greeter", env=env)
    assert_clean_error(result, 1, "no canary of greeter is running")
    result = run("deploy", "--canary", "lots", str(write_package(sources, version="3.1")), env=env)
    assert_clean_error(result, 1, "'lots' is not a step")


def wait_for_record(
    url: str, token: str, deployment: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the deployment's record (at most 20 s) until `done(record)`."""
    deadline = time.monotonic() + 20
    while True:
        response = httpx.get(
            f"{url}/_hotdeploy/deployments/{deployment}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        record: dict[str, Any] = response.json()
        if done(record) or time.monotonic() > deadline:
            return record
        time.sleep(0.05)
