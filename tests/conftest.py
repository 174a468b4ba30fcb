"""Shared fixtures: a small digits CNN trained once per session, its test split, foolbox wrappers.

Attack tests run torch on one CPU thread (the `one_thread` fixture; opt in with
`pytestmark = pytest.mark.usefixtures("one_thread")`). On the small tensors of these tests
OpenMP's thread pool costs far more than it saves (an order of magnitude on a busy two-core
machine), and training on one thread makes the digits CNN, and so every reference figure,
reproducible. Other test modules keep torch's default thread count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pytest
import torch

from robustlab.data import Dataset, digits_split
from robustlab.model import ModelUnderTest
from support import digits_model, single_thread


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


N_REFERENCE = 200  # correctly classified test samples used by the reference comparisons


@dataclass(frozen=True)
class Samples:
    """Inputs and labels (CPU, float32 / int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def head(self, n: int) -> "Samples":
        return Samples(self.x[:n], self.y[:n])


@pytest.fixture(scope="session")
def digits_test() -> Dataset:
    """The held-out digits split: 450 samples, x float32 (N, 1, 8, 8) in [0, 1], y int64."""
    data = digits_split("test")
    assert data.x.shape == (450, 1, 8, 8) and data.x.dtype == torch.float32
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    return data


@pytest.fixture(scope="session")
def digits_module() -> torch.nn.Module:
    """The suite's digits CNN (tests/support.py: 15 epochs, seed 0, seeded initial weights, one
    thread), in eval mode with frozen parameters. Do not modify it in a test."""
    model = digits_model()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def digits_accuracy(digits_module, digits_test) -> float:
    with torch.no_grad():
        return float((digits_module(digits_test.x).argmax(1) == digits_test.y).double().mean())


@pytest.fixture(scope="session")
def digits_correct(digits_module, digits_test, digits_accuracy) -> Samples:
    """The first N_REFERENCE test samples the trained CNN classifies correctly."""
    assert digits_accuracy > 0.9, f"the digits CNN did not train: test accuracy {digits_accuracy:.3f}"
    with torch.no_grad():
        correct = digits_module(digits_test.x).argmax(1) == digits_test.y
    idx = torch.nonzero(correct).reshape(-1)[:N_REFERENCE]
    assert len(idx) == N_REFERENCE
    return Samples(digits_test.x[idx].clone(), digits_test.y[idx].clone())


@pytest.fixture
def digits_mut(digits_module) -> ModelUnderTest:
    """A fresh ModelUnderTest around the trained CNN, bounds [0, 1]."""
    return ModelUnderTest(digits_module, bounds=(0.0, 1.0), name="digits-cnn")


@pytest.fixture(scope="session")
def foolbox_digits(digits_module):
    """foolbox's PyTorchModel around the same trained CNN, bounds (0, 1)."""
    foolbox = pytest.importorskip("foolbox")
    return foolbox.PyTorchModel(digits_module.eval(), bounds=(0, 1))


# ---------------------------------------------------------------------------- outcome verification
BALL_SLACK = 1e-6  # relative; the tolerance robustlab promises for the float64 ball check


def declared_bounds(model: ModelUnderTest, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's declared box in float64, broadcastable against a batch like `like`."""
    low = torch.as_tensor(model.bounds.low, dtype=torch.float64)
    high = torch.as_tensor(model.bounds.high, dtype=torch.float64)
    return low, high


def verify_outcome(model: ModelUnderTest, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                   outcome, *, eps: float | None, norm: str, same_dtype: bool = True) -> None:
    """Assert every invariant of an AttackOutcome, independently of robustlab's own checks.

    - x_adv has x's shape (and dtype, unless same_dtype=False) and is finite;
    - every value is inside the declared bounds (compared in float64);
    - if eps is given, the float64 norm of x_adv - x is at most eps * (1 + 1e-6) for every sample;
    - adv_pred is the argmax of a fresh forward pass on x_adv, and success is
      (argmax != y) untargeted, (argmax == target) targeted;
    - l2 / linf are the float64 norms of x_adv - x.
    """
    n = len(x)
    x_adv = outcome.x_adv
    assert x_adv.shape == x.shape, (x_adv.shape, x.shape)
    if same_dtype:
        assert x_adv.dtype == x.dtype, (x_adv.dtype, x.dtype)
    assert bool(torch.isfinite(x_adv).all())
    assert outcome.n == n and outcome.success.shape == (n,) and outcome.adv_pred.shape == (n,)
    assert outcome.success.dtype == torch.bool
    assert outcome.norm == norm
    if eps is not None:
        assert outcome.eps == eps

    low, high = declared_bounds(model, x)
    xa64, x64 = x_adv.double(), x.double()
    below = (xa64 < low).reshape(n, -1).any(dim=1)
    above = (xa64 > high).reshape(n, -1).any(dim=1)
    assert not bool((below | above).any()), f"samples outside the bounds: {torch.nonzero(below | above).reshape(-1).tolist()}"

    delta = (xa64 - x64).reshape(n, -1)
    l2 = delta.norm(dim=1)
    linf = delta.abs().amax(dim=1)
    if eps is not None:
        size = linf if norm == "linf" else l2
        limit = eps * (1.0 + BALL_SLACK)
        bad = size > limit
        rows = torch.nonzero(bad).reshape(-1)
        assert not len(rows), (f"{len(rows)} of {n} samples leave the eps ball: {norm} perturbation "
                               f"{size[rows[:5]].tolist()} > eps {eps!r} (rows {rows[:5].tolist()}...)")

    with torch.no_grad():
        logits = model(x_adv)
    pred = logits.argmax(dim=1)
    assert torch.equal(outcome.adv_pred, pred), (outcome.adv_pred, pred, logits)
    expected = pred != y if targets is None else pred == targets
    assert torch.equal(outcome.success, expected), (outcome.success, expected, logits, y, targets)
    assert torch.allclose(outcome.l2.double(), l2, rtol=1e-12, atol=0.0), (outcome.l2, l2)
    assert torch.allclose(outcome.linf.double(), linf, rtol=1e-12, atol=0.0), (outcome.linf, linf)


@pytest.fixture(scope="session")
def check_outcome():
    """The `verify_outcome` function (a session fixture, so hypothesis tests can use it too)."""
    return verify_outcome
