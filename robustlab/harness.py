"""The harness: model(s) x attacks x eps (x target modes) -> verified results.

Everything is validated before the first attack runs. Each attack runs only on the samples it
can attack (correctly classified; for targeted attacks, also target != label), and every row of
the results comes from a verified `AttackOutcome`. Minimal-perturbation attacks (CW) run once
per target set and are evaluated at every eps by projection (`robustlab.attacks.restrict`).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustlab import distributed
from robustlab import journal as journaling
from robustlab import progress as bars
from robustlab import targets as targeting
from robustlab.attacks import SUITES, Attack, AttackOutcome, Cascade, get_attack, restrict
from robustlab.attacks import registry as attack_registry
from robustlab.attacks.base import check_eps_fits, transfer, validate_inputs, validate_labels
from robustlab.batching import BatchRunner
from robustlab.data import Dataset, load_data
from robustlab.errors import InputError, VerificationError
from robustlab.integrity import LEVELS
from robustlab.integrity.base import Extra, Found, ModeEvidence, ModelContext
from robustlab.log import get_logger
from robustlab.model import ModelUnderTest, RobustlabWarning
from robustlab.results import SUMMARY_COLUMNS, WORST_CASE, AuditResult, certified_label, example_key, sample_frame
from robustlab.verdicts import evaluate as evaluate_verdicts
from robustlab.threat import Bounds, get_norm

DEFAULT_ATTACKS = ("fgsm", "pgd", "cw")
DEFAULT_SUITE = "standard"  # the cascade that runs beside the attacks (robustlab.attacks.cascade)
DEFAULT_EPS = (0.05, 0.1, 0.2)
TRANSFER_NOTE = "transfer from surrogate"
BLACK_BOX_REASON = "black-box model: white-box attacks and the standard suite did not run"

Progress = Callable[[str], None]
_log = get_logger(__name__)


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
    checks: str = "default"
    surrogate: Any = None  # a user-given surrogate module for the strict transfer check
    explain: list[str] = field(default_factory=list)  # explanation stages (robustlab.explaining)
    suite: str = DEFAULT_SUITE  # the cascade run beside the attacks, or "none"
    certify: tuple[str, float | None] | None = None  # (method, sigma): robustlab.certify beside the attacks
    smoothed: dict[str, ModelUnderTest] = field(default_factory=dict)  # certify=smoothing: each model's smoothed twin


@bars.honours("progress")
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
    features: Sequence[str] | None = None,
    output: str = "auto",
    progress: bool | Progress | None = None,
    checks: str = "default",
    surrogate: Any = None,
    explain: str | Sequence[str] | None = None,
    suite: str = DEFAULT_SUITE,
    certify: str | None = None,
    journal: "str | os.PathLike | journaling.Journal | journaling.Request | None" = None,
) -> AuditResult:
    """Attack `model` on `data` and return verified, tidy results.

    model: an nn.Module in eval mode, a `ModelUnderTest`, or a dict {name: model} to audit
        several side by side. Wrapper options (bounds, mean, std, name, classes, output) apply
        to models given as plain modules.
    data: "digits" (default), an .npz path, "module:function", (x, y) arrays, a Dataset or
        DataLoader, an image folder. `n` keeps the first n samples, and no more are read.
    features: names of 1-D (tabular) inputs' features, one per feature (default: the data's own, e.g.
        "breast-cancer" carries sklearn's); recorded in metadata["data"]["features"] and shown by the report.
    attacks: registered names (`robustlab.attacks.registry.names()`: "fgsm", "pgd", "cw", "mifgsm",
        "apgd-ce", "apgd-t", "fab-t", "square"), "foolbox:<Name>", or configured `Attack` objects;
        eps is set by the audit. `steps`/`restarts`/`loss` reach the attacks whose registration
        takes them (PGD all three, CW and MI-FGSM steps, FGSM and MI-FGSM loss).
    suite: the attack cascade run beside `attacks` (robustlab.attacks.cascade): "standard" (default:
        APGD-CE, APGD-T, Square-5000, Croce & Hein 2020), "quick" (APGD-CE and APGD-T with fewer
        iterations, for CI), or "none". Its row ("cascade" / "cascade-quick") joins the worst case;
        only an audit with the standard suite can have an "established" evaluation.
    targeted: "none", "random", "least-likely", "next", "all", a class, or a list of those.
    progress: status lines always go to the "robustlab" logger (INFO; configure logging to see them);
        progress bars follow robustlab.progress's automatic rule (None), or are forced on (True) or off
        (False) for this call; a callable also receives every status line.
    checks: integrity checks after each model's attacks (robustlab.integrity): "default" (the cheap
        ones, +<=50% time), "strict" (also the costly ones in full, and transfer from `surrogate`), or
        "none". With checks, margin-loss PGD always runs ("pgd-margin") and the adaptive attacks the
        failed checks call for (BPDA, EoT, Square, ...) add rows; the probes' verified adversarial examples
        are kept as sample rows ("probe:pgd-strong", "probe:square"); every row joins the worst case.
        The worst case carries a sample broken at an eps to every larger eps, and untargeted it counts
        every targeted mode's misclassifications; samples.csv holds its per-sample rows ("worst-case").
        metadata["checks"] holds the results; metadata["evaluation"] the evaluation status of every threat
        model (robustlab.verdicts), written with or without checks.
    surrogate: an nn.Module for the strict transfer check (same inputs and classes); a model with
        `requires_transfer` uses its own `.surrogate`.
    explain: "saliency", "shap", "probes" (a list or comma-separated; "all"): explanations of the
        attacked samples on clean and adversarial inputs (robustlab.explaining); frames land in
        `result.tables`, maps in `result.examples`, timings and flags in metadata["explain"].
    certify: None, "ibp", "crown", "smoothing" or "smoothing:SIGMA" (default sigma 0.25): certificates
        (robustlab.certify) of the untargeted threat model at every eps, in the audit's norm, beside the attacks.
        Rows "certified:ibp" / "certified:crown" / "certified:smoothing(sigma=S)" hold `certified_accuracy`
        (robust_accuracy NaN; they join no worst case); IBP/CROWN's also lands on the worst-case row, so one
        row holds the bracket [certified_accuracy, robust_accuracy]. Smoothing certifies the smoothed
        classifier, not the model: with smoothing each model's smoothed classifier is audited as a model of its
        own, "MODEL+smoothing0.25" (robustlab.certify.smoothed): EoT-PGD on its soft prediction beside its
        certificate, its clean prediction Cohen et al.'s PREDICT (abstentions count as not robust), and the
        bracket on its worst-case row. A model with a layer the bounds do not
        support is skipped with the reason in metadata["certify"][model]. A sample certified at eps and broken
        by an attack at eps (or a smaller one) raises VerificationError: a bug in one of the two.
    journal: a directory (or a robustlab.journal.Journal) keeping every finished attack call; an audit of the
        same configuration, models and data given the same journal resumes after the last finished call and
        returns the same result; another configuration's journal raises InputError (see robustlab.journal;
        the CLI keeps one beside --out and removes it once the results are saved).
    Under torch.distributed (torchrun) with several ranks, every attack call is sharded over the ranks and
    gathered (robustlab.distributed): each rank returns the same result, equal to a one-process run's.
    """
    started_wall = _dt.datetime.now(_dt.timezone.utc)
    started = time.perf_counter()
    say = _progress(progress)
    plan = _plan(model, data, attacks=attacks, eps=eps, norm=norm, targeted=targeted, steps=steps,
                 restarts=restarts, loss=loss, seed=seed, n=n, device=device, batch_size=batch_size, bounds=bounds,
                 mean=mean, std=std, name=name, classes=classes, output=output, checks=checks, surrogate=surrogate,
                 explain=explain, suite=suite, certify=certify, features=features)
    _log.debug("audit plan: models %s; %d samples; attacks %s; suite %s; %s eps %s; targeted %s; checks %s; "
               "explain %s; batch size %s", ", ".join(plan.models), len(plan.data.y),
               ", ".join(a.label for a in plan.attacks), plan.suite, plan.norm, ", ".join(f"{e:g}" for e in plan.eps),
               ", ".join(plan.modes), plan.checks, ", ".join(plan.explain) or "none", plan.batch_size or "automatic")
    config = {"attacks": [a if isinstance(a, str) else a.config() for a in attacks], "eps": plan.eps,
              "norm": plan.norm, "targeted": plan.modes, "steps": steps, "restarts": restarts,
              "loss": loss, "seed": seed, "n": n, "device": str(device), "batch_size": batch_size,
              "checks": plan.checks, "suite": plan.suite, "certify": certify_spec(plan.certify)}
    kept: journaling.Journal | None
    if journal is None or isinstance(journal, journaling.Journal):
        kept = journal
    elif isinstance(journal, journaling.Request):
        kept = journaling.Journal(journal.directory, _identity(plan, config), argument=journal.argument,
                                  must_exist=journal.must_exist)
    else:
        kept = journaling.Journal(os.fspath(journal), _identity(plan, config), argument="journal")
    with journaling.active(kept), distributed.sharding():
        return _audit_all(plan, config, say, started, started_wall)


def _identity(plan: "_Plan", config: dict) -> dict:
    """What a journal must match to be resumed: the configuration (less what never changes a result: the
    batch size), the models (weights digests, preprocessing, dtype) and the data's digest."""
    import robustlab

    unchanged = ("batch_size", "device")
    models = {}
    for name, mut in [*plan.models.items(), *plan.smoothed.items()]:
        about = mut.describe()
        models[name] = {k: v for k, v in about.items() if k in ("name", "sha256", "source", "bounds", "mean", "std",
                                                                "classes", "dtype", "amp", "defense")}
        models[name]["device"] = mut.device.type
    return {"robustlab": robustlab.__version__, "config": {k: v for k, v in config.items() if k not in unchanged},
            "explain": list(plan.explain), "models": models, "data": plan.data.describe()}


