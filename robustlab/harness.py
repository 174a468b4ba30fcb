"""The harness: model(s) x attacks x eps (x target modes) -> verified results.

Everything is validated before the first attack runs. Each attack runs only on the samples it
can attack (correctly classified; for targeted attacks, also target != label), and every row of
the results comes from a verified `AttackOutcome`. Minimal-perturbation attacks (CW) run once
per target set and are evaluated at every eps by projection (`robustlab.attacks.restrict`).
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustlab import targets as targeting
from robustlab.attacks import Attack, AttackOutcome, get_attack, restrict
from robustlab.attacks.base import check_eps_fits, transfer, validate_inputs, validate_labels
from robustlab.batching import BatchRunner
from robustlab.data import Dataset, load_data
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest, RobustlabWarning
from robustlab.results import SUMMARY_COLUMNS, WORST_CASE, AuditResult, example_key, sample_frame
from robustlab.threat import Bounds, get_norm

DEFAULT_ATTACKS = ("fgsm", "pgd", "cw")
DEFAULT_EPS = (0.05, 0.1, 0.2)
TRANSFER_NOTE = "transfer from surrogate"

Progress = Callable[[str], None]


@dataclass
class _Plan:
    """Validated configuration: what will run, before anything runs."""

    models: dict[str, ModelUnderTest]
    data: Dataset
    attacks: list[Attack]
    eps: list[float]
    norm: str
    modes: list[str]
    seed: int
    batch_size: int | None
    device: torch.device | None  # None: each model stays where it is


def audit(
    model: Any,
    data: Any = "digits",
    *,
    attacks: Sequence[str | Attack] = DEFAULT_ATTACKS,
    eps: float | Sequence[float] = DEFAULT_EPS,
    norm: str = "linf",
    targeted: str | int | Sequence[str | int] = "none",
    steps: int | None = None,
    restarts: int | None = None,
    loss: str | None = None,
    seed: int = 0,
    n: int | None = None,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    bounds: tuple | Bounds | None = None,
    mean: Any = None,
    std: Any = None,
    name: str | None = None,
    classes: Sequence[str] | None = None,
    output: str = "auto",
    progress: bool | Progress | None = None,
) -> AuditResult:
    """Attack `model` on `data` and return verified, tidy results.

    model: an nn.Module in eval mode, a `ModelUnderTest`, or a dict {name: model} to audit
        several side by side. Wrapper options (bounds, mean, std, name, classes, output) apply
        to models given as plain modules.
    data: "digits" (default), an .npz path, "module:function", (x, y) arrays, a Dataset or
        DataLoader. `n` keeps the first n samples.
    attacks: names ("fgsm", "pgd", "cw", "foolbox:<Name>") or configured `Attack` objects; eps
        is set by the audit. `steps`/`restarts`/`loss` override PGD's (steps also CW's).
    targeted: "none", "random", "least-likely", "next", "all", a class, or a list of those.
    """
    started_wall = _dt.datetime.now(_dt.timezone.utc)
    started = time.perf_counter()
    say = _progress(progress)
    plan = _plan(model, data, attacks=attacks, eps=eps, norm=norm, targeted=targeted, steps=steps,
                 restarts=restarts, loss=loss, seed=seed, n=n, device=device, batch_size=batch_size, bounds=bounds,
                 mean=mean, std=std, name=name, classes=classes, output=output)
    summaries: list[dict] = []
    frames: list[pd.DataFrame] = []
    batch_sizes: dict[str, int] = {}
    examples: dict[str, np.ndarray] = {}
    for model_name, mut in plan.models.items():
        s, f, used, shown = _audit_one(mut, plan, say)
        summaries.extend(s)
        frames.append(f)
        batch_sizes[model_name] = used
        examples.update(shown)
    extra = ["note"] if any("note" in s for s in summaries) else []
    summary = pd.DataFrame.from_records(summaries, columns=SUMMARY_COLUMNS + extra)
    samples = pd.concat(frames, ignore_index=True) if frames else sample_frame({})
    finished_wall = _dt.datetime.now(_dt.timezone.utc)
    metadata = _metadata(plan, started_wall, finished_wall, time.perf_counter() - started, batch_sizes,
                         {"attacks": [a if isinstance(a, str) else a.config() for a in attacks], "eps": plan.eps,
                          "norm": plan.norm, "targeted": plan.modes, "steps": steps, "restarts": restarts,
                          "loss": loss, "seed": seed, "n": n, "device": str(device), "batch_size": batch_size})
    return AuditResult(summary=summary, samples=samples, metadata=metadata, examples=examples)


# ---------------------------------------------------------------------------- planning
def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    text = str(device).lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device", "CUDA was requested but no GPU is available (torch.cuda.is_available() is False)")
    try:
        return torch.device(text)
    except RuntimeError:
        raise InputError("device", f"unknown device {device!r}; expected auto, cpu or cuda") from None


def _plan(model, data, *, attacks, eps, norm, targeted, steps, restarts, loss, seed, n, device, batch_size, bounds,
          mean, std, name, classes, output) -> _Plan:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed", f"must be a non-negative integer, got {seed!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError("batch_size", f"must be a positive integer, got {batch_size!r}")
    dev = None if str(device).lower() == "auto" else resolve_device(device)  # auto: where each model is
    geometry = get_norm(norm)
    eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
    if not eps_list:
        raise InputError("eps", "give at least one epsilon")
    for e in eps_list:
        if isinstance(e, bool) or not isinstance(e, (int, float, np.floating)) or not math.isfinite(e) or e < 0:
            raise InputError("eps", f"must be finite numbers >= 0, got {e!r}")
    eps_list = sorted({float(e) for e in eps_list})
    dataset = load_data(data).head(n)
    wrap_options = dict(bounds=bounds, mean=mean, std=std, classes=classes or dataset.classes, output=output)
    models = _models(model, name, wrap_options, dev)
    built = [_build_attack(a, geometry.name, steps=steps, restarts=restarts, loss=loss) for a in attacks]
    if not built:
        raise InputError("attacks", "give at least one attack")
    names = [a.name if not hasattr(a, "attack_class") else f"foolbox:{a.attack_class}" for a in built]
    if len(set(names)) != len(names):
        raise InputError("attacks", f"each attack may appear once, got {names}")
    first = next(iter(models.values()))
    modes_in = [targeted] if isinstance(targeted, (str, int)) or targeted is None else list(targeted)
    modes = list(dict.fromkeys(targeting.parse_mode(m, first.classes) for m in modes_in))
    for attack in built:
        attack.validate()
    for mut in models.values():
        x = validate_inputs(mut, dataset.x)
        mut.inspect(x)
        validate_labels("y", dataset.y, len(x), mut.num_classes)
        for e in eps_list:
            check_eps_fits(e, geometry, mut, tuple(x.shape[1:]))
        for m in modes:
            if m.lstrip("-").isdigit() and not 0 <= int(m) < mut.num_classes:
                raise InputError("targeted", f"target class {m} is out of range for a {mut.num_classes}-class model")
    for mut in models.values():
        if needs_transfer(mut):
            _surrogate(mut).inspect(validate_inputs(mut, dataset.x))
    shapes = {mut.inspection.num_classes for mut in models.values()}
    if len(shapes) > 1:
        raise InputError("model", f"models audited together must have the same classes; got class counts {sorted(shapes)}")
    return _Plan(models=models, data=dataset, attacks=built, eps=eps_list, norm=geometry.name, modes=modes,
                 seed=int(seed), batch_size=batch_size, device=dev)


def _models(model, name, wrap_options, device) -> dict[str, ModelUnderTest]:
    if isinstance(model, Mapping):
        if not model:
            raise InputError("model", "the dict of models is empty")
        out = {}
        for key, value in model.items():
            out[str(key)] = _wrap(value, str(key), wrap_options, device)
        return out
    mut = _wrap(model, name, wrap_options, device)
    return {mut.name: mut}


def _wrap(value, name, options, device: torch.device | None) -> ModelUnderTest:
    """Wrap plain modules; move a model only when a device was asked for explicitly."""
    if isinstance(value, ModelUnderTest):
        if name and value.name != name:
            value.name = name
        if device is not None and value.device != device:
            value.move_to(device)
        return value
    return ModelUnderTest(value, name=name, device=device, **options)


def _build_attack(spec: str | Attack, norm: str, *, steps, restarts, loss) -> Attack:
    if isinstance(spec, Attack):
        attack = spec
    elif isinstance(spec, str):
        attack = get_attack(spec)
        if spec.lower().startswith("foolbox:"):
            native = attack.native_norm()  # type: ignore[attr-defined]
            attack = attack.replace(norm=native if native and attack.minimal else norm)
    else:
        raise InputError("attacks", f"expected attack names or Attack objects, got {type(spec).__name__}")
    changes: dict[str, Any] = {}
    if attack.name in ("fgsm", "pgd") and attack.norm != norm:
        changes["norm"] = norm
    if steps is not None and hasattr(attack, "steps"):
        changes["steps"] = steps
    if restarts is not None and hasattr(attack, "restarts"):
        changes["restarts"] = restarts
    if loss is not None and hasattr(attack, "loss"):
        changes["loss"] = loss
    return attack.replace(**changes) if changes else attack


# ---------------------------------------------------------------------------- transfer
def needs_transfer(mut: ModelUnderTest) -> bool:
    """True for models with no usable gradient (e.g. a vote ensemble): attacked through `surrogate`."""
    return bool(getattr(mut.module, "requires_transfer", False))


def _surrogate(mut: ModelUnderTest) -> ModelUnderTest:
    """The wrapped surrogate of a transfer-only model (same bounds, normalisation and device); cached."""
    cached = getattr(mut, "_transfer_surrogate", None)
    if cached is not None:
        return cached
    module = getattr(mut.module, "surrogate", None)
    if not isinstance(module, nn.Module) and not callable(module):
        raise InputError("model", f"{mut.name!r} requires transfer attacks (requires_transfer=True) but has no "
                                  "`surrogate` module to generate them on")
    surrogate = ModelUnderTest(module, bounds=mut.bounds, mean=mut.mean, std=mut.std, name=f"{mut.name}:surrogate",
                               classes=mut.classes, output="logits", device=mut.device)
    mut._transfer_surrogate = surrogate  # type: ignore[attr-defined]
    return surrogate


# ---------------------------------------------------------------------------- running
def _clean_logits(mut: ModelUnderTest, x: torch.Tensor, batch_size: int | None) -> tuple[torch.Tensor, int]:
    runner = BatchRunner(batch_size, mut.device, x[0].numel())

    def one(a: int, b: int) -> torch.Tensor:
        with torch.no_grad():
            return mut(mut.to_device(x[a:b])).double().cpu()

    with mut.evaluating():
        parts = runner.run(len(x), one)
    return torch.cat(parts), runner.batch_size


def _audit_one(mut: ModelUnderTest, plan: _Plan, say: Progress) -> tuple[list[dict], pd.DataFrame, int]:
    data = plan.data
    x, y, ids = data.x, data.y, data.indices
    logits, used_batch = _clean_logits(mut, x, plan.batch_size)
    clean_pred = logits.argmax(dim=1)
    clean_correct = clean_pred == y
    clean_acc = float(clean_correct.double().mean())
    say(f"{mut.name}: clean accuracy {clean_acc:.1%} on {len(x)} samples")
    chance = float(torch.bincount(y, minlength=mut.num_classes).max()) / len(y)
    if len(y) >= 20 and clean_acc <= chance + 0.05:
        warnings.warn(f"model {mut.name!r}: clean accuracy {clean_acc:.1%} is at chance level ({chance:.1%}); "
                      "are the weights loaded, and do --bounds/--mean/--std match how it was trained?",
                      RobustlabWarning, stacklevel=3)
    summaries: list[dict] = []
    via_surrogate = needs_transfer(mut)
    if via_surrogate:
        say(f"{mut.name}: not differentiable; attacks run on its surrogate and transfer ({TRANSFER_NOTE})")
    rows: dict[str, list] = {c: [] for c in _ROW_KEYS}
    shown = _example_positions(clean_correct, x)
    examples: dict[str, np.ndarray] = {f"sample|{mut.name}": ids[shown].numpy(), f"clean|{mut.name}": x[shown].numpy()}
    for mode in plan.modes:
        target_sets = targeting.select(mode, y, logits, ids, seed=plan.seed, num_classes=mut.num_classes)
        robust_by: dict[tuple[str, float], torch.Tensor] = {}  # (attack, eps) -> per (set, sample) robust
        success_by: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for attack in plan.attacks:
            for eps, per_set, seconds, calls in _run_attack(attack, mut, plan, x, y, ids, clean_correct, target_sets, say):
                record, robust, attacked, success, l2, linf = _summarise(
                    mut.name, attack, plan.norm, eps, mode, per_set, x, y, clean_pred, clean_correct, target_sets,
                    seconds, calls, rows, ids)
                if via_surrogate:
                    record["note"] = TRANSFER_NOTE
                summaries.append(record)
                examples[example_key(mut.name, record["attack"], eps, mode)] = _adversarial_examples(
                    per_set[0], x, shown)
                if eps is not None:
                    robust_by[(record["attack"], eps)] = robust
                    success_by[(record["attack"], eps)] = (attacked, success, l2, linf)
        for eps in plan.eps:
            keys = [k for k in robust_by if k[1] == eps]
            if len(keys) < 2:
                continue
            worst = _worst_case(mut.name, plan.norm, eps, mode, keys, robust_by, success_by, summaries,
                                clean_acc, len(x))
            if via_surrogate:
                worst["note"] = TRANSFER_NOTE
            summaries.append(worst)
    return summaries, sample_frame(rows), used_batch, examples


EXAMPLE_VALUES = 200_000  # input values kept per (attack, eps) for reports: 8 digits, 8 CIFAR, 1 ImageNet image


def _example_positions(clean_correct: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The first few correctly classified samples: the ones every attack was run on."""
    count = max(1, min(8, EXAMPLE_VALUES // max(1, x[0].numel())))
    return torch.nonzero(clean_correct).reshape(-1)[:count]


def _adversarial_examples(first_set, x: torch.Tensor, shown: torch.Tensor) -> np.ndarray:
    """Adversarial inputs of the shown samples (first target set); the clean input where not attacked."""
    outcome, mask = first_set
    picked = x[shown].clone()
    if outcome is not None:
        position_in_outcome = torch.cumsum(mask.long(), 0) - 1
        attacked = mask[shown]
        picked[attacked] = outcome.x_adv[position_in_outcome[shown[attacked]]].to(picked.dtype)
    return picked.numpy()


def _run_attack(attack: Attack, mut, plan: _Plan, x, y, ids, clean_correct, target_sets, say):
    """Yields (eps, [outcome-or-None per target set, with the attacked mask], seconds, gradient calls)."""
    sets = target_sets or [None]
    masks = [clean_correct if s is None else (clean_correct & s.valid) for s in sets]
    label = attack.name if not hasattr(attack, "attack_class") else f"foolbox:{attack.attack_class}"
    via_surrogate = needs_transfer(mut)
    source = _surrogate(mut) if via_surrogate else mut  # the model whose gradients the attack uses

    def attacked(configured: Attack, idx, targets) -> AttackOutcome:
        outcome = configured(source, x[idx], y[idx], targets, sample_ids=ids[idx], seed=plan.seed,
                             batch_size=plan.batch_size)
        return transfer(outcome, mut, x[idx], y[idx], batch_size=plan.batch_size) if via_surrogate else outcome

    if attack.minimal:
        base: list[AttackOutcome | None] = []
        started = time.perf_counter()
        for s, mask in zip(sets, masks):
            idx = torch.nonzero(mask).reshape(-1)
            base.append(None if len(idx) == 0 else attacked(attack, idx, None if s is None else s.targets[idx]))
        seconds = time.perf_counter() - started
        calls = sum(o.gradient_calls for o in base if o is not None)
        say(f"{mut.name}: {label} (no budget) done in {seconds:.1f}s")
        yield None, list(zip(base, masks)), seconds, calls
        for eps in plan.eps:
            per_set = []
            for o, mask in zip(base, masks):
                idx = torch.nonzero(mask).reshape(-1)
                per_set.append((None if o is None else restrict(o, mut, x[idx], y[idx], eps, plan.norm,
                                                                batch_size=plan.batch_size), mask))
            yield eps, per_set, seconds, calls
        return
    for eps in plan.eps:
        configured = attack.replace(eps=eps)
        per_set = []
        started = time.perf_counter()
        for s, mask in zip(sets, masks):
            idx = torch.nonzero(mask).reshape(-1)
            per_set.append((None if len(idx) == 0 else attacked(configured, idx, None if s is None else s.targets[idx]),
                            mask))
        seconds = time.perf_counter() - started
        say(f"{mut.name}: {label} eps={eps:g} done in {seconds:.1f}s")
        yield eps, per_set, seconds, sum(o.gradient_calls for o, _ in per_set if o is not None)


_ROW_KEYS = ["model", "sample", "attack", "norm", "eps", "targeted", "target", "label", "clean_pred", "adv_pred",
             "adv_confidence", "clean_correct", "attacked", "success", "robust", "l2", "linf"]


def _summarise(model_name, attack, norm, eps, mode, per_set, x, y, clean_pred, clean_correct, target_sets, seconds,
               calls, rows, ids):
    """Rows for one (attack, eps, mode) and its summary record. Robust is per (target set, sample)."""
    n = len(y)
    label = attack.name if not hasattr(attack, "attack_class") else f"foolbox:{attack.attack_class}"
    # Budgeted rows are in the audit's norm; an unbounded run is in the attack's own (CW: L2).
    row_norm = norm if eps is not None else attack.geometry.name
    robust_sets, attacked_sets, success_sets, l2_sets, linf_sets = [], [], [], [], []
    for set_index, (outcome, mask) in enumerate(per_set):
        adv_pred = clean_pred.clone()
        confidence = torch.full((n,), float("nan"), dtype=torch.float64)
        success = torch.zeros(n, dtype=torch.bool)
        l2 = torch.zeros(n, dtype=torch.float64)
        linf = torch.zeros(n, dtype=torch.float64)
        idx = torch.nonzero(mask).reshape(-1)
        if outcome is not None:
            adv_pred[idx] = outcome.adv_pred
            confidence[idx] = outcome.adv_confidence.double()
            success[idx] = outcome.success
            l2[idx] = outcome.l2.double()
            linf[idx] = outcome.linf.double()
        robust = adv_pred == y
        target = target_sets[set_index].targets if target_sets else None
        robust_sets.append(robust)
        attacked_sets.append(mask)
        success_sets.append(success)
        l2_sets.append(l2)
        linf_sets.append(linf)
        rows["model"] += [model_name] * n
        rows["sample"] += ids.tolist()
        rows["attack"] += [label] * n
        rows["norm"] += [row_norm] * n
        rows["eps"] += [float("nan") if eps is None else eps] * n
        rows["targeted"] += [mode] * n
        rows["target"] += [pd.NA] * n if target is None else target.tolist()
        rows["label"] += y.tolist()
        rows["clean_pred"] += clean_pred.tolist()
        rows["adv_pred"] += adv_pred.tolist()
        rows["adv_confidence"] += confidence.tolist()
        rows["clean_correct"] += clean_correct.tolist()
        rows["attacked"] += mask.tolist()
        rows["success"] += success.tolist()
        rows["robust"] += robust.tolist()
        rows["l2"] += l2.tolist()
        rows["linf"] += linf.tolist()
    robust = torch.stack(robust_sets)
    attacked = torch.stack(attacked_sets)
    success = torch.stack(success_sets)
    l2, linf = torch.stack(l2_sets), torch.stack(linf_sets)
    record = {
        "model": model_name, "attack": label, "norm": row_norm, "eps": eps, "targeted": mode, "n": n,
        "clean_accuracy": float(clean_correct.double().mean()),
        "robust_accuracy": float(robust.all(dim=0).double().mean()),
        "success_rate": _rate(success, attacked),
        "n_attacked": int(attacked.sum()),
        "median_l2": _median(l2[success]), "median_linf": _median(linf[success]),
        "gradient_calls": int(calls), "seconds": round(float(seconds), 4),
    }
    return record, robust, attacked, success, l2, linf


def _worst_case(model_name, norm, eps, mode, keys, robust_by, success_by, summaries, clean_acc, n) -> dict:
    robust = torch.stack([robust_by[k] for k in keys]).all(dim=0)  # (sets, samples): every attack failed
    attacked = success_by[keys[0]][0]
    success = torch.stack([success_by[k][1] for k in keys]).any(dim=0)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    smallest_l2 = torch.stack([torch.where(success_by[k][1], success_by[k][2], inf) for k in keys]).amin(dim=0)
    smallest_linf = torch.stack([torch.where(success_by[k][1], success_by[k][3], inf) for k in keys]).amin(dim=0)
    same = [s for s in summaries if s["eps"] == eps and s["targeted"] == mode and s["model"] == model_name]
    return {
        "model": model_name, "attack": WORST_CASE, "norm": norm, "eps": eps, "targeted": mode, "n": n,
        "clean_accuracy": clean_acc, "robust_accuracy": float(robust.all(dim=0).double().mean()),
        "success_rate": _rate(success, attacked), "n_attacked": int(attacked.sum()),
        "median_l2": _median(smallest_l2[success]), "median_linf": _median(smallest_linf[success]),
        "gradient_calls": int(sum(s["gradient_calls"] for s in same)),
        "seconds": round(float(sum(s["seconds"] for s in same)), 4),
    }


def _rate(success: torch.Tensor, attacked: torch.Tensor) -> float:
    total = int(attacked.sum())
    return float((success & attacked).sum()) / total if total else float("nan")


def _median(values: torch.Tensor) -> float:
    return float(values.double().median()) if values.numel() else float("nan")


# ---------------------------------------------------------------------------- metadata, progress
def _metadata(plan: _Plan, started, finished, seconds, batch_sizes, config) -> dict:
    import robustlab

    transferred = {name: f"{TRANSFER_NOTE}: adversarial examples generated on {name}'s surrogate, evaluated "
                      f"(verified) on {name}; no gradient of {name} is computed"
                for name, mut in plan.models.items() if needs_transfer(mut)}
    return {
        **({"transfer": transferred} if transferred else {}),
        "robustlab_version": robustlab.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "pandas_version": pd.__version__,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "device": sorted({str(m.device) for m in plan.models.values()}),
        "device_name": sorted({torch.cuda.get_device_name(m.device) if m.device.type == "cuda"
                               else platform.processor() or "cpu" for m in plan.models.values()}),
        "seed": plan.seed,
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "seconds": round(seconds, 3),
        "models": {name: mut.describe() for name, mut in plan.models.items()},
        "data": plan.data.describe(),
        "batch_size_used": batch_sizes,
        "attack_configs": [a.config() for a in plan.attacks],
        "config": config,
        "definitions": {
            "robust_accuracy": "share of all n samples whose prediction stayed the true label under every target "
                               "of the attack (misclassified clean samples are not robust)",
            "success_rate": "share of attacked (sample, target) rows where the attack succeeded; untargeted: "
                            "prediction != label; targeted: prediction == target",
            "worst-case": "a sample counts as robust only if every attack failed on it at that eps",
        },
    }


def _progress(progress: bool | Progress | None) -> Progress:
    if callable(progress):
        return progress
    if progress or (progress is None and sys.stderr.isatty()):
        return lambda message: print(f"[robustlab] {message}", file=sys.stderr, flush=True)
    return lambda message: None
