"""Keeps the public API honest: everything exported is documented and nothing private leaks."""

from __future__ import annotations

import inspect

import starlette_hotdeploy


def test_all_is_complete() -> None:
    exported = starlette_hotdeploy.__all__
    assert len(exported) == len(set(exported))
    public = {name for name in dir(starlette_hotdeploy) if not name.startswith("_")}
    assert public == set(exported) - {"__version__"}


def test_every_export_is_documented_and_public() -> None:
    for name in starlette_hotdeploy.__all__:
        obj = getattr(starlette_hotdeploy, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"
            assert obj.__module__.startswith("starlette_hotdeploy"), name
            assert not name.startswith("_"), name


def test_errors_share_one_base() -> None:
    errors = [
        getattr(starlette_hotdeploy, n)
        for n in starlette_hotdeploy.__all__
        if n.endswith(("Error", "Conflict"))
    ]
    for error in errors:
        assert issubclass(error, starlette_hotdeploy.HotDeployError), error
