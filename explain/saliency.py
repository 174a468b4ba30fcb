"""Saliency maps with captum, and how much an attack shifts them.

`attribute` computes one method's maps (Integrated Gradients by default) for a batch, on the model's
device, in memory-bounded batches (`robustlab.batching.BatchRunner`, sized by the number of input
values a method expands each sample into: IG's steps, SmoothGrad's noisy copies...). captum always
sees the `ModelUnderTest` itself as the forward function, so normalisation stays inside the model
and attributions are in the user's input space.

Baselines: Integrated Gradients, DeepLift and Occlusion use the lower corner of the input box
(`model.bounds.low`: zeros for digits) unless `baselines=` is given. GradientShap's default baseline
distribution is 16 inputs drawn uniformly in the box (seeded); pass real samples as `baselines=`
for a data-driven reference.

Completeness: IG and DeepLift promise sum(maps) == F_t(x) - F_t(baseline). We measure it ourselves
(float64 forward passes, independently of captum's convergence delta, which is kept too) as the
relative error |sum(maps) - (F_t(x) - F_t(b))| / |F_t(x) - F_t(b)| (denominator floored at 1e-6)
and flag the method when more than 10% of the samples exceed `completeness_tol` (default 1e-2): its
maps do not add up to the model's output and should not be trusted (DeepLift's rescale rule through
MaxPool does this on the digits CNN; IG with too few steps does too).

Randomness: SmoothGrad's noise and GradientShap's draws come from captum's global-RNG sampling, run
inside a fork of torch's and numpy's RNGs seeded from (seed, the batch's sample ids) and restored
afterwards: identical numbers for the same seed, inputs and batch size (they may change with the
batch size). The perturbations of `sensitivity_max` and `infidelity` are seeded per sample
(robustlab.seeding), so those do not depend on the batch size.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustlab import seeding
from robustlab.batching import BatchRunner
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest

from .similarity import _k_of, spearman, topk_intersection

Tensor = torch.Tensor

METHODS = ("integrated_gradients", "saliency", "smoothgrad", "gradient_shap", "occlusion", "deeplift")
DELTA_METHODS = ("integrated_gradients", "deeplift", "gradient_shap")
COMPLETE_METHODS = ("integrated_gradients", "deeplift")  # completeness is exact in theory
COMPLETENESS_TOL = 1e-2
COMPLETENESS_SHARE = 0.1  # flag when more than this share of samples misses the tolerance
GSHAP_REFERENCES = 16

# seeding streams (robustlab.seeding): what the random numbers are for
_STREAM_SENSITIVITY = 7101
_STREAM_INFIDELITY = 7102
_STREAM_NOISE = 7103
_STREAM_GSHAP_BASELINES = 7104

_OPTIONS: dict[str, dict[str, object]] = {
    "integrated_gradients": {"n_steps": 50, "integration": "gausslegendre", "baselines": None,
                             "completeness_tol": COMPLETENESS_TOL},
    "saliency": {"abs": True},
    "smoothgrad": {"nt_samples": 20, "noise_level": 0.15, "abs": True},
    "gradient_shap": {"n_samples": 20, "stdevs": 0.0, "baselines": None},
    "occlusion": {"sliding_window_shapes": None, "strides": None, "baselines": None, "perturbations_per_eval": 16},
    "deeplift": {"baselines": None, "completeness_tol": COMPLETENESS_TOL},
}


@dataclass
class Attribution:
    """One method's maps for a batch (CPU tensors).

    delta: captum's per-sample convergence delta (IG, DeepLift; GradientShap: mean over its draws).
    completeness_error: per-sample relative completeness error (IG, DeepLift), else None.
    flagged: why these maps should not be trusted on this model, else None.
    """

    method: str
    maps: Tensor
    delta: Tensor | None
    completeness_error: Tensor | None
    flagged: str | None
    options: dict = field(default_factory=dict)


@dataclass
class SaliencyReport:
    """Clean vs adversarial attributions. See `saliency_report`."""

    method: str
    per_sample: pd.DataFrame
    summary: pd.DataFrame
    maps: dict[str, np.ndarray]
    flags: list[str]
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ validation
def check_model(model: object) -> ModelUnderTest:
    if not isinstance(model, ModelUnderTest):
        raise InputError("model", f"expected a robustlab ModelUnderTest, got {type(model).__name__}; "
                                  "wrap it with robustlab.wrap(module, bounds=...)")
    return model


def check_method(method: object) -> str:
    if not isinstance(method, str) or method.strip().lower() not in METHODS:
        raise InputError("method", f"unknown attribution method {method!r}; expected one of {', '.join(METHODS)}")
    return method.strip().lower()


def check_inputs(model: ModelUnderTest, x: object, name: str = "x") -> Tensor:
    """Floating point batch, finite, inside the model's bounds, in the model's dtype."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise InputError(name, f"expected a tensor of inputs, got {type(x).__name__}")
    x = x.detach()
    if not x.is_floating_point():
        raise InputError(name, f"must be floating point inputs in the bounds {model.bounds.describe()}, got dtype {x.dtype}")
    if x.dim() < 2 or len(x) == 0:
        raise InputError(name, f"must be a non-empty batch (samples first, at least 2 dimensions), got shape {tuple(x.shape)}")
    finite = torch.isfinite(x).reshape(len(x), -1).all(dim=1)
    if not finite.all():
        rows = torch.nonzero(~finite).reshape(-1)
        raise InputError(name, f"contains NaN or infinite values (in {len(rows)} samples, e.g. index {int(rows[0])})")
    x = x.to(model.dtype)
    low, high = model.bounds.tensors(x)
    outside = ((x < low) | (x > high)).reshape(len(x), -1).any(dim=1)
    if outside.any():
        rows = torch.nonzero(outside).reshape(-1)
        raise InputError(name, f"{len(rows)} samples lie outside the bounds {model.bounds.describe()} "
                               f"(e.g. index {int(rows[0])})")
    if model.inspection is None:
        model.inspect(x)
    elif tuple(x.shape[1:]) != model.inspection.input_shape:
        raise InputError(name, f"inputs have shape {tuple(x.shape[1:])} but the model was inspected with "
                               f"{model.inspection.input_shape}")
    return x


