"""Defensive distillation, Papernot et al. 2016.

    1. teacher F trained on hard labels with softmax(F(x) / T)            (training temperature T)
    2. soft labels  s(x) = softmax(F(x) / T)
    3. student G trained on s with softmax(G(x) / T), cross-entropy against s
    4. deploy G at T = 1: the returned module outputs G's raw logits z, so softmax(z) is the
       test-time output, and since z was trained to be ~T times larger than usual it saturates

Step 4 is what makes cross-entropy attacks report inflated robustness (the softmax saturates in
float32 and the CE gradient vanishes); margin-loss attacks (PGD with loss="margin", CW) are
unaffected (Carlini and Wagner 2016). The defense is here so audits can show exactly that.

The teacher: the paper's teacher is trained at temperature T from the start. `distill` accepts any
teacher module: it (a deep copy of it, the caller's module is left untouched) is trained for
`epochs` at temperature T from its current weights. Given a plain model trained at T = 1 this
retrains it at T, which is what the paper's step 1 needs (an untrained module works too).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.data import load_data
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest
from robustlab.attacks.base import validate_inputs, validate_labels


def distill(teacher: nn.Module, train_data, *, temperature: float = 20.0, epochs: int = 30, lr: float = 3e-3,
            seed: int = 0, student: nn.Module | None = None, batch_size: int = 64,
            teacher_epochs: int | None = None, bounds=None) -> nn.Module:
    """Return the distilled student (eval mode), deployed at T = 1 (raw logits).

    student: the module to train (in place); default: a copy of the teacher's architecture with
        freshly initialised parameters (`reset_parameters`, seeded by `seed`).
    teacher_epochs: epochs of the teacher's training at T (default `epochs`).
    """
    if not isinstance(teacher, nn.Module):
        raise InputError("teacher", f"expected a torch.nn.Module, got {type(teacher).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 1:
        raise InputError("temperature", f"must be a finite number >= 1, got {temperature!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(name, f"must be a positive integer, got {value!r}")
    teacher_epochs = epochs if teacher_epochs is None else teacher_epochs
    if isinstance(teacher_epochs, bool) or not isinstance(teacher_epochs, int) or teacher_epochs < 1:
        raise InputError("teacher_epochs", f"must be a positive integer, got {teacher_epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InputError("lr", f"must be a positive number, got {lr!r}")
    try:
        data = load_data(train_data)
    except InputError as error:
        raise InputError("train_data", error.problem) from None
    teacher_t = copy.deepcopy(teacher).eval()
    mut = ModelUnderTest(teacher_t, bounds=bounds, name="teacher")
    x = validate_inputs(mut, data.x)
    mut.inspect(x[:8])
    y = validate_labels("train_data.y", data.y, len(x), mut.num_classes)
    if student is None:
        student = copy.deepcopy(teacher)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in student.modules():
                if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                    module.reset_parameters()
    elif not isinstance(student, nn.Module):
        raise InputError("student", f"expected a torch.nn.Module, got {type(student).__name__}")
    T = float(temperature)

    # 1. teacher at temperature T on hard labels
    _fit(teacher_t, x, lambda logits, idx: F.cross_entropy(logits / T, y[idx]), teacher_epochs, lr, batch_size, seed)
    # 2. soft labels at T
    with torch.no_grad():
        soft = torch.softmax(teacher_t(x) / T, dim=1)
    # 3. student at T on soft labels
    _fit(student, x, lambda logits, idx: -(soft[idx] * F.log_softmax(logits / T, dim=1)).sum(1).mean(),
         epochs, lr, batch_size, seed + 1)
    # 4. deployed at T = 1: raw logits
    # (torch types Module.__setattr__'s value as Tensor | Module, but any plain attribute is allowed)
    student.distillation = {"temperature": T, "teacher_epochs": teacher_epochs, "epochs": epochs}  # type: ignore[assignment]
    student.defense = {"defense": "distillation", "temperature": T, "teacher_epochs": teacher_epochs,  # type: ignore[assignment]
                       "epochs": epochs, "lr": float(lr), "batch_size": batch_size, "seed": seed,
                       "deployed_temperature": 1.0, "train_data": data.source, "train_sha256": data.fingerprint()}
    return student.eval()


def _fit(model: nn.Module, x: torch.Tensor, loss_fn, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                optimiser.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), idx).backward()
                optimiser.step()
    model.eval()


__all__ = ["distill"]
