"""SHAP values for a model under test, on clean and on adversarial inputs.

Three estimators, chosen by `explainer`:

- "gradient": expected gradients (Erion et al.), the estimator of shap's `GradientExplainer`:
  phi = E_{b ~ background, t ~ U(0,1)} [ (x - b) * grad f_c(b + t (x - b)) ].
  shap's PyTorch implementation loops in Python over samples and draws (about 60 ms per sample for
  two classes at its default 200 draws on the 8x8 digits CNN: 30 s for the demo's 500 inputs), so
  the default `engine="torch"` evaluates the same estimator batched in torch. The test suite checks
  it against `shap.GradientExplainer` on identical draws; `engine="shap"` calls shap itself.
  Additivity is only approximate: shap documents no tolerance for this explainer (its docstring
  says the attributions *converge* to f(x) - E f(b); shap issue #1095), the error is Monte Carlo
  error and shrinks like 1/sqrt(nsamples). `sampling="stratified"` (default) stratifies t and
  cycles through the background, an unbiased estimator of the same expectation with less variance;
  `sampling="iid"` draws like shap.
- "deep": shap's `DeepExplainer` (DeepLIFT rescale rule through module hooks). Exact additivity
  (shap checks it with an absolute tolerance of 0.01), but silently wrong on in-place activations,
  functional activations inside `forward` and modules called twice. Unsafe models are detected
  (statically, by counting calls, and by an additivity trial on 2 samples) and fall back to
  "gradient" with the reason recorded in `ShapResult.fallback`.
- "kernel": shap's `KernelExplainer` on the flattened inputs: black-box (queries only), for
  tabular models or models flagged `requires_transfer`. Additive by construction.

Only the requested classes are explained (typically the true and the predicted class), not every
output. Background and random draws are seeded per sample id, so a sample's values do not depend
on the other samples in the call.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustlab import seeding
from robustlab.batching import BatchRunner
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest

EXPLAINERS = ("auto", "gradient", "deep", "kernel")
ENGINES = ("torch", "shap")
SAMPLINGS = ("stratified", "iid")
DEFAULT_GRADIENT_SAMPLES = 64  # draws per (sample, class); shap's own default is 200
DEEP_TOLERANCE = 1e-2  # shap.explainers._deep.deep_utils._check_additivity: absolute, on the output
SHAP_STREAM = 700  # robustlab.seeding stream of the expected-gradients draws
BACKGROUND_STREAM = 701
GRADIENT_POINTS_PER_BATCH = 8192  # interpolation points per forward/backward on the CPU


@dataclass
class ShapResult:
    """SHAP values of n samples for k requested classes each (all on the CPU).

    values[i, j] has the input's shape; values[i, j].sum() + expected[i, j] ~= f(x_i)[classes[i, j]].
    """

    explainer: str  # the one actually used
    values: torch.Tensor  # (n, k, *x.shape[1:]) float32
    expected: torch.Tensor  # (n, k): mean over the background of the explained logit
    classes: torch.Tensor  # (n, k) int64
    fallback: str | None = None  # why "deep" was not used, else None
    additivity_error: torch.Tensor | None = None  # (n, k) |sum(values) + expected - f(x)|
    nsamples: int | str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- inputs
def background_from(data_x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n rows of data_x drawn without replacement, fixed by seed (kept in data order)."""
    if not isinstance(data_x, torch.Tensor) or data_x.dim() < 2:
        raise InputError("data_x", f"expected a tensor of shape (N, ...), got {_describe(data_x)}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(data_x):
        raise InputError("n", f"must be an integer in [1, {len(data_x)}], got {n!r}")
    keys = seeding.uniform(seed, BACKGROUND_STREAM, torch.arange(len(data_x)), ())
    idx = torch.sort(torch.argsort(keys)[:n]).values
    return data_x[idx].clone()


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_inputs(name: str, x: object, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0 or not x.is_floating_point():
        raise InputError(name, f"expected a non-empty float tensor of shape (N, ...), got {_describe(x)}")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise InputError(name, f"has per-sample shape {tuple(x.shape[1:])}, expected {tuple(like.shape[1:])}")
    if not bool(torch.isfinite(x).all()):
        raise InputError(name, "contains NaN or infinite values")
    return x


def _num_classes(model: ModelUnderTest, x: torch.Tensor) -> int:
    if model.inspection is None:
        model.inspect(x)
    return model.num_classes


def _check_classes(classes: object, n: int, num_classes: int, name: str = "classes") -> torch.Tensor:
    if not isinstance(classes, torch.Tensor) or classes.is_floating_point() or classes.is_complex():
        raise InputError(name, f"expected an integer tensor of shape (n,) or (n, k), got {_describe(classes)}")
    if classes.dim() == 1:
        classes = classes.unsqueeze(1)
    if classes.dim() != 2 or classes.shape[0] != n or classes.shape[1] == 0:
        raise InputError(name, f"expected shape ({n},) or ({n}, k), got {tuple(classes.shape)}")
    classes = classes.to(torch.int64).cpu()
    if bool((classes < 0).any()) or bool((classes >= num_classes).any()):
        raise InputError(name, f"class indices must be in [0, {num_classes}), got {classes.min()}..{classes.max()}")
    return classes


def is_black_box(model: ModelUnderTest) -> bool:
    """Only queries are allowed: not an nn.Module, or flagged `requires_transfer` by its loader."""
    return not isinstance(model.module, nn.Module) or bool(getattr(model.module, "requires_transfer", False))


# ---------------------------------------------------------------------------------------- adapter
class _SelectedOutputs(nn.Module):
    """The model under test (normalisation inside) returning only the logits `selected`.

    shap explains every output of the module it is given; selecting the requested classes here is
    what keeps the cost at k classes instead of all of them. The user's module is a registered
    child so DeepExplainer's hooks reach its layers.
    """

    def __init__(self, model: ModelUnderTest, selected: Sequence[int]) -> None:
        super().__init__()
        self.net = model.module
        self.model = model  # not an nn.Module: a plain attribute
        self.selected = list(selected)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.selected]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """shap calls model.zero_grad() before each gradient; leave the user's .grad alone."""

    def train(self, mode: bool = True) -> "_SelectedOutputs":
        """shap calls model.eval(); the model is already in eval mode (`evaluating()`)."""
        return self


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _restored(module: nn.Module) -> Iterator[None]:
    """Undo what shap leaves on the user's module: hooks (on error), and the `x`/`y` parameters
    DeepExplainer attaches to nested layers (its cleanup only visits top-level children)."""
    before = {}
    for m in module.modules():
        before[id(m)] = ({d: set(getattr(m, d, {})) for d in _HOOK_DICTS}, set(m._parameters), set(m.__dict__))
    try:
        yield
    finally:
        for m in module.modules():
            if id(m) not in before:
                continue
            hooks, params, attrs = before[id(m)]
            for d, keys in hooks.items():
                table = getattr(m, d, None)
                if table is not None:
                    for key in [k for k in table if k not in keys]:
                        del table[key]
            for key in [k for k in m._parameters if k not in params]:
                del m._parameters[key]
            for key in [k for k in m.__dict__ if k not in attrs and k in ("x", "y", "target_input")]:
                del m.__dict__[key]


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """shap draws from numpy's global generator; seed it and restore the caller's state after."""
    state = np.random.get_state()
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        np.random.set_state(state)


def _unique_rows(classes: torch.Tensor) -> list[list[int]]:
    """Per sample, the distinct classes in request order (duplicates are explained once)."""
    return [list(dict.fromkeys(row.tolist())) for row in classes]


def _expected_outputs(model: ModelUnderTest, background: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        mean = _logits(model, background).mean(0)
    return mean[classes]


def _logits(model: ModelUnderTest, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    runner = BatchRunner(batch_size, model.device, values_per_sample=int(np.prod(x.shape[1:])))
    with torch.no_grad():
        parts = runner.run(len(x), lambda a, b: model(model.to_device(x[a:b])).float().cpu())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------- gradient
def _draws(seed: int, sample_ids: torch.Tensor, nsamples: int, n_background: int,
           sampling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Background indices and path positions t (float64), (n, nsamples) each, fixed per sample id."""
    u = seeding.uniform(seed, SHAP_STREAM, sample_ids, (nsamples, 3), dtype=torch.float64)
    if sampling == "iid":
        index = (u[..., 0] * n_background).long().clamp_max(n_background - 1)
        return index, u[..., 1]
    # stratified: one t per stratum [k/ns, (k+1)/ns) in random order; background cycled from a random offset
    order = torch.argsort(u[..., 2], dim=1)
    t = (order.double() + u[..., 1]) / nsamples
    offset = (u[:, :1, 0] * n_background).long()
    index = (offset + torch.arange(nsamples)) % n_background
    return index, t


def shap_draws(rseed: int, nsamples: int, n_background: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws shap's PyTorch GradientExplainer makes for ONE sample with `rseed` (its loop calls
    np.random.choice then np.random.uniform per draw); for checking this engine against shap."""
    rs = np.random.RandomState(rseed)
    index, t = [], []
    for _ in range(nsamples):
        index.append(rs.choice(n_background))
        t.append(rs.uniform())
    return torch.tensor(index).reshape(1, -1), torch.tensor(t, dtype=torch.float64).reshape(1, -1)


def expected_gradients(model: ModelUnderTest, x: torch.Tensor, classes: torch.Tensor, background: torch.Tensor,
                       index: torch.Tensor, t: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """mean_s (x - b_s) * d f_c / dx at b_s + t_s (x - b_s), for given draws; (n, *x.shape[1:]).

    classes: (n,) one class per sample. Batched over samples and draws (shap loops over both).
    """
    n, ns = index.shape
    per_batch = batch_size or max(1, GRADIENT_POINTS_PER_BATCH // ns)
    out = torch.empty((n, *x.shape[1:]), dtype=torch.float32)
    view = (-1,) + (1,) * (x.dim() - 1)
    bg = model.to_device(background)
    for a in range(0, n, per_batch):
        b = min(n, a + per_batch)
        xs = model.to_device(x[a:b])
        base = bg[index[a:b].reshape(-1).to(bg.device)]  # (m*ns, ...)
        xr = xs.repeat_interleave(ns, dim=0)
        delta = xr - base
        tt = t[a:b].reshape(view).to(device=bg.device, dtype=torch.float64)
        # shap's formula and rounding (t x + (1 - t) b, each weight rounded to the input dtype): at
        # max-pool near-ties a different rounding routes the gradient elsewhere
        points = (tt.to(bg.dtype) * xr + (1 - tt).to(bg.dtype) * base).detach().requires_grad_(True)
        logits = model(points)
        cls = classes[a:b].to(logits.device).repeat_interleave(ns)
        selected = logits.gather(1, cls.reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, points)
        phi = (grad * delta).reshape(b - a, ns, *x.shape[1:]).float().mean(1)
        out[a:b] = phi.detach().cpu()
    return out


def _gradient_torch(model, x, classes, background, *, seed, sample_ids, nsamples, sampling, batch_size):
    n, k = classes.shape
    index, t = _draws(seed, sample_ids, nsamples, len(background), sampling)
    values = torch.zeros((n, k, *x.shape[1:]), dtype=torch.float32)
    for j in range(k):
        # explain column j only where its class is not an earlier column's (same draws: same values)
        fresh = torch.tensor([classes[i, j].item() not in classes[i, :j].tolist() for i in range(n)])
        idx = torch.nonzero(fresh).reshape(-1)
        if len(idx):
            values[idx, j] = expected_gradients(model, x[idx], classes[idx, j], background, index[idx], t[idx],
                                                batch_size=batch_size)
        for i in torch.nonzero(~fresh).reshape(-1).tolist():
            values[i, j] = values[i, classes[i, :j].tolist().index(classes[i, j].item())]
    return values


def _gradient_shap(model, x, classes, background, *, seed, sample_ids, nsamples, batch_size):
    """shap.GradientExplainer itself, one sample per call (rseed from the sample id)."""
    import shap

    n, k = classes.shape
    values = torch.zeros((n, k, *x.shape[1:]), dtype=torch.float32)
    explainers: dict[int, tuple[Any, _SelectedOutputs]] = {}
    bg = model.to_device(background)
    for i, row in enumerate(_unique_rows(classes)):
        if len(row) not in explainers:
            adapter = _SelectedOutputs(model, row)
            explainers[len(row)] = (shap.GradientExplainer(adapter, bg, batch_size=batch_size or nsamples), adapter)
        explainer, adapter = explainers[len(row)]
        adapter.selected = row
        rseed = seeding.stream_key(seed, int(sample_ids[i]))
        with _numpy_seed(rseed):
            phi = explainer.shap_values(model.to_device(x[i:i + 1]), nsamples=nsamples, rseed=rseed)
        phi = torch.as_tensor(np.asarray(phi), dtype=torch.float32)[0]  # (*shape, len(row))
        for j in range(k):
            values[i, j] = phi[..., row.index(int(classes[i, j]))]
    return values


# ---------------------------------------------------------------------------------------- deep
def deep_unsafe_reason(model: ModelUnderTest, x: torch.Tensor) -> str | None:
    """Why DeepExplainer would be wrong on this model (static checks and a call count), else None."""
    from shap.explainers._deep.deep_pytorch import op_handler

    module = model.module
    if not isinstance(module, nn.Module):
        return "the model is not an nn.Module"
    leaves = [(name, m) for name, m in module.named_modules() if not list(m.children())]
    for name, m in leaves:
        if getattr(m, "inplace", False):
            return f"in-place {type(m).__name__} at {name or '<root>'}"
    for name, m in leaves:
        if type(m).__name__ not in op_handler:
            return f"{type(m).__name__} at {name or '<root>'} has no DeepLIFT rule in shap"
    counts: dict[str, int] = {name: 0 for name, _ in leaves}
    handles = []
    try:
        for name, m in leaves:
            handles.append(m.register_forward_hook(lambda _m, _i, _o, name=name: counts.__setitem__(name, counts[name] + 1)))
        with torch.no_grad():
            model(model.to_device(x[:2]))
    finally:
        for h in handles:
            h.remove()
    for name, count in counts.items():
        if count > 1:
            return f"module {name or '<root>'} is called {count} times in one forward pass"
    return None


def _deep(model, x, classes, background):
    """shap.DeepExplainer, one explainer per number of distinct classes, samples grouped by class set."""
    import shap

    n, k = classes.shape
    values = torch.zeros((n, k, *x.shape[1:]), dtype=torch.float32)
    rows = _unique_rows(classes)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, chosen in enumerate(rows):
        groups.setdefault(tuple(chosen), []).append(i)
    explainers: dict[int, tuple[Any, _SelectedOutputs]] = {}
    bg = model.to_device(background)
    with _restored(model.module), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # shap warns on full backward hooks; reasons are checked above
        for row, members in groups.items():
            if len(row) not in explainers:
                adapter = _SelectedOutputs(model, row)
                explainers[len(row)] = (shap.DeepExplainer(adapter, bg), adapter)
            explainer, adapter = explainers[len(row)]
            adapter.selected = list(row)
            phi = explainer.shap_values(model.to_device(x[members]), check_additivity=False)
            phi = torch.as_tensor(np.asarray(phi), dtype=torch.float32)  # (m, *shape, len(row))
            for j in range(k):
                cols = [row.index(int(classes[i, j])) for i in members]
                for pos, (i, c) in enumerate(zip(members, cols)):
                    values[i, j] = phi[pos, ..., c]
    return values


# ---------------------------------------------------------------------------------------- kernel
def _kernel(model, x, classes, background, *, seed, sample_ids, nsamples, batch_size):
    """shap.KernelExplainer on flattened inputs; one explainer per distinct class set (its base
    value is computed at construction), one seeded call per sample."""
    import shap

    n, k = classes.shape
    shape = tuple(x.shape[1:])
    values = torch.zeros((n, k, *shape), dtype=torch.float32)
    bg = background.reshape(len(background), -1).double().cpu().numpy()

    def predict(selected: list[int]) -> Callable[[np.ndarray], np.ndarray]:
        def f(z: np.ndarray) -> np.ndarray:
            inputs = torch.as_tensor(np.asarray(z), dtype=torch.float32).reshape(-1, *shape)
            return _logits(model, inputs, batch_size)[:, selected].double().numpy()
        return f

    explainers: dict[tuple[int, ...], Any] = {}
    for i, row in enumerate(_unique_rows(classes)):
        key = tuple(row)
        if key not in explainers:
            explainers[key] = shap.KernelExplainer(predict(row), bg)
        with _numpy_seed(seeding.stream_key(seed, int(sample_ids[i]))), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            phi = explainers[key].shap_values(x[i:i + 1].reshape(1, -1).double().cpu().numpy(),
                                              nsamples=nsamples, l1_reg=False, silent=True)
        phi = torch.as_tensor(np.asarray(phi), dtype=torch.float32).reshape(-1, len(row))  # (d, m)
        for j in range(k):
            values[i, j] = phi[:, row.index(int(classes[i, j]))].reshape(shape)
    return values


# ---------------------------------------------------------------------------------------- public
def shap_values(
    model: ModelUnderTest,
    x: torch.Tensor,
    classes: torch.Tensor,
    background: torch.Tensor,
    *,
    explainer: str = "auto",
    seed: int = 0,
    nsamples: int | str | None = None,
    batch_size: int | None = None,
    sample_ids: torch.Tensor | None = None,
    engine: str = "torch",
    sampling: str = "stratified",
) -> ShapResult:
    """SHAP values of `x` for the requested `classes` only ((n,) or (n, k) class indices).

    explainer: "auto" (gradient; kernel for black-box models), "gradient", "deep" (falls back to
    gradient when unsafe, reason in `.fallback`) or "kernel". nsamples: draws per (sample, class)
    for gradient (default 64), shap's nsamples for kernel (default "auto" = 2 d + 2048).
    sample_ids: ids that seed each sample's draws (default 0..n-1).
    """
    if not isinstance(model, ModelUnderTest):
        raise InputError("model", f"expected a robustlab ModelUnderTest, got {type(model).__name__}")
    if explainer not in EXPLAINERS:
        raise InputError("explainer", f"expected one of {', '.join(EXPLAINERS)}, got {explainer!r}")
    if engine not in ENGINES:
        raise InputError("engine", f"expected one of {', '.join(ENGINES)}, got {engine!r}")
    if sampling not in SAMPLINGS:
        raise InputError("sampling", f"expected one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    x = _check_inputs("x", x)
    background = _check_inputs("background", background, like=x)
    if nsamples is not None and nsamples != "auto" and (isinstance(nsamples, bool) or not isinstance(nsamples, int)
                                                         or nsamples < 1):
        raise InputError("nsamples", f"must be a positive integer (or 'auto' for kernel), got {nsamples!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError("batch_size", f"must be a positive integer, got {batch_size!r}")
    n = len(x)
    if sample_ids is None:
        sample_ids = torch.arange(n)
    elif not isinstance(sample_ids, torch.Tensor) or sample_ids.shape != (n,) or sample_ids.is_floating_point():
        raise InputError("sample_ids", f"expected an integer tensor of shape ({n},), got {_describe(sample_ids)}")
    black_box = is_black_box(model)
    if black_box and explainer in ("gradient", "deep"):
        raise InputError("explainer", f"{explainer!r} needs gradients, but the model is black-box; use 'kernel'")
    classes = _check_classes(classes, n, _num_classes(model, x))
    chosen = "kernel" if explainer == "kernel" or (explainer == "auto" and black_box) else (
        "deep" if explainer == "deep" else "gradient")
    if chosen == "gradient" and nsamples == "auto":
        raise InputError("nsamples", "'auto' is for the kernel explainer; give a number of draws")
    sample_ids = sample_ids.to(torch.int64).cpu()

    with model.evaluating():
        expected = _expected_outputs(model, background, classes)
        fx = _logits(model, x, batch_size).gather(1, classes)
        fallback: str | None = None
        values: torch.Tensor | None = None
        if chosen == "deep":
            fallback = deep_unsafe_reason(model, x)
            if fallback is None:
                fallback, values = _try_deep(model, x, classes, background, expected, fx)
            if fallback is not None:
                chosen, values = "gradient", None
        if chosen == "kernel":
            values = _kernel(model, x, classes, background, seed=seed, sample_ids=sample_ids,
                             nsamples=nsamples or "auto", batch_size=batch_size)
        elif chosen == "gradient":
            draws = nsamples or DEFAULT_GRADIENT_SAMPLES
            if engine == "shap":
                values = _gradient_shap(model, x, classes, background, seed=seed, sample_ids=sample_ids,
                                        nsamples=draws, batch_size=batch_size)
            else:
                values = _gradient_torch(model, x, classes, background, seed=seed, sample_ids=sample_ids,
                                         nsamples=draws, sampling=sampling, batch_size=batch_size)
            nsamples = draws
    assert values is not None
    error = (values.reshape(n, classes.shape[1], -1).double().sum(2) + expected.double() - fx.double()).abs().float()
    return ShapResult(explainer=chosen, values=values, expected=expected.float(), classes=classes, fallback=fallback,
                      additivity_error=error, nsamples=nsamples if chosen != "deep" else None)


def _try_deep(model, x, classes, background, expected, fx) -> tuple[str | None, torch.Tensor | None]:
    """Run DeepExplainer on 2 samples, then on all; any exception or additivity error beyond
    shap's own tolerance (scaled by the output's size) becomes a fallback reason."""
    for stage, rows in (("trial on 2 samples", slice(0, 2)), ("full run", slice(None))):
        try:
            values = _deep(model, x[rows], classes[rows], background)
        except Exception as error:  # noqa: BLE001 - any failure of shap's hooks means: do not trust it
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            return f"DeepExplainer failed ({stage}): {type(error).__name__}: {message}", None
        m = len(values)
        err = (values.reshape(m, classes.shape[1], -1).double().sum(2) + expected[rows].double() - fx[rows].double()).abs()
        scale = (fx[rows].double() - expected[rows].double()).abs().clamp_min(1.0)
        worst = float((err / scale).max())
        if worst > DEEP_TOLERANCE:
            return (f"DeepExplainer additivity error {worst:.3g} (relative) > {DEEP_TOLERANCE} on the {stage}: an "
                    "operation it has no rule for (e.g. a functional relu inside forward)"), None
    return None, values


# ---------------------------------------------------------------------------------------- report
@dataclass
class ShapReport:
    """SHAP on clean and adversarial inputs, summarised for reports (see `shap_report`)."""

    per_feature: pd.DataFrame  # key, role, feature, mean_abs_shap, mean_shap
    shift: pd.DataFrame  # key, feature, mean_change, mean_abs_change, rank
    per_sample: pd.DataFrame  # sample, key, additivity_error, spearman
    maps: dict[str, np.ndarray]  # key -> (m, *grid) true-class SHAP of the first m <= 8 samples
    explainer: str
    fallback: str | None
    explainers: dict[str, str] = field(default_factory=dict)  # per key, the explainer used
    grid: tuple[int, ...] = ()  # shape of the feature grid `feature` indexes (flat, C order)
    results: dict[str, ShapResult] = field(default_factory=dict)


def _feature_grid(values: torch.Tensor, max_features: int) -> torch.Tensor:
    """(n, *shape) SHAP -> (n, *grid): images summed over channels, then sum-pooled (SHAP values
    add up, so a cell's value is its pixels' total) until the grid has <= max_features cells."""
    if values.dim() == 4:  # (n, C, H, W)
        grid = values.sum(1)
        h, w = grid.shape[1:]
        factor = 1
        while math.ceil(h / factor) * math.ceil(w / factor) > max_features:
            factor += 1
        if factor > 1:
            grid = torch.nn.functional.avg_pool2d(grid.unsqueeze(1), factor, ceil_mode=True,
                                                  count_include_pad=False).squeeze(1)
            counts = torch.nn.functional.avg_pool2d(torch.ones(1, 1, h, w), factor, ceil_mode=True,
                                                    count_include_pad=False, divisor_override=1).squeeze(1)
            grid = grid * counts
        return grid
    flat = values.reshape(len(values), -1)
    d = flat.shape[1]
    if d <= max_features:
        return flat
    groups = math.ceil(d / max_features)
    pad = groups * max_features - d
    return torch.nn.functional.pad(flat, (0, pad)).reshape(len(values), max_features, groups).sum(2)


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1), np.nan)


def shap_report(
    model: ModelUnderTest,
    x_clean: torch.Tensor,
    y: torch.Tensor,
    adversarial: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    background: torch.Tensor,
    explainer: str = "auto",
    seed: int = 0,
    sample_ids: torch.Tensor | None = None,
    feature_names: Sequence[str] | None = None,
    nsamples: int | str | None = None,
    max_features: int = 256,
    max_maps: int = 8,
    **options: Any,
) -> ShapReport:
    """SHAP of the true and the predicted class on clean inputs and on each adversarial set.

    adversarial: key (e.g. "pgd|0.1") -> (x_adv, adv_pred) for the same samples as x_clean.
    `shift` ranks features by the mean absolute change of the true class's SHAP between clean and
    adversarial inputs (what the attack exploited); `per_sample.spearman` is the rank correlation
    of the two maps. Features: tabular inputs keep their names; images are summed over channels and
    sum-pooled to <= max_features cells, `feature` is the flat cell index in `grid`.
    """
    if not isinstance(model, ModelUnderTest):
        raise InputError("model", f"expected a robustlab ModelUnderTest, got {type(model).__name__}")
    x_clean = _check_inputs("x_clean", x_clean)
    n = len(x_clean)
    if not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point():
        raise InputError("y", f"expected an integer tensor of shape ({n},), got {_describe(y)}")
    if not isinstance(adversarial, dict):
        raise InputError("adversarial", f"expected a dict key -> (x_adv, adv_pred), got {type(adversarial).__name__}")
    for key, pair in adversarial.items():
        if not isinstance(key, str) or not key or key == "clean":
            raise InputError("adversarial", f"keys must be non-empty strings other than 'clean', got {key!r}")
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InputError(f"adversarial[{key!r}]", "expected a pair (x_adv, adv_pred)")
        _check_inputs(f"adversarial[{key!r}] x_adv", pair[0], like=x_clean)
        if len(pair[0]) != n or not isinstance(pair[1], torch.Tensor) or pair[1].shape != (n,):
            raise InputError(f"adversarial[{key!r}]", f"expected {n} adversarial inputs and {n} predictions (the "
                                                      "same samples as x_clean)")
    flat_dim = int(np.prod(x_clean.shape[1:]))
    if feature_names is not None:
        feature_names = [str(f) for f in feature_names]
        if x_clean.dim() != 2 or len(feature_names) != flat_dim:
            raise InputError("feature_names", f"expected {flat_dim} names for tabular inputs of shape "
                                              f"{tuple(x_clean.shape[1:])}, got {len(feature_names)}")
        max_features = flat_dim  # named features are never pooled
    if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 1:
        raise InputError("max_features", f"must be a positive integer, got {max_features!r}")
    num_classes = _num_classes(model, x_clean)
    y = _check_classes(y, n, num_classes, "y")[:, 0]
    sample_ids = torch.arange(n) if sample_ids is None else sample_ids
    with torch.no_grad(), model.evaluating():
        clean_pred = _logits(model, x_clean).argmax(1)

    common = dict(seed=seed, sample_ids=sample_ids, nsamples=nsamples, **options)
    results = {"clean": shap_values(model, x_clean, torch.stack([y, clean_pred], 1), background,
                                    explainer=explainer, **common)}
    used = results["clean"].explainer
    for key, (x_adv, adv_pred) in adversarial.items():
        classes = torch.stack([y, _check_classes(adv_pred, n, num_classes, f"adversarial[{key!r}] adv_pred")[:, 0]], 1)
        results[key] = shap_values(model, x_adv, classes, background, explainer=used, **common)

    grids = {key: _feature_grid(r.values[:, 0], max_features) for key, r in results.items()}
    grid = tuple(grids["clean"].shape[1:])
    features: list = feature_names if feature_names is not None else list(range(int(np.prod(grid))))
    frames, shifts, samples = [], [], []
    for key, r in results.items():
        for role, col in (("true", 0), ("predicted", 1)):
            g = _feature_grid(r.values[:, col], max_features).reshape(n, -1).double()
            frames.append(pd.DataFrame({"key": key, "role": role, "feature": features,
                                        "mean_abs_shap": g.abs().mean(0).numpy(), "mean_shap": g.mean(0).numpy()}))
        clean_flat = results["clean"].values[:, 0].reshape(n, -1).double().numpy()
        flat = r.values[:, 0].reshape(n, -1).double().numpy()
        samples.append(pd.DataFrame({
            "sample": sample_ids.numpy(), "key": key,
            "additivity_error": r.additivity_error.amax(1).numpy() if r.additivity_error is not None else np.nan,
            "spearman": np.full(n, np.nan) if key == "clean" else _spearman(clean_flat, flat)}))
        if key != "clean":
            delta = (grids[key] - grids["clean"]).reshape(n, -1).double()
            mean_change, mean_abs = delta.mean(0).numpy(), delta.abs().mean(0).numpy()
            order = np.argsort(-mean_abs, kind="stable")
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(1, len(order) + 1)
            shifts.append(pd.DataFrame({"key": key, "feature": features, "mean_change": mean_change,
                                        "mean_abs_change": mean_abs, "rank": rank}).sort_values(["rank"]))
    shift = pd.concat(shifts, ignore_index=True) if shifts else pd.DataFrame(
        columns=["key", "feature", "mean_change", "mean_abs_change", "rank"])
    maps = {key: grids[key][:max_maps].numpy().astype(np.float32) for key in results}
    fallbacks = [r.fallback for r in results.values() if r.fallback]
    return ShapReport(per_feature=pd.concat(frames, ignore_index=True), shift=shift,
                      per_sample=pd.concat(samples, ignore_index=True), maps=maps, explainer=used,
                      fallback=fallbacks[0] if fallbacks else None,
                      explainers={key: r.explainer for key, r in results.items()}, grid=grid, results=results)


__all__ = ["EXPLAINERS", "ShapResult", "ShapReport", "shap_values", "shap_report", "background_from",
           "deep_unsafe_reason", "expected_gradients", "shap_draws", "is_black_box"]
