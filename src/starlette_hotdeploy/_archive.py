"""Safe unpacking of a package source (directory, .zip or wheel) into one directory per version."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ._errors import ArchiveError, ManifestError
from ._files import write_all
from ._loader import top_level_names
from ._manifest import MANIFEST_NAME, Manifest, load_manifest, parse_manifest
from ._version import PackageVersion

STAGING_PREFIX = ".staging-"

# Never packed: caches and version-control folders.
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".venv", ".mypy_cache", ".pytest_cache"})


# What a deployment starts from: a directory or a .zip/.whl path, or the archive bytes.
Source = str | os.PathLike[str] | bytes


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """Caps that keep a hostile or broken archive from exhausting the disk or memory."""

    max_archive_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 256 * 1024 * 1024
    max_files: int = 10_000
    max_ratio: float = 200.0


@dataclass(frozen=True, slots=True)
class Unpacked:
    """A package source laid out on disk, ready to import."""

    root: Path  # the import root: the package's top-level modules live here
    manifest: Manifest
    sha256: str
    top_level: frozenset[str]  # read with the rest, off the event loop (`top_level_names`)

    def new_version(self) -> PackageVersion:
        """A version of these files, staged (nothing imported yet)."""
        return PackageVersion(self.manifest, self.root, self.sha256, top_level=self.top_level)


def unpack(
    source: str | os.PathLike[str] | bytes, into: Path, limits: ArchiveLimits | None = None
) -> Unpacked:
    """Unpack `source` under `into/<name>/<version>-<sha12>/` and validate its manifest.

    A directory is packed first (so later edits of the source cannot change a loaded version,
    and every version has an archive); a .zip or .whl file, or the bytes of one, is extracted
    with every entry checked first. The sha256 is that of the archive.
    """
    limits = limits or ArchiveLimits()
    into.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a starting worker clean up only what dead processes left behind.
    staging = into / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    moved = False
    try:
        data = read_source(source, limits)
        label = "upload" if isinstance(source, bytes) else Path(source).name
        sha256, manifests = _extract_zip(data, staging, limits, label=label)
        # Found and read in the archive's listing, not on disk (see _extract_zip).
        import_root, manifest_name = _find_manifest(manifests)
        text = manifests[manifest_name]
        assert text is not None  # (_find_manifest returns a file's name)
        manifest = parse_manifest(text)
        final = into / manifest.name / f"{manifest.version}-{sha256[:12]}"
        final.parent.mkdir(exist_ok=True)
        try:
            os.rename(staging, final)  # refused if it exists (not empty): unpacked before
            moved = True
        except OSError:
            if not final.is_dir():
                raise
            # The same bytes were unpacked before, or by a concurrent unpack that won the
            # rename: keep that directory (it may be loaded).
        root = final.joinpath(*import_root.parts)
        return Unpacked(root=root, manifest=manifest, sha256=sha256, top_level=top_level_names(root))
    finally:
        if not moved and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def clean_staging(into: Path) -> list[Path]:
    """Remove unpack folders left by processes that died mid-unpack (never a live one's)."""
    removed = []
    if into.is_dir():
        for leftover in into.glob(f"{STAGING_PREFIX}*"):
            pid = leftover.name.removeprefix(STAGING_PREFIX).partition("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_source(source: Source, limits: ArchiveLimits | None = None) -> bytes:
    """The archive bytes of a source: bytes as given, a file's content, a directory packed."""
    limits = limits or ArchiveLimits()
    if isinstance(source, bytes):
        return source
    path = Path(source)
    if path.is_dir():
        return pack_directory(path, limits).data
    if not path.is_file():
        raise ArchiveError(f"no such package directory or archive: {path}")
    size = path.stat().st_size
    if size > limits.max_archive_bytes:
        raise ArchiveError(
            f"{path.name} is {size} bytes, over the {limits.max_archive_bytes}-byte limit", too_large=True
        )
    return path.read_bytes()


@dataclass(frozen=True, slots=True)
class Packed:
    """A package directory zipped in memory: its validated manifest and the archive's bytes."""

    manifest: Manifest
    data: bytes

    @property
    def sha256(self) -> str:
        """The archive's sha256 (hex), as the server records it."""
        return hashlib.sha256(self.data).hexdigest()


def pack_directory(
    directory: str | os.PathLike[str],
    limits: ArchiveLimits | None = None,
    *,
    exclude: str | os.PathLike[str] | None = None,
) -> Packed:
    """Validate a package directory and zip it deterministically, in memory.

    Entries are sorted, timestamps fixed and modes plain, so the same files always give the same
    bytes (and sha256); caches (`__pycache__`, `.git`, ...) and `exclude` (the archive being
    written, say) are left out, and links refused. The modules the manifest names must exist."""
    limits = limits or ArchiveLimits()
    root = Path(directory)
    if not root.is_dir():
        raise ArchiveError(f"{root} is not a package directory")
    if not (root / MANIFEST_NAME).is_file():
        raise ArchiveError(
            f"no {MANIFEST_NAME} at the package root ({root}): is this a starlette-hotdeploy package?"
        )
    manifest = load_manifest(root / MANIFEST_NAME)
    _require_module(root, manifest, manifest.app_module, "app")
    if manifest.hooks is not None:
        _require_module(root, manifest, manifest.hooks, "hooks")
    files = _package_files(root, limits, exclude)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3  # unix, so the mode below means what it says
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return Packed(manifest=manifest, data=buffer.getvalue())


def _package_files(
    root: Path, limits: ArchiveLimits, exclude: str | os.PathLike[str] | None
) -> list[tuple[str, Path]]:
    """(archive name, path) of every file to pack, sorted by name; links refused, caches and
    `exclude` skipped, limits enforced."""
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[str, Path]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                raise ArchiveError(f"{here / name}: links are refused in a package")
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            path = here / name
            if path.is_symlink() or not path.is_file():
                raise ArchiveError(f"{path}: links and special files are refused in a package")
            if path.suffix in (".pyc", ".pyo") or (skip is not None and path.resolve() == skip):
                continue
            found.append((path.relative_to(root).as_posix(), path))
            total += path.stat().st_size
            if len(found) > limits.max_files:
                raise ArchiveError(f"{root} has more than {limits.max_files} files, over the limit")
            if total > limits.max_total_bytes:
                raise ArchiveError(
                    f"{root} holds more than {limits.max_total_bytes} bytes, over the limit", too_large=True
                )
    return sorted(found)


def _require_module(root: Path, manifest: Manifest, module: str, key: str) -> None:
    relative = Path(*module.split("."))
    candidates = [relative.with_suffix(".py"), relative / "__init__.py"]
    if (root / candidates[0]).is_file() or (root / relative).is_dir():
        return  # a module, a package or a namespace package
    expected = " or ".join(c.as_posix() for c in candidates)
    raise ManifestError(
        f"module {module!r} not found in {root} (expected {expected})", key=key, package=manifest.name
    )


def _find_manifest(manifests: dict[str, bytes | None]) -> tuple[PurePosixPath, str]:
    """Return (import root, manifest's entry name) of an archive whose entries are the keys of
    `manifests` (see _extract_zip): at the root, in a single top-level folder, or, for a wheel,
    inside its top-level import package."""
    if manifests.get(MANIFEST_NAME) is not None:
        return PurePosixPath(), MANIFEST_NAME
    top = {PurePosixPath(name).parts[0] for name in manifests}
    children = sorted(name for name in top if not name.endswith((".dist-info", ".data")))
    is_wheel = any(name.endswith(".dist-info") for name in top)
    nested = [c for c in children if manifests.get(f"{c}/{MANIFEST_NAME}") is not None]
    if is_wheel and len(nested) == 1:
        return PurePosixPath(), f"{nested[0]}/{MANIFEST_NAME}"
    if not is_wheel and len(children) == 1 and nested:
        return PurePosixPath(nested[0]), f"{nested[0]}/{MANIFEST_NAME}"
    if len(nested) > 1:
        names = ", ".join(nested)
        raise ArchiveError(f"more than one {MANIFEST_NAME} found ({names}); a package has exactly one")
    where = "inside the wheel's top-level package" if is_wheel else "at the archive root"
    raise ArchiveError(f"no {MANIFEST_NAME} {where}: is this a starlette-hotdeploy package?")


def _safe_member(name: str) -> PurePosixPath:
    if "\\" in name or "\x00" in name:
        raise ArchiveError(f"unsafe entry name {name!r}: backslash or NUL")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"unsafe entry {name!r}: absolute path")
    if any(part == ".." for part in path.parts):
        raise ArchiveError(f"unsafe entry {name!r}: '..' would escape the package directory")
    return path


def _extract_zip(
    data: bytes, dest: Path, limits: ArchiveLimits, label: str = "upload"
) -> tuple[str, dict[str, bytes | None]]:
    """Extract into `dest` (which it makes); the sha256 of the archive, and its entries: a
    file's name (without a trailing slash) maps to its bytes if it is named like a manifest,
    to None otherwise; a directory's maps to None."""
    if len(data) > limits.max_archive_bytes:
        raise ArchiveError(
            f"{label} is {len(data)} bytes, over the {limits.max_archive_bytes}-byte limit", too_large=True
        )
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{label} is not a zip or wheel archive: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_files:
            raise ArchiveError(f"{label} has {len(infos)} entries, over the {limits.max_files}-file limit")
        declared = 0
        for info in infos:
            _safe_member(info.filename)
            # zipfile.writestr() and some wheel builders store permission bits with no file type.
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"unsafe entry {info.filename!r}: links and special files are refused")
            declared += info.file_size
        if declared > limits.max_total_bytes:
            raise ArchiveError(
                f"{label} unpacks to {declared} bytes, over the {limits.max_total_bytes}-byte limit",
                too_large=True,
            )
        if declared > max(len(data), 1) * limits.max_ratio:
            raise ArchiveError(
                f"{label} compresses {declared / max(len(data), 1):.0f}:1, over the "
                f"{limits.max_ratio:.0f}:1 limit (a zip bomb?)"
            )
        dest.mkdir(parents=True)
        # Few system calls: in a worker thread under load, each one gives up the GIL and waits
        # to get it back from the busy event loop (the directories made are remembered, files
        # are written unbuffered).
        made = {dest}
        entries: dict[str, bytes | None] = {}
        written = 0
        for info in infos:
            member = _safe_member(info.filename)
            target = dest.joinpath(*member.parts)
            directory = target if info.is_dir() else target.parent
            if directory not in made:
                directory.mkdir(parents=True, exist_ok=True)
                made.add(directory)
            if info.is_dir():
                entries.setdefault(member.as_posix(), None)
                continue
            # A manifest (at the root or one folder down) is kept as read: no reading it back.
            kept = bytearray() if member.name == MANIFEST_NAME and len(member.parts) <= 2 else None
            try:
                with archive.open(info) as src, open(target, "xb", buffering=0) as out:
                    # Count real bytes: sizes in the zip's headers may lie.
                    while chunk := src.read(1 << 16):
                        written += len(chunk)
                        if written > limits.max_total_bytes:
                            raise ArchiveError(
                                f"{label} unpacks to more than {limits.max_total_bytes} bytes", too_large=True
                            )
                        if kept is not None:
                            kept += chunk
                        write_all(out, chunk)
            except FileExistsError:
                raise ArchiveError(f"{label} holds {info.filename!r} twice") from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
                raise ArchiveError(f"{label}: cannot extract {info.filename!r}: {exc}") from None
            entries[member.as_posix()] = bytes(kept) if kept is not None else None
    return sha256, entries
