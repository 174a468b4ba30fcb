"""Integrity checks (Carlini et al. 2019; Athalye et al. 2018) and verdicts.

`audit(..., checks="default"|"strict"|"none")` runs them after each model's attacks (see
robustlab.harness); results.json then holds `metadata["checks"]` (each check's status, evidence,
explanation and next step, and the adaptive attacks run) and `metadata["verdict"]` (one verdict per
model, norm, eps and targeted mode). This package's top level is torch-free (gates and reports
import it); the checks themselves (`runner`, `model_checks`, `probes`, `adaptive`) import torch.
"""

from __future__ import annotations

from .text import CHECKS, NOT_ESTABLISHED, NOT_ROBUST, ROBUST
from .verdict import (ROBUST_FRACTION, check_results, compute_verdicts, describe, entries, find, format_checks,
                      threshold_blocked)

LEVELS = ("none", "default", "strict")

__all__ = ["CHECKS", "LEVELS", "NOT_ESTABLISHED", "NOT_ROBUST", "ROBUST", "ROBUST_FRACTION", "check_results",
           "compute_verdicts", "describe", "entries", "find", "format_checks", "threshold_blocked"]
