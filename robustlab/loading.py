"""Load a model under test from disk, safely.

Model SPECs:
- a TorchScript file (torch.jit.save), any extension;
- a torch.export program (.pt2, torch.export.save);
- "pkg.module:factory" or "path/to/file.py:factory" returning an nn.Module, with optional
  `weights`: a .safetensors file, or a state-dict file read with torch.load(weights_only=True);
- an ONNX file (.onnx): white-box through onnx2torch when the graph converts, else black-box through
  onnxruntime (robustlab.onnx_model; the extra robustlab[onnx]). Parsing it runs no code.
Nothing that needs arbitrary unpickling is loaded (a pickled nn.Module, a weights file holding
Python objects) unless `trust_pickle=True` (CLI: --trust-pickle).

torch.export programs: `torch.export.load` unpickles parts of a .pt2 archive with
`weights_only=False` or `pickle.loads` (tensor-subclass weights and constants, Python "opaque"
constants, sample inputs that a restricted load refuses) and loads AOTInductor code (native
libraries). Before loading, the archive's entries are read (with torch's own zip reader, from
the same bytes that are then loaded) and every part that would be unpickled beyond
`torch.load(weights_only=True)` or run as native code is listed; any such part, or an entry
robustlab does not know, refuses the file unless `trust_pickle=True`. A plain exported program
(raw tensor weights and constants, sample inputs that load with weights_only=True) loads without
trust. Its batch dimension, if export fixed or bounded it, is adapted (see layers.BatchSizeAdapter).

A `module:factory` without weights audits whatever parameters the factory returns: if two calls
under different random seeds give different parameters, it is a random initialisation and is
refused unless `random_init=True` (CLI: --random-init).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import InputError, UntrustedFileError
from robustlab.imports import load_object
from robustlab.layers import BatchSizeAdapter, remember_program
from robustlab.model import ModelUnderTest, RobustlabWarning, file_sha256, is_exported, state_dict_sha256

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "weights")


def load_model(spec: str, *, weights: str | None = None, trust_pickle: bool = False,
               device: torch.device | str = "cpu", random_init: bool = False,
               **wrapper_options: Any) -> ModelUnderTest:
    """Resolve a model SPEC (see module doc) into a `ModelUnderTest` in eval mode.

    random_init: allow a `module:factory` without weights whose parameters are a random
    initialisation (an untrained model, audited on purpose); refused otherwise."""
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError("model", f"expected a file path or 'package.module:factory', got {type(spec).__name__}")
    spec = os.fspath(spec)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise InputError("weights", f"expected a file path, got {type(weights).__name__}")
    weights = None if weights is None else os.fspath(weights)
    if not isinstance(random_init, bool):
        raise InputError("random_init", f"expected True or False, got {random_init!r}")
    device = torch.device(device)
    name = wrapper_options.pop("name", None)
    notes: list[str] = []
    digest: str | None
    if _is_file_spec(spec):
        if weights is not None:
            raise InputError("weights", "goes with a 'module:factory' model spec; a model file already holds its weights")
        if random_init:
            raise InputError("random_init", "goes with a 'module:factory' model spec without weights; a model file "
                                            "already holds its weights")
        module, source, notes = _load_file(spec, trust_pickle=trust_pickle, device=device,
                                           bounds=wrapper_options.get("bounds"))
        digest = file_sha256(spec)
        default_name = Path(spec).stem
    else:
        module, source, digest, notes = _load_factory(spec, weights, trust_pickle=trust_pickle,
                                                      random_init=random_init)
        default_name = Path(weights).stem if weights else spec.rpartition(":")[2]
    if isinstance(module, nn.Module) and not is_exported(module):
        module.eval()
        module.to(device)
    mut = ModelUnderTest(module, name=name or default_name, sha256=digest, source=source, device=device,
                         **wrapper_options)
    mut.load_notes = notes
    for note in notes:
        warnings.warn(f"model {mut.name!r}: {note}", RobustlabWarning, stacklevel=2)
    return mut


def _is_file_spec(spec: str) -> bool:
    if os.path.exists(spec):
        return True
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.isidentifier():
        return False
    raise InputError("model", f"file not found: {spec} (expected a model file, or 'package.module:factory')")


def _load_file(path: str, *, trust_pickle: bool, device: torch.device,
               bounds: Any = None) -> tuple[nn.Module, str, list[str]]:
    if not os.path.isfile(path):
        raise InputError("model", f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise InputError("model", f"{path} is not readable (permission denied)")
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        from robustlab.onnx_model import load_onnx

        return load_onnx(path, bounds=bounds)
    if suffix == ".pt2":
        return _load_exported(path, trust_pickle=trust_pickle)
    if not zipfile.is_zipfile(path):
        raise InputError("model", f"{path} is neither a TorchScript archive nor a torch.export program "
                                  "(not a zip archive); is the file complete?")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; users still ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            script = torch.jit.load(path, map_location=device)
    except Exception as jit_error:  # noqa: BLE001 - not TorchScript: find out what it is
        jit_message = _first_line(jit_error)
    else:
        return script, f"torchscript:{path}", _training_baked_in(path, _script_training_nodes(script), "traced")
    if _looks_like_torchscript(path):  # torch.load would only hand it back to torch.jit.load
        raise InputError("model", f"{path} is a TorchScript archive that torch.jit.load cannot load: {jit_message}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not _weights_only_refusal(error):
            raise InputError("model", f"cannot load {path}: not TorchScript ({jit_message}) and not a torch save "
                                      f"file ({_weights_only_reason(error)})") from None
        obj = _untrusted(path, trust_pickle, error)
    except Exception as error:  # noqa: BLE001
        raise InputError("model", f"cannot load {path}: not TorchScript ({jit_message}) and not a torch "
                                  f"save file ({_first_line(error)})") from None
    if isinstance(obj, nn.Module):
        return obj, f"pickle:{path}", []
    if isinstance(obj, dict):
        raise InputError("model", f"{path} holds a state dict (weights only), not a model; pass "
                                  "--model package.module:factory --weights FILE")
    raise InputError("model", f"{path} holds a {type(obj).__name__}, not a model")


# ---------------------------------------------------------------------------- torch.export
_PT2_PLAIN_ENTRIES = {"archive_format", "archive_version", "byteorder", "version", ".data/version",
                      ".data/serialization_id"}
_PT2_LEGACY_ENTRIES = {"serialized_exported_program.json", "serialized_state_dict.pt", "serialized_constants.pt",
                       "serialized_example_inputs.pt", "serialized_state_dict.json", "serialized_constants.json"}


def _load_exported(path: str, *, trust_pickle: bool) -> tuple[nn.Module, str, list[str]]:
    """A torch.export program (see the module doc for what is refused without trust_pickle)."""
    with open(path, "rb") as f:
        data = f.read()  # inspected and loaded from the same bytes
    unsafe = pt2_unsafe_parts(data, path)
    if unsafe and not trust_pickle:
        listed = "; ".join(unsafe[:4]) + (f"; and {len(unsafe) - 4} more" if len(unsafe) > 4 else "")
        raise UntrustedFileError(
            "model", f"{path} is a torch.export program that cannot be loaded without unpickling or native code: "
                     f"{listed}. torch.export.load unpickles such parts (torch.load(weights_only=False), pickle.loads) "
                     "or loads them as a native library, which can run arbitrary code. Re-export the model as a plain "
                     "program (tensor weights and constants, no custom objects, no AOTInductor package) with "
                     "torch.export.save, or pass --trust-pickle (trust_pickle=True) if you trust where the file "
                     "came from")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
        module = program.module()
    except Exception as error:  # noqa: BLE001
        raise InputError("model", f"cannot load {path} as a torch.export program: {_first_line(error)}") from None
    remember_program(module, program)
    notes = _training_baked_in(path, _exported_training_nodes(program), "exported")
    low, high = _batch_range(program, path)
    if low > 1 or high is not None:
        adapter = BatchSizeAdapter(module, max(1, low), high)
        notes.append(adapter.describe())
        return adapter, f"torch.export:{path}", notes
    return module, f"torch.export:{path}", notes


def pt2_unsafe_parts(data: bytes, path: str = "the file") -> list[str]:
    """What in a .pt2 archive torch.export.load (torch 2.13) would unpickle beyond
    torch.load(weights_only=True), or load as native code; [] for a plain exported program.

    Entries are read with torch's own zip reader (the one torch.export.load uses), so duplicate
    or odd zip entries cannot show one thing here and another to torch. Raises InputError for a
    file that is not a zip archive."""
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        raise InputError("model", f"{path} is not a torch.export program (not a zip archive); is the file complete?")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InputError("model", f"cannot read {path} as a zip archive: {_first_line(error)}") from None
    problems: list[str] = []
    doubled = sorted(n for n, count in Counter(names).items() if count > 1)
    if doubled:
        problems.append(f"duplicate archive entries ({', '.join(doubled[:3])}): which copy is read depends on the reader")
    if any(n.rpartition("/")[2] == "serialized_exported_program.json" for n in names) or \
            set(names) & _PT2_LEGACY_ENTRIES:
        problems.append("the torch.export format of torch 2.7 and older, whose .pt parts torch.export.load unpickles "
                        "with weights_only=False when a restricted load fails (re-save it with a recent torch)")
        return problems
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = set(reader.get_all_records())
    except Exception as error:  # noqa: BLE001
        raise InputError("model", f"cannot read {path} as a torch.export program: {_first_line(error)}") from None

    def read(name: str) -> bytes:
        return bytes(reader.get_record(name))

    if "archive_format" not in records or read("archive_format") != b"pt2":
        raise InputError("model", f"{path} is a zip archive but not a torch.export program (no 'archive_format: pt2' "
                                  "entry); TorchScript files are loaded from any other extension")
    models = sorted(n[len("models/"):-len(".json")] for n in records if n.startswith("models/") and n.endswith(".json"))
    if not models:
        raise InputError("model", f"{path} holds no exported program (no models/*.json entry)")
    weights_only_parts: list[str] = []
    referenced: set[str] = set()
    for model in models:
        sample = f"data/sample_inputs/{model}.pt"
        if sample in records:
            weights_only_parts.append(sample)
        for kind, folder in (("weights", "data/weights/"), ("constants", "data/constants/")):
            legacy = f"{folder}{model}.pt"
            config_name = f"{folder}{model}_{kind}_config.json"
            referenced |= {legacy, config_name}
            if legacy in records:
                weights_only_parts.append(legacy)
            if config_name not in records:
                continue
            try:
                config = json.loads(read(config_name).decode("utf-8"))["config"]
                entries = list(config.items())
            except Exception:  # noqa: BLE001 - torch would fail on it too; we do not guess
                problems.append(f"{config_name} is not a readable payload configuration")
                continue
            for fqn, meta in entries:
                target = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
                referenced.add(folder + target)
                pickled = bool(meta.get("use_pickle", False)) if isinstance(meta, dict) else True
                if target.startswith("custom_obj_"):
                    problems.append(f"constant {fqn!r} is a TorchScript custom object ({folder}{target}), restored "
                                    "by the TorchScript unpickler")
                elif target.startswith("opaque_obj_"):
                    problems.append(f"constant {fqn!r} is a pickled Python object ({folder}{target}), restored with "
                                    "pickle.loads")
                elif pickled:
                    problems.append(f"{kind[:-1]} {fqn!r} is pickled ({folder}{target}: a tensor subclass), loaded with "
                                    "torch.load(weights_only=False)")
                elif not target.startswith("weight_" if kind == "weights" else "tensor_"):
                    problems.append(f"{kind[:-1]} {fqn!r} has an unknown payload kind ({folder}{target})")
    for name in sorted(records):
        if name in _PT2_PLAIN_ENTRIES or name.startswith("extra/") or name in referenced:
            continue
        if name.startswith("models/") and name.endswith(".json"):
            continue
        if name.startswith("data/sample_inputs/") and name in weights_only_parts:
            continue
        if name.startswith("data/aotinductor/"):
            problems.append(f"AOTInductor compiled code ({name}): a native library torch.export.load loads and runs")
        elif name.startswith(("data/weights/", "data/constants/")):
            continue  # payloads no configuration refers to: never read
        else:
            problems.append(f"an entry robustlab does not know ({name})")
    for name in weights_only_parts:
        try:
            torch.load(io.BytesIO(read(name)), weights_only=True)  # exactly torch.export.load's first attempt
        except Exception as error:  # noqa: BLE001 - torch.export.load would retry with weights_only=False
            problems.append(f"{name} needs unpickling beyond tensors ({_weights_only_reason(error)}); "
                            "torch.export.load retries it with weights_only=False")
    return problems


def _weights_only_reason(error: BaseException) -> str:
    """The line of a refused torch.load(weights_only=True) that says what was refused."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"Unsupported (?:global|operand)[^\n]*?(?= was not|\n|$)", text) or re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    return (found.group(0) if found else _first_line(error))[:160]


