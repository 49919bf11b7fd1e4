"""Signed archives: our SSH signatures against OpenSSH's own `ssh-keygen -Y`, both ways, and every
way a signature or a trusted key can be wrong.

The interoperability tests run the real ssh-keygen. They fail, never skip, when it is missing:
CI installs it (.ci/run), and a skipped test would hide that signatures stopped interoperating.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from starlette_hotdeploy._errors import HotDeployError, SignatureError
from starlette_hotdeploy._signing import (
    NAMESPACE,
    Signer,
    SigningKeyError,
    TrustedKeys,
    check_signature,
    parse_signature,
    sign,
    signature_path,
    specs_from_env,
)

ARCHIVE = b"PK\x03\x04 pretend this is a zip archive" * 50


def ssh_keygen(
    *args: str, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    executable = shutil.which("ssh-keygen")
    if executable is None:
        pytest.fail("ssh-keygen is not installed (Debian: apt-get install openssh-client; .ci/run does it)")
    return subprocess.run([executable, *args], input=input, capture_output=True, check=check, timeout=60)


def new_key(directory: Path, name: str = "alice", *, kind: str = "ed25519", passphrase: str = "") -> Path:
    """A key pair made by ssh-keygen: the private key's path (its public key is beside, .pub)."""
    path = directory / name
    args = ["-q", "-t", kind, "-N", passphrase, "-C", f"{name}@example.com", "-f", str(path)]
    ssh_keygen(*args, *(["-b", "2048"] if kind == "rsa" else []))
    return path


