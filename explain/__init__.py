"""Interpretability paired with attacks: what an attack changed, not only that it succeeded.

- saliency (captum): `attribute`, `saliency_report` (clean vs adversarial maps and their shift,
  completeness, sensitivity/infidelity), `cascading_randomization` (Adebayo et al. 2018 sanity check).
- SHAP (shap): `shap_values`, `shap_report` (gradient / deep / kernel explainers; the true and the
  predicted class only), `background_from`.
- probes (scikit-learn): `capture` (forward hooks), `probe_report` (label vs control-task probes per
  layer, clean-trained probes on adversarial activations, clean-vs-adversarial detection AUC).

Every function takes a `robustlab.model.ModelUnderTest` and batches of inputs in its box. captum,
shap and scikit-learn are imported inside the functions that use them.
"""

from __future__ import annotations

from .probes import ProbeReport, capture, probe_report
from .saliency import METHODS, Attribution, SaliencyReport, attribute, saliency_report
from .sanity import cascading_randomization
from .shap_values import EXPLAINERS, ShapReport, ShapResult, background_from, shap_report, shap_values
from .similarity import spearman, ssim, topk_intersection

__all__ = ["METHODS", "Attribution", "SaliencyReport", "attribute", "saliency_report", "cascading_randomization",
           "EXPLAINERS", "ShapReport", "ShapResult", "background_from", "shap_report", "shap_values",
           "ProbeReport", "capture", "probe_report", "spearman", "ssim", "topk_intersection"]
