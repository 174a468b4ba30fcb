"""--robustlab-quick: fewer samples, the quick suite and fewer attack steps, for pull requests.

The attack caps are the quick budgets the attacks declare where they are registered
(robustlab.attacks.registry: `register_attack(..., quick={"steps": 10})`), so a new attack gets its
cap in its registration, not here. QUICK repeats PGD's and CW's figures for the option's help and
session.json, which must not import torch; a test keeps them equal to the registry's.
A smaller value from the marker or the call is kept.
"""

from __future__ import annotations

from typing import Any

QUICK = {"n": 64, "pgd_steps": 10, "cw_steps": 20, "cw_binary_search_steps": 3}


def quick_attack(spec: Any, *, steps: int | None, restarts: int | None) -> Any:
    """`spec` (a name or a configured Attack) with the marker's steps/restarts, where the attack takes
    them, then capped at its registered quick budget; attacks without a budget are left as they are."""
    from robustlab.attacks import Attack, get_attack, registry

    name = spec.strip().lower() if isinstance(spec, str) else getattr(spec, "name", None)
    found = registry.entry(name) if isinstance(name, str) else None
    if found is None or not found.quick:
        return spec
    built = get_attack(spec) if isinstance(spec, str) else spec
    if not isinstance(built, Attack):
        return spec
    given = {k: v for k, v in (("steps", steps), ("restarts", restarts)) if v and k in found.audit_options}
    return found.quick_budget(built.replace(**given) if given else built)


def apply_quick(kwargs: dict, attacks: list, *, n: int | None, steps: int | None, restarts: int | None) -> dict:
    """robustlab.audit arguments `kwargs` with quick mode's caps: n, the quick suite, capped attacks.

    The marker's steps and restarts reach the capped attacks only (the audit gets steps=None)."""
    capped = dict(kwargs)
    capped["n"] = QUICK["n"] if n is None else min(int(n), QUICK["n"])
    if capped.get("suite", "standard") == "standard":
        capped["suite"] = "quick"  # the quick cascade (robustlab.attacks.cascade); verdicts say it is weaker
    capped.update(attacks=[quick_attack(a, steps=steps, restarts=restarts) for a in attacks], steps=None,
                  restarts=None)
    return capped
