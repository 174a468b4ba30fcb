"""Adversarial training: PGD-AT (Madry et al. 2018), fast FGSM-AT (Wong et al. 2020), TRADES (Zhang et al. 2019).

    for each epoch, for each shuffled batch (x, y):
        x_adv = inner_max(model, x, y)                       model in EVAL mode, weight grads untouched
        loss  = CE(f(x_adv), y)                               pgd, fast
              | CE(f(x), y) + beta * KL(p(x) || p(x_adv))     trades
        one optimiser step                                    model in TRAIN mode
    keep the weights with the best robust validation accuracy (PGD on val_data; Rice et al. 2020)

Mode during the inner maximisation: we generate adversarial examples with the model in eval mode and
train in train mode. Eval mode makes the inner maximisation attack the function that will be
deployed and audited (batch-norm with running statistics, no dropout noise in the gradient), and it
keeps the attack's extra forward passes from updating batch-norm running statistics with
half-built adversarial inputs. (Madry's reference code attacks in train mode; for models without
batch-norm or dropout, like the digits CNN, the two are identical.)

Randomness is a pure function of (seed, epoch, sample id): the batch order comes from a generator
seeded per epoch, random starts from `robustlab.seeding` streams. So training resumed from a
checkpoint after epoch k continues exactly as an uninterrupted run would.

Distributed: launched by torchrun with WORLD_SIZE > 1, the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU, one GPU per process by LOCAL_RANK). Every rank
draws the same global batch and attacks only its share (batch[rank::world]); the loss is scaled
so that DDP's gradient average equals the single-process gradient of the whole batch. Validation
is sharded the same way and the counts are summed, so every rank keeps the same best epoch; only
rank 0 writes checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustlab import progress as bars
from robustlab.attacks import PGD
from robustlab.attacks.base import validate_inputs, validate_labels
from robustlab.data import Dataset, load_data
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest, RobustlabWarning
from robustlab.threat import Bounds, Norm, get_norm

METHODS = ("pgd", "fast", "trades")
START_STREAM = 500_000  # + epoch; seeding streams for training-time random starts
STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"
BEST_FILE = "best.safetensors"
OPTIMISER_FILE = "optimiser.pt"

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------- inner maximisation
def training_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, objective: Callable,
                    norm: Norm, eps: float, steps: int, step_size: float, bounds: Bounds,
                    start: torch.Tensor | None) -> torch.Tensor:
    """Batched PGD for training: ascend `objective(logits, y) -> per-sample` from x + start.

    Not verified (training only). Gradients are taken with `torch.autograd.grad` with respect to
    the input alone, so parameters' `.grad` are never touched. The caller picks the model's mode.
    """
    low, high = bounds.tensors(x)
    eps_t = torch.full((len(x),), eps, dtype=x.dtype, device=x.device)
    x_adv = x.clone() if start is None else torch.minimum(torch.maximum(x + start, low), high)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            value = objective(model(x_adv), y)
            (grad,) = torch.autograd.grad(value.sum(), x_adv)
        x_adv = norm.ascend(x, x_adv.detach(), grad, step_size, eps_t, low, high)
    return x_adv.detach()


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _kl_from(clean_log_probs: torch.Tensor) -> Callable:
    def objective(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        # KL(p(clean) || p(adv)), per sample
        return F.kl_div(F.log_softmax(logits, dim=1), clean_log_probs, reduction="none", log_target=True).sum(1)
    return objective


# ---------------------------------------------------------------------------- public entry point
def adversarial_training(
    model: nn.Module,
    train_data,
    *,
    method: str = "pgd",
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    val_data=None,
    seed: int = 0,
    trades_beta: float = 6.0,
    bounds: Bounds | tuple | None = None,
    mean=None,
    std=None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """Train `model` (in place) adversarially and return it in eval mode.

    method: "pgd" (PGD-AT from a random start, `steps` steps of `step_size`, default 2.5 eps/steps),
        "fast" (FGSM from a uniform random start in the ball, step 1.25 eps unless `step_size`),
        "trades" (CE(clean) + trades_beta * KL(p(clean) || p(adv)); inner max of the KL).
    eps/norm/bounds: the threat model, checked like the attacks check it.
    mean/std: the model's input normalisation (as for `ModelUnderTest`): the model is trained on
        normalised inputs while eps, bounds and attacks stay in the user's input space.
    val_data: if given, after each epoch clean and PGD robust accuracy are measured on it (the
        verified `robustlab.attacks.PGD`, same eps and steps) and the best-robust weights are returned.
    checkpoint_dir: after each epoch, weights (safetensors), optimiser tensors (torch.save, loaded
        with weights_only=True) and, last, a JSON manifest naming them with their digests are written
        there; calling again with the same directory and configuration resumes after the last epoch
        whose checkpoint is complete (a crash mid-save resumes from the epoch before, never a mix).
    progress: called with one line per epoch.
    """
    say = progress if callable(progress) else (lambda message: None)
    if method not in METHODS:
        raise InputError("method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise InputError("model", f"expected a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("epochs", epochs), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(name, f"must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError("seed", f"must be a non-negative integer, got {seed!r}")
    for name, number in (("lr", lr), ("trades_beta", trades_beta)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number <= 0:
            raise InputError(name, f"must be a positive number, got {number!r}")
    if step_size is not None and (not isinstance(step_size, (int, float)) or not step_size > 0):
        raise InputError("step_size", f"must be positive, got {step_size!r}")
    train = _dataset("train_data", train_data)
    val = None if val_data is None else _dataset("val_data", val_data)
    geometry = get_norm(norm)
    ranks = _distributed()
    rank, world = ranks if ranks is not None else (0, 1)
    mut = ModelUnderTest(model.eval(), bounds=bounds, mean=mean, std=std, name="adversarial-training")
    device = mut.device
    net = Normalised(model, mut) if (mut.mean is not None or mut.std is not None) else model
    x = validate_inputs(mut, train.x)
    mut.inspect(x[:8])
    validate_labels("train_data.y", train.y, len(x), mut.num_classes)
    val_attack = PGD(eps=eps, norm=geometry.name, steps=steps, loss="ce")
    val_attack.validate()
    validated = val_attack._validated_eps(mut, x)  # the attacks' own eps checks (finite, >= 0, fits the bounds)
    assert validated is not None  # eps is required here (None only for minimal attacks)
    eps = validated
    if val is not None:
        xv = validate_inputs(mut, val.x)
        if tuple(xv.shape[1:]) != tuple(x.shape[1:]):
            raise InputError("val_data", f"inputs have shape {tuple(xv.shape[1:])}, training inputs {tuple(x.shape[1:])}")
        validate_labels("val_data.y", val.y, len(xv), mut.num_classes)
    if method == "fast":
        alpha = 1.25 * eps if step_size is None else float(step_size)
        inner_steps = 1
    else:
        alpha = 2.5 * eps / steps if step_size is None else float(step_size)
        inner_steps = steps
    x = x.to(mut.dtype)
    y = train.y.long()
    assert train.indices is not None  # Dataset.__post_init__ fills the sample ids
    ids = train.indices.long()

    config = {"method": method, "eps": eps, "norm": geometry.name, "steps": steps, "step_size": alpha,
              "lr": float(lr), "batch_size": batch_size, "seed": seed, "trades_beta": float(trades_beta),
              "train_sha256": train.fingerprint(), "val_sha256": None if val is None else val.fingerprint()}
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    state: dict[str, Any] = {"epoch": 0, "best_robust": None, "best_epoch": None, "history": [], "config": config}
    best_weights: dict[str, torch.Tensor] | None = None
    if checkpoint_dir is not None:
        if rank == 0:
            os.makedirs(checkpoint_dir, exist_ok=True)
        _barrier(ranks)
        loaded = _load_checkpoint(checkpoint_dir, model, optimiser, config, say)
        if loaded is not None:
            state, best_weights = loaded
            say(f"resuming from {checkpoint_dir} after epoch {state['epoch']}")
    trained = _ddp(net, device) if ranks is not None else net  # the module whose parameters get gradients

    done = state["epoch"]
    for epoch in bars.steps(range(done, epochs), "adversarial training", unit="epoch", initial=done):
        started = time.perf_counter()
        loss_sum, seen = 0.0, 0.0
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + epoch)  # dropout etc.: also fixed per epoch
            for start in bars.steps(range(0, len(x), batch_size), f"epoch {epoch + 1}", unit="batch"):
                batch = order[start:start + batch_size]
                idx = batch[rank::world]
                xb, yb = x[idx].to(device), y[idx].to(device)
                net.eval()
                x_adv, _ = _inner(method, net, xb, yb, ids[idx], geometry, eps, inner_steps,
                                  alpha, mut.bounds, seed, epoch)
                net.train()
                optimiser.zero_grad(set_to_none=True)
                loss = _training_loss(method, trained, xb, x_adv, yb, trades_beta,
                                      None if ranks is None else len(batch) / world)
                loss.backward()
                optimiser.step()
                loss_sum += float(loss.detach()) * (len(batch) / world if ranks is not None else len(idx))
                seen += len(batch) / world if ranks is not None else len(idx)
        model.eval()
        record = {"epoch": epoch + 1, "loss": _mean_over_ranks(loss_sum / max(seen, 1), ranks),
                  "seconds": round(time.perf_counter() - started, 3)}
        if val is not None:
            clean, robust = _robust_accuracy(mut, val, val_attack, seed, rank, world, ranks)
            record.update(clean_accuracy=clean, robust_accuracy=robust)
            if state["best_robust"] is None or robust > state["best_robust"]:
                state["best_robust"], state["best_epoch"] = robust, epoch + 1
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            say(f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, val clean {clean:.1%}, "
                f"val robust (PGD {geometry.name} eps={eps:g}) {robust:.1%}")
        else:
            say(f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}")
        state["epoch"] = epoch + 1
        state["history"].append(record)
        if checkpoint_dir is not None:
            if rank == 0:
                _save_checkpoint(checkpoint_dir, model, optimiser, state, best_weights)
            _barrier(ranks)

    if best_weights is not None:
        model.load_state_dict(best_weights)
        say(f"kept epoch {state['best_epoch']} (best val robust accuracy {state['best_robust']:.1%})")
    # (torch types Module.__setattr__'s value as Tensor | Module, but any plain attribute is allowed)
    model.training_history = list(state["history"])  # type: ignore[assignment]
    model.defense = {  # type: ignore[assignment]
        "defense": "adversarial-training", "method": method, "eps": eps, "norm": geometry.name,
        "steps": inner_steps, "step_size": alpha, "epochs": epochs, "lr": float(lr), "batch_size": batch_size,
        "seed": seed, **({"trades_beta": float(trades_beta)} if method == "trades" else {}),
        "best_epoch": state["best_epoch"], "best_val_robust_accuracy": state["best_robust"],
        "processes": world, "history": list(state["history"]),
        "train_data": train.source, "train_sha256": config["train_sha256"], "val_data": None if val is None else val.source,
    }
    return model.eval()


def _training_loss(method: str, net: nn.Module, xb, x_adv, yb, beta: float, share: float | None) -> torch.Tensor:
    """The batch loss. `share` (distributed only): the global batch size / world size; the per-rank sum
    divided by it makes DDP's gradient average the gradient of the global batch mean."""
    reduce = "mean" if share is None else "sum"
    if method == "trades":
        logits_clean = net(xb)
        kl = F.kl_div(F.log_softmax(net(x_adv), dim=1), F.log_softmax(logits_clean, dim=1),
                      reduction="batchmean" if share is None else "sum", log_target=True)
        loss = F.cross_entropy(logits_clean, yb, reduction=reduce) + beta * kl
    else:
        loss = F.cross_entropy(net(x_adv), yb, reduction=reduce)
    return loss if share is None else loss / share


