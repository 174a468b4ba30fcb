"""--robustlab-quick: fewer samples, the quick suite and fewer attack steps, for pull requests.

The caps are keyed on the attack's name in one table (QUICK_CAPS), so a new attack with a costly
budget gets its cap in one place. A smaller value from the marker or the call is kept.
"""

from __future__ import annotations

from typing import Any, Callable

QUICK = {"n": 64, "pgd_steps": 10, "cw_steps": 20, "cw_binary_search_steps": 3}


def _cap_pgd(attack: Any, steps: int | None, restarts: int | None) -> Any:
    return attack.replace(steps=min(steps or attack.steps, QUICK["pgd_steps"]),
                          **({"restarts": restarts} if restarts else {}))


def _cap_cw(attack: Any, steps: int | None, restarts: int | None) -> Any:
    return attack.replace(steps=min(steps or attack.steps, QUICK["cw_steps"]),
                          binary_search_steps=min(attack.binary_search_steps, QUICK["cw_binary_search_steps"]))


# attack name -> how a built attack of that name is capped: (attack, steps, restarts) -> attack
QUICK_CAPS: dict[str, Callable[[Any, int | None, int | None], Any]] = {"pgd": _cap_pgd, "cw": _cap_cw}


def quick_attack(spec: Any, *, steps: int | None, restarts: int | None) -> Any:
    """`spec` (a name or a configured Attack) under the quick caps; attacks without a cap unchanged."""
    from robustlab.attacks import Attack, get_attack

    name = spec.strip().lower() if isinstance(spec, str) else getattr(spec, "name", None)
    cap = QUICK_CAPS.get(name) if isinstance(name, str) else None
    if cap is None:
        return spec
    built = get_attack(spec) if isinstance(spec, str) else spec
    return cap(built, steps, restarts) if isinstance(built, Attack) else spec


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
