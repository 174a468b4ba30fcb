"""Load a model under test from disk, safely.

Model SPECs:
- a TorchScript file (torch.jit.save), any extension;
- a torch.export program (.pt2, torch.export.save);
- "pkg.module:factory" or "path/to/file.py:factory" returning an nn.Module, with optional
  `weights`: a .safetensors file, or a state-dict file read with torch.load(weights_only=True).
Nothing that needs arbitrary unpickling is loaded (a pickled nn.Module, a weights file holding
Python objects) unless `trust_pickle=True` (CLI: --trust-pickle). ONNX is not supported yet.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import InputError, UntrustedFileError
from robustlab.imports import load_object
from robustlab.model import ModelUnderTest, file_sha256, is_exported

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "weights")


def load_model(spec: str, *, weights: str | None = None, trust_pickle: bool = False,
               device: torch.device | str = "cpu", **wrapper_options: Any) -> ModelUnderTest:
    """Resolve a model SPEC (see module doc) into a `ModelUnderTest` in eval mode."""
    device = torch.device(device)
    name = wrapper_options.pop("name", None)
    if _is_file_spec(spec):
        if weights is not None:
            raise InputError("weights", "goes with a 'module:factory' model spec; a model file already holds its weights")
        module, source = _load_file(spec, trust_pickle=trust_pickle, device=device)
        digest = file_sha256(spec)
        default_name = Path(spec).stem
    else:
        module, source, digest = _load_factory(spec, weights, trust_pickle=trust_pickle)
        default_name = Path(weights).stem if weights else spec.rpartition(":")[2]
    if isinstance(module, nn.Module) and not is_exported(module):
        module.eval()
        module.to(device)
    return ModelUnderTest(module, name=name or default_name, sha256=digest, source=source, device=device,
                          **wrapper_options)


def _is_file_spec(spec: str) -> bool:
    if os.path.exists(spec):
        return True
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.isidentifier():
        return False
    raise InputError("model", f"file not found: {spec} (expected a model file, or 'package.module:factory')")


def _load_file(path: str, *, trust_pickle: bool, device: torch.device) -> tuple[nn.Module, str]:
    if not os.path.isfile(path):
        raise InputError("model", f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise InputError("model", f"{path} is not readable (permission denied)")
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        raise InputError("model", "ONNX models are not supported yet; export the PyTorch model with "
                                  "torch.jit.save or torch.export.save, or convert the ONNX file with onnx2torch")
    if suffix == ".pt2":
        try:
            return torch.export.load(path).module(), f"torch.export:{path}"
        except Exception as error:  # noqa: BLE001
            raise InputError("model", f"cannot load {path} as a torch.export program: {_first_line(error)}") from None
    if not zipfile.is_zipfile(path):
        raise InputError("model", f"{path} is neither a TorchScript archive nor a torch.export program "
                                  "(not a zip archive); is the file complete?")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; users still ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location=device), f"torchscript:{path}"
    except Exception as jit_error:  # noqa: BLE001 - not TorchScript: find out what it is
        jit_message = _first_line(jit_error)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = _untrusted(path, trust_pickle)
    except Exception as error:  # noqa: BLE001
        raise InputError("model", f"cannot load {path}: not TorchScript ({jit_message}) and not a torch "
                                  f"save file ({_first_line(error)})") from None
    if isinstance(obj, nn.Module):
        return obj, f"pickle:{path}"
    if isinstance(obj, dict):
        raise InputError("model", f"{path} holds a state dict (weights only), not a model; pass "
                                  "--model package.module:factory --weights FILE")
    raise InputError("model", f"{path} holds a {type(obj).__name__}, not a model")


def _untrusted(path: str, trust_pickle: bool) -> Any:
    if not trust_pickle:
        raise UntrustedFileError(
            "model", f"{path} is a pickled Python object (e.g. torch.save(model)); loading it can run arbitrary "
                     "code. Save the model with torch.jit.save or torch.export.save, or its weights as "
                     "safetensors, or pass --trust-pickle (trust_pickle=True) if you trust where the file came from")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise InputError("model", f"cannot unpickle {path}: {_first_line(error)}") from None


def _load_factory(spec: str, weights: str | None, *, trust_pickle: bool) -> tuple[nn.Module, str, str | None]:
    factory = load_object(spec, argument="model")
    if not callable(factory):
        raise InputError("model", f"{spec} is not callable; expected a factory returning an nn.Module")
    try:
        module = factory()
    except Exception as error:  # noqa: BLE001
        raise InputError("model", f"calling {spec}() failed: {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(module, nn.Module):
        raise InputError("model", f"{spec}() returned {type(module).__name__}, not a torch.nn.Module")
    if weights is None:
        return module, f"factory:{spec}", None
    state = read_state_dict(weights, trust_pickle=trust_pickle)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InputError("weights", f"{weights} does not fit {spec}(): {_first_line(error)}") from None
    return module, f"factory:{spec} weights:{weights}", file_sha256(weights)


def read_state_dict(path: str, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch.save file loaded with weights_only=True."""
    if not os.path.isfile(path):
        raise InputError("weights", f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise InputError("weights", f"{path} is not readable (permission denied)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # noqa: BLE001
            raise InputError("weights", f"cannot read {path} as safetensors: {_first_line(error)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise UntrustedFileError(
                "weights", f"{path} holds Python objects beyond tensors; loading it can run arbitrary code. "
                           "Save model.state_dict() (or use safetensors), or pass --trust-pickle if you trust it") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise InputError("weights", f"cannot read {path}: {_first_line(error)}") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError("weights", f"{path} does not hold a state dict of tensors")
    return obj


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
