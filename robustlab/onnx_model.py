"""ONNX models: white-box through onnx2torch when the graph converts, else black-box through onnxruntime.

Reading an .onnx file parses a protobuf message (no pickle, no code runs), so no --trust-pickle is
needed; the file is validated with onnx.checker before anything else.

- **White-box**: `onnx2torch.convert` turns the graph into a torch.fx module. Its outputs are
  compared with onnxruntime's on random inputs inside the bounds before it is trusted; when they
  match, every attack, check and explanation runs on the converted module, and the model's source in
  the results says "converted with onnx2torch".
- **Black-box**: a graph onnx2torch cannot convert (an operator it lacks) or whose conversion
  disagrees with onnxruntime runs through an onnxruntime session, wrapped as a module with no
  gradient (`black_box = True`). The harness then runs only gradient-free attacks (Square), plus
  transfer from a surrogate when one is given, and the evaluation is "weaker than standard" with
  the reason (robustlab.verdicts).

The three packages are the optional extra `robustlab[onnx]`. onnx2torch imports torchvision for two
detection operators (NonMaxSuppression, RoiAlign) only; when torchvision is not installed it is
imported with a stand-in for those two, and a graph that uses them is not converted.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from typing import Any

import numpy as np
import torch
from torch import nn

from robustlab.errors import InputError

EXTRA = "pip install 'robustlab[onnx]'"
PACKAGES = ("onnx", "onnxruntime", "onnx2torch")
NEEDS_TORCHVISION = ("NonMaxSuppression", "RoiAlign")  # onnx2torch's converters that call torchvision
CROSS_CHECK_SAMPLES = 4  # random inputs on which onnx2torch's module must match onnxruntime
CROSS_CHECK_TOLERANCE = 1e-4  # largest difference allowed, relative to the largest output
BLACK_BOX_SOURCE = "onnxruntime"
_ELEMENT_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE


def require_onnx() -> dict[str, Any]:
    """The onnx, onnxruntime and onnx2torch modules; InputError naming the extra when one is missing."""
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError("model", f"ONNX models need the optional packages {', '.join(PACKAGES)} "
                                  f"({', '.join(missing)} not installed): {EXTRA}")
    return {"onnx": importlib.import_module("onnx"), "onnxruntime": importlib.import_module("onnxruntime"),
            "onnx2torch": _import_onnx2torch()}


def _import_onnx2torch() -> Any:
    """onnx2torch, with a stand-in for torchvision (used by its detection operators only) if absent."""
    if "onnx2torch" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("onnx2torch")
    stub = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this ONNX operator needs torchvision, which is not installed")

    ops.nms = ops.box_convert = ops.roi_align = unavailable  # type: ignore[attr-defined]
    stub.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    try:
        return importlib.import_module("onnx2torch")
    finally:  # nobody else sees the stand-in
        for name, module in (("torchvision", stub), ("torchvision.ops", ops)):
            if sys.modules.get(name) is module:
                del sys.modules[name]


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session as a module: logits for a batch, and no gradient (black-box)."""

    black_box = True  # robustlab.harness runs only gradient-free attacks (and transfer) on it

    def __init__(self, session: Any, input_name: str, dtype: Any, batch: int | None, reason: str) -> None:
        super().__init__()
        self.session = session
        self.input_name = input_name
        self.numpy_dtype = dtype
        self.fixed_batch = batch  # the graph's batch size when it is not symbolic
        self.reason = reason  # why it is black-box

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy().astype(self.numpy_dtype, copy=False)
        step = self.fixed_batch or max(1, len(array))
        parts = []
        for start in range(0, len(array), step):
            chunk = array[start:start + step]
            real = len(chunk)
            if self.fixed_batch is not None and real < self.fixed_batch:  # pad with copies of the last input
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - real, axis=0)])
            parts.append(np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(chunk)})[0])[:real])
        out = np.concatenate(parts) if parts else np.zeros((0,), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=torch.float32)


class _FixedBatch(nn.Module):
    """Calls a converted graph only with its fixed batch size (chunks; the last one padded, extras dropped)."""

    def __init__(self, graph: nn.Module, batch: int) -> None:
        super().__init__()
        self.graph = graph
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            real = len(chunk)
            if real < self.batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.batch - real, *chunk.shape[1:])])
            out = self.graph(chunk)
            parts.append((out[0] if isinstance(out, (tuple, list)) else out)[:real])
        return torch.cat(parts)


def load_onnx(path: str, *, bounds: Any = None) -> tuple[nn.Module, str, list[str]]:
    """(module, source, notes) for an .onnx file (see the module doc); InputError naming `model`."""
    mods = require_onnx()
    onnx, ort, onnx2torch = mods["onnx"], mods["onnxruntime"], mods["onnx2torch"]
    model = _read(onnx, path)
    name, shape, dtype = _graph_input(model, path)
    batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime refuses the graph: nothing can run it
        raise InputError("model", f"onnxruntime cannot run {path}: {_first_line(error)}") from None
    runtime = OnnxRuntimeModel(session, name, dtype, batch, "")
    version = getattr(onnx2torch, "__version__", "") or _version("onnx2torch")
    graph, why = _convert(onnx2torch, model)
    if graph is not None:
        module: nn.Module = graph if batch is None else _FixedBatch(graph, batch)
        module.eval()
        agreement, why = _cross_check(module, runtime, shape, bounds)
        if why is None:
            batch_note = f"; its batch size is fixed at {batch}: called in batches of {batch}, padded" if batch else ""
            return module, (f"onnx:{path} (converted with onnx2torch {version}; white-box; outputs match "
                            f"onnxruntime's {agreement}{batch_note})"), []
    runtime.reason = str(why)
    note = (f"black-box through onnxruntime {ort.__version__}: {why}. Only gradient-free attacks (Square) run, and "
            "transfer from a surrogate when one is given; white-box attacks, gradient checks and certificates do "
            "not, so the evaluation is weaker than standard")
    return runtime, f"onnx:{path} (black-box through onnxruntime {ort.__version__})", [note]