def _batch_range(program: Any, path: str) -> tuple[int, int | None]:
    """(lowest, highest or None) batch size the program accepts; InputError unless it takes one tensor."""
    from torch.export.graph_signature import InputKind

    user = [spec for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    if len(user) != 1:
        raise InputError("model", f"{path}: the exported program takes {len(user)} inputs "
                                  f"({', '.join(getattr(s.arg, 'name', '?') for s in user)}); robustlab calls a model "
                                  "with one batch of inputs. Export a module whose forward takes one tensor")
    name = getattr(user[0].arg, "name", None)
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and n.name == name), None)
    value = None if node is None else node.meta.get("val")
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) == 0:
        raise InputError("model", f"{path}: the exported program's input is not a batch tensor (got {value!r}); "
                                  "export a module whose forward takes one tensor of shape (batch, ...)")
    batch = shape[0]
    if isinstance(batch, int):
        return batch, batch
    expr = getattr(getattr(batch, "node", None), "expr", None)
    ranges = program.range_constraints.get(expr) if expr is not None else None
    if ranges is None:
        return 1, None
    low, high = ranges.lower, ranges.upper
    low = int(low) if getattr(low, "is_number", True) and _finite(low) else 1
    high = int(high) if _finite(high) else None
    return low, high


def _finite(value: Any) -> bool:
    try:
        return abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False


