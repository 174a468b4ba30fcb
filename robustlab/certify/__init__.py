"""Certified robustness: per-sample proofs (IBP, CROWN) and randomised smoothing certificates.

    from robustlab.certify import certify
    outcome = certify(mut, x, y, eps=0.1, norm="linf", method="crown")
    outcome.certified            # bool per sample: robust at eps, proven
    outcome.certified_accuracy

    smoothed = certify(mut, x, y, eps=0.5, norm="l2", method="smoothing", sigma=0.25)
    smoothed.radius, smoothed.abstained, smoothed.certified_at(1.0)   # the radius curve from one run

An attack bounds robust accuracy from above, a certificate from below: certified accuracy <=
robust accuracy under any attack, sample by sample. IBP and CROWN run on models that trace to a
chain of supported layers (`SUPPORTED`); any other model raises `UnsupportedLayerError` naming the
layer. `SmoothedClassifier` is the smoothed model as a module, for attacks on its prediction.
The bound machinery itself (`trace`, `InputSet`, `spec_lower`, `margin_spec`) is differentiable
and can be used for IBP training.
"""

from __future__ import annotations

from .api import METHODS, CertifyOutcome, certify
from .bounds import InputSet, margin_spec, spec_lower
from .graph import SUPPORTED, Chain, UnsupportedLayerError, chain_for, trace
from .smoothing import SmoothedClassifier, certify_smoothed, clopper_pearson_lower, predict_smoothed

__all__ = ["METHODS", "SUPPORTED", "CertifyOutcome", "Chain", "InputSet", "SmoothedClassifier",
           "UnsupportedLayerError", "certify", "certify_smoothed", "chain_for", "clopper_pearson_lower",
           "margin_spec", "predict_smoothed", "spec_lower", "trace"]
