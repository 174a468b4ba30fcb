"""Resolve 'pkg.module:attr' or 'path/to/file.py:attr' to a Python object, with clear errors."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from robustlab.errors import InputError


def load_object(spec: str, *, argument: str) -> Any:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise InputError(argument, f"expected 'package.module:name' or 'file.py:name', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.exists(module_name):
                raise InputError(argument, f"file not found: {module_name}")
            name = f"_robustlab_user_{abs(hash(os.path.abspath(module_name)))}"
            loader_spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # like `python -m`: the user's own packages resolve
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's import failed: say so, with the cause
        raise InputError(argument, f"cannot import {module_name!r}: {type(error).__name__}: {error}") from None
    if not hasattr(module, attr):
        raise InputError(argument, f"{module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)
