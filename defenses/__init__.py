"""Defenses: adversarial training, defensive distillation, ensembles.

Each builds a defended model (a plain `nn.Module`, eval mode) that is audited side by side with
the original, e.g. `robustlab.audit({"plain": model, "adv-trained": defended})`.

- `adversarial_training`: PGD-AT (Madry et al. 2018), fast FGSM-AT (Wong et al. 2020), TRADES
  (Zhang et al. 2019); best-robust-checkpoint selection (Rice et al. 2020), resumable checkpoints.
- `distill`: defensive distillation (Papernot et al. 2016), deployed at T = 1.
- `ensemble`: averaged logits, averaged probabilities, or a majority vote (audited by transfer).
- `build_defenses` / `save_models` (recipes): defended copies of a given model by name, as the
  CLI's `--defend` builds them, cached and resumable; saved as safetensors + JSON.
"""

from __future__ import annotations

from .adversarial import adversarial_training
from .distillation import distill
from .ensemble import Ensemble, NotDifferentiableError, ensemble
from .recipes import DEFENSES, Recipe, build_defenses, save_models

__all__ = ["adversarial_training", "distill", "ensemble", "Ensemble", "NotDifferentiableError", "DEFENSES", "Recipe",
           "build_defenses", "save_models"]
