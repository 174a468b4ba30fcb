"""Defended versions of a given model, built by name: what `--defend` and `robustlab demo` run.

    pgd-at        PGD adversarial training (Madry et al. 2018) from a fresh initialisation
    fast-at       FGSM with random start (Wong et al. 2020)
    trades        TRADES (Zhang et al. 2019)
    distillation  defensive distillation at temperature T (Papernot et al. 2016), deployed at T = 1
    ensemble      the given model plus independently trained copies: averaged logits ("ensemble")
                  and majority vote ("ensemble-vote", audited by transfer)

Every defended model is a fresh copy of the given architecture: the user's module is never
trained or modified. "Fresh" means re-initialised by each submodule's `reset_parameters` under a
seed, so a model whose parameters cannot be re-initialised that way (TorchScript, an exported
program, a bare `nn.Parameter` on a custom module) is refused with the reason before any training.

Adversarial training writes a checkpoint after every epoch into `work_dir/<defense>-<key>`; the
key hashes the base weights, the training data and the recipe, so re-running the same command
resumes an interrupted run and reuses a finished one. Distilled models and ensemble members are
cached the same way once trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from robustlab.data import Dataset, load_data
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest, is_exported, state_dict_sha256
from robustlab.training import train_classifier

from .adversarial import Normalised, adversarial_training
from .distillation import distill
from .ensemble import ensemble

DEFENSES = ("pgd-at", "fast-at", "trades", "distillation", "ensemble")
_AT_METHOD = {"pgd-at": "pgd", "fast-at": "fast", "trades": "trades"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """How the defenses are trained. eps/norm: the adversarial-training threat model."""

    eps: float
    norm: str = "linf"
    epochs: int = 30
    steps: int = 7
    lr: float = 3e-3
    batch_size: int = 64
    temperature: float = 20.0
    members: int = 3
    seed: int = 0


def parse_defenses(text: str | Sequence[str]) -> list[str]:
    """'pgd-at,distillation,ensemble' -> names, checked; 'all' -> every defense."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(DEFENSES)
    aliases = {"pgd": "pgd-at", "adversarial-training": "pgd-at", "fast": "fast-at", "distill": "distillation",
               "distilled": "distillation"}
    names = [aliases.get(n, n) for n in names]
    unknown = [n for n in names if n not in DEFENSES]
    if unknown or not names:
        raise InputError("defend", f"unknown defense {', '.join(unknown) or '(none given)'}; expected a comma-separated "
                                   f"list of {', '.join(DEFENSES)} (or all)")
    return list(dict.fromkeys(names))