class Normalised(nn.Module):
    """The user's module behind the wrapper's normalisation, so training sees what the audit sees."""

    def __init__(self, inner: nn.Module, mut: ModelUnderTest) -> None:
        super().__init__()
        self.inner = inner
        self._normalise = mut._normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self._normalise(x))


# ---------------------------------------------------------------------------- distributed
def _distributed() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun with several processes; None otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("WORLD_SIZE", f"is {world} but this torch build has no torch.distributed")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _ddp(net: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def _barrier(ranks) -> None:
    if ranks is not None:
        import torch.distributed as dist

        dist.barrier()


def _all_sum(values: list[float], ranks) -> list[float]:
    if ranks is None:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def _mean_over_ranks(value: float, ranks) -> float:
    return value if ranks is None else _all_sum([value], ranks)[0] / ranks[1]


def _dataset(name: str, data) -> Dataset:
    try:
        dataset = load_data(data)
    except InputError as error:
        raise InputError(name, error.problem) from None
    if len(dataset) == 0:
        raise InputError(name, "is empty: no samples to train on")
    return dataset


def _inner(method, model, xb, yb, ids, geometry, eps, steps, alpha, bounds, seed, epoch):
    eps_t = torch.full((len(xb),), eps, dtype=xb.dtype, device=xb.device)
    start = geometry.random_start(eps_t, ids, tuple(xb.shape[1:]), seed=seed, stream=START_STREAM + epoch,
                                  device=xb.device, dtype=xb.dtype)
    if method == "trades":
        with torch.no_grad():
            clean_log_probs = F.log_softmax(model(xb), dim=1)
        # Zhang et al. start within 0.001 of x (their 0.001 * N(0, 1)); we scale the ball's uniform draw.
        x_adv = training_attack(model, xb, yb, objective=_kl_from(clean_log_probs), norm=geometry, eps=eps,
                                steps=steps, step_size=alpha, bounds=bounds, start=1e-3 * start)
        return x_adv, clean_log_probs
    x_adv = training_attack(model, xb, yb, objective=_ce, norm=geometry, eps=eps, steps=steps,
                            step_size=alpha, bounds=bounds, start=start)
    return x_adv, None


def _robust_accuracy(mut: ModelUnderTest, val: Dataset, attack: PGD, seed: int, rank: int = 0, world: int = 1,
                     ranks=None) -> tuple[float, float]:
    """Clean and verified-PGD robust accuracy on val (this rank's share; counts summed over ranks)."""
    assert val.indices is not None  # Dataset.__post_init__ fills the sample ids
    x, y, ids = val.x[rank::world], val.y[rank::world], val.indices[rank::world]
    with torch.no_grad(), mut.evaluating():
        pred = mut(mut.to_device(x)).argmax(1).cpu()
    correct = pred == y
    idx = torch.nonzero(correct).reshape(-1)
    robust = 0
    if len(idx):
        outcome = attack(mut, x[idx], y[idx], sample_ids=ids[idx], seed=seed)
        robust = int((~outcome.success).sum())
    n_correct, n_robust = _all_sum([float(correct.sum()), float(robust)], ranks)
    return n_correct / len(val), n_robust / len(val)


# ---------------------------------------------------------------------------- checkpoints
# A checkpoint is three files of one epoch (weights-E.safetensors, optimiser-E.pt, best-E.safetensors)
# and the manifest state.json, written last and atomically, naming them with their sha256: a crash
# between two writes leaves the previous manifest, which names the previous epoch's files, still
# there (they are removed only once the new manifest is in place). Loading checks the digests.
CHECKPOINT_FORMAT = 2
_EPOCH_FILE = re.compile(r"^(weights|best|optimiser)-(\d+)\.(safetensors|pt)$")
_OLD_FILES = (WEIGHTS_FILE, BEST_FILE, OPTIMISER_FILE)  # format 1: one name per role, overwritten each epoch


def _save_checkpoint(directory, model, optimiser, state, best_weights) -> None:
    from safetensors.torch import save

    from robustlab.atomic import write_atomically

    epoch = int(state["epoch"])
    parts: dict[str, bytes] = {
        f"weights-{epoch}.safetensors": save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})}
    if best_weights is not None:
        parts[f"best-{epoch}.safetensors"] = save({k: v.cpu().contiguous() for k, v in best_weights.items()})
    tensors, groups = _optimiser_tensors(optimiser)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    parts[f"optimiser-{epoch}.pt"] = buffer.getvalue()
    files = {}
    for name, data in parts.items():
        _write_part(os.path.join(directory, name), data)
        files[name.split("-", 1)[0]] = {"file": name, "sha256": hashlib.sha256(data).hexdigest()}
    document = dict(state, optimiser_param_groups=groups, format=CHECKPOINT_FORMAT, files=files)
    write_atomically(Path(directory, STATE_FILE), json.dumps(document, indent=2).encode())  # the commit
    kept = {entry["file"] for entry in files.values()}
    for name in os.listdir(directory):
        if (name in _OLD_FILES or _EPOCH_FILE.match(name)) and name not in kept:
            os.remove(os.path.join(directory, name))


