"""Sanity check for saliency maps: cascading model-parameter randomisation (Adebayo et al. 2018).

A map that explains the model must change when the model's learned weights are destroyed. We copy
the module (the user's model is never touched), re-initialise its parameterised layers one after
the other from the top (logits) down, cumulatively, recompute each method's maps after every step,
and compare them with the maps of the trained model:

- `spearman`: rank correlation of |maps| restricted to the input's informative region (features
  where the input differs from the box's lower corner, e.g. the strokes of a digit), so the large
  constant background, where IG and gradient x input are zero for every model, cannot make two
  maps look alike; samples with fewer than 2 informative features are compared on all features;
- `ssim`: structural similarity of the |maps| (see `similarity.ssim`), reported as in the paper.

Verdict per method, from the fully randomised model: "does not reflect the model" when the median
Spearman similarity stays above `threshold`, "reflects the model" otherwise ("undetermined" when it
cannot be computed, e.g. constant maps).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustlab import seeding
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest

from .saliency import (METHODS, check_model, check_seed, positive_int, attribute, check_inputs, check_labels,
                       check_method, check_sample_ids)
from .saliency import method_options as _validated_options
from .similarity import spearman, ssim

Tensor = torch.Tensor
MapFunction = Callable[[ModelUnderTest, Tensor, Tensor], Tensor]

DEFAULT_METHODS = ("integrated_gradients", "saliency", "smoothgrad", "gradient_shap", "deeplift")
DEFAULT_THRESHOLD = 0.5
REFLECTS, DOES_NOT_REFLECT, UNDETERMINED = "reflects the model", "does not reflect the model", "undetermined"
_STREAM_REINIT = 7201


def randomisation_order(module: nn.Module) -> list[str]:
    """Names of the modules holding parameters of their own, from the output back to the input
    (reverse registration order, which is the forward order for Sequential-style models)."""
    names = [name for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def reinitialise(module: nn.Module, seed: int) -> None:
    """Fresh random parameters for one module, seeded: its own `reset_parameters` when it has one
    (under a seeded fork of torch's RNG), else a normal draw with each tensor's original std."""
    device = next(module.parameters(recurse=False)).device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            return
        for p in module.parameters(recurse=False):
            scale = float(p.detach().double().std()) if p.numel() > 1 else 1.0
            p.copy_(torch.randn(p.shape, dtype=p.dtype, device=p.device) * (scale if math.isfinite(scale) and scale > 0 else 1.0))


def informative_region(model: ModelUnderTest, x: Tensor) -> Tensor:
    """Bool mask: features where the input is away from the box's lower corner (per sample); rows
    with fewer than 2 such features are all True."""
    low, high = model.bounds.tensors(x)
    mask = (x - low).abs() > 1e-6 * (high - low)
    few = mask.reshape(len(x), -1).sum(dim=1) < 2
    mask[few] = True
    return mask


def _method_list(methods: object) -> list[tuple[str, str | MapFunction]]:
    if isinstance(methods, (str, bytes)) or callable(methods):
        methods = [methods]
    if not isinstance(methods, Sequence) or not methods:
        raise InputError("methods", f"expected a non-empty list of method names ({', '.join(METHODS)}) or callables, got {methods!r}")
    out: list[tuple[str, str | MapFunction]] = []
    for m in methods:
        if callable(m):
            out.append((getattr(m, "__name__", type(m).__name__), m))
        else:
            try:
                name = check_method(m)
            except InputError as error:
                raise InputError("methods", error.problem) from None
            out.append((name, name))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise InputError("methods", f"names must be distinct, got {names}")
    return out


def _maps(model: ModelUnderTest, x: Tensor, target: Tensor, method: str | MapFunction, *, seed: int, ids: Tensor,
          batch_size: int | None, options: dict) -> Tensor:
    if isinstance(method, str):
        return attribute(model, x, target, method=method, seed=seed, sample_ids=ids, batch_size=batch_size,
                         **options.get(method, {})).maps
    with model.evaluating():
        maps = torch.as_tensor(method(model, x, target)).detach().float().cpu()
    if maps.shape != x.shape:
        raise InputError("methods", f"{getattr(method, '__name__', method)!r} returned maps of shape "
                                    f"{tuple(maps.shape)}, expected the inputs' shape {tuple(x.shape)}")
    return maps


def _copy(model: ModelUnderTest, x: Tensor) -> ModelUnderTest:
    if not isinstance(model.module, nn.Module):
        raise InputError("model", "cascading randomisation needs a torch.nn.Module (its layers are re-initialised)")
    try:
        with torch.no_grad():  # a ScriptModule's deepcopy otherwise clones parameters into non-leaf tensors
            module = copy.deepcopy(model.module)
    except Exception as error:  # noqa: BLE001 - any failure to copy means we cannot proceed safely
        raise InputError("model", f"cannot be copied for randomisation ({type(error).__name__}: {error})") from None
    clone = ModelUnderTest(module, bounds=model.bounds, mean=model.mean, std=model.std, name=f"{model.name} (randomised)",
                           output=model.output)
    clone.inspect(x)
    return clone


def cascading_randomization(model: ModelUnderTest, x: Tensor, target: Tensor, *,
                            methods: Sequence[str | MapFunction] = DEFAULT_METHODS, seed: int = 0,
                            threshold: float = DEFAULT_THRESHOLD, sample_ids: Tensor | None = None,
                            batch_size: int | None = None, region: str | Tensor = "input",
                            method_options: dict[str, dict] | None = None) -> pd.DataFrame:
    """Adebayo et al.'s cascading randomisation; one row per (method, step).

    methods: names from `saliency.METHODS` or callables `fn(model, x, target) -> maps` (e.g. an edge
    detector, which ignores the model: it must come out "does not reflect the model").
    region: "input" (the informative region, see `informative_region`), "all", or a bool mask shaped
    like x. method_options: per-method options for `attribute`, e.g. {"integrated_gradients":
    {"n_steps": 32}}. Every stochastic method draws the same noise at every step (same seed), so only
    the model changes.

    Columns: method, step (0 = trained model, k = top k layers randomised), layer (the layer
    re-initialised at this step, "" at step 0), spearman_median, spearman_mean, ssim_median,
    ssim_mean, n, verdict (per method; also in `frame.attrs["verdicts"]`).
    """
    model = check_model(model)
    listed = _method_list(methods)
    seed = check_seed(seed)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold < 1.0:
        raise InputError("threshold", f"must be a similarity in [-1, 1), got {threshold!r}")
    if batch_size is not None:
        batch_size = positive_int("batch_size", batch_size)
    options = dict(method_options or {})
    for name, opts in options.items():
        _validated_options(check_method(name), opts)  # validates names before any work
    x = check_inputs(model, x, "x")
    target = check_labels("target", target, len(x), model.num_classes)
    ids = check_sample_ids(sample_ids, len(x))
    if isinstance(region, str):
        if region not in ("input", "all"):
            raise InputError("region", f"expected 'input', 'all' or a bool mask, got {region!r}")
        mask = informative_region(model, x) if region == "input" else None
    else:
        mask = torch.as_tensor(region).to(torch.bool)
        if mask.shape != x.shape:
            raise InputError("region", f"a mask must have the inputs' shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    mask = None if mask is None else mask.cpu()
    layers = randomisation_order(model.module) if isinstance(model.module, nn.Module) else []
    if not layers:
        raise InputError("model", "has no parameterised layers to randomise")

    def run(m: ModelUnderTest) -> dict[str, Tensor]:
        return {name: _maps(m, x, target, fn, seed=seed, ids=ids, batch_size=batch_size, options=options)
                for name, fn in listed}

    original = run(model)
    clone = _copy(model, x)
    assert isinstance(clone.module, nn.Module)  # _copy wraps a deep copy of the nn.Module
    modules = dict(clone.module.named_modules())
    rows: list[dict] = []

    def record(step: int, layer: str, maps: dict[str, Tensor]) -> None:
        for name, _ in listed:
            rho = spearman(original[name].abs(), maps[name].abs(), mask=mask).numpy()
            sim = ssim(original[name], maps[name]).numpy() if x.dim() >= 3 else np.full(len(x), math.nan)
            rows.append({"method": name, "step": step, "layer": layer,
                         "spearman_median": _stat(rho, np.nanmedian), "spearman_mean": _stat(rho, np.nanmean),
                         "ssim_median": _stat(sim, np.nanmedian), "ssim_mean": _stat(sim, np.nanmean), "n": len(x)})

    record(0, "", original)
    for step, layer in enumerate(layers, start=1):
        reinitialise(modules[layer], seeding.stream_key(seed, _STREAM_REINIT + step))
        record(step, layer, run(clone))
    frame = pd.DataFrame(rows)
    last = frame[frame["step"] == len(layers)].set_index("method")["spearman_median"]
    verdicts = {name: (UNDETERMINED if not math.isfinite(last[name]) else
                       DOES_NOT_REFLECT if last[name] > threshold else REFLECTS) for name, _ in listed}
    frame["verdict"] = frame["method"].map(verdicts)
    frame.attrs["verdicts"] = verdicts
    frame.attrs["threshold"] = float(threshold)
    frame.attrs["layers"] = layers
    return frame


def _stat(values: np.ndarray, fn: Callable) -> float:
    return float(fn(values)) if np.isfinite(values).any() else math.nan
