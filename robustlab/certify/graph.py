"""A model as a chain of layers the bounds know, traced with torch.fx (or refused, naming the layer).

IBP and CROWN here propagate one tensor through one layer at a time, so the model's graph must be
a chain: every layer takes the previous layer's output only. Residual connections, concatenation,
and any layer outside SUPPORTED raise `UnsupportedLayerError` with the layer's name and type,
so a caller can skip the model with that reason instead of certifying something else.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from robustlab.errors import InputError
from robustlab.model import ModelUnderTest, is_exported

from . import ops as O

SUPPORTED = ("Linear, Conv2d (zero padding), ReLU, Flatten/view/reshape, AvgPool2d, AdaptiveAvgPool2d, "
             "MaxPool2d (no ceil_mode), BatchNorm1d/2d in eval mode, Identity, Dropout in eval mode, "
             "and a final log_softmax (it leaves logit differences unchanged)")

_RELU: tuple[Callable[..., Any], ...] = (torch.relu, F.relu)
_LOG_SOFTMAX: tuple[Callable[..., Any], ...] = (torch.log_softmax, F.log_softmax)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


class UnsupportedLayerError(InputError):
    """The model has a layer (or a graph shape) the bounds cannot handle; nothing was certified.
    `layer` is its name in the model (module path or graph node), `kind` its type."""

    def __init__(self, layer: str, kind: str, reason: str) -> None:
        self.layer, self.kind, self.reason = layer, kind, reason
        super().__init__("model", f"cannot certify layer {layer!r} ({kind}): {reason}. Supported: {SUPPORTED}")


@dataclass
class Chain:
    """The ops of a model in order, from inputs of `input_shape` to logits."""

    ops: list[O.Op]
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        shape = self.ops[-1].out_shape if self.ops else self.input_shape
        return int(shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits the chain computes (the traced model, in the chain's dtype)."""
        for op in self.ops:
            x = op.forward(x)
        return x

    def describe(self) -> list[str]:
        return [repr(op) for op in self.ops]


def chain_for(model: ModelUnderTest, *, dtype: torch.dtype = torch.float64) -> Chain:
    """The chain of a wrapped model: its mean/std normalisation as a first affine layer, the
    module's layers, and the wrapper's binary-logit transform [0, z] when it has one output."""
    if model.inspection is None:
        raise RuntimeError("inspect the model first (the input shape and output kind come from it)")
    kind = model.inspection.output_kind
    if kind in ("probs", "binary_prob"):
        raise UnsupportedLayerError("<output>", kind, "the model returns probabilities; certify the logits "
                                    "(the module without its final softmax or sigmoid)")
    shape = model.inspection.input_shape
    chain = trace(model.module, shape, dtype=dtype)
    if model.mean is not None or model.std is not None:
        zero = torch.zeros((1, *shape), dtype=torch.float64, device=model.device)
        shift = model._normalise(zero)[0]
        scale = model._normalise(zero + 1)[0] - shift
        chain.ops.insert(0, O.Scale("<normalisation>", lambda: (scale, shift), shape))
        chain.notes.append("mean/std normalisation certified as an affine first layer")
    if kind == "binary_logit":
        matrix = torch.tensor([[0.0], [1.0]], dtype=torch.float64, device=model.device)
        chain.ops.append(O.Matrix("<binary logit>", matrix, (1,), (2,)))
        chain.notes.append("single output certified as the logits [0, z]")
    return chain


def trace(module: Any, input_shape: tuple[int, ...], *, dtype: torch.dtype = torch.float64) -> Chain:
    """Trace `module` on inputs of `input_shape` (per sample) into a Chain; raise
    UnsupportedLayerError naming the first layer that is not in SUPPORTED."""
    name = type(module).__name__
    if not isinstance(module, nn.Module):
        raise UnsupportedLayerError("<model>", name, "certification needs a torch.nn.Module, not a plain callable")
    if isinstance(module, torch.jit.ScriptModule) or is_exported(module):
        raise UnsupportedLayerError("<model>", name, "TorchScript and torch.export programs are not traced; "
                                    "pass the nn.Module they were made from")
    root = nn.Sequential(module) if isinstance(module, _LEAVES) else module
    try:
        tracer = _Tracer()
        gm = fx.GraphModule(root, tracer.trace(root))
    except Exception as error:  # noqa: BLE001 - any tracing failure is the same answer: not certifiable
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UnsupportedLayerError("<model>", name, f"torch.fx cannot trace its forward ({first})") from None
    gm.graph.eliminate_dead_code()
    gm.recompile()
    example = _example(module, input_shape)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return _walk(gm, tuple(input_shape), dtype)


_LEAVES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Unflatten, nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d,
           nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.LogSoftmax) + _DROPOUT


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping subclasses of the supported layers whole (not traced into) unless
    they override forward (then what they compute is traced, and judged, op by op)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        kept = any(isinstance(m, c) and type(m).forward is c.forward for c in _LEAVES)
        return kept or super().is_leaf_module(m, module_qualified_name)


