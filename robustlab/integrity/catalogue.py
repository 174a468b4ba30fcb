"""The check registry: one registration per integrity check, read by the runner, the texts and the plan.

Each check declares what users read (title, what it means when it fires, what to do), where it
applies (once per model, per targeted mode, or per mode and eps), the function that runs it (a
"module:function" path under robustlab.integrity, imported only when checks run: this module is
torch-free, for the reports), whether it runs on a black-box model, the levels it runs at, and the
adaptive attack its failure calls for (a planner of robustlab.integrity.adaptive). Adding a check is
its function plus one `register_check` here.
"""

from __future__ import annotations

from dataclasses import dataclass

SCOPES = ("model", "mode", "eps")
# planner keys of robustlab.integrity.adaptive.PLANNERS
ADAPTIVE = ("bpda", "eot", "black-box", "stronger-pgd", "square")


@dataclass(frozen=True)
class CheckSpec:
    """One integrity check.

    scope: "model" (once per model, every threat model; no norm), "mode" (per targeted mode, every
    eps), "eps" (per targeted mode and eps). probe: it runs an attack of its own (the costly ones,
    run last, behind a progress bar). adaptive: what its failure calls for (None: nothing more;
    "square" defers to BPDA/EoT when a gradient cause was found).
    """

    id: str
    title: str
    means: str
    next_step: str
    scope: str
    run: str
    adaptive: str | None = None
    probe: bool = False
    black_box: bool = False
    levels: tuple[str, ...] = ("default", "strict")


_REGISTRY: dict[str, CheckSpec] = {}


def register_check(spec: CheckSpec) -> CheckSpec:
    if spec.id in _REGISTRY:
        raise ValueError(f"check {spec.id!r} is already registered")
    if spec.scope not in SCOPES or (spec.adaptive is not None and spec.adaptive not in ADAPTIVE) \
            or ":" not in spec.run:
        raise ValueError(f"{spec.id}: scope must be one of {SCOPES}, adaptive one of {ADAPTIVE} or None, "
                         "run 'module:function'")
    _REGISTRY[spec.id] = spec
    return spec


def get(check: str) -> CheckSpec | None:
    return _REGISTRY.get(check)


def checks(level: str | None = None) -> list[CheckSpec]:
    """The registered checks in run order (model-wide first), those of `level` when given."""
    return [s for s in _REGISTRY.values() if level is None or level in s.levels]


def model_wide(check: str) -> bool:
    """True for checks that apply to every threat model of a model (their results carry no norm)."""
    spec = get(check)
    return spec is not None and spec.scope == "model"


register_check(CheckSpec(
    "gradients", "Loss gradients are usable",
    "The input gradient of the loss is zero, NaN or infinite on many points: gradient attacks cannot "
    "move (a non-differentiable or gradient-blocking layer, e.g. quantisation or rounding).",
    "Attack with BPDA (a differentiable approximation of the blocking layer, identity by default); "
    "the pgd-bpda rows are in the results when a blocking layer was found.",
    scope="model", run="model_checks:gradients", adaptive="bpda"))
register_check(CheckSpec(
    "logits", "Outputs are logits",
    "The model outputs probabilities; gradients of log(probabilities) vanish where the softmax "
    "saturates, so attacks under-report vulnerability.",
    "Audit the model without its final softmax (logits), or rely on margin-loss attacks (pgd-margin).",
    scope="model", run="model_checks:logits", black_box=True))
register_check(CheckSpec(
    "determinism", "The forward pass is deterministic",
    "Two forward passes on the same inputs differ: single-pass gradients are random draws, so attacks "
    "that ignore the randomness under-report vulnerability.",
    "Attack with expectation over transformation (PGD with eot_samples); the pgd-eot rows are in the "
    "results.",
    scope="model", run="model_checks:determinism", adaptive="eot", black_box=True))
register_check(CheckSpec(
    "unbounded", "An unbounded attack reaches ~100% success",
    "With a budget as large as the whole input range any input can be reached, so every point should be "
    "misclassified. An attack that fails there is blind (zero or useless gradients), not defeated.",
    "Look for gradient masking (non-differentiable layers, saturated outputs); use BPDA or a "
    "score-based attack (Square).",
    scope="model", run="model_checks:unbounded", adaptive="square"))
register_check(CheckSpec(
    "eps-monotonic", "Robust accuracy falls as eps grows",
    "Robust accuracy rose with a larger budget, beyond the statistical noise. A larger ball contains the "
    "smaller one, so a working attack can only do better: the attack is failing for another reason "
    "(masked gradients, bad step size).",
    "Check the attack's step size and steps; run the adaptive attacks (margin loss, BPDA, EoT).",
    scope="mode", run="comparisons:eps_monotonic", adaptive="square", black_box=True))
register_check(CheckSpec(
    "iterative-vs-single-step", "Iterative attacks beat single-step ones",
    "FGSM broke points that PGD did not. PGD takes FGSM's direction and more, so this signals a "
    "loss surface that misleads iterative steps (gradient masking).",
    "Try PGD with the margin loss, more restarts and a smaller step; run the adaptive attacks.",
    scope="eps", run="comparisons:iterative_vs_single_step", adaptive="square"))
register_check(CheckSpec(
    "margin-vs-ce", "Margin-loss and cross-entropy PGD agree",
    "PGD on the logit margin broke many more points than PGD on cross-entropy: the softmax saturates "
    "(typical of defensive distillation) and the cross-entropy gradient vanishes.",
    "Use the margin loss (--loss margin) or CW; the pgd-margin rows are in the results.",
    scope="eps", run="comparisons:margin_vs_ce"))
register_check(CheckSpec(
    "convergence", "More steps and restarts change little",
    "PGD with twice the steps and an extra restart broke noticeably more points: the audit's attack had "
    "not converged, so its robust accuracy is too high.",
    "Raise --steps and --restarts until robust accuracy stops falling (the stronger PGD's rows are in "
    "the results as pgd-strong).",
    scope="eps", run="probes:convergence", adaptive="stronger-pgd", probe=True))
register_check(CheckSpec(
    "black-box", "White-box attacks beat black-box ones",
    "A score-based (Square) or transfer attack, which sees less of the model, broke points every "
    "white-box attack missed: the model's gradients mislead the white-box attacks.",
    "Treat the white-box figures as upper bounds; the Square attack's rows are in the results; use "
    "BPDA/EoT or a different loss for white-box attacks.",
    scope="eps", run="probes:black_box", adaptive="black-box", probe=True))
register_check(CheckSpec(
    "random-noise", "Gradient attacks beat random noise",
    "Random points of the eps ball broke samples every attack of the audit left robust. A gradient attack "
    "that loses to random search is being misled (Carlini et al. 2019, section 5: noise must never beat the "
    "attack).",
    "Treat the white-box figures as upper bounds; the Square attack (which needs no gradient) has run; "
    "look for gradient masking with the other checks' evidence.",
    scope="eps", run="probes:random_noise", adaptive="square", probe=True, levels=("strict",)))
