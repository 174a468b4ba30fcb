"""Views of a model's layers for the steps that hook them (BPDA, probes), whatever the model's format.

Forward hooks only work on Python `nn.Module`s. A TorchScript module refuses them ("not supported
on ScriptModules"), and the module `torch.export` gives back is one flat graph whose submodules
only hold parameters (a hook on them never fires). `hookable(module)` returns a *twin*: a fresh
Python module computing the same function whose layers accept hooks, named as in
`module.named_modules()`:

- a Python module (no TorchScript inside): a deep copy (hooks on it never touch the user's module);
- TorchScript: each scripted module whose compiled forward only chains its children
  (`self.b(self.a(x))`, every `nn.Sequential`, traced or scripted) becomes a Python chain of its
  children's twins; any other scripted module (a leaf, a residual block, a forward with ops of its
  own) is one opaque layer, called as it is. The TorchScript code itself is never changed;
- an exported program: `torch.export.unflatten` of the program (registered at load time by
  `remember_program`), which restores the original module hierarchy as Python modules;
- anything else (an exported module whose program is unknown, a plain callable): one opaque layer.

The twin is checked against the model on the probe inputs (same outputs up to float rounding);
`Twin.note` says what is coarser than the original (e.g. layers hidden inside an opaque TorchScript
module), so a step that needs finer layers can record why it could not have them.

`BatchSizeAdapter` lets robustlab call a `torch.export` program whose batch dimension is fixed
(or bounded) at export time with any batch size: chunks of an accepted size, the last one padded
with copies of its last sample whose outputs are dropped.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_PROGRAMS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
TWIN_TOLERANCE = 1e-4  # relative to the largest output: float rounding of a different call order


def remember_program(module: nn.Module, program: Any) -> None:
    """Record that `module` is `program.module()` (a torch.export ExportedProgram), for `hookable`."""
    _PROGRAMS[module] = program


def exported_program(module: nn.Module) -> Any | None:
    """The ExportedProgram `module` was made from, when `remember_program` recorded it."""
    try:
        return _PROGRAMS.get(module)
    except TypeError:
        return None


def is_torchscript(module: object) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def contains_torchscript(module: object) -> bool:
    return isinstance(module, nn.Module) and any(is_torchscript(m) for m in module.modules())


# ---------------------------------------------------------------------------- batch size adapter
class BatchSizeAdapter(nn.Module):
    """Calls `program` (a module from torch.export) only with batch sizes in [low, high].

    Larger batches run in chunks of `high`; a batch (or last chunk) smaller than `low` is padded
    with copies of its last sample, and the outputs of the padding are dropped. Gradients flow
    to the real samples only (the dropped outputs get no gradient)."""

    robustlab_exported = True  # train/eval mode is fixed in the program (see robustlab.model.is_exported)

    program: nn.Module

    def __init__(self, program: nn.Module, low: int, high: int | None, *, transparent: bool = False) -> None:
        super().__init__()
        if low < 1 or (high is not None and high < low):
            raise ValueError(f"invalid batch range [{low}, {high}]")
        if transparent:  # a twin: the program's layers keep their own names (no "program." prefix)
            object.__setattr__(self, "program", program)
            self._modules = program._modules
        else:
            self.program = program
        self.low = int(low)
        self.high = None if high is None else int(high)

    def describe(self) -> str:
        if self.high == self.low:
            return (f"its batch size is fixed at {self.low} by torch.export: robustlab calls it in batches of "
                    f"{self.low}, padding the last one with copies of its last sample (their outputs are dropped)")
        top = "any" if self.high is None else str(self.high)
        return (f"torch.export bounded its batch size to [{self.low}, {top}]: robustlab calls it in batches in "
                "that range, padding a smaller one with copies of its last sample (their outputs are dropped)")

    def forward(self, x: torch.Tensor) -> Any:
        n = x.shape[0]
        if n >= self.low and (self.high is None or n <= self.high):
            return self.program(x)
        step = self.high if self.high is not None else max(n, self.low)
        parts = []
        for start in range(0, n, step):
            chunk = x[start:start + step]
            real = chunk.shape[0]
            if real < self.low:
                pad = chunk[-1:].expand(self.low - real, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            parts.append(_rows(self.program(chunk), real))
        return _cat(parts)


def _rows(out: Any, k: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:k]
    if isinstance(out, (tuple, list)):
        return type(out)(_rows(o, k) for o in out)
    if isinstance(out, dict):
        return {key: _rows(v, k) for key, v in out.items()}
    return out


def _cat(parts: list) -> Any:
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _cat([p[key] for p in parts]) for key in first}
    return first


# ---------------------------------------------------------------------------- twins
class OpaqueLayer(nn.Module):
    """A module hooks cannot see into (TorchScript, an exported graph), called as it is.

    It is not registered as a submodule, and its parameters are not registered here either
    (TorchScript's are plain tensors), so hooks, names and modes stay on this Python shell and
    nothing robustlab does to the twin (freezing, moving) reaches the user's module. Wrap the
    twin with `ModelUnderTest.with_module`, which carries over the original's device and dtype."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)
        self.kind = f"TorchScript {getattr(inner, 'original_name', type(inner).__name__)}" \
            if is_torchscript(inner) else type(inner).__name__

    def forward(self, *args: Any) -> Any:
        inner: Any = self.__dict__["inner"]
        return inner(*args)

    def extra_repr(self) -> str:
        return self.kind


class ChainLayer(nn.Module):
    """A scripted module whose forward chains its children: calls their twins in the same order."""

    def __init__(self, original_name: str, children: list[tuple[str, nn.Module]], order: list[str]) -> None:
        super().__init__()
        for name, child in children:
            self.add_module(name, child)
        self.order = order
        self.original_name = original_name

    def forward(self, x: Any) -> Any:
        for name in self.order:
            x = self._modules[name](x)  # type: ignore[misc]
        return x

    def extra_repr(self) -> str:
        return f"TorchScript {self.original_name}: {' -> '.join(self.order)}"


@dataclass
class Twin:
    """A hookable module computing the model's function; `note` says what it cannot show."""

    module: nn.Module
    note: str | None = None  # None: every layer of the original is visible
    kind: str = "python"  # python, torchscript, exported, opaque


def hookable(module: Any, *, probe: torch.Tensor | None = None, copy_python: bool = True) -> Twin:
    """A module computing the same function as `module`, whose layers accept forward hooks (see
    the module docstring). A fresh module, never the user's, except for a plain Python module with
    `copy_python=False` (for callers that remove their hooks again). With `probe` (inputs as the
    module receives them, i.e. normalised), a rebuilt twin's outputs are compared with the
    module's; one that differs beyond float rounding is replaced by one opaque layer, with a note."""
    if not copy_python and isinstance(module, nn.Module) and not isinstance(module, BatchSizeAdapter) \
            and not contains_torchscript(module) and not _is_export_graph(module):
        return Twin(module, None, "python")
    twin = _build(module)
    if probe is not None and twin.kind in ("torchscript", "exported"):
        problem = _differs(module, twin.module, probe)
        if problem:
            return Twin(OpaqueLayer(module).eval(), note=f"its layers could not be rebuilt faithfully ({problem}); "
                                                          "only its output is visible", kind="opaque")
    return twin


def _build(module: Any) -> Twin:
    if isinstance(module, BatchSizeAdapter):
        inner = _build(module.program)
        adapter = BatchSizeAdapter(inner.module, module.low, module.high, transparent=True)
        return Twin(adapter.eval(), inner.note, inner.kind)
    if is_torchscript(module):
        twin, hidden = _script_twin(module)
        return Twin(twin.eval(), _hidden_note(hidden), "torchscript")
    if isinstance(module, nn.Module) and _is_export_graph(module):
        program = exported_program(module)
        if program is None:
            return Twin(OpaqueLayer(module).eval(), "an exported graph without its ExportedProgram (load the .pt2 "
                                                     "file, or pass the program itself): only its output is visible",
                        "opaque")
        try:
            unflat = torch.export.unflatten(program)
        except Exception as error:  # noqa: BLE001 - an unusual program: the whole graph is one layer
            return Twin(OpaqueLayer(module).eval(), f"torch.export.unflatten failed ({_first_line(error)}); only its "
                                                    "output is visible", "opaque")
        return Twin(unflat.eval(), None, "exported")
    if isinstance(module, nn.Module):
        if contains_torchscript(module):
            clone = copy.deepcopy(module)
            hidden = _replace_script_parts(clone, "")
            return Twin(clone, _hidden_note(hidden), "torchscript")
        return Twin(copy.deepcopy(module), None, "python")
    return Twin(OpaqueLayer(module), "not an nn.Module: only its output is visible", "opaque")


def _hidden_note(hidden: list[str]) -> str | None:
    if not hidden:
        return None
    shown = ", ".join(hidden[:5]) + (" ..." if len(hidden) > 5 else "")
    return ("TorchScript modules whose forward does more than call their children one after the other are single "
            f"layers here (the layers inside them are not visible to hooks): {shown}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _replace_script_parts(module: nn.Module, prefix: str) -> list[str]:
    """Replace, in place, the TorchScript children of a Python module by their twins."""
    hidden: list[str] = []
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if is_torchscript(child):
            twin, inner = _script_twin(child, path)
            setattr(module, name, twin.eval())
            hidden += inner
        else:
            hidden += _replace_script_parts(child, path)
    return hidden


def _is_export_graph(module: nn.Module) -> bool:
    return any(cls.__name__ == "_StatefulGraphModule" for cls in type(module).__mro__)


def _script_twin(module: Any, prefix: str = "") -> tuple[nn.Module, list[str]]:
    """(twin, names of scripted modules with children that had to stay opaque)."""
    children = dict(module.named_children())
    if not children:
        return OpaqueLayer(module), []
    order = _chain_order(module, set(children))
    if order is None:
        return OpaqueLayer(module), [prefix or "<root>"]
    parts, hidden = [], []
    for name in dict.fromkeys(order):
        twin, inner_hidden = _script_twin(children[name], f"{prefix}.{name}" if prefix else name)
        parts.append((name, twin))
        hidden += inner_hidden
    return ChainLayer(str(getattr(module, "original_name", "module")), parts, order), hidden


def _chain_order(module: Any, children: set[str]) -> list[str] | None:
    """The child names a scripted forward calls, in order, if the forward does nothing else:
    x -> child_1(x) -> child_2(...) -> ... -> returned. None otherwise."""
    try:
        graph = module.graph
    except Exception:  # noqa: BLE001 - no forward method
        return None
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        return None
    self_id, current = inputs[0].unique(), inputs[1].unique()
    attrs: dict[int, str] = {}
    order: list[str] = []
    for node in graph.nodes():
        kind = node.kind()
        if kind == "prim::GetAttr":
            source = list(node.inputs())
            name = node.s("name")
            if len(source) != 1 or source[0].unique() != self_id or name not in children:
                return None
            attrs[node.output().unique()] = name
        elif kind == "prim::CallMethod" and node.s("name") == "forward":
            args = list(node.inputs())
            outs = list(node.outputs())
            if len(args) != 2 or args[0].unique() not in attrs or args[1].unique() != current or len(outs) != 1:
                return None
            order.append(attrs[args[0].unique()])
            current = outs[0].unique()
        else:
            return None
    outputs = list(graph.outputs())
    if not order or len(outputs) != 1 or outputs[0].unique() != current:
        return None
    return order


def _differs(original: Any, twin: nn.Module, probe: torch.Tensor) -> str | None:
    try:
        with torch.no_grad():
            a, b = _tensor(original(probe)), _tensor(twin(probe))
    except Exception as error:  # noqa: BLE001 - the twin cannot run: not faithful
        return f"it fails: {_first_line(error)}"
    if a is None or b is None or a.shape != b.shape:
        return "its outputs have another shape"
    scale = float(a.detach().abs().max().clamp_min(1e-12))
    gap = float((a.detach().double() - b.detach().double()).abs().max())
    if not gap <= TWIN_TOLERANCE * scale:
        return f"outputs differ by {gap:.3g}"
    return None


def _tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, dict):
        out = next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
    return out if isinstance(out, torch.Tensor) else None


__all__ = ["BatchSizeAdapter", "ChainLayer", "OpaqueLayer", "Twin", "exported_program", "hookable",
           "is_torchscript", "remember_program"]