def _read(onnx: Any, path: str) -> Any:
    try:
        model = onnx.load(path)
    except Exception as error:  # noqa: BLE001 - DecodeError and friends: not an ONNX protobuf
        raise InputError("model", f"cannot read {path} as an ONNX model: {_first_line(error)}") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # noqa: BLE001 - ValidationError, InferenceError
        raise InputError("model", f"{path} is not a valid ONNX model (onnx.checker: {_first_line(error)})") from None
    return model


def _graph_input(model: Any, path: str) -> tuple[str, list[int | str], Any]:
    """The graph's one data input: name, shape (ints, or names of symbolic dimensions) and numpy dtype."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise InputError("model", f"{path}: the ONNX graph takes {len(inputs)} inputs "
                                  f"({', '.join(i.name for i in inputs) or 'none'}); robustlab calls a model with one "
                                  "batch of inputs")
    tensor = inputs[0].type.tensor_type
    dtype = _ELEMENT_DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise InputError("model", f"{path}: the ONNX graph's input {inputs[0].name!r} is not a float tensor "
                                  f"(element type {tensor.elem_type}); robustlab attacks float inputs")
    shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                              for d in tensor.shape.dim]
    return inputs[0].name, shape, dtype


def _convert(onnx2torch: Any, model: Any) -> tuple[nn.Module | None, str | None]:
    """onnx2torch's module, or None and why the graph does not convert."""
    ops = sorted({node.op_type for node in model.graph.node})
    if importlib.util.find_spec("torchvision") is None:
        detection = [op for op in ops if op in NEEDS_TORCHVISION]
        if detection:
            return None, f"onnx2torch needs torchvision for {', '.join(detection)}, which is not installed"
    try:
        return onnx2torch.convert(model), None
    except Exception as error:  # noqa: BLE001 - NotImplementedError for a missing operator, and others
        text = _first_line(error)
        op = _unsupported_op(text)
        return None, (f"onnx2torch cannot convert the operator {op}" if op else f"onnx2torch cannot convert the "
                                                                               f"graph ({text})")


def _unsupported_op(text: str) -> str | None:
    import re

    found = re.search(r"operation_type='([^']+)'(?:, version=(\d+))?", text)
    if not found:
        return None
    return found.group(1) + (f" (opset {found.group(2)})" if found.group(2) else "")


def _cross_check(module: nn.Module, runtime: OnnxRuntimeModel, shape: list[int | str],
                 bounds: Any) -> tuple[str, str | None]:
    """Compare the converted module with onnxruntime on random inputs in the bounds: (what matched, or why not)."""
    if any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        return "", (f"the graph's input shape {shape} has symbolic feature dimensions, so onnx2torch's conversion "
                    "cannot be checked against onnxruntime before the audit")
    n = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else CROSS_CHECK_SAMPLES
    low, high = _scalar_bounds(bounds)
    generator = torch.Generator().manual_seed(0)
    x = low + (high - low) * torch.rand((n, *[int(d) for d in shape[1:]]), generator=generator)
    try:
        with torch.no_grad():
            got = module(x.to(_dtype_of(module)))
            got = (got[0] if isinstance(got, (tuple, list)) else got).double()
        expected = runtime(x).double()
    except Exception as error:  # noqa: BLE001 - the converted graph fails where onnxruntime runs
        return "", f"onnx2torch's conversion fails on inputs onnxruntime accepts ({_first_line(error)})"
    if got.shape != expected.shape:
        return "", f"onnx2torch's conversion returns shape {tuple(got.shape)}, onnxruntime {tuple(expected.shape)}"
    scale = float(expected.abs().max().clamp_min(1e-12))
    gap = float((got - expected).abs().max()) / scale
    if not math.isfinite(gap) or gap > CROSS_CHECK_TOLERANCE:
        return "", (f"onnx2torch's conversion differs from onnxruntime by {gap:.3g} of the largest output on {n} "
                    f"random inputs (more than {CROSS_CHECK_TOLERANCE:g}), so it is not trusted")
    return f"to {gap:.2g} of the largest output on {n} random inputs", None


def _scalar_bounds(bounds: Any) -> tuple[float, float]:
    """Scalar (low, high) for the cross-check's random inputs; (0, 1) when not scalar or not given."""
    try:
        low, high = (float(b) for b in (bounds.low, bounds.high)) if hasattr(bounds, "low") else \
            (float(bounds[0]), float(bounds[1]))
    except (TypeError, ValueError, IndexError, RuntimeError):  # per-feature tensors: the default box
        return 0.0, 1.0
    return (low, high) if math.isfinite(low) and math.isfinite(high) and low < high else (0.0, 1.0)


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
