"""The iterate-in-working-precision set-up that the eps-ball attacks (PGD, MI-FGSM, random noise) share.

Iterates live in at least float32 (robustlab.threat.working_dtype); every point an attack judges
or returns is `contained`: cast to the model's dtype and exactly inside ball and box, the point
finalize would return, so a success in the loop is the verified one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustlab.model import ModelUnderTest
from robustlab.threat import Norm, contain


@dataclass(frozen=True)
class Working:
    x: torch.Tensor  # the caller's inputs, model dtype
    xw: torch.Tensor  # the same in the working dtype
    low: torch.Tensor
    high: torch.Tensor
    eps: torch.Tensor  # (n,) in the working dtype
    eps64: torch.Tensor  # (n,) float64, for containment
    norm: Norm
    model: ModelUnderTest

    @classmethod
    def of(cls, model: ModelUnderTest, x: torch.Tensor, eps: float, norm: Norm) -> "Working":
        from robustlab.threat import working_dtype

        xw = x.to(working_dtype(x.dtype))
        low, high = model.bounds.tensors(xw)
        return cls(x=x, xw=xw, low=low, high=high,
                   eps=torch.full((len(x),), eps, dtype=xw.dtype, device=x.device),
                   eps64=torch.full((len(x),), eps, dtype=torch.float64, device=x.device), norm=norm, model=model)

    def contained(self, iterate: torch.Tensor) -> torch.Tensor:
        """The iterate as finalize would return it: model dtype, exactly inside ball and box (no host sync)."""
        return contain(self.x, iterate.to(self.x.dtype), self.eps64, self.norm, self.model.bounds, sync=False)

    def random_point(self, sample_ids: torch.Tensor, *, seed: int, stream: int) -> torch.Tensor:
        """A uniform point of the eps ball around x, clipped to the box (working dtype), fixed per
        (seed, stream, sample)."""
        start = self.norm.random_start(self.eps, sample_ids, tuple(self.x.shape[1:]), seed=seed, stream=stream,
                                       device=self.x.device, dtype=self.xw.dtype)
        return torch.minimum(torch.maximum(self.xw + self.norm.project(start, self.eps), self.low), self.high)

    def ascend(self, x_adv: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
        """One projected steepest-ascent step (robustlab.threat.Norm.ascend)."""
        return self.norm.ascend(self.xw, x_adv, direction, alpha, self.eps, self.low, self.high)
