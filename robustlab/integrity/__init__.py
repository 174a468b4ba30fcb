"""Integrity checks (Carlini et al. 2019; Athalye et al. 2018).

`audit(..., checks="default"|"strict"|"none")` runs them after each model's attacks (see
robustlab.harness); results.json then holds `metadata["checks"]` (each check's status, evidence,
explanation and next step, and the adaptive attacks run). What they mean for each threat model (the
evaluation status: established / weaker than standard / not established) is decided on the ground
floor, in robustlab.verdicts, and written to `metadata["evaluation"]`. This package's top level is
torch-free; the checks themselves (`runner`, `model_checks`, `probes`, `adaptive`) import torch.
"""

from __future__ import annotations

from .text import CHECKS
from .verdict import (ESTABLISHED, NOT_ESTABLISHED, WEAKER, check_results, evaluate, find, format_checks,
                      records)

LEVELS = ("none", "default", "strict")

__all__ = ["CHECKS", "ESTABLISHED", "LEVELS", "NOT_ESTABLISHED", "WEAKER", "check_results", "evaluate", "find",
           "format_checks", "records"]