def _audit_all(plan: "_Plan", config: dict, say: Progress, started: float, started_wall: Any) -> AuditResult:
    summaries: list[dict] = []
    check_results: list[dict] = []
    adaptive: list[dict] = []
    check_seconds = 0.0
    frames: list[pd.DataFrame] = []
    batch_sizes: dict[str, int] = {}
    examples: dict[str, np.ndarray] = {}
    explained: dict = {}
    certified: dict[str, dict] = {}
    smoothed_plan = _smoothed_plan(plan)
    for model_name, mut in [*plan.models.items(), *plan.smoothed.items()]:
        s, f, used, shown, integrity, explanation = _audit_one(mut, plan if model_name in plan.models
                                                               else smoothed_plan, say, certified)
        if explanation is not None:
            explained[model_name] = explanation
        summaries.extend(s)
        frames.append(f)
        batch_sizes[model_name] = used
        examples.update(shown)
        check_results.extend(integrity.get("results", []))
        adaptive.extend(integrity.get("adaptive", []))
        check_seconds += integrity.get("seconds", 0.0)
    extra = ["note"] if any("note" in s for s in summaries) else []
    summary = pd.DataFrame.from_records(summaries, columns=SUMMARY_COLUMNS + extra)
    samples = pd.concat(frames, ignore_index=True) if frames else sample_frame({})
    finished_wall = _dt.datetime.now(_dt.timezone.utc)
    metadata = _metadata(plan, started_wall, finished_wall, time.perf_counter() - started, batch_sizes, config)
    group = distributed.current()
    if group is not None:  # every rank computed this; rank 0's devices are the ones named above
        metadata["shards"] = {"world_size": group.world, "backend": "nccl" if group.device.type == "cuda" else "gloo"}
    if plan.certify is not None:
        metadata["certify"] = certified
        metadata["models"].update({name: mut.describe() for name, mut in plan.smoothed.items()})
    if plan.checks == "none":
        metadata["checks"] = {"level": "none"}
    else:
        metadata["checks"] = {"level": plan.checks, "results": check_results, "adaptive": adaptive,
                              "seconds": round(check_seconds, 3)}
    # certificate rows join no evaluation; each record carries its threat model's certified lower bound
    metadata["evaluation"] = evaluate_verdicts(summary, check_results, level=plan.checks, norm=plan.norm)
    _mark_black_box(metadata["evaluation"], plan)
    metadata["definitions"]["evaluation"] = (
        "per (model, norm, eps, targeted): the worst-case robust accuracy with its 95% Wilson interval over n, and "
        "a status: 'established' (the standard suite ran and every applicable check passed), 'weaker than "
        "standard' (no check failed, but the suite was reduced or the checks were not run), 'not established' "
        "(a check failed). Only a requirement the user sets says whether the figure is enough")
    if plan.certify is not None:
        metadata["definitions"]["certified_accuracy"] = (
            "share of all n samples proven robust at eps (IBP/CROWN: every input in the eps ball is classified "
            "correctly, a lower bound of robust accuracy under any attack; smoothing: the smoothed classifier's "
            "certified L2 radius exceeds eps, with probability 1 - alpha over the noise)")
    tables: dict[str, pd.DataFrame] = {}
    if plan.explain:
        from robustlab.explaining import merge

        tables, maps, info = merge(explained)
        examples.update(maps)
        metadata["explain"] = info
    return AuditResult(summary=summary, samples=samples, metadata=metadata, examples=examples, tables=tables)


