"""@pytest.mark.robustness: its arguments, and how a merged configuration becomes robustlab.audit's.

The marker describes the gate (what runs, at which eps, which thresholds); check() and audit()
take the same keywords plus AUDIT_OPTIONS, passed straight to robustlab.audit, and check() the
GATE_OPTIONS (a certified-accuracy threshold, with certify= in the same call). The session's
device, seed and quick flag come from the options, never from the marker.
"""

from __future__ import annotations

from typing import Any

from .quick import apply_quick

MARKER = "robustness"
MARKER_DEFAULTS: dict[str, Any] = {
    "attack": "pgd", "eps": None, "min_accuracy": None, "norm": "linf", "targeted": "none", "n": None,
    "steps": None, "restarts": None, "min_clean_accuracy": None, "name": None,
}
# Further keyword arguments check()/audit() pass straight to robustlab.audit.
AUDIT_OPTIONS = ("attacks", "seed", "bounds", "mean", "std", "classes", "output", "batch_size", "loss", "checks",
                 "explain", "suite", "certify")
# Thresholds check() takes beyond the marker's: certified accuracy needs certify= (an audit option) beside it.
GATE_OPTIONS = ("min_certified_accuracy",)
MARKER_HELP = (f"{MARKER}(attack='pgd', eps=..., min_accuracy=..., norm='linf', targeted='none', n=None, steps=None, "
               "restarts=None, min_clean_accuracy=None, name=None): a robustness gate, run by the `robustlab` "
               "fixture's check(); it reads the worst case over every attack the audit ran")


def marker_problem(marker: Any) -> str | None:
    """What is wrong with a marker's arguments, in one line, or None."""
    allowed = ", ".join(MARKER_DEFAULTS)
    if marker.args:
        return f"takes keyword arguments only ({allowed}), got positional {marker.args!r}"
    unknown = [k for k in marker.kwargs if k not in MARKER_DEFAULTS]
    if unknown:
        return (f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"allowed: {allowed}")
    return None


def audit_kwargs(config: dict) -> dict:
    """robustlab.audit keyword arguments for a merged configuration (quick caps applied)."""
    attack = config["attack"]
    if attack is None:
        from robustlab.harness import DEFAULT_ATTACKS

        attack = list(DEFAULT_ATTACKS)
    attacks = [attack] if isinstance(attack, str) or not isinstance(attack, (list, tuple)) else list(attack)
    kwargs: dict[str, Any] = {
        "attacks": attacks, "norm": config["norm"], "targeted": config["targeted"], "n": config["n"],
        "steps": config["steps"], "restarts": config["restarts"], "seed": config["seed"],
        "device": config["device"], "name": config["name"],
    }
    if config["eps"] is not None:
        kwargs["eps"] = config["eps"]
    for key in AUDIT_OPTIONS:
        if key in config and key != "attacks":
            kwargs[key] = config[key]
    if config.get("quick"):
        kwargs = apply_quick(kwargs, attacks, n=config["n"], steps=config["steps"], restarts=config["restarts"])
    return kwargs
