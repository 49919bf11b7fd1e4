"""Signed archives: OpenSSH's SSH signatures (SSHSIG, PROTOCOL.sshsig) made with Ed25519 keys.

A signature is the file `ssh-keygen -Y sign -n hotdeploy -f KEY archive.zip` writes as
`archive.zip.sig`; `sign` writes the same format, so either tool can sign and either can check
(`ssh-keygen -Y verify` / `check-novalidate`). `TrustedKeys` is what a server trusts: public keys
and allowed_signers files, as ssh-keygen reads them. Only `ssh-ed25519` keys: one algorithm, no
parameters to get wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
)

from ._errors import HotDeployError, SignatureError

NAMESPACE = "hotdeploy"  # ssh-keygen's -n: a signature for git or email is not one for us
SIGNATURE_SUFFIX = ".sig"
SIGNATURE_HEADER = "Hotdeploy-Signature"  # admin uploads: base64 of the whole .sig file
TRUSTED_KEYS_ENV = "HOTDEPLOY_TRUSTED_KEYS"  # os.pathsep-separated specs, for `hotdeploy serve`

KEY_TYPE = "ssh-ed25519"
MAGIC = b"SSHSIG"
SIG_VERSION = 1
HASHES = {"sha512": hashlib.sha512, "sha256": hashlib.sha256}  # ssh-keygen signs with sha512
ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
ARMOR_END = "-----END SSH SIGNATURE-----"
ARMOR_WIDTH = 70  # ssh-keygen's line length
MAX_SIGNATURE_BYTES = 16 * 1024  # an Ed25519 SSHSIG is under 300 bytes; this keeps parsing cheap

SIGN_HINT = "sign it with `hotdeploy pack --sign KEY` or `ssh-keygen -Y sign -n hotdeploy -f KEY archive.zip`"
NEW_KEY_HINT = "create one with `ssh-keygen -t ed25519`"

# The key types OpenSSH knows: how a line that starts with a key is told from an allowed_signers
# line, which starts with its principals.
_KNOWN_KEY_TYPE = re.compile(
    r"(ssh-(ed25519|rsa|dss|ed448)|ecdsa-sha2-nistp\d+|rsa-sha2-\d+|sk-\S+@openssh\.com)(-cert-v0\d@openssh\.com)?"
)
_ALLOWED_OPTIONS = ("namespaces", "valid-after", "valid-before")


class SigningKeyError(HotDeployError, ValueError):
    """A key given to trust or to sign with is missing, unreadable, or not an ssh-ed25519 key.
    `spec` is what was given (a path or a key line); the message names it and the problem."""

    def __init__(self, spec: str, problem: str, *, needs_passphrase: bool = False) -> None:
        super().__init__(f"{spec}: {problem}")
        self.spec = spec
        self.needs_passphrase = needs_passphrase  # an encrypted private key and no passphrase


@dataclass(frozen=True)
class Signer:
    """Who signed an archive: the key's fingerprint as `ssh-keygen -l` prints it, and its name
    (the principals of its allowed_signers line, or the public key's comment; may be "")."""

    fingerprint: str
    name: str = ""

    def describe(self) -> str:
        """`alice@example.com (SHA256:...)`, or the fingerprint alone."""
        return f"{self.name} ({self.fingerprint})" if self.name else self.fingerprint


def fingerprint(key_blob: bytes) -> str:
    """`SHA256:<base64, no padding>` of a public key in SSH wire format."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")


def signature_path(archive: Path) -> Path:
    """Where a signature lives: beside the archive, `archive.zip` -> `archive.zip.sig`."""
    return archive.with_name(archive.name + SIGNATURE_SUFFIX)


# -- the SSH wire format ---------------------------------------------------------------------------


class _Truncated(Exception):
    pass


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, size: int, field: str) -> bytes:
        if self._at + size > len(self._data):
            raise _Truncated(field)
        value = self._data[self._at : self._at + size]
        self._at += size
        return value

    def uint32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def string(self, field: str) -> bytes:
        return self.take(self.uint32(field), field)

    def text(self, field: str) -> str:
        return self.string(field).decode("utf-8", errors="replace")

    @property
    def rest(self) -> int:
        return len(self._data) - self._at


def _key_blob(public_key: Ed25519PublicKey) -> bytes:
    return _string(KEY_TYPE.encode()) + _string(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def _signed_data(namespace: str, hash_algorithm: str, data: bytes) -> bytes:
    """What the key signs (PROTOCOL.sshsig): the namespace and a hash of the message, never the
    message itself, so that the signature of an archive cannot pass for an SSH login."""
    digest = HASHES[hash_algorithm](data).digest()
    return (
        MAGIC
        + _string(namespace.encode())
        + _string(b"")
        + _string(hash_algorithm.encode())
        + _string(digest)
    )


@dataclass(frozen=True)
class SshSignature:
    """The fields of an SSHSIG blob. `public_key` is the signer's key in SSH wire format; for
    ssh-ed25519, `key` is its 32 raw bytes and `signature` the 64 raw bytes."""

    public_key: bytes
    namespace: str
    hash_algorithm: str
    key_type: str
    key: bytes
    signature: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


def _malformed(what: str) -> SignatureError:
    return SignatureError(
        f"the signature is not a valid SSH signature ({what}): expected the armored "
        f"'{ARMOR_BEGIN}' file that `ssh-keygen -Y sign` or `hotdeploy pack --sign` writes"
    )


def _dearmor(signature: bytes) -> bytes:
    if signature.startswith(MAGIC):  # the bare blob, not armored: accept it as well
        return signature
    try:
        text = signature.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _malformed("it is neither text nor an SSHSIG blob") from None
    lines = [line.strip() for line in text.splitlines()]
    if not lines or lines[0] != ARMOR_BEGIN:
        raise _malformed(f"it does not start with '{ARMOR_BEGIN}'")
    if lines[-1] != ARMOR_END or len(lines) < 2:
        raise _malformed(f"it does not end with '{ARMOR_END}': cut short?")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise _malformed("its base64 text is damaged") from None


def parse_signature(signature: bytes) -> SshSignature:
    """The fields of an armored (or bare) SSHSIG; `SignatureError` saying what is wrong."""
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise _malformed(f"it is {len(signature)} bytes, over the {MAX_SIGNATURE_BYTES}-byte limit")
    blob = _dearmor(signature)
    reader = _Reader(blob)
    try:
        if reader.take(len(MAGIC), "magic") != MAGIC:
            raise _malformed("it does not start with the SSHSIG magic")
        version = reader.uint32("version")
        if version != SIG_VERSION:
            raise _malformed(f"it is SSHSIG version {version}, only version {SIG_VERSION} is known")
        public_key = reader.string("public key")
        namespace = reader.text("namespace")
        reader.string("reserved")
        hash_algorithm = reader.text("hash algorithm")
        signature_blob = _Reader(reader.string("signature"))
        key_blob = _Reader(public_key)
        key_type = key_blob.text("public key type")
        key = key_blob.string("public key") if key_type == KEY_TYPE else b""
        sig_type = signature_blob.text("signature type")
        raw = signature_blob.string("signature bytes")
    except _Truncated as exc:
        raise _malformed(f"it is cut short in its {exc}") from None
    if reader.rest or signature_blob.rest:
        raise _malformed("it has trailing bytes")
    if key_type == KEY_TYPE and (len(key) != 32 or key_blob.rest):
        raise _malformed(f"its public key is not a {KEY_TYPE} key of 32 bytes")
    if key_type == KEY_TYPE and (sig_type != KEY_TYPE or len(raw) != 64):
        raise _malformed(f"its signature is {sig_type!r} of {len(raw)} bytes, not a 64-byte {KEY_TYPE} one")
    return SshSignature(public_key, namespace, hash_algorithm, key_type, key, raw)


def _armor(blob: bytes) -> bytes:
    text = base64.b64encode(blob).decode()
    lines = [text[i : i + ARMOR_WIDTH] for i in range(0, len(text), ARMOR_WIDTH)]
    return "\n".join([ARMOR_BEGIN, *lines, ARMOR_END, ""]).encode()


# -- signing ---------------------------------------------------------------------------------------


def sign(data: bytes, private_key: str | os.PathLike[str], passphrase: bytes | None = None) -> bytes:
    """The armored SSH signature of `data` in namespace "hotdeploy", as `ssh-keygen -Y sign -n
    hotdeploy -f private_key` makes it. `private_key` is an OpenSSH private key file (ssh-ed25519).
    `SigningKeyError` if it cannot be used (`needs_passphrase` when it is encrypted and no
    passphrase was given)."""
    key = load_signing_key(private_key, passphrase)
    public = key.public_key()
    signature = _string(KEY_TYPE.encode()) + _string(key.sign(_signed_data(NAMESPACE, "sha512", data)))
    blob = (
        MAGIC
        + SIG_VERSION.to_bytes(4, "big")
        + _string(_key_blob(public))
        + _string(NAMESPACE.encode())
        + _string(b"")
        + _string(b"sha512")
        + _string(signature)
    )
    return _armor(blob)


def load_signing_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """An Ed25519 private key from an OpenSSH private key file (what ssh-keygen writes)."""
    spec = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError(spec, f"cannot read the signing key: {exc.strerror or exc}") from None
    if _KNOWN_KEY_TYPE.match(raw[:40].decode("ascii", errors="replace")):
        raise SigningKeyError(spec, "this is a public key: sign with the private key (the file without .pub)")
    try:
        key = load_ssh_private_key(raw, passphrase)
    except TypeError:
        # cryptography raises TypeError both for "encrypted, no passphrase" and "passphrase
        # given, key not encrypted" (ssh-keygen ignores it then; so do we).
        if passphrase is None:
            raise _encrypted(spec) from None
        return load_signing_key(path)
    except UnsupportedAlgorithm as exc:
        raise SigningKeyError(spec, _unsupported(exc)) from None
    except ValueError as exc:
        wrong = " or the passphrase is wrong" if passphrase is not None else ""
        raise SigningKeyError(
            spec, f"not an OpenSSH private key{wrong} ({exc}); a key from `ssh-keygen -t ed25519` is"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        kind = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).split()[0].decode()
        raise SigningKeyError(spec, f"{kind} keys cannot sign, only {KEY_TYPE} keys ({NEW_KEY_HINT})")
    return key


def _encrypted(spec: str) -> SigningKeyError:
    if importlib.util.find_spec("bcrypt") is None:
        # cryptography decrypts OpenSSH keys only with bcrypt installed: say so before asking.
        return SigningKeyError(spec, _unsupported(None))
    return SigningKeyError(spec, "the key is encrypted: give its passphrase", needs_passphrase=True)


def _unsupported(exc: Exception | None) -> str:
    if exc is None or "bcrypt" in str(exc):
        return (
            "the key is encrypted with a passphrase, and decrypting it needs the `bcrypt` package "
            "(pip install bcrypt); or sign with `ssh-keygen -Y sign -n hotdeploy -f KEY archive.zip`"
        )
    return f"cannot use the key: {exc}"


# -- trusted keys ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _TrustedKey:
    signer: Signer
    public_key: Ed25519PublicKey
    origin: str  # `spec:line`, for messages
    valid_after: datetime | None = None
    valid_before: datetime | None = None


class TrustedKeys:
    """The ssh-ed25519 public keys whose signatures a server accepts (`load`), and `verify`.

    Iterating gives each key's `Signer`; an empty `TrustedKeys` is false."""

    def __init__(self, entries: Iterable[_TrustedKey] = ()) -> None:
        # One key may have several allowed_signers lines (other validity windows): keep them all.
        self._by_fingerprint: dict[str, list[_TrustedKey]] = {}
        for entry in entries:
            self._by_fingerprint.setdefault(entry.signer.fingerprint, []).append(entry)

    @classmethod
    def load(cls, specs: Iterable[str | os.PathLike[str]]) -> TrustedKeys:
        """Read each spec: a public key file (`ssh-ed25519 AAAA... comment`, one key a line), an
        allowed_signers file (`principals [options] ssh-ed25519 AAAA...`, as ssh-keygen reads
        it), or a public key line itself. `SigningKeyError` naming the spec and the problem."""
        entries: list[_TrustedKey] = []
        for spec in specs:
            entries += _load_spec(spec)
        return cls(entries)

    def __len__(self) -> int:
        return len(self._by_fingerprint)

    def __bool__(self) -> bool:
        return bool(self._by_fingerprint)

    def __iter__(self) -> Iterator[Signer]:
        return (entries[0].signer for entries in self._by_fingerprint.values())

    def __repr__(self) -> str:
        return f"TrustedKeys({', '.join(signer.describe() for signer in self)})"

    def verify(self, data: bytes, signature: bytes | None, *, now: datetime | None = None) -> Signer:
        """Who signed `data`, if `signature` (the .sig file's bytes) is a valid SSH signature of
        it in namespace "hotdeploy" by one of these keys; else `SignatureError` saying why.
        Pure and cheap: one hash of `data` and one Ed25519 verification. `now` (timezone-aware)
        is for the valid-after/valid-before options of allowed_signers lines."""
        if signature is None or not signature.strip():
            raise SignatureError(
                "the archive is not signed; this server accepts only archives signed by "
                f"{self._count('its')}: {SIGN_HINT}"
            )
        parsed = _usable(parse_signature(signature))
        entries = self._by_fingerprint.get(parsed.fingerprint)
        if not entries:
            raise SignatureError(
                f"the archive is signed by key {parsed.fingerprint}, which is not "
                + self._count("this server's")
            )
        _check(parsed, entries[0].public_key, data, entries[0].signer)
        return _within_validity(entries, now or datetime.now(UTC))

    def _count(self, whose: str) -> str:
        if len(self) == 1:
            return f"{whose} trusted key"
        return f"one of {whose} {len(self)} trusted keys"


def check_signature(data: bytes, signature: bytes) -> Signer:
    """The key that made `signature`, if it is a valid hotdeploy signature of `data`; else
    `SignatureError`. Like `ssh-keygen -Y check-novalidate`: it says nothing about whether the
    key is trusted (for the CLI, to catch a stale .sig before uploading it)."""
    parsed = _usable(parse_signature(signature))
    signer = Signer(parsed.fingerprint)
    _check(parsed, Ed25519PublicKey.from_public_bytes(parsed.key), data, signer)
    return signer


def _usable(parsed: SshSignature) -> SshSignature:
    """Refuse a signature of the wrong kind before looking up its key."""
    if parsed.key_type != KEY_TYPE:
        raise SignatureError(
            f"the archive is signed with a {parsed.key_type} key ({parsed.fingerprint}): only "
            f"{KEY_TYPE} signatures are accepted"
        )
    if parsed.namespace != NAMESPACE:
        raise SignatureError(
            f"the signature is for namespace {parsed.namespace!r}, not {NAMESPACE!r}: "
            f"sign with `ssh-keygen -Y sign -n {NAMESPACE}` or `hotdeploy pack --sign KEY`"
        )
    if parsed.hash_algorithm not in HASHES:
        raise _malformed(f"its hash algorithm {parsed.hash_algorithm!r} is not one of {', '.join(HASHES)}")
    return parsed


def _check(parsed: SshSignature, public_key: Ed25519PublicKey, data: bytes, signer: Signer) -> None:
    try:
        public_key.verify(parsed.signature, _signed_data(NAMESPACE, parsed.hash_algorithm, data))
    except InvalidSignature:
        raise SignatureError(
            f"the signature by {signer.describe()} does not match the archive: the archive was "
            "changed after it was signed, or the signature is of another file"
        ) from None


def specs_from_env(value: str | None) -> list[str]:
    """The trusted key specs of `$HOTDEPLOY_TRUSTED_KEYS`: os.pathsep-separated, blanks left out."""
    return [spec.strip() for spec in (value or "").split(os.pathsep) if spec.strip()]


def _within_validity(entries: list[_TrustedKey], now: datetime) -> Signer:
    """The signer of the first line whose valid-after/valid-before window contains `now`."""
    for entry in entries:
        if (entry.valid_after is None or entry.valid_after <= now) and (
            entry.valid_before is None or now < entry.valid_before
        ):
            return entry.signer
    windows = "; ".join(
        f"{entry.origin}: from {_when(entry.valid_after)} until {_when(entry.valid_before)}"
        for entry in entries
    )
    raise SignatureError(
        f"the signature by {entries[0].signer.describe()} is valid, but the key is not trusted at "
        f"{_when(now)} ({windows})"
    )


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "-"


def _load_spec(spec: str | os.PathLike[str]) -> list[_TrustedKey]:
    if isinstance(spec, str) and _is_key_line(spec):
        label = _short(spec)
        entry = _parse_line(spec.strip(), label)
        if entry is None:
            raise SigningKeyError(label, f"it is not trusted for namespace {NAMESPACE!r}")
        return [entry]
    label = os.fspath(spec)
    try:
        text = Path(spec).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SigningKeyError(
            label,
            "no such file (a trusted key is a public key file, an allowed_signers file, "
            f"or a public key line '{KEY_TYPE} AAAA...')",
        ) from None
    except UnicodeDecodeError:
        raise SigningKeyError(
            label, "not a text file: expected a public key or an allowed_signers file"
        ) from None
    except OSError as exc:
        raise SigningKeyError(label, f"cannot read it: {exc.strerror or exc}") from None
    if "PRIVATE KEY-----" in text:
        raise SigningKeyError(label, "this is a private key: trust its public key (the .pub file) instead")
    entries: list[_TrustedKey] = []
    lines = 0
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lines += 1
        entry = _parse_line(line, f"{label}:{number}")
        if entry is not None:
            entries.append(entry)
    if not lines:
        raise SigningKeyError(label, f"no key in it (expected lines like '{KEY_TYPE} AAAA... comment')")
    if not entries:
        raise SigningKeyError(
            label,
            f"none of its {lines} key(s) is trusted for namespace {NAMESPACE!r} (see their namespaces=)",
        )
    return entries


def _is_key_line(spec: str) -> bool:
    """A spec that is a key itself (`ssh-ed25519 AAAA...`) rather than a file's path."""
    tokens = spec.split()
    return len(tokens) >= 2 and _KNOWN_KEY_TYPE.fullmatch(tokens[0]) is not None


def _short(line: str) -> str:
    text = " ".join(line.split())
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _parse_line(line: str, where: str) -> _TrustedKey | None:
    """One public key line or allowed_signers line; None if its namespaces= leave us out."""
    tokens = _tokens(line)
    if _KNOWN_KEY_TYPE.fullmatch(tokens[0]):
        principals, options, rest = "", "", tokens
    else:
        # allowed_signers: principals, then options unless the next token is the key.
        principals = tokens[0].strip('"')
        has_options = len(tokens) > 1 and not _KNOWN_KEY_TYPE.fullmatch(tokens[1])
        options = tokens[1] if has_options else ""
        rest = tokens[2:] if has_options else tokens[1:]
    if len(rest) < 2:
        raise SigningKeyError(
            where, f"expected '{KEY_TYPE} AAAA...' or an allowed_signers line 'principal {KEY_TYPE} AAAA...'"
        )
    key_type, encoded, *comment = rest
    if key_type != KEY_TYPE:
        raise SigningKeyError(where, f"{key_type} keys are not supported, only {KEY_TYPE} ({NEW_KEY_HINT})")
    public_key, blob = _decode_key(encoded, where)
    allowed = _parse_options(options, where)
    if allowed is None:
        return None
    name = principals or " ".join(comment)
    return _TrustedKey(Signer(fingerprint(blob), name), public_key, where, *allowed)


def _tokens(line: str) -> list[str]:
    """Whitespace-separated, but a double-quoted part (an option's value) stays whole."""
    return re.findall(r'(?:[^\s"]|"[^"]*")+', line)


def _decode_key(encoded: str, where: str) -> tuple[Ed25519PublicKey, bytes]:
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SigningKeyError(where, "the key's base64 text is damaged") from None
    reader = _Reader(blob)
    inner_type, raw = "", b""
    try:
        inner_type = reader.text("type")
        raw = reader.string("key")
    except _Truncated:
        pass  # said below: not a key of our kind
    if inner_type != KEY_TYPE or len(raw) != 32 or reader.rest:
        says = f" (it says {inner_type!r})" if inner_type and inner_type != KEY_TYPE else ""
        raise SigningKeyError(where, f"the key's data is not an {KEY_TYPE} key{says}")
    return Ed25519PublicKey.from_public_bytes(raw), blob


def _parse_options(options: str, where: str) -> tuple[datetime | None, datetime | None] | None:
    """The validity window of an allowed_signers line, or None if `namespaces=` excludes ours."""
    valid: dict[str, datetime] = {}
    for option in re.findall(r'(?:[^,"]|"[^"]*")+', options):
        name, _, value = option.partition("=")
        name, value = name.lower(), value.strip('"')
        if name == "cert-authority":
            raise SigningKeyError(where, "cert-authority: certificates are not supported, only plain keys")
        if name not in _ALLOWED_OPTIONS:
            raise SigningKeyError(where, f"unknown option {name!r} (known: {', '.join(_ALLOWED_OPTIONS)})")
        if name == "namespaces" and not _matches(NAMESPACE, value):
            return None
        if name != "namespaces":
            valid[name] = _parse_time(value, f"{where}: {name}")
    return valid.get("valid-after"), valid.get("valid-before")


def _matches(name: str, patterns: str) -> bool:
    """ssh's pattern lists: comma-separated, `*` and `?` wildcards (nothing else is special),
    `!` negates and wins."""
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        wildcards = re.escape(pattern.removeprefix("!")).replace(r"\*", ".*").replace(r"\?", ".")
        if re.fullmatch(wildcards, name):
            if negated:
                return False
            matched = True
    return matched


def _parse_time(value: str, where: str) -> datetime:
    """ssh-keygen's YYYYMMDD[HHMM[SS]], local time, or UTC with a trailing Z."""
    utc = value.endswith(("Z", "z"))
    digits = value[:-1] if utc else value
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    try:
        moment = datetime.strptime(digits, formats[len(digits)])
    except (KeyError, ValueError):
        raise SigningKeyError(where, f"{value!r} is not a time YYYYMMDD[HHMM[SS]][Z]") from None
    return moment.replace(tzinfo=UTC) if utc else moment.astimezone()