def check_labels(name: str, labels: object, n: int, num_classes: int) -> Tensor:
    t = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, Tensor) else labels.detach()
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise InputError(name, f"must be integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(-1) if t.dim() <= 1 else t
    if t.dim() != 1 or len(t) != n:
        raise InputError(name, f"must hold one class index per sample (shape ({n},)), got shape {tuple(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= num_classes:
        bad = t[(t < 0) | (t >= num_classes)]
        raise InputError(name, f"values must be in [0, {num_classes - 1}] for a {num_classes}-class model; found {bad[:5].tolist()}")
    return t.cpu()


def check_sample_ids(sample_ids: object, n: int) -> Tensor:
    if sample_ids is None:
        return torch.arange(n)
    t = torch.as_tensor(np.asarray(sample_ids)) if not isinstance(sample_ids, Tensor) else sample_ids.detach()
    if t.is_floating_point() or t.dtype == torch.bool:
        raise InputError("sample_ids", f"must be integers, got dtype {t.dtype}")
    t = t.long().reshape(-1).cpu()
    if len(t) != n:
        raise InputError("sample_ids", f"has {len(t)} entries but there are {n} inputs")
    return t


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed", f"must be a non-negative integer, got {seed!r}")
    return int(seed)


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(name, f"must be a positive integer, got {value!r}")
    return int(value)


def method_options(method: str, options: Mapping[str, object]) -> dict:
    """The method's defaults updated with the user's options; unknown names are an error."""
    known = _OPTIONS[method]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(unknown[0], f"is not an option of {method}; its options are: {', '.join(known) or 'none'}")
    opts = {**known, **options}
    for name in ("n_steps", "nt_samples", "n_samples", "perturbations_per_eval"):
        if name in opts:
            opts[name] = positive_int(name, opts[name])
    if "integration" in opts and opts["integration"] not in ("gausslegendre", "riemann_trapezoid", "riemann_left",
                                                             "riemann_right", "riemann_middle"):
        raise InputError("integration", f"unknown integration rule {opts['integration']!r}")
    for name in ("noise_level", "stdevs", "completeness_tol"):
        if name in opts:
            v = opts[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(name, f"must be a finite number >= 0, got {v!r}")
            opts[name] = float(v)
    return opts


def _expansion(method: str, opts: dict) -> int:
    """How many model inputs one sample becomes inside captum (sizes the memory-bounded batches)."""
    return {"integrated_gradients": opts.get("n_steps", 1), "smoothgrad": opts.get("nt_samples", 1),
            "gradient_shap": opts.get("n_samples", 1), "occlusion": opts.get("perturbations_per_eval", 1),
            "deeplift": 2}.get(method, 1)


# ------------------------------------------------------------------------------------ baselines
def _baseline(model: ModelUnderTest, value: object, like: Tensor) -> Tensor:
    """A baseline batch shaped like `like`: the box's lower corner by default."""
    if value is None:
        low, _ = model.bounds.tensors(like)
        return torch.broadcast_to(low, like.shape).contiguous()
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if not torch.isfinite(t).all():
        raise InputError("baselines", "must be finite")
    try:
        return torch.broadcast_to(t, like.shape).contiguous()
    except RuntimeError:
        raise InputError("baselines", f"shape {tuple(t.shape)} does not broadcast to inputs {tuple(like.shape)}") from None


def _gshap_references(model: ModelUnderTest, value: object, like: Tensor, seed: int) -> Tensor:
    shape = tuple(like.shape[1:])
    if value is None:
        u = seeding.uniform(seed, _STREAM_GSHAP_BASELINES, torch.arange(GSHAP_REFERENCES), shape,
                            device=like.device, dtype=like.dtype)
        low, high = model.bounds.tensors(like)
        return low + u * (high - low)
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.shape == shape:
        t = t.unsqueeze(0)
    if tuple(t.shape[1:]) != shape or len(t) == 0 or not torch.isfinite(t).all():
        raise InputError("baselines", f"gradient_shap needs finite reference inputs shaped (R, {', '.join(map(str, shape))}), "
                                      f"got {tuple(t.shape)}")
    return t


def _default_window(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Occlusion window: all channels x about 1/8 of each spatial side; stride half the window."""
    if len(shape) == 1:
        side = max(1, round(shape[0] / 8))
        return (side,), (max(1, side // 2),)
    spatial = tuple(max(1, round(s / 8)) for s in shape[1:])
    return (shape[0], *spatial), (shape[0], *(max(1, s // 2) for s in spatial))


# ------------------------------------------------------------------------------------ captum calls
class _AsModule(nn.Module):
    """An nn.Module whose forward is the ModelUnderTest (for DeepLift, which hooks modules)."""

    def __init__(self, model: ModelUnderTest) -> None:
        super().__init__()
        if not isinstance(model.module, nn.Module):
            raise InputError("method", "deeplift needs a torch.nn.Module model (it hooks the model's layers)")
        self.inner = model.module
        self._model = model

    def forward(self, z: Tensor) -> Tensor:
        return self._model(z)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence captum's notes that are about our calling convention, not the user's model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not already require gradients.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*", category=UserWarning)
        yield


@contextlib.contextmanager
def seeded_global_rng(seed: int, stream: int, ids: Tensor, device: torch.device) -> Iterator[None]:
    """torch (CPU and this CUDA device) and numpy global RNGs seeded for the duration, then restored."""
    key = seeding.stream_key(seed, stream * 1_000_003 + int(ids[0]) * 7919 + len(ids))
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(key)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(key)
        np.random.seed(key)
        try:
            yield
        finally:
            np.random.set_state(state)


def _slice_maps(model: ModelUnderTest, x: Tensor, target: Tensor, ids: Tensor, method: str, opts: dict,
                seed: int) -> tuple[Tensor, Tensor | None]:
    """One batch through captum on the model's device: (maps, delta or None)."""
    from captum.attr import (DeepLift, GradientShap, IntegratedGradients, NoiseTunnel, Occlusion,
                             Saliency)

    x = model.to_device(x).detach().clone()
    target = target.to(model.device)
    inputs = x.clone().requires_grad_(method != "occlusion")
    delta = None
    if method == "integrated_gradients":
        maps, delta = IntegratedGradients(model).attribute(
            inputs, baselines=_baseline(model, opts["baselines"], x), target=target, n_steps=opts["n_steps"],
            method=opts["integration"], return_convergence_delta=True)
    elif method == "saliency":
        maps = Saliency(model).attribute(inputs, target=target, abs=opts["abs"])
    elif method == "smoothgrad":
        stdev = float(opts["noise_level"]) * model.bounds.width()
        with seeded_global_rng(seed, _STREAM_NOISE, ids, model.device):
            maps = NoiseTunnel(Saliency(model)).attribute(inputs, nt_type="smoothgrad", nt_samples=opts["nt_samples"],
                                                          stdevs=stdev, target=target, abs=opts["abs"])
    elif method == "gradient_shap":
        refs = _gshap_references(model, opts["baselines"], x, seed)
        with seeded_global_rng(seed, _STREAM_NOISE, ids, model.device):
            maps, delta = GradientShap(model).attribute(inputs, baselines=refs, n_samples=opts["n_samples"],
                                                        stdevs=opts["stdevs"], target=target,
                                                        return_convergence_delta=True)
        delta = delta.reshape(len(x), -1).mean(dim=1)  # captum: one delta per draw, sample-major
    elif method == "occlusion":
        window, default_stride = _default_window(tuple(x.shape[1:]))
        window = tuple(opts["sliding_window_shapes"] or window)
        stride = opts["strides"] if opts["strides"] is not None else (
            default_stride if opts["sliding_window_shapes"] is None else 1)
        with torch.no_grad():
            maps = Occlusion(model).attribute(inputs, sliding_window_shapes=window, strides=stride,
                                              baselines=_baseline(model, opts["baselines"], x), target=target,
                                              perturbations_per_eval=opts["perturbations_per_eval"])
    elif method == "deeplift":
        maps, delta = DeepLift(_AsModule(model)).attribute(inputs, baselines=_baseline(model, opts["baselines"], x),
                                                           target=target, return_convergence_delta=True)
    else:  # pragma: no cover - check_method guards this
        raise InputError("method", f"unknown method {method!r}")
    maps = maps.detach()
    return maps, (None if delta is None else delta.detach().reshape(-1))


def _completeness(model: ModelUnderTest, x: Tensor, target: Tensor, maps: Tensor, baseline: Tensor) -> Tensor:
    """|sum(maps) - (F_t(x) - F_t(b))| / |F_t(x) - F_t(b)| per sample (float64; denominator >= 1e-6)."""
    with torch.no_grad():
        t = target.to(model.device).reshape(-1, 1)
        fx = model(model.to_device(x)).gather(1, t).double().reshape(-1)
        fb = model(baseline).gather(1, t).double().reshape(-1)
    gap = fx - fb
    total = maps.double().reshape(len(maps), -1).sum(dim=1).to(gap.device)
    return ((total - gap).abs() / gap.abs().clamp_min(1e-6)).cpu()


def completeness_flag(method: str, errors: Tensor | None, tol: float) -> str | None:
    """A message when more than 10% of the samples miss completeness by more than tol."""
    if errors is None or not len(errors):
        return None
    failing = float((errors > tol).double().mean())
    if failing <= COMPLETENESS_SHARE:
        return None
    why = ("raise n_steps" if method == "integrated_gradients"
           else "its propagation rules do not conserve the output through some layer of this model (e.g. MaxPool)")
    return (f"{method}: completeness fails on this model for {failing:.0%} of samples "
            f"(relative error > {tol:g}; median {float(errors.median()):.3g}, max {float(errors.max()):.3g}): "
            f"the maps do not add up to the model's output change; {why}")


def _run(model: ModelUnderTest, x: Tensor, target: Tensor, ids: Tensor, method: str, opts: dict, seed: int,
         batch_size: int | None) -> Attribution:
    """attribute() after validation: batched, under eval mode with frozen parameters."""
    runner = BatchRunner(batch_size, model.device, x[0].numel() * _expansion(method, opts))

    def one(a: int, b: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        maps, delta = _slice_maps(model, x[a:b], target[a:b], ids[a:b], method, opts, seed)
        error = None
        if method in COMPLETE_METHODS:
            xb = model.to_device(x[a:b])
            error = _completeness(model, xb, target[a:b], maps, _baseline(model, opts["baselines"], xb))
        return maps.float().cpu(), (None if delta is None else delta.float().cpu()), error

    with model.evaluating(), _quiet():
        parts = runner.run(len(x), one)
    maps = torch.cat([p[0] for p in parts])
    # every batch ran the same method: all of them have deltas (errors), or none has
    delta = torch.cat([cast(Tensor, p[1]) for p in parts]) if parts[0][1] is not None else None
    error = torch.cat([cast(Tensor, p[2]) for p in parts]) if parts[0][2] is not None else None
    flagged = completeness_flag(method, error, opts.get("completeness_tol", COMPLETENESS_TOL))
    if not torch.isfinite(maps).all():
        flagged = (flagged + "; " if flagged else "") + f"{method}: maps contain NaN or infinite values"
    return Attribution(method=method, maps=maps, delta=delta, completeness_error=error, flagged=flagged,
                       options={k: v for k, v in opts.items() if not isinstance(v, Tensor)})


def _checked_call(model, method, options: Mapping[str, object], seed, batch_size):
    """The arguments every entry point shares, validated before any work."""
    model = check_model(model)
    method = check_method(method)
    opts = method_options(method, options)
    seed = check_seed(seed)
    if batch_size is not None:
        batch_size = positive_int("batch_size", batch_size)
    return model, method, opts, seed, batch_size


def attribute(model: ModelUnderTest, x: Tensor, target: Tensor, *, method: str = "integrated_gradients",
              seed: int = 0, batch_size: int | None = None, sample_ids: Tensor | None = None,
              **options) -> Attribution:
    """Attribution maps of `method` explaining logit `target[i]` of input x[i] (CPU, float32, shape of x).

    options (keyword only, per method; unknown names are an error):
      integrated_gradients: n_steps=50, integration="gausslegendre", baselines=None (box low),
          completeness_tol=1e-2
      saliency: abs=True; smoothgrad: nt_samples=20, noise_level=0.15 (std as a fraction of the box
          width), abs=True
      gradient_shap: n_samples=20, stdevs=0.0, baselines=None (16 seeded uniform inputs in the box)
      occlusion: sliding_window_shapes=None (all channels x ~1/8 of each side), strides=None,
          baselines=None, perturbations_per_eval=16
      deeplift: baselines=None, completeness_tol=1e-2
    """
    model, method, opts, seed, batch_size = _checked_call(model, method, options, seed, batch_size)
    x = check_inputs(model, x, "x")
    target = check_labels("target", target, len(x), model.num_classes)
    ids = check_sample_ids(sample_ids, len(x))
    return _run(model, x, target, ids, method, opts, seed, batch_size)


# ------------------------------------------------------------------------------------ robustness metrics
def _explainer(model: ModelUnderTest, method: str, opts: dict, seed: int, ids: Tensor,
               maps: Tensor) -> Callable[..., Tensor | tuple[Tensor, ...]]:
    """The explanation function sensitivity_max calls. captum calls it once on the unperturbed
    inputs (as a 1-tuple, expecting a tuple back): those maps are already computed, so they are
    returned as they are; then on the perturbed copies (a tensor)."""
    def explain(inputs: Tensor | tuple[Tensor, ...], target: Tensor) -> Tensor | tuple[Tensor, ...]:
        packed = isinstance(inputs, tuple)
        if packed and inputs[0].shape == maps.shape:
            return (maps.to(device=inputs[0].device, dtype=inputs[0].dtype),)
        with torch.enable_grad():
            fresh = _slice_maps(model, inputs[0] if isinstance(inputs, tuple) else inputs, target, ids, method, opts,
                                seed)[0]
        return (fresh,) if packed else fresh
    return explain


def _repeat_ids(ids: Tensor, n: int) -> Tensor:
    """Distinct virtual ids for the n perturbed copies of each sample (captum's repeat_interleave order)."""
    return ids.repeat_interleave(n) * n + torch.arange(n).repeat(len(ids))


def explanation_robustness(model: ModelUnderTest, x: Tensor, target: Tensor, maps: Tensor, ids: Tensor, method: str,
                           opts: dict, seed: int, *, radius: float, noise: float, n_sensitivity: int,
                           n_infidelity: int, batch_size: int | None) -> tuple[Tensor, Tensor]:
    """captum's sensitivity_max (L-inf ball of `radius`, box-clipped) and infidelity (Gaussian noise of
    std `noise` subtracted, box-clipped; normalize=True, i.e. with the optimal scaling of the maps), per
    sample. Perturbations are seeded per sample, so neither depends on the batch size."""
    from captum.metrics import infidelity, sensitivity_max

    runner = BatchRunner(batch_size, model.device, x[0].numel() * _expansion(method, opts) * n_sensitivity)
    shape = tuple(x.shape[1:])

    def one(a: int, b: int) -> tuple[Tensor, Tensor]:
        xb = model.to_device(x[a:b])
        tb = target[a:b].to(model.device)
        idb = ids[a:b]
        low, high = model.bounds.tensors(xb)

        def jitter(inputs: Tensor) -> Tensor:
            u = seeding.uniform(seed, _STREAM_SENSITIVITY, _repeat_ids(idb, n_sensitivity), shape,
                                device=inputs.device, dtype=inputs.dtype)
            return torch.minimum(torch.maximum(inputs + (2 * u - 1) * radius, low), high)

        def remove(inputs: Tensor) -> tuple[Tensor, Tensor]:
            z = seeding.normal(seed, _STREAM_INFIDELITY, _repeat_ids(idb, n_infidelity), shape,
                               device=inputs.device, dtype=inputs.dtype)
            perturbed = torch.minimum(torch.maximum(inputs - noise * z, low), high)
            return inputs - perturbed, perturbed

        mb = maps[a:b].to(device=model.device, dtype=xb.dtype)
        sens = sensitivity_max(_explainer(model, method, opts, seed, idb, mb), xb, perturb_func=jitter,
                               n_perturb_samples=n_sensitivity, target=tb)
        with torch.no_grad():
            infid = infidelity(model, remove, xb, mb, target=tb,
                               n_perturb_samples=n_infidelity, normalize=True)
        return sens.double().cpu().reshape(-1), infid.double().cpu().reshape(-1)

    with model.evaluating(), _quiet():
        parts = runner.run(len(x), one)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ------------------------------------------------------------------------------------ the report
def _check_adversarial(model: ModelUnderTest, adversarial: object, x_clean: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    if not isinstance(adversarial, Mapping):
        raise InputError("adversarial", f"expected a dict key -> (x_adv, adv_pred), got {type(adversarial).__name__}")
    checked: dict[str, tuple[Tensor, Tensor]] = {}
    for key, value in adversarial.items():
        name = f"adversarial[{key!r}]"
        if not isinstance(key, str) or not key or key == "clean":
            raise InputError("adversarial", f"keys must be non-empty strings other than 'clean', got {key!r}")
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise InputError(name, "must be a pair (x_adv, adv_pred)")
        x_adv = check_inputs(model, value[0], name)
        if x_adv.shape != x_clean.shape:
            raise InputError(name, f"x_adv has shape {tuple(x_adv.shape)} but x_clean has shape {tuple(x_clean.shape)}; "
                                   "adversarial inputs must be for the same samples, in the same order")
        pred = check_labels(f"{name} adv_pred", value[1], len(x_clean), model.num_classes)
        checked[key] = (x_adv, pred)
    return checked


def _check_fraction(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise InputError(name, f"must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def saliency_report(model: ModelUnderTest, x_clean: Tensor, y: Tensor, adversarial: dict[str, tuple[Tensor, Tensor]],
                    *, method: str = "integrated_gradients", sample_ids: Tensor | None = None, seed: int = 0,
                    top_k: float | int = 0.1, batch_size: int | None = None, robustness_metrics: bool = True,
                    robustness_on: str = "clean", sensitivity_radius: float = 0.02, infidelity_noise: float = 0.1,
                    n_sensitivity: int = 5, n_infidelity: int = 20, n_maps: int = 8,
                    **options) -> SaliencyReport:
    """Attributions on clean inputs and on each attack's adversarial inputs, and how far they moved.

    Which class is explained: every map, clean or adversarial, explains the TRUE label y (the logit
    of class y[i]), so the shift compares the evidence for the same class before and after the
    attack. The adversarial prediction is recorded alongside (column `pred`).

    adversarial: key (e.g. "pgd|0.1") -> (x_adv, adv_pred) for the same samples, in the same order.

    Shift per sample (rows with key != "clean"): `spearman`, the rank correlation of |clean map| and
    |adversarial map| over all features (ties: average ranks), and `topk_intersection`, the share of
    the top_k (fraction or count) features by |attribution| the two maps share. Both are 1 for an
    unchanged input and fall as the explanation moves.

    per_sample: one row per (sample, key) with columns sample, key, method, label, pred, fooled,
    spearman, topk_intersection, ig_delta (the method's convergence delta: IG, DeepLift,
    GradientShap), completeness_error (IG, DeepLift), sensitivity_max, infidelity (captum.metrics,
    on the keys chosen by `robustness_on`: "clean" (default, the cheap choice) or "all"); NaN where
    not computed. summary: one row per key with medians/means, the share of samples failing
    completeness and the method's flag for that key. maps: "clean" and each key -> the first n_maps
    maps (float32). flags: every flag raised, prefixed by its key.

    Robustness of the explanation (captum.metrics, `robustness_metrics=True`): sensitivity_max over
    `n_sensitivity` uniform perturbations in the L-inf ball of radius `sensitivity_radius` x the box
    width (clipped to the box; it recomputes the method n_sensitivity times, the main cost), and
    infidelity (normalize=True) over `n_infidelity` Gaussian perturbations of std `infidelity_noise`
    x the box width, subtracted from the input and clipped to the box. Both seeded per sample.
    **options: the method's options (see `attribute`), e.g. n_steps=100.
    """
    started = time.perf_counter()
    model, method, opts, seed, batch_size = _checked_call(model, method, options, seed, batch_size)
    if robustness_on not in ("clean", "all"):
        raise InputError("robustness_on", f"expected 'clean' or 'all', got {robustness_on!r}")
    radius = _check_fraction("sensitivity_radius", sensitivity_radius) * model.bounds.width()
    noise = _check_fraction("infidelity_noise", infidelity_noise) * model.bounds.width()
    n_sensitivity = positive_int("n_sensitivity", n_sensitivity)
    n_infidelity = positive_int("n_infidelity", n_infidelity)
    if isinstance(n_maps, bool) or not isinstance(n_maps, (int, np.integer)) or n_maps < 0:
        raise InputError("n_maps", f"must be an integer >= 0, got {n_maps!r}")
    x_clean = check_inputs(model, x_clean, "x_clean")
    y = check_labels("y", y, len(x_clean), model.num_classes)
    ids = check_sample_ids(sample_ids, len(x_clean))
    try:
        _k_of(top_k, x_clean[0].numel())
    except InputError as error:
        raise InputError("top_k", error.problem) from None
    adversarial = _check_adversarial(model, adversarial, x_clean)

    with torch.no_grad(), model.evaluating():
        clean_pred = torch.cat(BatchRunner(batch_size, model.device, x_clean[0].numel()).run(
            len(x_clean), lambda a, b: model(model.to_device(x_clean[a:b])).argmax(dim=1).cpu()))

    sets: dict[str, tuple[Tensor, Tensor]] = {"clean": (x_clean, clean_pred), **adversarial}
    frames: list[pd.DataFrame] = []
    maps_out: dict[str, np.ndarray] = {}
    flags: list[str] = []
    summary_rows: list[dict] = []
    clean_maps: Tensor | None = None
    nan = torch.full((len(x_clean),), math.nan, dtype=torch.float64)
    for key, (x_set, pred) in sets.items():
        result = _run(model, x_set, y, ids, method, opts, seed, batch_size)
        if key == "clean":
            clean_maps = result.maps
            rho, top = nan, nan
        else:
            assert clean_maps is not None  # "clean" is the first of the sets
            rho = spearman(clean_maps.abs(), result.maps.abs())
            top = topk_intersection(clean_maps, result.maps, top_k)
        sens, infid = nan, nan
        if robustness_metrics and (key == "clean" or robustness_on == "all"):
            sens, infid = explanation_robustness(model, x_set, y, result.maps, ids, method, opts, seed, radius=radius,
                                                 noise=noise, n_sensitivity=n_sensitivity,
                                                 n_infidelity=n_infidelity, batch_size=batch_size)
        if result.flagged:
            flags.append(f"[{key}] {result.flagged}")
        frames.append(pd.DataFrame({
            "sample": ids.numpy(), "key": key, "method": method, "label": y.numpy(), "pred": pred.numpy(),
            "fooled": (pred != y).numpy(),
            "spearman": rho.numpy(), "topk_intersection": top.numpy(),
            "ig_delta": (result.delta.double() if result.delta is not None else nan).numpy(),
            "completeness_error": (result.completeness_error if result.completeness_error is not None else nan).numpy(),
            "sensitivity_max": sens.numpy(), "infidelity": infid.numpy(),
        }))
        maps_out[key] = result.maps[:n_maps].numpy().astype(np.float32)
        err = result.completeness_error
        summary_rows.append({
            "key": key, "method": method, "n": len(x_set), "fooled_share": float((pred != y).double().mean()),
            "spearman_median": _nanstat(rho, np.nanmedian), "spearman_mean": _nanstat(rho, np.nanmean),
            "topk_median": _nanstat(top, np.nanmedian), "topk_mean": _nanstat(top, np.nanmean),
            "completeness_error_median": float(err.median()) if err is not None else math.nan,
            "completeness_fail_share": float((err > opts.get("completeness_tol", COMPLETENESS_TOL)).double().mean())
            if err is not None else math.nan,
            "sensitivity_max_median": _nanstat(sens, np.nanmedian), "infidelity_median": _nanstat(infid, np.nanmedian),
            "flagged": result.flagged,
        })
    per_sample = pd.concat(frames, ignore_index=True)
    summary = pd.DataFrame(summary_rows)
    return SaliencyReport(method=method, per_sample=per_sample, summary=summary, maps=maps_out, flags=flags,
                          seconds=time.perf_counter() - started)


def _nanstat(values: Tensor, fn: Callable) -> float:
    v = values.numpy()
    if not np.isfinite(v).any():
        return math.nan
    return float(fn(v))