# ---------------------------------------------------------------------------- planning
def check_audit(model: Any, data: Any = "digits", **options: Any) -> None:
    """Check an audit's configuration as `audit` would (same keywords), without attacking: raises
    InputError. For callers about to do long work first (training defenses) with these options."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(audit).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"check_audit() got unexpected options {unknown}")
    merged = {**defaults, **options}
    merged.pop("progress", None)
    merged.pop("journal", None)
    _plan(model, data, **merged)


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
          mean, std, name, classes, output, checks="default", surrogate=None, explain=None,
          suite=DEFAULT_SUITE, certify=None, features=None) -> _Plan:
    from robustlab.explaining import parse_stages

    certifying = parse_certify(certify)

    if not isinstance(suite, str) or suite.strip().lower() not in SUITES + ("none",):
        raise InputError("suite", f"expected one of {', '.join(SUITES + ('none',))}, got {suite!r}")
    suite = suite.strip().lower()
    stages = parse_stages(explain)
    if not isinstance(checks, str) or checks.strip().lower() not in LEVELS:
        raise InputError("checks", f"expected one of {', '.join(LEVELS)}, got {checks!r}")
    checks = checks.strip().lower()
    if surrogate is not None and not isinstance(surrogate, (nn.Module, ModelUnderTest)):
        raise InputError("surrogate", f"expected an nn.Module (or a ModelUnderTest), got {type(surrogate).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed", f"must be a non-negative integer, got {seed!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError("batch_size", f"must be a positive integer, got {batch_size!r}")
    dev = None if str(device).lower() == "auto" else resolve_device(device)  # auto: where each model is
    geometry = get_norm(norm)
    if certifying is not None and geometry.name not in ("linf", "l2"):
        raise InputError("certify", f"certificates are for linf and l2 audits, not {geometry.name}")
    eps_list = eps_values(eps)
    if not eps_list:
        raise InputError("eps", "give at least one epsilon")
    for e in eps_list:
        if isinstance(e, bool) or not isinstance(e, (int, float, np.floating)) or not math.isfinite(e) or e < 0:
            raise InputError("eps", f"must be finite numbers >= 0, got {e!r}")
    eps_list = sorted({float(e) for e in eps_list})
    dataset = load_data(data, n=n).with_features(features)  # n applied while reading
    wrap_options = dict(bounds=bounds, mean=mean, std=std, classes=classes or dataset.classes, output=output)
    models = _models(model, name, wrap_options, dev)
    for mut in models.values():
        check_model_name(mut.name, "name" if name is not None else "model")
    if isinstance(attacks, (str, Attack)):
        attacks = [attacks]  # "pgd" is one attack, not the attacks "p", "g", "d"
    built = [_build_attack(a, geometry.name, steps=steps, restarts=restarts, loss=loss) for a in attacks]
    if suite != "none" and not any(isinstance(a, Cascade) for a in built):
        built.append(Cascade(norm=geometry.name, suite=suite))
    if not built:
        raise InputError("attacks", "give at least one attack")
    names = [a.label for a in built]
    if len(set(names)) != len(names):
        raise InputError("attacks", f"each attack may appear once, got {names}")
    _warn_unused_options(built, steps=steps, restarts=restarts, loss=loss)
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
        if surrogate is not None and (checks == "strict" or black_box(mut)):
            _user_surrogate(mut, surrogate).inspect(validate_inputs(mut, dataset.x))
    shapes = {mut.num_classes for mut in models.values()}  # each was inspected above
    if len(shapes) > 1:
        raise InputError("model", f"models audited together must have the same classes; got class counts {sorted(shapes)}")
    smoothed = _smoothed_models(models, certifying, int(seed), dataset)
    return _Plan(models=models, data=dataset, attacks=built, eps=eps_list, norm=geometry.name, modes=modes,
                 seed=int(seed), batch_size=batch_size, device=dev, checks=checks, surrogate=surrogate,
                 explain=stages, suite=suite, certify=certifying, smoothed=smoothed)


def _smoothed_models(models: dict[str, ModelUnderTest], certifying: tuple[str, float | None] | None, seed: int,
                     dataset: Dataset) -> dict[str, ModelUnderTest]:
    """certify=smoothing: the smoothed classifier of every differentiable model, audited as a model of its own
    (robustlab.certify.smoothed); a black-box or transfer-only model has no gradient to attack it with."""
    if certifying is None or certifying[0] != "smoothing":
        return {}
    from robustlab.certify.smoothed import inspect_quietly, smoothed_model

    sigma = certifying[1]
    assert sigma is not None
    out: dict[str, ModelUnderTest] = {}
    for mut in models.values():
        if black_box(mut) or needs_transfer(mut):
            continue
        twin = smoothed_model(mut, sigma, seed=seed)
        if twin.name in models:
            raise InputError("certify", f"a model is named {twin.name!r}, the name of {mut.name!r}'s smoothed "
                                        "classifier; rename it")
        inspect_quietly(twin, validate_inputs(twin, dataset.x))
        out[twin.name] = twin
    return out


def _smoothed_plan(plan: _Plan) -> _Plan:
    """How a smoothed classifier is audited: EoT-PGD on its soft prediction, untargeted, no cascade, no
    checks or explanations (the checks' adaptive attacks are for the base model), and its certificate."""
    import dataclasses

    from robustlab.certify.smoothed import EoTPGD

    return dataclasses.replace(plan, models=plan.smoothed, attacks=[EoTPGD(norm=plan.norm)], modes=["none"],
                               checks="none", explain=[], suite="none")


CERTIFY_METHODS = ("ibp", "crown", "smoothing")
DEFAULT_SIGMA = 0.25


def parse_certify(value: Any) -> tuple[str, float | None] | None:
    """None, "ibp", "crown", "smoothing", "smoothing:SIGMA" -> None or (method, sigma); InputError naming certify."""
    if value is None:
        return None
    expected = "expected none, ibp, crown, smoothing or smoothing:SIGMA"
    if not isinstance(value, str):
        raise InputError("certify", f"{expected}, got {value!r}")
    text = value.strip().lower()
    if text in ("", "none"):
        return None
    method, colon, rest = text.partition(":")
    method = method.strip()
    if method not in CERTIFY_METHODS:
        raise InputError("certify", f"{expected}, got {value!r}")
    if method != "smoothing":
        if colon:
            raise InputError("certify", f"{method} takes no parameter, got {value!r}")
        return method, None
    if not colon:
        return method, DEFAULT_SIGMA
    try:
        sigma = float(rest)
    except ValueError:
        raise InputError("certify", f"smoothing:SIGMA needs a number, got {value!r}") from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise InputError("certify", f"smoothing's noise level sigma must be > 0, got {value!r}")
    return method, sigma


def certify_spec(parsed: tuple[str, float | None] | None) -> str | None:
    """The canonical text of a parsed certify option ("crown", "smoothing:0.25"), or None."""
    if parsed is None:
        return None
    method, sigma = parsed
    return method if sigma is None else f"{method}:{sigma:g}"


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


def eps_values(eps: Any) -> list:
    """The budgets as given: a number, a string ("0.1", "8/255", "0.05,0.1"), or a sequence of those;
    strings become floats here, anything else is checked by the caller."""
    from fractions import Fraction

    if isinstance(eps, (str, int, float, np.floating)):
        items = [eps]
    else:
        try:
            items = list(eps)
        except TypeError:
            raise InputError("eps", f"expected a number or a list of numbers, got {eps!r}") from None
    out: list = []
    for item in items:
        if not isinstance(item, str):
            out.append(item)
            continue
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            try:
                out.append(float(Fraction(part)) if "/" in part else float(part))
            except (ValueError, ZeroDivisionError):
                raise InputError("eps", f"not a number: {part!r} (give numbers, or text like '0.1' or "
                                        "'8/255')") from None
    return out


def check_model_name(name: Any, argument: str = "name") -> None:
    """Model names become parts of examples.npz entry names (`adv|MODEL|...`, paths when the archive is
    unzipped) and of report anchors: refuse '|' (the key separator), control characters and '..' as a
    path component (a name like ../../x would climb out of an unzipped archive)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(argument, f"a model name must be a non-empty string, got {name!r}")
    problems = (["'|' (the separator of examples.npz keys)"] if "|" in name else []) + \
        ([f"a control character ({next(c for c in name if ord(c) < 32 or ord(c) == 127)!r})"]
         if any(ord(c) < 32 or ord(c) == 127 for c in name) else []) + \
        (["'..' as a path component"] if ".." in name.replace("\\", "/").split("/") else []) + \
        (["only dots"] if set(name.strip()) == {"."} else [])
    if problems:
        raise InputError(argument, f"model name {name!r} contains {problems[0]}; model names become entry and "
                                   "file names, so choose another (e.g. letters, digits and . _ - + ( ) =)")


def _warn_unused_options(built: Sequence[Attack], **options: Any) -> None:
    """--steps/--restarts/--loss reach only attacks whose registration takes them: given with none of
    those (e.g. FGSM alone), say they are ignored rather than ignore them silently."""
    for option, value in options.items():
        if value is None:
            continue
        takers = [a for a in built if option in getattr(attack_registry.entry(a.name), "audit_options", ())]
        if not takers:
            run = ", ".join(a.label for a in built)
            warnings.warn(f"{option}={value} is ignored: none of the attacks run ({run}) takes it",
                          RobustlabWarning, stacklevel=4)


def _build_attack(spec: str | Attack, norm: str, *, steps, restarts, loss) -> Attack:
    """An attack set up for the audit's norm with the audit-wide options it takes, as its registry
    entry declares (robustlab.attacks.registry: APGD's schedule and APGD-T's DLR loss are part of what
    makes them strong, so they take none; foolbox attacks keep their native norm)."""
    if isinstance(spec, Attack):
        attack = spec
    elif isinstance(spec, str):
        attack = get_attack(spec)
        if spec.lower().startswith("foolbox:"):
            native = attack.native_norm()  # type: ignore[attr-defined]
            attack = attack.replace(norm=native if native and attack.minimal else norm)
    else:
        raise InputError("attacks", f"expected attack names or Attack objects, got {type(spec).__name__}")
    registered = attack_registry.entry(attack.name)
    if registered is None:
        return attack
    return registered.configure(attack, norm, steps=steps, restarts=restarts, loss=loss)


# ---------------------------------------------------------------------------- transfer
def needs_transfer(mut: ModelUnderTest) -> bool:
    """True for models with no usable gradient (e.g. a vote ensemble): attacked through `surrogate`."""
    return bool(getattr(mut.module, "requires_transfer", False))


def black_box(mut: ModelUnderTest) -> bool:
    """True for models with no gradient at all (an ONNX graph run by onnxruntime): only gradient-free
    attacks run on them, plus transfer from the audit's surrogate when one is given."""
    return bool(getattr(mut.module, "black_box", False))


def _model_attacks(mut: ModelUnderTest, plan: "_Plan", say: Progress) -> list[tuple[Attack, Extra | None]]:
    """The attacks run on one model: the plan's, or for a black-box model its gradient-free ones (Square
    at AutoAttack's settings when none is asked for) and the others as transfer from the surrogate."""
    if not black_box(mut):
        return [(a, None) for a in plan.attacks]
    from robustlab.attacks import Square
    from robustlab.attacks.square import PUBLISHED

    free = [a for a in plan.attacks if isinstance(a, Square)] or [
        Square(norm=plan.norm, loss="margin", queries=int(PUBLISHED["queries"]), p_init=float(PUBLISHED["p_init"]),
               rescale=bool(PUBLISHED["rescale"]))]
    chosen: list[tuple[Attack, Extra | None]] = [(a, None) for a in free]
    others = [a for a in plan.attacks if not isinstance(a, (Square, Cascade))]
    if plan.surrogate is not None:
        source = _user_surrogate(mut, plan.surrogate)
        chosen += [(a, Extra(label=a.label, attack=a, reason=TRANSFER_NOTE, source=source, transfer=True))
                   for a in others]
        others = []
    skipped = [a.label for a in others] + [a.label for a in plan.attacks if isinstance(a, Cascade)]
    say(f"{mut.name}: black-box ({getattr(mut.module, 'reason', '') or 'no gradient'}): running "
        f"{', '.join(a.label for a, _ in chosen)}" + (f"; not run: {', '.join(skipped)}" if skipped else ""))
    return chosen


def _black_box_checks(mut: ModelUnderTest, plan: "_Plan", x, y, ids, clean_correct, logits, states,
                      say: Progress) -> dict:
    """The integrity checks registered as needing no gradient (logits, determinism, eps-monotonic); the
    others are recorded as skipped with the reason."""
    from robustlab.integrity.runner import run_checks

    started = time.perf_counter()
    ctx = ModelContext(mut=mut, source=mut, via_transfer=False, x=x, y=y, ids=ids, clean_correct=clean_correct,
                       norm=plan.norm, eps=list(plan.eps), seed=plan.seed, batch_size=plan.batch_size,
                       level=plan.checks, attacks=list(plan.attacks))
    say(f"{mut.name}: integrity checks ({plan.checks}, black-box: those without gradients)")
    evidence = {mode: state.evidence for mode, state in states.items()}
    results = run_checks(ctx, evidence, logits, None, black_box=True)
    return {"results": [r.to_dict() for r in results], "adaptive": [], "seconds": time.perf_counter() - started}


def _mark_black_box(evaluations: list[dict], plan: "_Plan") -> None:
    """A black-box model's evaluation is weaker than standard, whatever its checks, and says why."""
    from robustlab.verdicts import ESTABLISHED, STATUS_TEXT, SUITE_REASONS, WEAKER

    names = {name for name, mut in plan.models.items() if black_box(mut)}
    for record in evaluations:
        if record.get("model") not in names:
            continue
        record["reductions"] = [BLACK_BOX_REASON] + [r for r in record.get("reductions", [])
                                                     if r != SUITE_REASONS["none"]]
        if record.get("status") == ESTABLISHED:
            record["status"] = WEAKER
        record["reasons"] = list(record.get("failed_checks", [])) + record["reductions"]
        record["meaning"] = STATUS_TEXT[record["status"]]


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


def _user_surrogate(mut: ModelUnderTest, module: Any) -> ModelUnderTest:
    """The user's surrogate (strict transfer check), wrapped like `mut`; cached on `mut`."""
    cached = getattr(mut, "_check_surrogate", None)
    if cached is not None:
        return cached
    if isinstance(module, ModelUnderTest):
        wrapped = module
    else:
        wrapped = ModelUnderTest(module, bounds=mut.bounds, mean=mut.mean, std=mut.std, name=f"{mut.name}:surrogate",
                                 classes=mut.classes, device=mut.device)
    mut._check_surrogate = wrapped  # type: ignore[attr-defined]
    return wrapped


def _check_surrogate(mut: ModelUnderTest, plan: "_Plan") -> ModelUnderTest | None:
    if plan.surrogate is not None:
        return _user_surrogate(mut, plan.surrogate)
    return _surrogate(mut) if needs_transfer(mut) else None


# ---------------------------------------------------------------------------- running
def _clean_logits(mut: ModelUnderTest, x: torch.Tensor, batch_size: int | None) -> tuple[torch.Tensor, int]:
    """The clean logits, batch by batch (sharded like an attack under torch.distributed: robustlab.distributed)."""
    runner = BatchRunner(batch_size, mut.device, x[0].numel())

    def one(a: int, b: int) -> dict:
        with torch.no_grad():
            return {"logits": mut(mut.to_device(x[a:b])).double().cpu()}

    def block(a: int, b: int) -> list[dict]:
        return runner.run(b - a, lambda i, j: one(a + i, a + j), desc=f"{mut.name}: clean")

    with mut.evaluating():
        parts = distributed.run_parts(len(x), runner.batch_size, block)
    return torch.cat([p["logits"] for p in parts]), runner.batch_size


def _audit_one(mut: ModelUnderTest, plan: _Plan, say: Progress,
               certified: dict[str, dict]) -> tuple[list[dict], pd.DataFrame, int, dict, dict, Any]:
    data = plan.data
    x, y, ids = data.x, data.y, data.indices
    assert ids is not None  # Dataset.__post_init__ fills the sample ids
    logits, used_batch = _clean_logits(mut, x, plan.batch_size)
    clean_pred = logits.argmax(dim=1)
    smoothing_base = getattr(mut, "smoothing_of", None)  # a smoothed classifier (robustlab.certify.smoothed)
    if smoothing_base is not None:  # its prediction is PREDICT's: -1 where it abstains, never correct
        from robustlab.certify.smoothed import smoothed_prediction

        clean_pred = smoothed_prediction(mut, x, ids, seed=plan.seed, batch_size=plan.batch_size)
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
    states: dict[str, _ModeState] = {}
    attacks = _model_attacks(mut, plan, say)
    explain_attack = _explained_attack(plan) if plan.explain else None
    explain_mode = "none" if "none" in plan.modes else plan.modes[0]  # untargeted, else the first mode's first target
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # "attack|eps" -> adversarial inputs to explain
    keep_count = _explained_count(plan, x)

    def keep(label: str, eps: float, state: "_ModeState", block: "_Block") -> None:
        """Per-sample results of one (attack, eps): what the checks and the worst case are built from."""
        state.evidence.robust[(label, eps)] = block.robust
        state.evidence.success[(label, eps)] = block.success
        state.blocks[(label, eps)] = block

    def run(attack: Attack, mode: str, state: "_ModeState", extra: Extra | None = None) -> None:
        label = extra.label if extra is not None else None
        for eps, per_set, seconds, calls in _run_attack(attack, mut, plan, x, y, ids, clean_correct, state.target_sets,
                                                        say, label=label, extra=extra):
            record, block = _summarise(
                mut.name, attack, plan.norm, eps, mode, per_set, x, y, clean_pred, clean_correct, state.target_sets,
                seconds, calls, rows, ids, label=label)
            _add_note(record, _row_note(mut, extra))
            summaries.append(record)
            examples[example_key(mut.name, record["attack"], eps, mode)] = _adversarial_examples(per_set[0], x, shown)
            if (eps is not None and mode == explain_mode and record["attack"] == explain_attack
                    and per_set[0][0] is not None):
                outcome = per_set[0][0]
                kept[f"{record['attack']}|{eps:g}"] = (outcome.x_adv[:keep_count], outcome.adv_pred[:keep_count])
            if eps is not None:
                keep(record["attack"], eps, state, block)
            else:
                state.evidence.unbounded[record["attack"]] = block.success

    def found(f: "Found") -> None:
        """A probe's verified outcomes: sample rows of their own (no summary row), and the worst case."""
        state = states[f.mode]
        n = len(y)
        per_set = []
        for set_index in range(max(1, len(state.target_sets))):
            part = next((p for p in f.parts if p[0] == set_index), None)
            mask = torch.zeros(n, dtype=torch.bool)
            if part is not None:  # positions ascending (probes.rows draws them so): the outcome's row order
                mask[part[1]] = True
            per_set.append((None if part is None else part[2], mask))
        calls = sum(int(p[2].gradient_calls) for p in f.parts)
        seconds = sum(float(p[2].seconds) for p in f.parts)
        _, block = _summarise(mut.name, None, plan.norm, f.eps, f.mode, per_set, x, y, clean_pred,
                              clean_correct, state.target_sets, seconds, calls, rows, ids, label=f.label)
        keep(f.label, f.eps, state, block)
        spent_calls, spent_seconds = state.probe_cost.get(f.eps, (0, 0.0))
        state.probe_cost[f.eps] = (spent_calls + calls, spent_seconds + seconds)

    for mode in plan.modes:
        target_sets = targeting.select(mode, y, logits, ids, seed=plan.seed, num_classes=mut.num_classes)
        masks = torch.stack([clean_correct & s.valid for s in target_sets] if target_sets else [clean_correct])
        state = _ModeState(target_sets, ModeEvidence(mode=mode, target_sets=target_sets, masks=masks))
        states[mode] = state
        for attack, transferred in bars.steps(attacks, f"{mut.name} ({mode})", unit="attack"):
            run(attack, mode, state, transferred)
    if "none" in states:  # a targeted success is a misclassification: it breaks the untargeted threat model too
        states["none"].evidence.also = [s.evidence for m, s in states.items() if m != "none"]
    integrity: dict = {}
    if plan.checks != "none":
        integrity = (_black_box_checks(mut, plan, x, y, ids, clean_correct, logits, states, say) if black_box(mut)
                     else _run_checks(mut, plan, x, y, ids, clean_correct, logits, states, run, found, say))
    explanation = None
    if plan.explain:
        from robustlab.explaining import explain_model

        attacked = torch.nonzero(clean_correct).reshape(-1)[:keep_count]
        explanation = explain_model(mut, x[attacked], y[attacked], ids[attacked],
                                    {k: v for k, v in kept.items() if len(v[0]) == len(attacked)}, plan.explain,
                                    background=x, seed=plan.seed, batch_size=plan.batch_size,
                                    differentiable=not via_surrogate and not black_box(mut), say=say)
    certificates: dict[float, Any] = {}
    smoothing = plan.certify is not None and plan.certify[0] == "smoothing"
    certified_name = mut.name
    if smoothing and smoothing_base is None:  # the smoothed classifier's certificate: on its own model's rows
        from robustlab.certify.smoothed import smoothed_name

        assert plan.certify is not None and plan.certify[1] is not None
        certified_name = smoothed_name(mut.name, plan.certify[1])
    if plan.certify is not None and certified_name in plan.smoothed and certified_name != mut.name:
        certified[mut.name] = {"method": "smoothing", "sigma": plan.certify[1], "status": "smoothed",
                               "smoothed_model": certified_name}
    elif plan.certify is not None:
        certificates, certified[certified_name] = _certify_one(smoothing_base or mut, plan, x, y, ids,
                                                               "none" in states, say)
        for eps, outcome in certificates.items():
            summaries.append(_certified_rows(certified_name, plan, eps, outcome, x, y, ids, clean_pred,
                                             clean_correct, rows))
    # the bracket [certified, attacked] on the worst-case row: of the same classifier only
    bracket = {e: o for e, o in certificates.items() if o.method in ("ibp", "crown") or smoothing_base is not None}
    for mode, state in states.items():
        others = [s for m, s in states.items() if m != mode] if mode == "none" else []
        mine = bracket if mode == "none" else {}
        if len(state.blocks) + sum(len(s.blocks) for s in others) < 2 and not mine:
            continue  # one attack at one eps: its own row is the worst case
        for eps in plan.eps:
            worst = _worst_case(mut.name, plan.norm, eps, mode, state, others, summaries, y, ids, clean_pred,
                                clean_correct, rows)
            if worst is None:
                continue
            if via_surrogate:
                _add_note(worst, TRANSFER_NOTE)
            if eps in mine:
                worst["certified_accuracy"] = mine[eps].certified_accuracy
            summaries.append(worst)
        for eps, outcome in mine.items():
            if outcome.method != "smoothing":
                _check_consistency(mut.name, plan.norm, eps, outcome, state, others, ids)
                continue
            # a smoothing certificate holds with probability 1 - alpha, for the hard smoothed classifier: the
            # samples it certifies that EoT-PGD broke (on the soft one) are counted, not an error
            from robustlab.certify.smoothed import broken_certified

            broken = broken_certified(outcome, [b for (_, e), b in state.blocks.items() if e <= eps + 1e-9])
            certified[mut.name].setdefault("certified_and_broken", {})[format(eps, "g")] = broken
    return summaries, sample_frame(rows), used_batch, examples, integrity, explanation


# ---------------------------------------------------------------------------- certificates
def _certify_one(mut: ModelUnderTest, plan: _Plan, x, y, ids, untargeted: bool,
                 say: Progress) -> tuple[dict[float, Any], dict]:
    """Certificates (robustlab.certify) of the untargeted threat model at every eps, and what
    metadata["certify"][model] records: the method, or why the model was skipped."""
    from robustlab.certify import UnsupportedLayerError, certify

    assert plan.certify is not None
    method, sigma = plan.certify
    info: dict[str, Any] = {"method": method, **({"sigma": sigma} if sigma is not None else {})}
    if black_box(mut):
        info.update(status="skipped", reason="the model is black-box (run by onnxruntime): no layers to bound")
        say(f"{mut.name}: certify {method} skipped: {info['reason']}")
        return {}, info
    if not untargeted:
        info.update(status="skipped", reason="certificates are for the untargeted threat model, which this audit "
                                             "does not run (targeted=none)")
        say(f"{mut.name}: certify {method} skipped: {info['reason']}")
        return {}, info
    out: dict[float, Any] = {}
    started = time.perf_counter()
    try:
        if method == "smoothing":  # one CERTIFY run: the radii give every eps
            base = certify(mut, x, y, eps=max(plan.eps), norm=plan.norm, method=method, sigma=sigma,
                           seed=plan.seed, sample_ids=ids, batch_size=plan.batch_size)
            for eps in plan.eps:
                out[eps] = _at_eps(base, eps)
        else:
            for eps in plan.eps:
                out[eps] = certify(mut, x, y, eps=eps, norm=plan.norm, method=method, sample_ids=ids)
                say(f"{mut.name}: certified:{method} eps={eps:g}: {out[eps].certified_accuracy:.1%} certified "
                    f"in {out[eps].seconds:.1f}s")
    except UnsupportedLayerError as error:
        info.update(status="skipped", reason=error.problem, layer=error.layer, kind=error.kind)
        say(f"{mut.name}: certify {method} skipped: cannot certify layer {error.layer!r} ({error.kind}): "
            f"{error.reason}")
        return {}, info
    seconds = time.perf_counter() - started
    notes = list(dict.fromkeys(note for o in out.values() for note in o.notes))
    info.update(status="certified", seconds=round(seconds, 3), notes=notes,
                certified_accuracy={format(e, "g"): o.certified_accuracy for e, o in out.items()})
    if method == "smoothing":
        info.update(abstention_rate=next(iter(out.values())).abstention_rate,
                    options={k: v for k, v in next(iter(out.values())).options.items()})
        say(f"{mut.name}: certified:{method} (sigma={sigma:g}) in {seconds:.1f}s")
    return out, info


def _at_eps(base: Any, eps: float) -> Any:
    """A smoothing outcome re-read at another eps from the same radii."""
    import dataclasses

    return dataclasses.replace(base, eps=eps, certified=base.certified_at(eps))


def _certified_rows(model_name: str, plan: _Plan, eps: float, outcome: Any, x, y, ids, clean_pred, clean_correct,
                    rows) -> dict:
    """Sample rows of one certificate (robust = certified, nothing attacked) and its summary record."""
    assert plan.certify is not None
    method, sigma = plan.certify
    label = certified_label(method, sigma)
    n = len(y)
    certified = outcome.certified.cpu().bool()
    nan = [float("nan")] * n
    rows["model"] += [model_name] * n
    rows["sample"] += ids.tolist()
    rows["attack"] += [label] * n
    rows["norm"] += [plan.norm] * n
    rows["eps"] += [eps] * n
    rows["targeted"] += ["none"] * n
    rows["target"] += [pd.NA] * n
    rows["label"] += y.tolist()
    rows["clean_pred"] += clean_pred.tolist()
    rows["adv_pred"] += outcome.prediction.cpu().long().tolist()  # smoothing: the smoothed class, -1 abstained
    rows["adv_confidence"] += nan
    rows["clean_correct"] += clean_correct.tolist()
    rows["attacked"] += [False] * n
    rows["success"] += [False] * n
    rows["robust"] += certified.tolist()
    rows["l2"] += nan
    rows["linf"] += nan
    record: dict[str, Any] = {
        "model": model_name, "attack": label, "norm": plan.norm, "eps": eps, "targeted": "none", "n": n,
        "clean_accuracy": float(clean_correct.double().mean()) if n else float("nan"),
        "robust_accuracy": float("nan"), "certified_accuracy": outcome.certified_accuracy,
        "success_rate": float("nan"), "n_attacked": 0, "median_l2": float("nan"), "median_linf": float("nan"),
        "gradient_calls": 0, "seconds": round(float(outcome.seconds), 4)}
    if method == "smoothing":
        _add_note(record, f"the smoothed classifier (sigma={sigma:g}, n={outcome.options.get('n')}, "
                          f"alpha={outcome.options.get('alpha')}), not the model; abstained on "
                          f"{outcome.abstention_rate:.1%}")
    return record


def _check_consistency(model_name: str, norm: str, eps: float, outcome: Any, state: _ModeState,
                       others: list[_ModeState], ids: Any) -> None:
    """A sample proven robust at eps must not be broken by any verified attack at eps (or at a smaller eps:
    the balls are nested), untargeted or targeted: one of the two would be wrong."""
    certified = outcome.certified.cpu().bool()
    if not certified.any():
        return
    within = eps + 1e-9 * max(1.0, eps)
    clash = torch.zeros_like(certified)
    attacks: list[str] = []
    blocks = [(k, b, False) for k, b in state.blocks.items()] + \
        [(k, b, True) for other in others for k, b in other.blocks.items()]
    for (label, e), block, targeted in blocks:
        if e > within:
            continue
        broken = (block.attacked & ~block.robust).any(dim=0).cpu() & certified
        if broken.any():
            clash |= broken
            name = label if e == eps else f"{label} at eps={e:g}"
            attacks.append(name + (" (targeted)" if targeted else ""))
    if clash.any():
        samples = ids[torch.nonzero(clash).reshape(-1)].tolist()
        raise VerificationError(
            f"model {model_name!r}: {int(clash.sum())} samples certified robust by {outcome.method} at {norm} "
            f"eps={eps:g} were broken by verified attacks ({', '.join(dict.fromkeys(attacks))}); samples "
            f"{samples[:5]}{' ...' if len(samples) > 5 else ''}: a bug in the certificate or in the attack")


def _explained_attack(plan: _Plan) -> str | None:
    """The attack whose adversarial inputs are explained: PGD when it ran, else the first one run."""
    names = [a.label for a in plan.attacks]
    return "pgd" if "pgd" in names else (names[0] if names else None)


def _explained_count(plan: _Plan, x: torch.Tensor) -> int:
    from robustlab.explaining import N_PROBE, PROBE_VALUES

    return max(20, min(N_PROBE, PROBE_VALUES // max(1, x[0].numel())))


@dataclass
class _Block:
    """One (attack, eps, mode)'s per-(target set, sample) results, each (sets, n)."""

    robust: torch.Tensor
    attacked: torch.Tensor
    success: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    adv_pred: torch.Tensor
    confidence: torch.Tensor


@dataclass
class _ModeState:
    """Per targeted mode: its target sets and every attack's (and probe's) per-(set, sample) results so far."""

    target_sets: list
    evidence: ModeEvidence
    blocks: dict = field(default_factory=dict)  # (attack label, eps) -> _Block
    probe_cost: dict = field(default_factory=dict)  # eps -> (queries/gradient calls, seconds) of the probes' rows

    @property
    def eligible(self) -> torch.Tensor:
        """Samples some target set can attack (a fixed target class cannot attack its own samples)."""
        return _eligible(self.target_sets, self.evidence.masks.shape[1])


def _row_note(mut: ModelUnderTest, extra: Extra | None) -> str | None:
    if extra is not None and extra.source is not None:
        return f"generated on {extra.source.name}, judged on {mut.name}" if extra.transfer else None
    return TRANSFER_NOTE if needs_transfer(mut) else None


def _run_checks(mut, plan: _Plan, x, y, ids, clean_correct, logits, states, run, found, say) -> dict:
    """Integrity checks for one model, with the margin-loss PGD before and the adaptive attacks after.

    Every adversarial example a check's probe found is kept (`found`) before the adaptive attacks run."""
    from robustlab.integrity import adaptive as adaptive_attacks
    from robustlab.integrity.runner import run_checks

    started = time.perf_counter()
    via_surrogate = needs_transfer(mut)
    ctx = ModelContext(mut=mut, source=_surrogate(mut) if via_surrogate else mut, via_transfer=via_surrogate,
                       x=x, y=y, ids=ids, clean_correct=clean_correct, norm=plan.norm, eps=list(plan.eps),
                       seed=plan.seed, batch_size=plan.batch_size, level=plan.checks, attacks=list(plan.attacks),
                       surrogate=_check_surrogate(mut, plan) if plan.checks == "strict" else None)
    ran: list[dict] = []
    margin = adaptive_attacks.margin_pgd(ctx)
    if margin is not None:
        for mode, state in states.items():
            run(margin.attack, mode, state, margin)
        ran.append(margin.describe(mut.name))
    evidence = {mode: state.evidence for mode, state in states.items()}
    say(f"{mut.name}: integrity checks ({plan.checks})")
    results = run_checks(ctx, evidence, logits, margin.label if margin is not None else None)
    for r in results:
        if r.status == "fail":
            say(f"{mut.name}: check {r.check} failed" + ("" if r.eps is None else f" at eps={r.eps:g}"))
        for f in r.found:
            found(f)
    extras, notes = adaptive_attacks.plan(ctx, results)
    for extra in extras:
        say(f"{mut.name}: adaptive attack {extra.label}: {extra.reason}")
        for mode, state in states.items():
            run(extra.attack, mode, state, extra)
        ran.append(extra.describe(mut.name))
    return {"results": [r.to_dict() for r in results], "adaptive": ran + notes,
            "seconds": time.perf_counter() - started}


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


def _run_attack(attack: Attack, mut, plan: _Plan, x, y, ids, clean_correct, target_sets, say, *,
                label: str | None = None, extra: Extra | None = None):
    """Yields (eps, [outcome-or-None per target set, with the attacked mask], seconds, gradient calls).

    extra: an attack asked for by the integrity checks (its own source model and eps list)."""
    sets = target_sets or [None]
    masks = [clean_correct if s is None else (clean_correct & s.valid) for s in sets]
    label = label or (attack.label)
    if extra is not None and extra.source is not None:
        source, via_surrogate = extra.source, extra.transfer
    else:
        via_surrogate = needs_transfer(mut)
        source = _surrogate(mut) if via_surrogate else mut  # the model whose gradients the attack uses
    eps_list = plan.eps if extra is None or extra.eps is None else [e for e in plan.eps if e in extra.eps]

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
        for eps in eps_list:
            per_set = []
            for o, mask in zip(base, masks):
                idx = torch.nonzero(mask).reshape(-1)
                per_set.append((None if o is None else restrict(o, mut, x[idx], y[idx], eps, plan.norm,
                                                                batch_size=plan.batch_size), mask))
            yield eps, per_set, seconds, calls
        return
    for eps in eps_list:
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
               calls, rows, ids, label: str | None = None):
    """Rows for one (attack, eps, mode) and its summary record. Robust is per (target set, sample)."""
    n = len(y)
    label = label or (attack.label)
    # Budgeted rows are in the audit's norm; an unbounded run is in the attack's own (CW: L2).
    row_norm = norm if eps is not None else attack.geometry.name
    robust_sets, attacked_sets, success_sets, l2_sets, linf_sets, pred_sets, confidence_sets = [], [], [], [], [], [], []
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
        pred_sets.append(adv_pred)
        confidence_sets.append(confidence)
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
    eligible = _eligible(target_sets, n)
    record = {
        "model": model_name, "attack": label, "norm": row_norm, "eps": eps, "targeted": mode,
        **_over_eligible(robust, clean_correct, eligible, mode),
        "success_rate": _rate(success, attacked),
        "n_attacked": int(attacked.sum()),
        "median_l2": _median(l2[success]), "median_linf": _median(linf[success]),
        "gradient_calls": int(calls), "seconds": round(float(seconds), 4),
    }
    return record, _Block(robust, attacked, success, l2, linf, torch.stack(pred_sets), torch.stack(confidence_sets))


def _eligible(target_sets, n: int) -> torch.Tensor:
    """Samples some target set can attack: all, except a fixed target class's own samples."""
    if not target_sets:
        return torch.ones(n, dtype=torch.bool)
    return torch.stack([s.valid for s in target_sets]).any(dim=0)


def _over_eligible(robust: torch.Tensor, clean_correct: torch.Tensor, eligible: torch.Tensor, mode: str) -> dict:
    """n, clean and robust accuracy of a row over the samples its targets can attack, and a note when that
    is not all of them: a sample whose label is the fixed target cannot be attacked, so it cannot count
    as robust either."""
    k = int(eligible.sum())
    out: dict[str, Any] = {"n": k, "clean_accuracy": float(clean_correct[eligible].double().mean()) if k else float("nan"),
           "robust_accuracy": float(robust.all(dim=0)[eligible].double().mean()) if k else float("nan")}
    excluded = len(eligible) - k
    if excluded:
        out["note"] = (f"{excluded} samples of class {mode} (the target) excluded: they cannot be attacked toward "
                       "their own label")
    return out


def _add_note(record: dict, note: str | None) -> None:
    if note:
        record["note"] = f"{record['note']}; {note}" if record.get("note") else note


_INF = float("inf")


def _worst_case(model_name, norm, eps, mode, state: _ModeState, others: list[_ModeState], summaries, y, ids,
                clean_pred, clean_correct, rows) -> dict | None:
    """The worst-case summary record at eps, and its per-sample rows (attack "worst-case") in `rows`.

    A (target set, sample) is robust only if every attack and probe failed on it at eps and at every
    smaller eps (the balls of one norm are nested, so an adversarial example found at a smaller eps
    is inside this ball too), and, untargeted, if no targeted mode misclassified it either (AutoAttack
    counts APGD-T's successes the same way). Each broken row keeps the smallest adversarial
    perturbation found (in the audit's norm) with its prediction.
    """
    def within(e: float) -> bool:
        return e <= eps + 1e-9 * max(1.0, eps)

    keys = [k for k in state.blocks if within(k[1])]
    if not keys:
        return None
    own = [state.blocks[k] for k in keys]
    attacked = state.evidence.masks
    untargeted = mode == "none"
    # success: untargeted, a misclassification; targeted, the target reached
    layers = [(b.robust, b.attacked & (~b.robust if untargeted else b.success), b) for b in own]
    for other in others:
        for k in [k for k in other.blocks if within(k[1])]:
            layers.append(_misclassified(other.blocks[k], norm))
    robust = torch.stack([r for r, _, _ in layers]).all(dim=0)  # (sets, n)
    hits = torch.stack([h for _, h, _ in layers])
    success = hits.any(dim=0) & attacked
    wrong = torch.stack([b.attacked & ~r for r, _, b in layers])  # misclassified, target reached or not
    size = torch.stack([(b.linf if norm == "linf" else b.l2).double() for _, _, b in layers])
    chosen = torch.where(hits.any(dim=0), torch.where(hits, size, _INF).argmin(dim=0),
                         torch.where(wrong, size, _INF).argmin(dim=0))  # (sets, n): the layer kept per row
    broken = hits.any(dim=0) | wrong.any(dim=0)

    def pick(name: str) -> torch.Tensor:
        return torch.stack([getattr(b, name) for _, _, b in layers]).gather(0, chosen.unsqueeze(0)).squeeze(0)

    adv_pred = pick("adv_pred")
    confidence = torch.where(broken, pick("confidence"), float("nan"))
    l2 = torch.where(broken, pick("l2"), float("nan"))
    linf = torch.where(broken, pick("linf"), float("nan"))
    smallest_l2 = torch.stack([torch.where(h, b.l2, _INF) for _, h, b in layers]).amin(dim=0)
    smallest_linf = torch.stack([torch.where(h, b.linf, _INF) for _, h, b in layers]).amin(dim=0)
    n = len(y)
    for s in range(robust.shape[0]):
        target = state.target_sets[s].targets if state.target_sets else None
        rows["model"] += [model_name] * n
        rows["sample"] += ids.tolist()
        rows["attack"] += [WORST_CASE] * n
        rows["norm"] += [norm] * n
        rows["eps"] += [eps] * n
        rows["targeted"] += [mode] * n
        rows["target"] += [pd.NA] * n if target is None else target.tolist()
        rows["label"] += y.tolist()
        rows["clean_pred"] += clean_pred.tolist()
        rows["adv_pred"] += adv_pred[s].tolist()
        rows["adv_confidence"] += confidence[s].tolist()
        rows["clean_correct"] += clean_correct.tolist()
        rows["attacked"] += attacked[s].tolist()
        rows["success"] += success[s].tolist()
        rows["robust"] += robust[s].tolist()
        rows["l2"] += l2[s].tolist()
        rows["linf"] += linf[s].tolist()
    modes = {mode} | ({s["targeted"] for s in summaries} if others else set())  # untargeted: every mode's work
    same = [s for s in summaries if s["model"] == model_name and s["targeted"] in modes and s["eps"] is not None
            and s["attack"] != WORST_CASE and within(float(s["eps"]))]
    probe_calls = sum(c for st in [state, *others] for e, (c, _) in st.probe_cost.items() if within(e))
    probe_seconds = sum(t for st in [state, *others] for e, (_, t) in st.probe_cost.items() if within(e))
    record = {
        "model": model_name, "attack": WORST_CASE, "norm": norm, "eps": eps, "targeted": mode,
        **_over_eligible(robust, clean_correct, state.eligible, mode),
        "success_rate": _rate(success, attacked), "n_attacked": int(attacked.sum()),
        "median_l2": _median(smallest_l2[success]), "median_linf": _median(smallest_linf[success]),
        "gradient_calls": int(sum(s["gradient_calls"] for s in same) + probe_calls),
        "seconds": round(float(sum(s["seconds"] for s in same) + probe_seconds), 4),
    }
    return record


def _misclassified(block: _Block, norm: str) -> tuple[torch.Tensor, torch.Tensor, _Block]:
    """A targeted mode's block seen from the untargeted threat model: one row per sample, broken where
    any target set misclassified it (keeping the smallest such perturbation)."""
    wrong = block.attacked & ~block.robust
    size = torch.where(wrong, block.linf if norm == "linf" else block.l2, _INF)
    best = size.argmin(dim=0, keepdim=True)

    def one(t: torch.Tensor) -> torch.Tensor:
        return t.gather(0, best)

    attacked = block.attacked.any(dim=0, keepdim=True)
    robust = block.robust.all(dim=0, keepdim=True)
    hit = attacked & ~robust
    reduced = _Block(robust=robust, attacked=attacked, success=hit, l2=one(block.l2), linf=one(block.linf),
                     adv_pred=one(block.adv_pred), confidence=one(block.confidence))
    return robust, hit, reduced


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
    opaque = {name: f"{BLACK_BOX_REASON} ({getattr(mut.module, 'reason', '')})"
              for name, mut in plan.models.items() if black_box(mut)}
    return {
        **({"transfer": transferred} if transferred else {}),
        **({"black_box": opaque} if opaque else {}),
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
            "worst-case": "a sample counts as robust at an eps only if every attack, probe and adaptive attack "
                          "failed on it at that eps and at every smaller eps (the balls are nested), and, "
                          "untargeted, if no targeted mode misclassified it either",
        },
    }


def _progress(progress: bool | Progress | None) -> Progress:
    """Status lines to the logger, and to `progress` when it is a callable (bars: robustlab.progress)."""
    bars.environment_setting()  # a bad ROBUSTLAB_PROGRESS is refused before any work

    def say(message: str) -> None:
        _log.info(message)
        if callable(progress):
            progress(message)
    return say
