"""How targeted attacks choose their target class for each sample.

Modes: "none" (untargeted), "random" (a uniformly random other class, seeded per sample),
"least-likely" (the clean input's lowest-scoring class), "next" ((label + 1) mod K), "all"
(every other class: K-1 targets per sample), or a class index/name (one fixed target; samples
of that class are not attacked since the target is their own label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from robustlab import seeding
from robustlab.errors import InputError

MODES = ("none", "random", "least-likely", "next", "all")
RANDOM_TARGET_STREAM = 1


@dataclass(frozen=True)
class TargetSet:
    """One target per sample; `valid` is False where the target equals the true label."""

    targets: torch.Tensor
    valid: torch.Tensor


def parse_mode(mode: str | int | None, classes: Sequence[str] | None = None) -> str:
    """Normalise a targeted mode; a fixed class becomes its index as a string ("3")."""
    if mode is None or mode is False:
        return "none"
    if isinstance(mode, bool):
        raise InputError("targeted", "pass a mode ('random', 'least-likely', 'next', 'all') or a class, not True")
    if isinstance(mode, int):
        return str(mode)
    text = str(mode).strip().lower().replace("_", "-")
    text = {"untargeted": "none", "ll": "least-likely", "leastlikely": "least-likely", "every": "all"}.get(text, text)
    if text in MODES:
        return text
    if classes is not None and str(mode).strip() in classes:
        return str(list(classes).index(str(mode).strip()))
    if text.lstrip("-").isdigit():
        return str(int(text))
    raise InputError("targeted", f"unknown mode {mode!r}; expected none, random, least-likely, next, all, "
                                 "or a class label")


def select(mode: str, labels: torch.Tensor, clean_logits: torch.Tensor, sample_ids: torch.Tensor, *,
           seed: int, num_classes: int) -> list[TargetSet]:
    """Target sets for `mode` (already parsed); [] for untargeted."""
    k = num_classes
    if mode == "none":
        return []
    if mode == "next":
        return [_set((labels + 1) % k, labels)]
    if mode == "random":
        u = seeding.uniform(seed, RANDOM_TARGET_STREAM, sample_ids, (1,), dtype=torch.float64).reshape(-1)
        offset = 1 + torch.clamp((u * (k - 1)).floor().long(), max=k - 2)
        return [_set((labels + offset) % k, labels)]
    if mode == "least-likely":
        masked = clean_logits.double().scatter(1, labels.unsqueeze(1), float("inf"))
        return [_set(masked.argmin(dim=1), labels)]
    if mode == "all":
        return [_set((labels + shift) % k, labels) for shift in range(1, k)]
    target = int(mode)
    if not 0 <= target < k:
        raise InputError("targeted", f"target class {target} is out of range for a {k}-class model")
    return [_set(torch.full_like(labels, target), labels)]


def _set(targets: torch.Tensor, labels: torch.Tensor) -> TargetSet:
    return TargetSet(targets=targets.long(), valid=targets != labels)