def pub(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


def ssh_fingerprint(key: Path) -> str:
    """`SHA256:...` as `ssh-keygen -l` prints it."""
    return ssh_keygen("-l", "-f", str(pub(key))).stdout.decode().split()[1]


def ssh_sign(key: Path, file: Path, namespace: str = NAMESPACE, *options: str) -> bytes:
    """`ssh-keygen -Y sign`: the .sig file it writes beside `file`."""
    ssh_keygen("-Y", "sign", "-n", namespace, "-f", str(key), *options, str(file))
    return signature_path(file).read_bytes()


@pytest.fixture
def alice(tmp_path: Path) -> Path:
    return new_key(tmp_path, "alice")


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "greeter-1.0.zip"
    path.write_bytes(ARCHIVE)
    return path


def refused(keys: TrustedKeys, data: bytes, signature: bytes | None) -> str:
    with pytest.raises(SignatureError) as caught:
        keys.verify(data, signature)
    assert caught.value.step == "signature"
    return caught.value.message


# -- round trip and interoperability with ssh-keygen ------------------------------------------------


def test_round_trip(alice: Path) -> None:
    signature = sign(ARCHIVE, alice)
    assert signature.startswith(b"-----BEGIN SSH SIGNATURE-----\n")
    assert signature.endswith(b"-----END SSH SIGNATURE-----\n")
    signer = TrustedKeys.load([pub(alice)]).verify(ARCHIVE, signature)
    assert signer == Signer(ssh_fingerprint(alice), "alice@example.com")
    assert signer.describe() == f"alice@example.com ({ssh_fingerprint(alice)})"
    assert check_signature(ARCHIVE, signature) == Signer(ssh_fingerprint(alice))


def test_a_signature_made_by_ssh_keygen_verifies(alice: Path, archive: Path) -> None:
    signature = ssh_sign(alice, archive)
    assert parse_signature(signature).hash_algorithm == "sha512"
    signer = TrustedKeys.load([pub(alice)]).verify(ARCHIVE, signature)
    assert signer.fingerprint == ssh_fingerprint(alice)


def test_a_sha256_signature_made_by_ssh_keygen_verifies(alice: Path, archive: Path) -> None:
    signature = ssh_sign(alice, archive, NAMESPACE, "-O", "hashalg=sha256")
    assert parse_signature(signature).hash_algorithm == "sha256"
    assert TrustedKeys.load([pub(alice)]).verify(ARCHIVE, signature).fingerprint == ssh_fingerprint(alice)


def test_ssh_keygen_check_novalidate_accepts_our_signature(alice: Path, archive: Path) -> None:
    sig = archive.with_name("ours.sig")
    sig.write_bytes(sign(ARCHIVE, alice))
    result = ssh_keygen("-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig), input=ARCHIVE)
    assert f'Good "{NAMESPACE}" signature' in result.stdout.decode()
    # And it is a real check: another file does not pass.
    assert ssh_keygen(
        "-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig), input=b"x", check=False
    ).returncode


def test_ssh_keygen_verify_accepts_our_signature_with_allowed_signers(alice: Path, archive: Path) -> None:
    sig = archive.with_name("ours.sig")
    sig.write_bytes(sign(ARCHIVE, alice))
    allowed = alice.with_name("allowed_signers")
    allowed.write_text(f'alice@example.com namespaces="{NAMESPACE}" {pub(alice).read_text()}')
    args = ["-Y", "verify", "-f", str(allowed), "-I", "alice@example.com", "-n", NAMESPACE, "-s", str(sig)]
    result = ssh_keygen(*args, input=ARCHIVE)
    assert "Good" in result.stdout.decode()
    assert "alice@example.com" in result.stdout.decode()
    # The same file is one we read.
    assert TrustedKeys.load([allowed]).verify(ARCHIVE, sig.read_bytes()).name == "alice@example.com"


# -- refused signatures --------------------------------------------------------------------------------


def test_unsigned_is_refused_with_how_to_sign(alice: Path, tmp_path: Path) -> None:
    one = TrustedKeys.load([pub(alice)])
    for missing in (None, b"", b"  \n"):
        message = refused(one, ARCHIVE, missing)
        assert message.startswith(
            "the archive is not signed; this server accepts only archives signed by its trusted key"
        )
        assert "hotdeploy pack --sign KEY" in message
        assert "ssh-keygen -Y sign -n hotdeploy -f KEY archive.zip" in message
    two = TrustedKeys.load([pub(alice), pub(new_key(tmp_path, "bob"))])
    assert "one of its 2 trusted keys" in refused(two, ARCHIVE, None)


def test_a_changed_archive_is_refused(alice: Path) -> None:
    signature = sign(ARCHIVE, alice)
    message = refused(TrustedKeys.load([pub(alice)]), ARCHIVE + b"!", signature)
    assert (
        f"the signature by alice@example.com ({ssh_fingerprint(alice)}) does not match the archive" in message
    )
    assert "changed after it was signed" in message
    with pytest.raises(SignatureError, match="does not match"):
        check_signature(ARCHIVE + b"!", signature)


def test_another_namespace_is_refused(alice: Path, archive: Path) -> None:
    signature = ssh_sign(alice, archive, "git")
    message = refused(TrustedKeys.load([pub(alice)]), ARCHIVE, signature)
    assert "namespace 'git', not 'hotdeploy'" in message
    assert "-n hotdeploy" in message


def test_an_untrusted_key_is_named_by_its_fingerprint(alice: Path, tmp_path: Path) -> None:
    mallory = new_key(tmp_path, "mallory")
    message = refused(TrustedKeys.load([pub(alice)]), ARCHIVE, sign(ARCHIVE, mallory))
    assert message == (
        f"the archive is signed by key {ssh_fingerprint(mallory)}, which is not this server's trusted key"
    )


def _armored(blob: bytes) -> bytes:
    return b"-----BEGIN SSH SIGNATURE-----\n" + base64.b64encode(blob) + b"\n-----END SSH SIGNATURE-----\n"


def _blob(signature: bytes) -> bytes:
    return base64.b64decode(b"".join(signature.splitlines()[1:-1]))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda s: s[: len(s) // 2], "does not end with '-----END SSH SIGNATURE-----': cut short?"),
        (lambda s: b"garbage", "does not start with '-----BEGIN SSH SIGNATURE-----'"),
        (lambda s: b"\xff\xfe\x00binary", "neither text nor an SSHSIG blob"),
        (lambda s: s.replace(b"U1NIU0lH", b"U1NIU0l*"), "its base64 text is damaged"),
        (lambda s: _armored(_blob(s)[:-10]), "cut short in its signature"),
        (lambda s: _armored(_blob(s) + b"\x00"), "trailing bytes"),
        (lambda s: _armored(b"SSHSIG\x00\x00\x00\x02"), "SSHSIG version 2"),
        (lambda s: _armored(b"NOTSIG" + _blob(s)[6:]), "SSHSIG magic"),
        (lambda s: b"x" * 20_000, "over the 16384-byte limit"),
    ],
)
def test_a_malformed_signature_says_what_is_wrong(alice: Path, damage: object, expected: str) -> None:
    assert callable(damage)
    bad = damage(sign(ARCHIVE, alice))
    message = refused(TrustedKeys.load([pub(alice)]), ARCHIVE, bad)
    assert message.startswith("the signature is not a valid SSH signature (")
    assert expected in message


def test_the_bare_blob_is_accepted_too(alice: Path) -> None:
    blob = _blob(sign(ARCHIVE, alice))
    assert TrustedKeys.load([pub(alice)]).verify(ARCHIVE, blob).name == "alice@example.com"


def test_an_rsa_signature_is_refused(alice: Path, tmp_path: Path, archive: Path) -> None:
    rsa = new_key(tmp_path, "rsa", kind="rsa")
    message = refused(TrustedKeys.load([pub(alice)]), ARCHIVE, ssh_sign(rsa, archive))
    assert message == (
        f"the archive is signed with a ssh-rsa key ({ssh_fingerprint(rsa)}): only ssh-ed25519 signatures are accepted"
    )


# -- trusted keys ----------------------------------------------------------------------------------------


def test_rsa_keys_are_refused_clearly(tmp_path: Path) -> None:
    rsa = new_key(tmp_path, "rsa", kind="rsa")
    with pytest.raises(SigningKeyError) as trusted:
        TrustedKeys.load([pub(rsa)])
    assert str(trusted.value) == (
        f"{pub(rsa)}:1: ssh-rsa keys are not supported, only ssh-ed25519 (create one with `ssh-keygen -t ed25519`)"
    )
    assert isinstance(trusted.value, ValueError)
    assert isinstance(trusted.value, HotDeployError)
    with pytest.raises(SigningKeyError, match="ssh-rsa keys cannot sign, only ssh-ed25519 keys"):
        sign(ARCHIVE, rsa)


def test_keys_from_files_lines_and_allowed_signers(tmp_path: Path) -> None:
    alice, bob, carol = (new_key(tmp_path, name) for name in ("alice", "bob", "carol"))
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(
        "# who may deploy\n"
        "\n"
        f"bob@example.com,robert@example.com {pub(bob).read_text().strip()} a comment\n"
        f'carol@example.com namespaces="git" {pub(carol).read_text()}'  # not for us: left out
        f'carol@example.com namespaces="file,hot*" {pub(carol).read_text()}'
    )
    keys = TrustedKeys.load([pub(alice), str(allowed), pub(alice).read_text().strip()])
    assert len(keys) == 3
    assert keys
    assert [signer.name for signer in keys] == [
        "alice@example.com",
        "bob@example.com,robert@example.com",
        "carol@example.com",
    ]
    assert keys.verify(ARCHIVE, sign(ARCHIVE, bob)).describe() == (
        f"bob@example.com,robert@example.com ({ssh_fingerprint(bob)})"
    )
    assert keys.verify(ARCHIVE, sign(ARCHIVE, carol)).name == "carol@example.com"
    assert not TrustedKeys.load([])
    assert len(TrustedKeys.load([])) == 0


def test_a_namespace_restriction_that_excludes_hotdeploy(tmp_path: Path) -> None:
    key = new_key(tmp_path)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'alice@example.com namespaces="git,!hotdeploy,*" {pub(key).read_text()}')
    with pytest.raises(
        SigningKeyError, match="none of its 1 key\\(s\\) is trusted for namespace 'hotdeploy'"
    ):
        TrustedKeys.load([allowed])