def fresh_copy(module: nn.Module | Callable[[torch.Tensor], torch.Tensor], seed: int) -> nn.Module:
    """A copy of `module` with every parameter re-initialised (seeded); refuses what it cannot reset."""
    if not isinstance(module, nn.Module) or is_exported(module) or isinstance(module, torch.jit.ScriptModule):
        kind = "an exported program" if isinstance(module, nn.Module) and is_exported(module) else (
            "a TorchScript module" if isinstance(module, torch.jit.ScriptModule) else type(module).__name__)
        raise InputError("model", f"defenses train fresh copies of the model's architecture, which needs a Python "
                                  f"nn.Module; this model is {kind}. Give it as package.module:factory with --weights")
    copied = copy.deepcopy(module)
    resettable = [m for m in copied.modules() if callable(getattr(m, "reset_parameters", None))]
    covered = {id(p) for m in resettable for p in m.parameters(recurse=False)}
    missing = [n for n, p in copied.named_parameters() if id(p) not in covered]
    if missing:
        raise InputError("model", f"cannot re-initialise parameter(s) {', '.join(missing[:3])}: their module has no "
                                  "reset_parameters(); add one, or train the defended model yourself and pass it to "
                                  "robustlab.audit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in resettable:
            getattr(m, "reset_parameters")()
    for p in copied.parameters():
        p.requires_grad_(True)
    return copied.train()


def build_defenses(base: ModelUnderTest, names: Sequence[str], train_data, recipe: Recipe, *,
                   work_dir: str | os.PathLike | None = None, val_data=None,
                   progress: Progress | None = None) -> dict[str, nn.Module]:
    """Train each named defense from `base`'s architecture on `train_data`; {model name: module (eval)}.

    The returned modules take inputs in the same space as `base` (its mean/std normalisation is
    applied during training and must be given again when they are audited: `defended_wrapper`).
    """
    say = progress if callable(progress) else (lambda message: None)
    names = parse_defenses(names)
    try:
        train = load_data(train_data)
    except InputError as error:
        raise InputError("train_data", error.problem) from None
    fresh_copy(base.module, recipe.seed)  # refuses, before any training, a model it cannot re-initialise
    assert isinstance(base.module, nn.Module)  # fresh_copy refused anything else
    if val_data is None and any(n in _AT_METHOD for n in names):
        train, val_data = split_validation(train, seed=recipe.seed)
    built: dict[str, nn.Module] = {}
    for name in names:
        key = _key(base, train, recipe, name)
        cache = None if work_dir is None else Path(work_dir) / f"{name}-{key}"
        if name in _AT_METHOD:
            say(f"{name}: adversarial training ({recipe.norm} eps={recipe.eps:g}, {recipe.epochs} epochs)")
            # (mypy cannot infer a lambda whose default binds a loop variable: the two ignores below)
            built[name] = adversarial_training(
                fresh_copy(base.module, recipe.seed), train, method=_AT_METHOD[name], eps=recipe.eps,
                norm=recipe.norm, steps=recipe.steps, epochs=recipe.epochs, lr=recipe.lr,
                batch_size=recipe.batch_size, val_data=val_data, seed=recipe.seed, bounds=base.bounds,
                mean=base.mean, std=base.std, checkpoint_dir=cache,
                progress=lambda m, n=name: say(f"{n}: {m}"))  # type: ignore[misc]
        elif name == "distillation":
            built[name] = _cached(cache, base.module, recipe.seed, say, name, lambda: distill(
                _normalised(fresh_copy(base.module, recipe.seed + 101), base), train, temperature=recipe.temperature,
                epochs=recipe.epochs, lr=recipe.lr, seed=recipe.seed, batch_size=recipe.batch_size,
                bounds=base.bounds, student=_normalised(fresh_copy(base.module, recipe.seed + 202), base)))
        else:
            members = [base.module] + [
                _cached(None if cache is None else cache / f"member-{i}", base.module, recipe.seed + i, say,
                        f"ensemble member {i}", lambda i=i: _unwrap(train_classifier(  # type: ignore[misc]
                            _normalised(fresh_copy(base.module, recipe.seed + i), base), train,
                            epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed + i)))
                for i in range(1, recipe.members)]
            example = train.x[:2].to(base.dtype)
            built["ensemble"] = ensemble(members, "logits", example_input=_normalise_input(example, base))
            built["ensemble-vote"] = ensemble(members, "vote", example_input=_normalise_input(example, base))
    for module in built.values():
        module.eval()
    return built


def defended_wrapper(module: nn.Module, base: ModelUnderTest, name: str) -> ModelUnderTest:
    """Wrap a defended module like its base (bounds, normalisation, classes, device)."""
    inner = module.inner if isinstance(module, Normalised) else module
    return ModelUnderTest(inner, bounds=base.bounds, mean=base.mean, std=base.std, name=name, classes=base.classes,
                          output="logits", device=base.device, source=f"robustlab defense of {base.name}")


# ---------------------------------------------------------------------------- saving
def save_models(models: dict[str, nn.Module], directory: str | os.PathLike, *, base: ModelUnderTest,
                base_spec: str | None = None, named: str | os.PathLike | None = None) -> list[Path]:
    """Each defended model as NAME.safetensors (its state_dict) + NAME.json (how it was made, how to load it).

    base_spec: the base model's `--model` (a module:factory, as the user typed it). The JSON's `load` is a
    command that loads the saved weights from the directory the user ran in: `directory` as given (relative
    paths stay relative), with the base's bounds and normalisation.
    named: where the directory will be once in place, when it is written inside a results directory that is
    swapped in later (robustlab.results.AuditResult.save(also=...)): the `load` command and the returned
    paths name it, not the staging copy.
    Written into a staging directory and moved into place, so an interrupted save leaves nothing behind.
    """
    from safetensors.torch import save_file

    target = Path(directory)
    shown = Path(named) if named is not None else target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    written: list[Path] = []
    try:
        for name, module in models.items():
            inner = _unwrap(module)
            tensors = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
            save_file(tensors, str(staging / f"{name}.safetensors"))
            about = {
                "name": name, "defense": getattr(module, "defense", None), "base_model": base.name,
                "base_sha256": base.sha256(), "base_spec": base_spec, "weights_sha256": state_dict_sha256(inner),
                "bounds": base.bounds.to_json(),
                "mean": None if base.mean is None else base.mean.tolist(),
                "std": None if base.std is None else base.std.tolist(),
                "load": _how_to_load(name, module, base_spec, shown / f"{name}.safetensors", base),
            }
            (staging / f"{name}.json").write_text(json.dumps(about, indent=2, default=str) + "\n")
            written.append(shown / f"{name}.safetensors")
        target.mkdir(parents=True, exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for item in staging.iterdir():
            os.chmod(item, 0o666 & ~umask)  # safetensors writes owner-only files; these are results to share
            os.replace(item, target / item.name)
    finally:
        for item in staging.glob("*"):
            item.unlink()
        staging.rmdir()
    return written


def _how_to_load(name: str, module: nn.Module, base_spec: str | None, weights: Path, base: ModelUnderTest) -> str:
    """The command that audits this defended model, runnable from where the user ran the audit."""
    defense = getattr(module, "defense", {}) or {}
    if defense.get("defense") == "ensemble":
        return (f"an ensemble ({defense.get('combine')}) of {defense.get('members')} members of the base architecture; "
                "the state_dict keys are members.<i>.<parameter>: load each member with the base factory and "
                "combine them with robustlab.defenses.ensemble(members, combine)")
    if not base_spec:
        return "the base model's architecture with these weights (load_state_dict)"
    words = ["robustlab", "audit", "--model", base_spec, "--weights", str(weights)]
    bounds = base.bounds.to_json()
    low, high = bounds["low"], bounds["high"]
    per_feature = isinstance(low, list) or isinstance(high, list)
    if not per_feature and (low, high) != (0.0, 1.0):
        words += ["--bounds", f"{_short(low)},{_short(high)}"]
    for flag, value in (("--mean", base.mean), ("--std", base.std)):
        if value is not None:
            words += [flag, ",".join(_short(v) for v in value.detach().cpu().reshape(-1).numpy())]
    command = " ".join(shlex.quote(w) for w in words)
    return command + (" (per-feature bounds: pass bounds= from Python)" if per_feature else "")


def _short(value) -> str:
    """The shortest text that reads back as the same number in its own precision (float32 0.485 -> '0.485')."""
    import numpy as np

    text = str(value if isinstance(value, np.floating) else np.float64(value))
    return text[:-2] if text.endswith(".0") else text


# ---------------------------------------------------------------------------- helpers
def _normalised(module: nn.Module, base: ModelUnderTest) -> nn.Module:
    return Normalised(module, base) if (base.mean is not None or base.std is not None) else module


def _unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, Normalised):
        inner = module.inner
        for attribute in ("defense", "distillation", "training_history"):
            if hasattr(module, attribute):
                setattr(inner, attribute, getattr(module, attribute))
        return inner
    return module


def _normalise_input(x: torch.Tensor, base: ModelUnderTest) -> torch.Tensor:
    return base._normalise(x) if (base.mean is not None or base.std is not None) else x


def split_validation(data: Dataset, *, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A seeded, per-class held-out share of the training data: adversarial training keeps the epoch
    with the best robust accuracy on it (Rice et al. 2020), so it must not be trained on."""
    generator = torch.Generator().manual_seed(seed)
    held: list[torch.Tensor] = []
    for label in torch.unique(data.y):
        where = torch.nonzero(data.y == label).reshape(-1)
        where = where[torch.randperm(len(where), generator=generator)]
        held.append(where[: max(1, round(fraction * len(where)))] if len(where) > 1 else where[:0])
    val_idx = torch.sort(torch.cat(held)).values
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[val_idx] = False
    train_idx = torch.nonzero(keep).reshape(-1)

    def part(idx: torch.Tensor, tag: str) -> Dataset:
        assert data.indices is not None  # Dataset.__post_init__ fills the sample ids
        return Dataset(data.x[idx], data.y[idx], f"{data.source} ({tag})", data.classes, data.indices[idx])

    return part(train_idx, f"{1 - fraction:.0%} for training"), part(val_idx, f"{fraction:.0%} held out for validation")


def _cached(directory: Path | None, like: nn.Module, seed: int, say: Progress, what: str,
            make: Callable[[], nn.Module]) -> nn.Module:
    """Train with `make`, or load the weights a previous identical run saved in `directory`."""
    from safetensors.torch import load_file, save_file

    weights, about = (None, None) if directory is None else (directory / "final.safetensors", directory / "final.json")
    if weights is not None and weights.exists() and about is not None and about.exists():
        module = fresh_copy(like, seed)
        module.load_state_dict(load_file(str(weights)))
        defense = json.loads(about.read_text())
        if defense:
            module.defense = defense
        say(f"{what}: reusing {directory}")
        return module.eval()
    say(f"{what}: training")
    module = _unwrap(make())
    if weights is not None:
        assert directory is not None and about is not None  # the three are None together
        directory.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))
        about.write_text(json.dumps(getattr(module, "defense", None), default=str))
        os.replace(tmp, weights)
    return module.eval()


def _key(base: ModelUnderTest, train: Dataset, recipe: Recipe, name: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"base": base.sha256(), "train": train.fingerprint(), "recipe": asdict(recipe),
                         "defense": name, "bounds": base.bounds.to_json(),
                         "mean": None if base.mean is None else base.mean.tolist(),
                         "std": None if base.std is None else base.std.tolist(), "version": 1},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


__all__ = ["DEFENSES", "Recipe", "build_defenses", "defended_wrapper", "fresh_copy", "parse_defenses", "save_models",
           "split_validation"]