def _write_part(path: str, data: bytes) -> None:
    """One checkpoint file, atomically (a separate function so tests can crash between the writes)."""
    from robustlab.atomic import write_atomically

    write_atomically(Path(path), data)


def _optimiser_tensors(optimiser) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimiser.state_dict()
    tensors = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            tensors[f"{pid}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    groups = [{k: v for k, v in g.items() if isinstance(v, (int, float, bool, str, list, tuple, type(None)))}
              for g in sd["param_groups"]]
    return tensors, groups


def _load_checkpoint(directory, model, optimiser, config, say: Progress = lambda message: None):
    """(state, best weights) of the last complete epoch in `directory`, checked against its manifest;
    None to start afresh. InputError (checkpoint_dir) for another configuration or a checkpoint whose
    files do not match the manifest."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        return None
    from safetensors.torch import load as load_safetensors

    try:
        with open(path) as handle:
            document = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError("checkpoint_dir", f"cannot read {path} ({error}); delete {directory} to train "
                                           "afresh") from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        message = (f"the checkpoint in {directory} was written without a manifest of digests (an older "
                   "robustlab): its weights and optimiser state cannot be checked to be of the same epoch, "
                   "so training starts again from epoch 0")
        warnings.warn(message, RobustlabWarning, stacklevel=3)
        say(message)
        return None
    saved = document.get("config", {})
    different = sorted(k for k in config if saved.get(k) != config[k])
    if different:
        raise InputError("checkpoint_dir", f"{directory} holds a run with a different configuration "
                                           f"({', '.join(different)}); use another directory to start afresh")
    files = document.get("files") or {}
    model.load_state_dict(load_safetensors(_checked_part(directory, files, "weights", document)))
    tensors = torch.load(io.BytesIO(_checked_part(directory, files, "optimiser", document)), weights_only=True)
    sd = optimiser.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = document.pop("optimiser_param_groups")
    for group, saved_group in zip(sd["param_groups"], groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    optimiser.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    best = load_safetensors(_checked_part(directory, files, "best", document)) \
        if "best" in files and document.get("best_epoch") else None
    for key in ("files", "format"):
        document.pop(key, None)
    return document, best


def _checked_part(directory, files: dict, role: str, document: dict) -> bytes:
    """The bytes of the checkpoint's `role` file, refused unless they are the ones the manifest names."""
    entry = files.get(role)
    name = entry.get("file") if isinstance(entry, dict) else None
    epoch = document.get("epoch")
    if not isinstance(name, str) or not _EPOCH_FILE.match(name) or name.split("-", 1)[0] != role:
        raise InputError("checkpoint_dir", f"{directory}/{STATE_FILE} names no valid {role} file; delete "
                                           f"{directory} to train afresh")
    assert isinstance(entry, dict)  # the valid name came from it
    try:
        with open(os.path.join(directory, name), "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise InputError("checkpoint_dir", f"the checkpoint of epoch {epoch} in {directory} is incomplete: "
                                           f"{name}: {error.strerror}; delete {directory} to train afresh") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise InputError("checkpoint_dir", f"the checkpoint of epoch {epoch} in {directory} is inconsistent: {name} "
                                           f"does not match the digest {STATE_FILE} records (changed after it was "
                                           f"written); delete {directory} to train afresh")
    return data


__all__ = ["adversarial_training", "training_attack", "METHODS", "Normalised"]