def test_validity_windows_of_allowed_signers(tmp_path: Path) -> None:
    key = new_key(tmp_path)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(
        f'alice@example.com valid-after="20240101Z",valid-before="20250101Z" {pub(key).read_text()}'
    )
    keys = TrustedKeys.load([allowed])
    signature = sign(ARCHIVE, key)
    assert keys.verify(ARCHIVE, signature, now=datetime(2024, 6, 1, tzinfo=UTC)).name == "alice@example.com"
    with pytest.raises(SignatureError) as late:
        keys.verify(ARCHIVE, signature, now=datetime(2025, 6, 1, tzinfo=UTC))
    assert "is valid, but the key is not trusted at 2025-06-01 00:00:00 UTC" in late.value.message
    assert "from 2024-01-01 00:00:00 UTC until 2025-01-01 00:00:00 UTC" in late.value.message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "no key in it"),
        ("# only a comment\n", "no key in it"),
        ("ssh-ed25519 AAAA!!!! alice\n", ":1: the key's base64 text is damaged"),
        (
            "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa").decode() + "\n",
            "the key's data is not an ssh-ed25519 key (it says 'ssh-rsa')",
        ),
        ("alice@example.com\n", ":1: expected 'ssh-ed25519 AAAA...'"),
        ("alice@example.com cert-authority {key}", "certificates are not supported"),
        ("alice@example.com frobnicate {key}", "unknown option 'frobnicate'"),
        ('alice@example.com valid-after="tomorrow" {key}', "'tomorrow' is not a time"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\n", "this is a private key: trust its public key"),
    ],
)
def test_a_bad_trusted_key_file_names_itself_and_the_problem(
    tmp_path: Path, content: str, problem: str
) -> None:
    spec = tmp_path / "keys"
    spec.write_text(
        content.format(
            key="ssh-ed25519 "
            + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"k" * 32).decode()
        )
    )
    with pytest.raises(SigningKeyError) as caught:
        TrustedKeys.load([spec])
    assert str(caught.value).startswith(str(spec))
    assert caught.value.spec.startswith(str(spec))
    assert problem in str(caught.value)


