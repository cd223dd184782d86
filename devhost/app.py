"""Loading a v2-model function app the way the Python worker indexes it.

The app module is imported from its file, the single `FunctionApp` in it is found, and each
function's bindings are read from `get_function_json()`: the same JSON the worker reports to
the host. Nothing in the app is changed or special-cased.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func

_SETTING_REF = re.compile(r"%([^%]+)%")


class HostError(Exception):
    """The app or its configuration cannot be hosted."""


def resolve_setting_refs(value: str) -> str:
    """Replace `%Name%` with app setting `Name`, as the host does for binding expressions."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise HostError(f"binding expression '%{name}%' does not resolve to a value")
        return os.environ[name]

    return _SETTING_REF.sub(lookup, value)


@dataclass
class HostedFunction:
    """One function of the app with its trigger binding and the Python callable."""

    name: str
    trigger: dict[str, Any]
    bindings: list[dict[str, Any]]
    callable: Any
    parameters: dict[str, inspect.Parameter] = field(default_factory=dict)

    @property
    def trigger_type(self) -> str:
        return str(self.trigger["type"])

    def invoke(self, arguments: dict[str, Any]) -> Any:
        result = self.callable(**arguments)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return result

    def trigger_annotation(self) -> Any:
        """The trigger parameter's type, resolving string annotations like the worker."""
        try:
            hints = typing.get_type_hints(self.callable)
        except (NameError, TypeError):
            hints = {}
        name = self.trigger["name"]
        if name in hints:
            return hints[name]
        parameter = self.parameters.get(name)
        return None if parameter is None else parameter.annotation


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _import_app_module(app_file: Path) -> Any:
    root = str(app_file.parent.resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    module_name = app_file.stem
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "")).resolve() == app_file.resolve():
            return loaded
        # Another app with the same file name is loaded (tests host several apps).
        module_name = f"{module_name}_{abs(hash(str(app_file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, app_file)
    if spec is None or spec.loader is None:
        raise HostError(f"cannot import {app_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# `FunctionApp.get_functions()` may run only once per app (it registers names), so each
# app file is indexed once per process.
_INDEXED: dict[Path, tuple[Any, list[HostedFunction]]] = {}


def load_functions(app_file: Path) -> tuple[Any, list[HostedFunction]]:
    """Import `app_file`; return the module and its functions as the worker indexes them."""
    key = app_file.resolve()
    if key not in _INDEXED:
        _INDEXED[key] = _index(app_file)
    return _INDEXED[key]


def _index(app_file: Path) -> tuple[Any, list[HostedFunction]]:
    module = _import_app_module(app_file)
    apps = [v for v in vars(module).values() if isinstance(v, func.FunctionRegister)]
    if len(apps) != 1:
        raise HostError(f"{app_file} must define exactly one FunctionApp, found {len(apps)}")
    hosted = []
    for function in apps[0].get_functions():
        bindings = json.loads(function.get_function_json())["bindings"]
        triggers = [b for b in bindings if b["type"].endswith("Trigger")]
        if len(triggers) != 1:
            raise HostError(f"function {function.get_function_name()} needs exactly one trigger")
        user_function = function.get_user_function()
        hosted.append(
            HostedFunction(
                name=str(function.get_function_name()),
                trigger=triggers[0],
                bindings=bindings,
                callable=user_function,
                parameters=dict(inspect.signature(user_function).parameters),
            )
        )
    return module, hosted
