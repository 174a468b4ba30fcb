"""Results for the report tests: a quickly trained digits CNN audited like the demo, built once per session."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

import robustlab
from robustlab.data import digits_split
from robustlab.training import seeded_init, train_classifier
from robustlab.zoo import DigitsCNN

XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]


@functools.lru_cache(maxsize=1)
def trained() -> torch.nn.Module:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # faster on small tensors, and reproducible
    try:
        model = train_classifier(seeded_init(DigitsCNN, 0), digits_split("train"), epochs=10, seed=0)
    finally:
        torch.set_num_threads(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def demo_like(directory: Path, checks: str = "none") -> Path:
    """The demo's audit (FGSM, PGD, CW at Linf 0.05, 0.1, 0.2), untargeted and targeted 'next', on 60 samples.

    checks: the integrity-check level ("none" by default: the browser test reads the 'not run' card)."""
    result = robustlab.audit(trained(), digits_split("test").head(60), attacks=("fgsm", "pgd", "cw"), suite="none",
                             eps=(0.05, 0.1, 0.2), steps=5, targeted=["none", "next"], progress=False, checks=checks)
    result.save(directory)
    return directory


def hostile(directory: Path) -> Path:
    """A run whose model and class names are markup: the report must show them as text."""
    classes = [XSS[i % 2] + f" {i}" for i in range(10)]
    result = robustlab.audit(trained(), digits_split("test").head(20), attacks=("fgsm", "cw"), suite="none", eps=(0.1,), steps=3,
                             targeted=["none", "next"], name=XSS[0] + XSS[1], classes=classes, progress=False)
    result.metadata["config"]["note"] = XSS[1]
    result.save(directory)
    return directory
