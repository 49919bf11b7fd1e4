"""The manifest, `hotdeploy.toml`: what parses, and how every bad value is named and explained."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from starlette_hotdeploy import ManifestError, parse_manifest
from starlette_hotdeploy._manifest import load_manifest, validate_manifest

# Values are TOML literals, so a case can say `inf`, `true` or an inline table.
MINIMAL = {"name": '"greeter"', "version": '"1.0"', "app": '"greeter.app:app"', "mount": '"/greeter"'}

FULL = """
name = "orders"
version = "2.1.0rc1"
app = "orders.web:create_app()"
mount = "/api/orders/"
health = "/healthz"
strategy = "block"
drain_timeout = 5
startup_timeout = 2.5
hooks = "orders.checks"

[requires]
inventory = ">=1.0,<2"
billing = "~=3.2"
"""


def toml(**overrides: str) -> str:
    """MINIMAL with `overrides` applied; a value of "" drops the key."""
    fields = {**MINIMAL, **overrides}
    return "".join(f"{key} = {value}\n" for key, value in fields.items() if value)


@pytest.mark.parametrize(
    ("written", "normal"),
    [("/%70robe", "/probe"), ("/api//orders/", "/api/orders"), ("/%7Eme", "/~me"), ("//a///b", "/a/b")],
)
def test_mount_is_normalised_as_servers_decode_paths(written: str, normal: str) -> None:
    # uvicorn percent-decodes the path before routing: `/%70robe` is `/probe` for every request,
    # so it must also be `/probe` for the overlap checks.
    assert parse_manifest(toml(mount=f'"{written}"')).mount == normal


def test_minimal_manifest_gets_defaults() -> None:
    manifest = parse_manifest(toml())
    assert manifest.to_dict() == {
        "name": "greeter",
        "version": "1.0",
        "app": "greeter.app:app",
        "mount": "/greeter",
        "health": None,
        "requires": {},
        "strategy": "drain",
        "drain_timeout": 30.0,
        "startup_timeout": 30.0,
        "load_timeout": None,
        "hooks": None,
        "shadow_host_routes": False,
        "canary": None,
        "exports": None,
        "reload_with_requirements": True,
    }
    assert (manifest.app_module, manifest.app_attribute, manifest.app_is_factory) == (
        "greeter.app",
        "app",
        False,
    )


def test_full_manifest_parses_every_key() -> None:
    manifest = parse_manifest(FULL.encode())
    assert manifest.name == "orders"
    assert manifest.version == "2.1.0rc1"
    assert str(manifest.parsed_version) == "2.1.0rc1"
    assert manifest.app == "orders.web:create_app()"
    assert (manifest.app_module, manifest.app_attribute, manifest.app_is_factory) == (
        "orders.web",
        "create_app",
        True,
    )
    assert manifest.mount == "/api/orders"  # the trailing slash is normalised away
    assert manifest.health == "/healthz"
    assert manifest.requires == {"inventory": SpecifierSet(">=1.0,<2"), "billing": SpecifierSet("~=3.2")}
    assert "1.5" in manifest.requires["inventory"]
    assert "2.0" not in manifest.requires["inventory"]
    assert manifest.strategy == "block"
    assert manifest.drain_timeout == 5.0
    assert isinstance(manifest.drain_timeout, float)
    assert manifest.startup_timeout == 2.5
    assert manifest.hooks == "orders.checks"


@pytest.mark.parametrize(
    ("mount", "expected"),
    [
        ('"/orders/"', "/orders"),
        ('"/orders///"', "/orders"),
        ('"/api/v1.2/orders"', "/api/v1.2/orders"),
        ('"/a-b/c_d/~e"', "/a-b/c_d/~e"),
    ],
)
def test_mount_is_normalised(mount: str, expected: str) -> None:
    assert parse_manifest(toml(mount=mount)).mount == expected


def test_validate_manifest_takes_a_dict() -> None:
    manifest = validate_manifest({"name": "a", "version": "1", "app": "a:app", "mount": "/a"})
    assert (manifest.name, manifest.mount) == ("a", "/a")


@pytest.mark.parametrize("key", ["name", "version", "app", "mount"])
def test_each_required_key_is_required(key: str) -> None:
    with pytest.raises(ManifestError, match="is required") as caught:
        parse_manifest(toml(**{key: ""}))
    assert caught.value.key == key
    assert f"{key}: is required" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("colour", '"blue"', "unknown key"),
        ("name", '"Greeter"', "must be lowercase"),
        ("name", '"1greeter"', "starting with a letter"),
        ("name", '"my-app"', "must be lowercase"),
        ("name", "3", "non-empty string"),
        ("version", '"one point oh"', "not a PEP 440 version"),
        ("version", '"1.0-beta-x"', "not a PEP 440 version"),
        ("app", '"greeter.app"', "module:attribute"),
        ("app", '"greeter.app:app()x"', "module:attribute"),
        ("app", '"greeter.app:"', "module:attribute"),
        ("app", '":app"', "module:attribute"),
        ("app", '""', "non-empty string"),
        ("mount", '"greeter"', "must start with '/'"),
        ("mount", '"/"', "is the host app's"),
        ("mount", '"/a/../b"', "literal URL prefix"),
        ("mount", '"/.."', "literal URL prefix"),
        ("mount", '"/items/{item_id}"', "literal URL prefix"),
        ("mount", '"/a%2Fb"', "literal URL prefix"),
        ("mount", '"/a%2520"', "literal URL prefix"),
        ("mount", '"/%ff"', "not UTF-8"),
        ("load_timeout", "0", "positive number of seconds"),
        ("shadow_host_routes", '"yes"', "true or false"),
        ("reload_with_requirements", "1", "true or false"),
        ("exports", '"orders.api"', "a list of module names"),
        ("exports", '["orders api"]', "is not a module name"),
        ("mount", '"/a b"', "literal URL prefix"),
        ("health", '"healthz"', "must be a path starting with '/'"),
        ("requires", '"inventory>=1"', "must be a table"),
        ("requires", '["inventory"]', "must be a table"),
        ("strategy", '"rolling"', "must be 'drain', 'block' or 'canary'"),
        ("drain_timeout", "0", "positive number of seconds"),
        ("drain_timeout", "-1.5", "positive number of seconds"),
        ("drain_timeout", "true", "positive number of seconds"),
        ("drain_timeout", '"30"', "positive number of seconds"),
        ("drain_timeout", "inf", "positive number of seconds"),
        ("drain_timeout", "nan", "positive number of seconds"),
        ("startup_timeout", "0.0", "positive number of seconds"),
        ("startup_timeout", "-inf", "positive number of seconds"),
        ("hooks", '"my-hooks"', "must be a module name"),
        ("hooks", '"hooks:setup"', "must be a module name"),
        pytest.param(
            "hooks",
            '"orders..checks"',
            "must be a module name",
        ),
        pytest.param(
            "app",
            '"orders..web:app"',
            "module:attribute",
        ),
        pytest.param(
            "mount",
            '"/a\\n/b"',
            "literal URL prefix",
        ),
    ],
)
def test_bad_value_names_key_and_problem(key: str, value: str, problem: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(toml(**{key: value}))
    assert caught.value.key == key
    assert f"hotdeploy.toml: {key}: " in str(caught.value)
    assert problem in str(caught.value)
    assert caught.value.step == "manifest"


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ('{ inventory = ">>1.0" }', "requires.inventory", "not a PEP 440 specifier"),
        ('{ inventory = "1.0" }', "requires.inventory", "not a PEP 440 specifier"),
        ("{ inventory = 1 }", "requires.inventory", "must be a string"),
        ('{ Inventory = ">=1" }', "requires.Inventory", "is not a package name"),
        ('{ "my-lib" = ">=1" }', "requires.my-lib", "is not a package name"),
        pytest.param(
            '{ "inventory\\n" = ">=1" }',
            "requires.inventory\n",
            "is not a package name",
        ),
    ],
)
def test_bad_requirement_names_the_dependency(table: str, key: str, problem: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(toml(requires=table))
    assert caught.value.key == key
    assert key in str(caught.value)
    assert problem in str(caught.value)


def test_error_carries_the_package_name_once_known() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(toml(strategy='"rolling"'))
    assert caught.value.package == "greeter"
    assert str(caught.value).startswith("greeter: hotdeploy.toml: strategy: ")


def test_unknown_key_is_reported_before_missing_ones() -> None:
    with pytest.raises(ManifestError, match="unknown key") as caught:
        parse_manifest('name = "greeter"\nentrypoint = "x"\n')
    assert caught.value.key == "entrypoint"


def test_invalid_toml() -> None:
    with pytest.raises(ManifestError, match="not valid TOML") as caught:
        parse_manifest(b'name = "greeter\n')
    assert caught.value.key is None
    assert str(caught.value).startswith("hotdeploy.toml: not valid TOML")


def test_bytes_that_are_not_utf8() -> None:
    with pytest.raises(ManifestError):
        parse_manifest(toml(name='"caf\xe9"').encode("latin-1"))


def test_load_manifest_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "hotdeploy.toml"
    path.write_text(FULL)
    assert load_manifest(path) == parse_manifest(FULL)


def test_load_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no hotdeploy\.toml found") as caught:
        load_manifest(tmp_path / "hotdeploy.toml")
    assert str(tmp_path) in str(caught.value)