def _exported_training_nodes(program: Any) -> dict[str, list[str]]:
    """Operators of an exported graph that run in training mode: {"batch norm": [...], "dropout": [...]}."""
    found: dict[str, list[str]] = {"batch norm": [], "dropout": []}
    mutated = list(getattr(program.graph_signature, "buffers_to_mutate", {}).values())
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        args = list(node.args)
        if "batch_norm" in target and "no_training" not in target:
            if "functional" in target or (len(args) > 5 and args[5] is True):
                found["batch norm"].append(node.name)
        elif "dropout" in target and len(args) > 2 and args[2] is True:
            found["dropout"].append(node.name)
    if mutated and not found["batch norm"]:
        found["batch norm"] += [f"buffer {m}" for m in mutated]
    return found


def _script_training_nodes(module: Any) -> dict[str, list[str]]:
    """Operators a traced TorchScript graph runs in training mode whatever eval() says (the mode was
    a constant when it was traced); a scripted module reads self.training, which eval() sets."""
    found: dict[str, list[str]] = {"batch norm": [], "dropout": []}
    try:
        nodes = list(module.inlined_graph.nodes())
    except Exception:  # noqa: BLE001 - no forward graph to read
        return found
    for node in nodes:
        kind = node.kind()
        position = 5 if kind in ("aten::batch_norm", "aten::native_batch_norm") else \
            2 if kind in ("aten::dropout", "aten::feature_dropout", "aten::alpha_dropout",
                          "aten::feature_alpha_dropout", "aten::native_dropout") else None
        if position is None:
            continue
        inputs = list(node.inputs())
        if len(inputs) <= position or inputs[position].node().kind() != "prim::Constant":
            continue
        try:
            constant = inputs[position].toIValue()
        except Exception:  # noqa: BLE001
            continue
        if constant is True:
            found["batch norm" if "batch_norm" in kind else "dropout"].append(kind.split("::")[1])
    return found


