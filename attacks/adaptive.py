"""Adaptive-attack helpers (Athalye, Carlini and Wagner 2018): BPDA and a randomness probe.

Defenses that shatter gradients (input quantisation, rounding, a gradient-killing autograd.Function)
make gradient attacks fail without making the model robust. BPDA (Backward Pass Differentiable
Approximation) keeps the forward pass and replaces the backward pass of the offending layers by
that of the identity (or of a given differentiable approximation g), in the straight-through form

    out = g(x) + (f(x) - g(x)).detach()        value f(x) (up to float rounding), gradient of g

installed by a forward hook on a twin of the user's module (`robustlab.layers.hookable`: a deep copy
of a Python module; for TorchScript and torch.export models, a Python module with the same layers,
since those formats refuse hooks); the user's module is never touched.
Attack the BPDA model, then judge the adversarial inputs on the ORIGINAL model with
`robustlab.attacks.transfer(outcome, original, x, y)`: success is never taken from the surrogate.

Randomised defenses call for EoT instead: `PGD(eot_samples=k)`; `is_random` says whether a model
needs it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from robustlab import seeding
from robustlab.errors import InputError
from robustlab.layers import Twin, hookable
from robustlab.model import ModelUnderTest

from .base import validate_batch

Approximation = Callable[[torch.Tensor], torch.Tensor]
PROBE_STREAM = 900  # robustlab.seeding stream of the random probe inputs bpda draws when layers=None
PROBE_SAMPLES = 16


def _leaves(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if name and not any(True for _ in m.children())}


def _first_float(args: tuple) -> int | None:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return i
    return None


def _twin(model: ModelUnderTest, probe: torch.Tensor | None, *, copy_python: bool) -> Twin:
    """The model's module as one whose layers accept hooks, checked on (a few of) `probe`."""
    sample = None if probe is None else model.normalise(model.to_device(probe[:PROBE_SAMPLES]))
    return hookable(model.module, probe=sample, copy_python=copy_python)


def layer_names(model: ModelUnderTest) -> list[str]:
    """The layer names `bpda` and `find_gradient_blockers` use: those of `model.module` for a Python
    module; for TorchScript and torch.export models, those of its hookable twin (the same paths,
    as far as the format lets robustlab see into it)."""
    if not isinstance(model, ModelUnderTest) or not isinstance(model.module, nn.Module):
        raise InputError("model", "expected a robustlab ModelUnderTest around an nn.Module")
    return [name for name, _ in _twin(model, None, copy_python=False).module.named_modules() if name]


