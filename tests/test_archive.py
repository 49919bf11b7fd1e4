"""Unpacking a package source (directory, .zip or wheel): layout, hashing and every refusal."""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from packages import write_package, zip_directory
from starlette_hotdeploy import ArchiveError, ArchiveLimits, ManifestError
from starlette_hotdeploy._archive import unpack

REGULAR = (stat.S_IFREG | 0o644) << 16
SYMLINK = (stat.S_IFLNK | 0o777) << 16

MANIFEST = 'name = "greeter"\nversion = "1.0"\napp = "greeter.app:app"\nmount = "/greeter"\n'
PACKAGE = {"hotdeploy.toml": MANIFEST, "greeter/__init__.py": "", "greeter/app.py": "app = None\n"}
WHEEL = {
    "greeter/hotdeploy.toml": MANIFEST,
    "greeter/__init__.py": "",
    "greeter-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n",
    "greeter-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: greeter\nVersion: 1.0\n",
}


def zip_bytes(files: Mapping[str, str | bytes], *, modes: dict[str, int] | None = None) -> bytes:
    """A zip of `files`; each entry is a regular file unless `modes` gives its external_attr."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (modes or {}).get(name, REGULAR)
            archive.writestr(info, content)
    return buffer.getvalue()


def staging_dirs(into: Path) -> list[Path]:
    return list(into.glob(".staging-*"))


@pytest.fixture
def into(tmp_path: Path) -> Path:
    return tmp_path / "unpacked"


def test_directory_is_copied_not_linked(sources: Path, into: Path) -> None:
    source = write_package(sources)
    result = unpack(source, into)
    assert result.root == into / "greeter" / f"1.0-{result.sha256[:12]}"
    assert result.manifest.name == "greeter"
    models = source / "greeter" / "models.py"
    copied = result.root / "greeter" / "models.py"
    original = models.read_text()
    assert copied.read_text() == original
    models.write_text("VERSION = 'edited'\n")
    assert copied.read_text() == original
    assert staging_dirs(into) == []


def test_directory_hash_ignores_pycache_and_follows_content(sources: Path, tmp_path: Path) -> None:
    source = write_package(sources)
    first = unpack(source, tmp_path / "a")
    pycache = source / "greeter" / "__pycache__"
    pycache.mkdir()
    (pycache / "app.cpython-311.pyc").write_bytes(b"\x00compiled")
    second = unpack(source, tmp_path / "b")
    assert second.sha256 == first.sha256
    assert (second.root / "greeter" / "app.py").is_file()
    assert not (second.root / "greeter" / "__pycache__").exists()

    models = source / "greeter" / "models.py"
    models.write_text(models.read_text().replace("models of", "models 0f"))  # one byte, same size
    third = unpack(source, tmp_path / "c")
    assert third.sha256 != first.sha256
    assert third.root.name == f"1.0-{third.sha256[:12]}"


def test_zip_path_and_bytes_agree(sources: Path, tmp_path: Path, into: Path) -> None:
    archive = zip_directory(write_package(sources), tmp_path / "greeter-1.0.zip")
    data = archive.read_bytes()
    from_path = unpack(str(archive), into)
    from_bytes = unpack(data, into)
    sha256 = hashlib.sha256(data).hexdigest()
    assert from_path.sha256 == from_bytes.sha256 == sha256
    assert from_path.root == from_bytes.root == into / "greeter" / f"1.0-{sha256[:12]}"
    assert (from_path.root / "hotdeploy.toml").read_text() == (
        sources / "greeter-1.0/hotdeploy.toml"
    ).read_text()
    assert (from_path.root / "greeter" / "app.py").is_file()


def test_zip_with_one_top_level_folder(into: Path) -> None:
    data = zip_bytes({f"greeter-1.0/{name}": content for name, content in PACKAGE.items()})
    result = unpack(data, into)
    assert result.root == into / "greeter" / f"1.0-{result.sha256[:12]}" / "greeter-1.0"
    assert (result.root / "hotdeploy.toml").is_file()
    assert (result.root / "greeter" / "app.py").read_text() == "app = None\n"


def test_wheel_root_is_the_import_root(into: Path) -> None:
    result = unpack(zip_bytes(WHEEL), into)
    assert result.root == into / "greeter" / f"1.0-{result.sha256[:12]}"
    assert result.manifest.name == "greeter"
    assert (result.root / "greeter" / "__init__.py").is_file()
    assert (result.root / "greeter-1.0.dist-info" / "WHEEL").is_file()


def test_wheel_file_path(tmp_path: Path, into: Path) -> None:
    wheel = tmp_path / "greeter-1.0-py3-none-any.whl"
    wheel.write_bytes(zip_bytes(WHEEL))
    result = unpack(wheel, into)
    assert result.sha256 == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert (result.root / "greeter" / "hotdeploy.toml").is_file()


def test_same_bytes_twice_reuse_the_directory(into: Path) -> None:
    data = zip_bytes(PACKAGE)
    first = unpack(data, into)
    (first.root / "loaded-marker").write_text("in use")
    second = unpack(data, into)
    assert second.root == first.root
    assert (second.root / "loaded-marker").read_text() == "in use"
    assert list((into / "greeter").iterdir()) == [first.root]
    assert staging_dirs(into) == []


def test_directory_entries_in_a_zip(into: Path) -> None:
    data = zip_bytes({"greeter/": b"", **PACKAGE}, modes={"greeter/": (stat.S_IFDIR | 0o755) << 16})
    assert (unpack(data, into).root / "greeter" / "app.py").is_file()


def test_zip_written_with_plain_writestr(into: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in PACKAGE.items():
            archive.writestr(name, content)  # external_attr is 0o600 << 16: no S_IFREG bit
    assert unpack(buffer.getvalue(), into).manifest.name == "greeter"


def symlink_in_directory(tmp_path: Path) -> Path:
    source = write_package(tmp_path)
    (source / "greeter" / "alias.py").symlink_to(source / "greeter" / "app.py")
    return source


def symlinked_folder_in_directory(tmp_path: Path) -> Path:
    source = write_package(tmp_path)
    (source / "greeter" / "shared").symlink_to(tmp_path)
    return source


def no_manifest_directory(tmp_path: Path) -> Path:
    (tmp_path / "greeter").mkdir()
    (tmp_path / "greeter" / "__init__.py").write_text("")
    return tmp_path


Source = Callable[[Path], bytes | Path]


@pytest.mark.parametrize(
    ("make", "limits", "cause", "too_large"),
    [
        pytest.param(
            lambda _: bytes(range(256)) * 4, None, "not a zip or wheel archive", False, id="not-a-zip"
        ),
        pytest.param(
            lambda _: zip_bytes({**PACKAGE, "../evil.py": "x"}), None, "'..' would escape", False, id="dotdot"
        ),
        pytest.param(
            lambda _: zip_bytes({**PACKAGE, "/tmp/evil.py": "x"}), None, "absolute path", False, id="absolute"
        ),
        pytest.param(
            lambda _: zip_bytes(
                {**PACKAGE, "greeter/link.py": "/etc/passwd"}, modes={"greeter/link.py": SYMLINK}
            ),
            None,
            "links and special files are refused",
            False,
            id="symlink-entry",
        ),
        pytest.param(symlink_in_directory, None, "alias.py: links", False, id="symlink-in-directory"),
        pytest.param(symlinked_folder_in_directory, None, "shared: links", False, id="symlinked-folder"),
        pytest.param(
            lambda _: zip_bytes(PACKAGE),
            ArchiveLimits(max_files=2),
            "over the 2-file limit",
            None,
            id="files-zip",
        ),
        pytest.param(
            write_package, ArchiveLimits(max_files=2), "more than 2 files", False, id="files-directory"
        ),
        pytest.param(
            lambda _: zip_bytes(PACKAGE),
            ArchiveLimits(max_total_bytes=50),
            "over the 50-byte limit",
            True,
            id="total-zip",
        ),
        pytest.param(
            write_package,
            ArchiveLimits(max_total_bytes=500),
            "more than 500 bytes",
            True,
            id="total-directory",
        ),
        pytest.param(
            lambda _: zip_bytes(PACKAGE),
            ArchiveLimits(max_archive_bytes=100),
            "over the 100-byte limit",
            True,
            id="archive-bytes",
        ),
        pytest.param(
            lambda tmp: zip_directory(write_package(tmp), tmp / "greeter.zip"),
            ArchiveLimits(max_archive_bytes=100),
            "greeter.zip is .* over the 100-byte limit",
            True,
            id="archive-file",
        ),
        pytest.param(
            lambda _: zip_bytes({**PACKAGE, "greeter/data.txt": b"\0" * 20_000}),
            ArchiveLimits(max_ratio=5),
            "over the 5:1 limit \\(a zip bomb\\?\\)",
            False,
            id="ratio",
        ),
        pytest.param(
            lambda _: zip_bytes({"greeter/__init__.py": "", "README": "hi"}),
            None,
            "no hotdeploy.toml at the archive root",
            False,
            id="no-manifest-zip",
        ),
        pytest.param(
            no_manifest_directory,
            None,
            "no hotdeploy.toml at the package root",
            False,
            id="no-manifest-directory",
        ),
        pytest.param(
            lambda _: zip_bytes({**WHEEL, "other/hotdeploy.toml": MANIFEST}),
            None,
            "more than one hotdeploy.toml found \\(greeter, other\\)",
            False,
            id="two-manifests-wheel",
        ),
        pytest.param(
            lambda _: zip_bytes({"greeter/__init__.py": "", "greeter-1.0.dist-info/WHEEL": ""}),
            None,
            "no hotdeploy.toml inside the wheel's top-level package",
            False,
            id="no-manifest-wheel",
        ),
        pytest.param(
            lambda tmp: tmp / "missing.zip", None, "no such package directory or archive", False, id="missing"
        ),
    ],
)
def test_refusals_leave_nothing_behind(
    make: Source, limits: ArchiveLimits | None, cause: str, too_large: bool | None, tmp_path: Path, into: Path
) -> None:
    made = tmp_path / "made"
    made.mkdir()
    source = make(made)
    with pytest.raises(ArchiveError, match=cause) as caught:
        unpack(source, into, limits)
    if too_large is not None:
        assert caught.value.too_large is too_large
    assert caught.value.step == "unpack"
    assert staging_dirs(into) == []
    assert not (into / "greeter").exists()
    if limits is not None:  # the limit, not the package, was the problem
        assert unpack(source, tmp_path / "control").manifest.name == "greeter"


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "directory"])
def test_bad_manifest_inside_a_good_archive(as_zip: bool, sources: Path, tmp_path: Path, into: Path) -> None:
    source = write_package(sources, manifest_extra='strategy = "rolling"\n')
    with pytest.raises(ManifestError, match="strategy") as caught:
        unpack(zip_directory(source, tmp_path / "bad.zip") if as_zip else source, into)
    assert caught.value.key == "strategy"
    assert staging_dirs(into) == []
    assert not (into / "greeter").exists()