def _training_baked_in(path: str, found: dict[str, list[str]], how: str) -> list[str]:
    """Refuse batch norm baked in training mode; a note (the forward is random) for dropout."""
    if found["batch norm"]:
        raise InputError(
            "model", f"outputs depend on the other samples in the batch: {path} was {how} with batch norm in training "
                     f"mode ({len(found['batch norm'])} operator(s) normalise over each batch and update the running "
                     f"statistics on every call), which eval() cannot undo in {'a traced' if how == 'traced' else 'an exported'} "
                     f"model. {'Trace' if how == 'traced' else 'Export'} it after model.eval()")
    if found["dropout"]:
        return [f"{how} with dropout in training mode ({len(found['dropout'])} operator(s)): the forward pass is "
                f"random, which eval() cannot undo; if that is not intended, {'trace' if how == 'traced' else 'export'} "
                "it after model.eval()"]
    return []


def _looks_like_torchscript(path: str) -> bool:
    """A zip with TorchScript's entries (code/, constants.pkl), which torch.save archives never have."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def _weights_only_refusal(error: BaseException) -> bool:
    """torch.load(weights_only=True) refused what the pickle asks for (a Python object), as opposed to
    bytes that are no pickle at all ('invalid load key', or an opcode it does not know: 'Unsupported
    operand', which is what the restricted unpickler says of arbitrary bytes)."""
    text = str(error)
    return "Weights only load failed" in text and "Unsupported operand" not in text


def _untrusted(path: str, trust_pickle: bool, error: BaseException) -> Any:
    if not trust_pickle:
        raise UntrustedFileError(
            "model", f"{path} is a pickled Python object (e.g. torch.save(model); {_weights_only_reason(error)}); "
                     "loading it can run arbitrary "
                     "code. Save the model with torch.jit.save or torch.export.save, or its weights as "
                     "safetensors, or pass --trust-pickle (trust_pickle=True) if you trust where the file came from")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise InputError("model", f"cannot unpickle {path}: {_first_line(error)}") from None


def _load_factory(spec: str, weights: str | None, *, trust_pickle: bool,
                  random_init: bool) -> tuple[nn.Module, str, str | None, list[str]]:
    factory = load_object(spec, argument="model")
    if not callable(factory):
        raise InputError("model", f"{spec} is not callable; expected a factory returning an nn.Module")
    if weights is not None and random_init:
        raise InputError("random_init", "cannot go with weights: the weights replace the random initialisation")
    check_random = weights is None and not random_init
    module = _call_factory(factory, spec, seed=1 if check_random else None)
    if weights is None:
        if not check_random:
            return module, f"factory:{spec} (random initialisation)", None, [
                "audited with the parameters its factory initialises (random_init=True): the figures describe an "
                "untrained model"]
        again = _call_factory(factory, spec, seed=2)
        if _parameters_of(again) != _parameters_of(module):
            raise InputError(
                "model", f"{spec} without weights is a random initialisation ({spec}() gives different parameters "
                         "under two random seeds): the audit would measure an untrained model. Pass its trained "
                         "weights (weights=FILE, CLI: --weights FILE), or random_init=True (CLI: --random-init) "
                         "to audit the untrained model on purpose")
        return module, f"factory:{spec}", None, []
    state = read_state_dict(weights, trust_pickle=trust_pickle)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise InputError("weights", f"{weights} does not fit {spec}(): "
                                    f"{'; '.join(details)[:400] if details else _first_line(error)}") from None
    return module, f"factory:{spec} weights:{weights}", file_sha256(weights), []


def _call_factory(factory: Any, spec: str, *, seed: int | None) -> nn.Module:
    """factory(), its errors as InputError; under a fixed seed (the global RNG restored after) when given."""
    try:
        if seed is None:
            module = factory()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = factory()
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001
        raise InputError("model", f"calling {spec}() failed: {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(module, nn.Module):
        raise InputError("model", f"{spec}() returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _parameters_of(module: nn.Module) -> str:
    try:
        return state_dict_sha256(module)
    except InputError:  # meta tensors: no values, nothing trained either
        return f"meta:{id(module)}"


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
    except pickle.UnpicklingError as error:
        if not _weights_only_refusal(error):
            raise InputError("weights", f"cannot read {path}: neither safetensors nor a torch.save file of "
                                        f"tensors ({_weights_only_reason(error)})") from None
        if not trust_pickle:
            raise UntrustedFileError(
                "weights", f"{path} holds Python objects beyond tensors ({_weights_only_reason(error)}); loading it "
                           "can run arbitrary code. Save model.state_dict() (or use safetensors), or pass "
                           "--trust-pickle if you trust it") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as unpickling:  # noqa: BLE001
            raise InputError("weights", f"cannot unpickle {path}: {_first_line(unpickling)}") from None
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
