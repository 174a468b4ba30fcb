"""Defenses: adversarial training, defensive distillation, ensembles.

Not implemented yet (tracked in the issue "Defenses: adversarial training, defensive distillation
and ensembles"). This package exists so that `robustlab.defenses` resolves; it exports nothing.
"""