def _example(module: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    p = next(iter(module.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros((2, *input_shape), dtype=dtype, device=device)  # 2: tells the batch dim apart


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _walk(gm: fx.GraphModule, input_shape: tuple[int, ...], dtype: torch.dtype) -> Chain:
    chain = Chain([], input_shape, dtype)
    current: fx.Node | None = None
    log_softmax_at: str | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise UnsupportedLayerError(node.name, "input", "the model takes several inputs")
            current = node
            continue
        if node.op == "output":
            out = node.args[0]
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out is not current:
                raise UnsupportedLayerError("<output>", type(out).__name__,
                                            "the model must return the last layer's tensor")
            break
        label, kind = _label(gm, node)
        shape = _shape(node)
        if shape is None:  # a size or a shape computed for a view: no data flows through it
            if node.op == "get_attr":
                raise UnsupportedLayerError(label, kind, "a parameter is used outside a supported layer")
            continue
        inputs = [n for n in node.all_input_nodes if _shape(n) is not None]
        if len(inputs) != 1 or inputs[0] is not current:
            reason = ("it combines several tensors (a residual connection or a concatenation); only chains of "
                      "layers are supported" if len(inputs) > 1 else "it does not take the previous layer's output")
            raise UnsupportedLayerError(label, kind, reason)
        if log_softmax_at is not None:
            raise UnsupportedLayerError(log_softmax_at, "log_softmax", "only a final log_softmax is supported")
        assert current is not None
        before = _shape(current)
        assert before is not None
        if shape[0] != before[0]:
            raise UnsupportedLayerError(label, kind, "it mixes the samples of a batch")
        op = _convert(gm, node, label, kind, before[1:], shape[1:], dtype)
        if op == "log_softmax":
            log_softmax_at = label
        elif isinstance(op, O.Op):
            chain.ops.append(op)
        current = node
    if log_softmax_at is not None:
        chain.notes.append(f"final log_softmax {log_softmax_at!r} dropped: it leaves every logit difference unchanged")
    final = chain.ops[-1].out_shape if chain.ops else input_shape
    if len(final) != 1:
        raise UnsupportedLayerError("<output>", "tensor", f"logits must be one vector per sample, got shape {final}")
    return chain


def _label(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str]:
    if node.op == "call_module":
        return str(node.target), type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_function":
        return node.name, getattr(node.target, "__name__", str(node.target))
    return node.name, str(node.target)


def _convert(gm: fx.GraphModule, node: fx.Node, label: str, kind: str, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...], dtype: torch.dtype) -> O.Op | str | None:
    """The op for one graph node; None for an identity; "log_softmax" for the final marker."""
    if node.op == "call_module":
        return _convert_module(gm.get_submodule(str(node.target)), label, kind, in_shape, out_shape, dtype)
    if node.op == "call_function":
        target = node.target
        if target in _RELU:
            return O.ReLU(label, in_shape, out_shape)
        if target is torch.flatten:
            return O.Reshape(label, in_shape, out_shape)
        if target in _LOG_SOFTMAX and _last_dim(node, in_shape):
            return "log_softmax"
        if target is operator.getitem:
            raise UnsupportedLayerError(label, kind, "indexing a tensor is not supported")
        raise UnsupportedLayerError(label, kind, "this function is not supported")
    if node.op == "call_method":
        method = str(node.target)
        if method in ("relu", "relu_"):
            return O.ReLU(label, in_shape, out_shape)
        if method in ("flatten", "view", "reshape"):
            return O.Reshape(label, in_shape, out_shape)
        if method == "contiguous":
            return None
        if method == "log_softmax" and _last_dim(node, in_shape):
            return "log_softmax"
        raise UnsupportedLayerError(label, f"Tensor.{method}", "this tensor method is not supported")
    raise UnsupportedLayerError(label, kind, f"graph node of kind {node.op} is not supported")


def _last_dim(node: fx.Node, in_shape: tuple[int, ...]) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return len(in_shape) == 1 and dim in (1, -1)


def _convert_module(m: nn.Module, label: str, kind: str, in_shape, out_shape, dtype) -> O.Op | str | None:
    if isinstance(m, nn.Linear):
        return O.Dense(label, m, in_shape, out_shape, dtype)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise UnsupportedLayerError(label, kind, f"padding_mode {m.padding_mode!r}; only zero padding is supported")
        return O.Conv(label, m, in_shape, out_shape, dtype)
    if isinstance(m, nn.ReLU):
        return O.ReLU(label, in_shape, out_shape)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return O.Reshape(label, in_shape, out_shape)
    if isinstance(m, _DROPOUT) or isinstance(m, nn.Identity):
        if m.training:
            raise UnsupportedLayerError(label, kind, "dropout in training mode is random; call model.eval()")
        return None
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if m.training or m.running_mean is None or m.running_var is None:
            raise UnsupportedLayerError(label, kind, "batch norm must be in eval mode with running statistics "
                                        "(otherwise it normalises by the batch)")
        return O.Scale(label, O.batch_norm_scale_shift(m, len(in_shape)), in_shape)
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return O.Pool(label, m, in_shape, out_shape)
    if isinstance(m, nn.MaxPool2d):
        if m.ceil_mode or m.return_indices:
            raise UnsupportedLayerError(label, kind, "ceil_mode and return_indices are not supported")
        return O.MaxPool(label, m, in_shape, out_shape)
    if isinstance(m, nn.LogSoftmax) and len(in_shape) == 1 and m.dim in (1, -1):
        return "log_softmax"
    if isinstance(m, (nn.Softmax, nn.Sigmoid)):
        raise UnsupportedLayerError(label, kind, "the model returns probabilities; certify the logits (drop it)")
    raise UnsupportedLayerError(label, kind, "this layer is not supported")
