"""Ensembles of classifiers: averaged logits, averaged probabilities, majority vote.

- "logits": mean of the members' logits (differentiable; white-box attacks apply directly).
- "probs": log of the mean of the members' probabilities (differentiable; a proper logit vector).
- "vote": per class, the number of members whose prediction is that class (ties broken by the
  lowest class index through argmax). It has no useful gradient, and computing one is refused:
  backward through it raises `NotDifferentiableError`. It carries `requires_transfer = True` and a
  `surrogate` (the averaged-logits ensemble of the same members): `robustlab.audit` attacks the
  surrogate and evaluates the adversarial examples on the vote (a transfer attack).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from robustlab.errors import InputError, RobustlabError

COMBINE = ("logits", "probs", "vote")


class NotDifferentiableError(RobustlabError, RuntimeError):
    """A gradient was requested through a non-differentiable model (the vote ensemble)."""


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return votes.clone()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D401
        raise NotDifferentiableError(
            "the vote ensemble is not differentiable (a majority vote has no gradient); attack its `surrogate` "
            "(the averaged-logits ensemble) and transfer the adversarial examples, as robustlab.audit does")


class Ensemble(nn.Module):
    """Combine member classifiers; see the module docstring for the three rules."""

    def __init__(self, members: Sequence[nn.Module], combine: str = "logits") -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.requires_transfer = combine == "vote"

    @property
    def surrogate(self) -> "Ensemble | None":
        if self.combine != "vote":
            return None
        # Shares the members (no copy): the averaged-logits view of the same ensemble.
        view = Ensemble.__new__(Ensemble)
        nn.Module.__init__(view)
        view.members = self.members
        view.combine = "logits"
        view.requires_transfer = False
        view.train(self.training)
        return view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.combine == "logits":
            return torch.stack([m(x) for m in self.members]).mean(0)
        if self.combine == "probs":
            log_probs = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
            return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
        with torch.no_grad():
            logits = [m(x) for m in self.members]
            k = logits[0].shape[1]
            votes = torch.stack([nn.functional.one_hot(z.argmax(1), k) for z in logits]).sum(0).to(logits[0].dtype)
        return _NoBackward.apply(x, votes) if x.requires_grad else votes

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}, members={len(self.members)}"


def ensemble(models: Sequence[nn.Module], combine: str = "logits", *, example_input: torch.Tensor | None = None,
             input_shape: Sequence[int] | None = None) -> Ensemble:
    """Build an ensemble (eval mode). Members are probed once with `example_input` (a batch) or
    zeros of `input_shape`; members with different class counts, or that cannot take the input,
    are refused before anything runs."""
    if combine not in COMBINE:
        raise InputError("combine", f"expected one of {', '.join(COMBINE)}, got {combine!r}")
    members = list(models) if not isinstance(models, nn.Module) else None
    if not members:
        raise InputError("models", "give a non-empty list of nn.Module members")
    for i, m in enumerate(members):
        if not isinstance(m, nn.Module):
            raise InputError("models", f"member {i} is a {type(m).__name__}, expected a torch.nn.Module")
    if example_input is None:
        if input_shape is None:
            raise InputError("input_shape", "give example_input= (a batch) or input_shape= (one input's shape) "
                                            "so the members can be checked before use")
        example_input = torch.zeros((2, *[int(s) for s in input_shape]))
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise InputError("example_input", "must be a batch tensor (samples first)")
    probe = example_input[:2]
    counts = []
    for i, m in enumerate(members):
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad():
                out = m(probe)
        except Exception as error:  # noqa: BLE001 - any failure means the member cannot take this input
            raise InputError("models", f"member {i} cannot take inputs of shape {tuple(probe.shape[1:])}: {error}") from None
        finally:
            m.train(was_training)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(probe):
            raise InputError("models", f"member {i} must return (batch, classes) logits, got "
                                       f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        counts.append(int(out.shape[1]))
    if len(set(counts)) > 1:
        raise InputError("models", f"members must have the same number of classes, got {counts}")
    built = Ensemble(members, combine).eval()
    # torch types Module.__setattr__'s value as Tensor | Module, but any plain attribute is allowed
    built.defense = {"defense": "ensemble", "combine": combine, "members": len(members),  # type: ignore[assignment]
                     "member_defenses": [getattr(m, "defense", {}).get("defense", "none") for m in members],
                     **({"attacked_through": "transfer from the averaged-logits surrogate"} if combine == "vote" else {})}
    return built


__all__ = ["ensemble", "Ensemble", "NotDifferentiableError", "COMBINE"]
