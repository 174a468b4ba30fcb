"""Crafted files whose unpickling runs a payload: the payload creates a marker file.

`Payload(marker)` pickles as a call of `open(marker, "w")`: unpickling it creates the file and
nothing else, so a test can tell whether a loader ran it by whether the marker exists. Each
`craft_*` writes one hostile file of one format, built from a real model or data file so that
the only thing wrong with it is the payload.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch


class Payload:
    """Unpickling this runs open(marker, 'w'): a harmless, observable stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> None:
    """Copy a zip archive, replacing entries whose names end with a key of `replace`, adding `add`
    (names relative to the archive's root folder)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename == f"{root}/{suffix}":
                    data = new
            zout.writestr(info, data)
        for name, data in (add or {}).items():
            zout.writestr(f"{root}/{name}", data)


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- torch.save
def craft_pickled_module(path: Path, marker: Path) -> Path:
    """A torch.save file whose object runs the payload (what torch.save(model) of a hostile class gives)."""
    torch.save({"model": Payload(marker)}, str(path))
    return path


def craft_state_dict_with_object(path: Path, marker: Path, state: dict) -> Path:
    """A checkpoint: a real state dict plus one Python object (the payload)."""
    torch.save({"state_dict": state, "optimizer": Payload(marker)}, str(path))
    return path


def craft_torchscript(path: Path, marker: Path, scripted: torch.jit.ScriptModule) -> Path:
    """A TorchScript archive whose data.pkl is replaced by a pickle calling the payload."""
    clean = path.with_name(path.stem + "-clean.pt")
    scripted.save(str(clean))
    _rewrite_zip(clean, path, {"data.pkl": pickle.dumps(Payload(marker), protocol=2)})
    clean.unlink()
    return path


def craft_safetensors(path: Path, marker: Path) -> Path:
    """A pickle named .safetensors."""
    path.write_bytes(pickle.dumps({"w": Payload(marker)}))
    return path


# ---------------------------------------------------------------------------- torch.export
PT2_VARIANTS = ("sample-inputs", "pickled-weight", "opaque-constant", "custom-object", "aoti", "legacy-format",
                "duplicate-entry", "unknown-entry")


def craft_pt2(path: Path, marker: Path, clean: Path, variant: str) -> Path:
    """A .pt2 archive (from the plain program `clean`) whose `variant` part carries the payload.

    sample-inputs: data/sample_inputs/model.pt pickles the payload (torch.export.load retries a
        refused weights_only load with weights_only=False);
    pickled-weight: a weight declared `use_pickle` (a tensor subclass), its file a torch.save of the payload;
    opaque-constant: a constant declared an opaque Python object, restored with pickle.loads;
    custom-object: a constant declared a TorchScript custom object (torchbind);
    aoti: an AOTInductor package entry (a native library torch.export.load would load);
    legacy-format: a torch 2.7-style archive (serialized_*.pt files);
    duplicate-entry: sample inputs present twice, a harmless copy first and the payload last;
    unknown-entry: an entry robustlab does not know, holding a pickle."""
    payload = pickle.dumps(Payload(marker), protocol=2)
    with zipfile.ZipFile(clean) as z:
        root = z.namelist()[0].split("/")[0]
        weights_config = json.loads(z.read(f"{root}/data/weights/model_weights_config.json"))
        constants_config = json.loads(z.read(f"{root}/data/constants/model_constants_config.json"))
        sample = z.read(f"{root}/data/sample_inputs/model.pt")
    if variant == "sample-inputs":
        _rewrite_zip(clean, path, {"data/sample_inputs/model.pt": _torch_saved(((Payload(marker),), {}))})
    elif variant == "pickled-weight":
        first = next(iter(weights_config["config"]))
        weights_config["config"][first].update(use_pickle=True, path_name="weight_evil")
        _rewrite_zip(clean, path, {"data/weights/model_weights_config.json": json.dumps(weights_config).encode()},
                     {"data/weights/weight_evil": _torch_saved(Payload(marker))})
    elif variant in ("opaque-constant", "custom-object"):
        name = "opaque_obj_0" if variant == "opaque-constant" else "custom_obj_0"
        constants_config["config"]["evil"] = {"path_name": name, "is_param": False, "use_pickle": True,
                                              "tensor_meta": None}
        _rewrite_zip(clean, path,
                     {"data/constants/model_constants_config.json": json.dumps(constants_config).encode()},
                     {f"data/constants/{name}": payload})
    elif variant == "aoti":
        _rewrite_zip(clean, path, {}, {"data/aotinductor/model/model.so": b"\x7fELF"})
    elif variant == "legacy-format":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("version", "8.0")
            z.writestr("serialized_exported_program.json", "{}")
            z.writestr("serialized_state_dict.pt", _torch_saved({"w": Payload(marker)}))
            z.writestr("serialized_constants.pt", _torch_saved({}))
            z.writestr("serialized_example_inputs.pt", _torch_saved(((), {})))
    elif variant == "duplicate-entry":
        _rewrite_zip(clean, path, {}, {"data/sample_inputs/model.pt": _torch_saved(((Payload(marker),), {}))})
    elif variant == "unknown-entry":
        _rewrite_zip(clean, path, {}, {"data/mystery/blob.pkl": payload})
    else:
        raise ValueError(variant)
    del sample
    return path


def craft_pt2_graph_call(path: Path, marker: Path, clean: Path) -> Path:
    """A .pt2 whose graph (JSON, no pickle) calls os.system, reached as torch.serialization.os.system:
    torch's deserializer resolves any attribute chain under `torch`, and only its verifier (operators
    must be OpOverloads, higher-order operators or a few builtins) stands between it and a call."""
    import copy

    with zipfile.ZipFile(clean) as z:
        root = z.namelist()[0].split("/")[0]
        program = json.loads(z.read(f"{root}/models/model.json"))
    graph = program["graph_module"]["graph"]
    graph["tensor_values"]["evil_out"] = copy.deepcopy(graph["tensor_values"]["x"])
    graph["nodes"].insert(0, {"target": "torch.serialization.os.system", "name": "evil", "metadata": {},
                              "inputs": [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
                              "outputs": [{"as_tensor": {"name": "evil_out"}}], "is_hop_single_tensor_return": None})
    _rewrite_zip(clean, path, {"models/model.json": json.dumps(program).encode()})
    return path


# ---------------------------------------------------------------------------- numpy
def craft_npz_object_array(path: Path, marker: Path, x: np.ndarray) -> Path:
    """An .npz whose labels are an object array holding the payload."""
    y = np.empty(len(x), dtype=object)
    y[:] = [Payload(marker)] * len(x)
    np.savez(path, x=x, y=y)
    return path
