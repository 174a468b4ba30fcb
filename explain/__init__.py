"""Interpretability paired with attacks (saliency, SHAP, probes).

Not implemented yet (tracked in the issue "Interpretability paired with attacks"). This package
exists so that `robustlab.explain` resolves; it exports nothing.
"""
