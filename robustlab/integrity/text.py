"""What each check means and what to do when it fires: the words users read (no torch here).

The words of verdicts themselves (evaluation status, requirement outcomes) are the ground floor's:
robustlab.verdicts.
"""

from __future__ import annotations

# check id -> (title, what it means when it fires, what to do next)
CHECKS: dict[str, tuple[str, str, str]] = {
    "eps-monotonic": (
        "Robust accuracy falls as eps grows",
        "Robust accuracy rose with a larger budget, beyond the statistical noise. A larger ball contains the "
        "smaller one, so a working attack can only do better: the attack is failing for another reason "
        "(masked gradients, bad step size).",
        "Check the attack's step size and steps; run the adaptive attacks (margin loss, BPDA, EoT)."),
    "unbounded": (
        "An unbounded attack reaches ~100% success",
        "With a budget as large as the whole input range any input can be reached, so every point should be "
        "misclassified. An attack that fails there is blind (zero or useless gradients), not defeated.",
        "Look for gradient masking (non-differentiable layers, saturated outputs); use BPDA or a "
        "score-based attack (Square)."),
    "iterative-vs-single-step": (
        "Iterative attacks beat single-step ones",
        "FGSM broke points that PGD did not. PGD takes FGSM's direction and more, so this signals a "
        "loss surface that misleads iterative steps (gradient masking).",
        "Try PGD with the margin loss, more restarts and a smaller step; run the adaptive attacks."),
    "convergence": (
        "More steps and restarts change little",
        "PGD with twice the steps and an extra restart broke noticeably more points: the audit's attack had "
        "not converged, so its robust accuracy is too high.",
        "Raise --steps and --restarts until robust accuracy stops falling (the stronger PGD's rows are in "
        "the results as pgd-strong)."),
    "black-box": (
        "White-box attacks beat black-box ones",
        "A score-based (Square) or transfer attack, which sees less of the model, broke points every "
        "white-box attack missed: the model's gradients mislead the white-box attacks.",
        "Treat the white-box figures as upper bounds; the Square attack's rows are in the results; use "
        "BPDA/EoT or a different loss for white-box attacks."),
    "gradients": (
        "Loss gradients are usable",
        "The input gradient of the loss is zero, NaN or infinite on many points: gradient attacks cannot "
        "move (a non-differentiable or gradient-blocking layer, e.g. quantisation or rounding).",
        "Attack with BPDA (a differentiable approximation of the blocking layer, identity by default); "
        "the pgd-bpda rows are in the results when a blocking layer was found."),
    "logits": (
        "Outputs are logits",
        "The model outputs probabilities; gradients of log(probabilities) vanish where the softmax "
        "saturates, so attacks under-report vulnerability.",
        "Audit the model without its final softmax (logits), or rely on margin-loss attacks (pgd-margin)."),
    "determinism": (
        "The forward pass is deterministic",
        "Two forward passes on the same inputs differ: single-pass gradients are random draws, so attacks "
        "that ignore the randomness under-report vulnerability.",
        "Attack with expectation over transformation (PGD with eot_samples); the pgd-eot rows are in the "
        "results."),
    "margin-vs-ce": (
        "Margin-loss and cross-entropy PGD agree",
        "PGD on the logit margin broke many more points than PGD on cross-entropy: the softmax saturates "
        "(typical of defensive distillation) and the cross-entropy gradient vanishes.",
        "Use the margin loss (--loss margin) or CW; the pgd-margin rows are in the results."),
}

def title(check: str) -> str:
    return CHECKS.get(check, (check, "", ""))[0]


def explanation(check: str, status: str, reason: str = "") -> str:
    """The explanation users see: what a failure means; for passes and skips a short note."""
    if status == "fail":
        return CHECKS.get(check, ("", "", ""))[1]
    if status == "skipped":
        if reason.startswith("inconclusive: "):  # it ran, but what it found cannot make it pass
            return "Inconclusive: " + reason[len("inconclusive: "):]
        return f"Not run: {reason}" if reason else "Not run."
    return "Passed." + (f" {reason}" if reason else "")


def next_step(check: str, status: str) -> str:
    return CHECKS.get(check, ("", "", ""))[2] if status == "fail" else ""
