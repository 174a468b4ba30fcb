"""Random noise in the eps ball: the baseline every real attack must beat (Carlini et al. 2019, sec. 5).

    for d in 1..draws:  x_d = contain(clip(x + uniform point of the eps ball))   (1 query)
    keep the first x_d that fools; else the last draw

Draws are per sample from robustlab.seeding (stream NOISE_STREAM + d), so a sample's result does
not depend on its batch mates. It needs no gradient. Its use is as evidence: where random points
break samples a gradient attack left robust, the gradient attack is being misled (the integrity
check "random-noise"). `gradient_calls` counts forward queries, as for Square.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustlab.errors import InputError
from robustlab.threat import expand_per_sample

from .base import Attack, Perturbed
from .losses import succeeded
from .working import Working

NOISE_STREAM = 5_000_000  # + draw index; see robustlab.seeding


@dataclass(frozen=True)
class RandomNoise(Attack):
    name: ClassVar[str] = "noise"

    draws: int = 20

    def validate(self) -> None:
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 1:
            raise InputError("draws", f"must be a positive integer, got {self.draws!r}")

    def _perturb(self, model, x, y, targets, sample_ids, eps, seed) -> Perturbed:
        w = Working.of(model, x, eps, self.geometry)
        best = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for draw in range(self.draws):
            point = w.contained(w.random_point(sample_ids, seed=seed, stream=NOISE_STREAM + draw))
            with torch.no_grad():
                hit = succeeded(model(point), y, targets) & ~found
            last = draw == self.draws - 1
            best = torch.where(expand_per_sample(hit | (last & ~found), x), point, best)
            found = found | hit
        return Perturbed(best, gradient_calls=len(x) * self.draws)