def find_gradient_blockers(model: ModelUnderTest, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Names (see `layer_names`) of leaf modules whose backward returns zero, NaN or
    inf input gradients although their output gradient is non-zero (quantisation, rounding, a
    gradient-killing autograd.Function, argmax, detach...).

    Each leaf is tested locally, on the inputs it receives for x: its first floating-point input is
    cut from the graph and made a leaf, and a fixed random (non-zero) output gradient is pulled back
    through it alone, so a blocker downstream does not hide one upstream. A leaf whose output does
    not depend differentiably on its input at all (integer output, detached) counts as a blocker.
    Only module-level blockers are found: an op written inline in a parent's forward is not a leaf.
    A ReLU whose inputs are all negative on this batch would also be reported (its gradient is
    truly zero there); use a representative batch. `y` is validated only (the test is label-free).
    TorchScript and torch.export models are searched on their hookable twin; see `locate_gradient_blockers`
    for what the twin could not show.
    """
    return locate_gradient_blockers(model, x, y)[0]


def locate_gradient_blockers(model: ModelUnderTest, x: torch.Tensor, y: torch.Tensor) -> tuple[list[str], str | None]:
    """`find_gradient_blockers`, and a note on the layers that could not be searched (layers hidden
    inside a TorchScript module that does more than call its children, say), or None."""
    if not isinstance(model, ModelUnderTest) or not isinstance(model.module, nn.Module):
        raise InputError("model", "expected a robustlab ModelUnderTest around an nn.Module")
    x, y, _, _ = validate_batch(model, x, y, None, None)
    x = model.to_device(x)
    twin = _twin(model, x, copy_python=False)
    view = model if twin.module is model.module else model.with_module(twin.module)
    leaves = _leaves(twin.module)
    calls: dict[str, list[tuple[torch.Tensor, object]]] = {}

    def pre_hook(name: str):
        def hook(module, args):
            i = _first_float(args)
            if i is None:
                return None
            leaf = args[i].detach().requires_grad_(True)
            calls.setdefault(name, []).append((leaf, None))
            # a clone, not the leaf itself: in-place layers (ReLU(inplace=True)) may write into it
            return args[:i] + (leaf.clone(),) + args[i + 1:]
        return hook

    def post_hook(name: str):
        def hook(module, args, out):
            if name in calls and calls[name] and calls[name][-1][1] is None:
                calls[name][-1] = (calls[name][-1][0], out)
        return hook

    handles = []
    try:
        for name, leaf in leaves.items():
            handles.append(leaf.register_forward_pre_hook(pre_hook(name)))
            handles.append(leaf.register_forward_hook(post_hook(name)))
        with view.evaluating(), torch.enable_grad():
            view(x)
            generator = torch.Generator().manual_seed(0)
            blockers = [name for name in leaves if name in calls
                        and any(_blocks(cut, out, generator) for cut, out in calls[name])]
    finally:
        for h in handles:
            h.remove()
    return blockers, twin.note


def _blocks(cut: torch.Tensor, out: object, generator: torch.Generator) -> bool:
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, torch.Tensor)), None)
    if not isinstance(out, torch.Tensor):
        return False
    if not out.is_floating_point() or not out.requires_grad:
        return True  # the output does not depend differentiably on the input: argmax, detach
    v = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, cut, grad_outputs=v, allow_unused=True)
    return grad is None or not bool(torch.isfinite(grad).all()) or not bool((grad != 0).any())


def _probe_inputs(model: ModelUnderTest) -> torch.Tensor:
    """Uniform random inputs in the model's box (fixed seed), for layers=None without a probe."""
    if model.inspection is None:
        raise InputError("probe", "random probe inputs need the input shape: pass probe=x or inspect the model first")
    shape = model.inspection.input_shape
    u = seeding.uniform(0, PROBE_STREAM, torch.arange(PROBE_SAMPLES), shape, dtype=torch.float64)
    low = torch.as_tensor(model.bounds.low, dtype=torch.float64)
    high = torch.as_tensor(model.bounds.high, dtype=torch.float64)
    return (low + u * (high - low)).to(model.dtype)


def bpda(model: ModelUnderTest, layers: Sequence[str] | Mapping[str, Approximation | None] | None = None,
         *, probe: torch.Tensor | None = None) -> ModelUnderTest:
    """A ModelUnderTest whose forward computes the same function but whose backward replaces the
    named layers by the identity (or by the given differentiable approximation g: forward value
    f(x), gradient of g). layers=None: the layers `find_gradient_blockers` reports on `probe` (or,
    without a probe, on random inputs in the bounds; the model must then have been inspected, e.g.
    by an earlier attack, so the input shape is known). Never modifies the user's module (a twin
    carries the hooks: a deep copy, or for TorchScript / torch.export a Python module with the same
    layers, see `layer_names`). Same bounds/mean/std/classes/output kind/device.

    Identity needs equal input and output shapes; a shape-changing layer needs an approximation,
    else InputError naming the layer (raised here when the input shape is known, else at the first
    forward pass).
    """
    if not isinstance(model, ModelUnderTest) or not isinstance(model.module, nn.Module):
        raise InputError("model", "expected a robustlab ModelUnderTest around an nn.Module")
    if probe is None and model.inspection is not None and layers is None:
        probe = _probe_inputs(model)
    if probe is not None:
        probe = model.to_device(torch.as_tensor(probe))
    if layers is None:
        if probe is None:
            raise InputError("layers", "cannot find the blocking layers without inputs: pass layer names, "
                                       "a probe batch (probe=x), or inspect the model first (model.inspect(x))")
        with torch.no_grad(), model.evaluating():
            labels = model(probe).argmax(dim=1).cpu()
        layers = find_gradient_blockers(model, probe, labels)
    if isinstance(layers, str):
        raise InputError("layers", f"expected a list of layer names or a mapping, got the string {layers!r}")
    plan: dict[str, Approximation | None] = dict(layers) if isinstance(layers, Mapping) else {n: None for n in layers}
    clone = _twin(model, probe, copy_python=True).module
    names = dict(clone.named_modules())
    for name, approx in plan.items():
        if not isinstance(name, str) or not name or name not in names:
            known = ", ".join(n for n in names if n)[:300]
            raise InputError("layers", f"no layer named {name!r} in the model (layers: {known})")
        if approx is not None and not callable(approx):
            raise InputError("layers", f"approximation for {name!r} must be callable or None, got {type(approx).__name__}")

    for name, approx in plan.items():
        names[name].register_forward_hook(_straight_through(name, approx))
    wrapped = model.with_module(clone, name=f"{model.name} (BPDA)", keep_inspection=False)
    if model.inspection is not None:
        sample = probe if probe is not None else _probe_inputs(model)
        wrapped.inspect(sample)  # also checks the shapes now, before any attack runs
    return wrapped


def _straight_through(name: str, approx: Approximation | None):
    """Forward hook: value of the layer's output, gradient of approx (identity when None)."""
    def hook(module, args, out):
        i = _first_float(args)
        if i is None or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise InputError("layers", f"BPDA layer {name!r} must map a floating-point tensor to a floating-point "
                                       "tensor; give it a differentiable approximation or choose another layer")
        inp = args[i]
        g = inp if approx is None else approx(inp)
        if not isinstance(g, torch.Tensor) or g.shape != out.shape:
            what = "the identity" if approx is None else "its approximation"
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise InputError("layers", f"BPDA layer {name!r} maps shape {tuple(inp.shape)} to {tuple(out.shape)}, "
                                       f"but {what} gives {got}; pass layers={{{name!r}: g}} with a differentiable "
                                       "g of the output's shape")
        g = g.to(out.dtype)
        return g + (out - g).detach()
    return hook


def is_random(model: ModelUnderTest, x: torch.Tensor, repeats: int = 2) -> bool:
    """True when `repeats` forward passes on the same inputs differ (beyond 1e-5 of the logit scale,
    the tolerance of ModelUnderTest.inspect): the model needs EoT (PGD(eot_samples=k)), and its
    single-pass gradients and verdicts are draws of a random variable."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise InputError("repeats", f"must be an integer >= 2, got {repeats!r}")
    if not isinstance(model, ModelUnderTest):
        raise InputError("model", "expected a robustlab ModelUnderTest")
    x = model.to_device(torch.as_tensor(x))
    with torch.no_grad(), model.evaluating():
        first = model(x)
        scale = float(first.abs().max().clamp_min(1e-12))
        for _ in range(repeats - 1):
            if float((model(x) - first).abs().max()) > 1e-5 * scale:
                return True
    return False