def test_a_missing_trusted_key_file(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError) as caught:
        TrustedKeys.load([tmp_path / "nope.pub"])
    assert str(caught.value).startswith(
        f"{tmp_path / 'nope.pub'}: no such file (a trusted key is a public key file"
    )


def test_a_bad_key_line_is_named_short() -> None:
    with pytest.raises(SigningKeyError) as caught:
        TrustedKeys.load(["ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC" + "x" * 300 + " bob"])
    message = str(caught.value)
    assert message.startswith("'ssh-rsa AAAAB3NzaC1yc2E")
    assert "...': ssh-rsa keys are not supported" in message
    assert len(message.partition(": ")[0]) < 45


# -- signing keys and small helpers ---------------------------------------------------------------------


def test_signing_needs_a_private_key(alice: Path, tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="this is a public key: sign with the private key"):
        sign(ARCHIVE, pub(alice))
    with pytest.raises(SigningKeyError, match="cannot read the signing key: No such file"):
        sign(ARCHIVE, tmp_path / "nope")
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(SigningKeyError, match="not an OpenSSH private key"):
        sign(ARCHIVE, tmp_path / "junk")
    # A passphrase for a key without one is ignored, as ssh-keygen does.
    assert sign(ARCHIVE, alice, b"unneeded") == sign(ARCHIVE, alice)


def test_an_encrypted_key_asks_for_its_passphrase(tmp_path: Path) -> None:
    key = new_key(tmp_path, "locked", passphrase="secret words")
    with pytest.raises(SigningKeyError) as caught:
        sign(ARCHIVE, key)
    # With bcrypt installed the CLI asks for the passphrase; without, the message says what to install.
    assert caught.value.needs_passphrase or "`bcrypt` package" in str(caught.value)


def test_signature_path_and_the_environment_variable() -> None:
    assert signature_path(Path("out/greeter-1.0.zip")) == Path("out/greeter-1.0.zip.sig")
    assert specs_from_env(None) == []
    assert specs_from_env(f" a.pub {os.pathsep}{os.pathsep}b ") == ["a.pub", "b"]
