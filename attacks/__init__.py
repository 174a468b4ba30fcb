"""Attacks: FGSM, PGD, APGD (CE and targeted DLR), FAB-T (targeted minimum-norm), Carlini-Wagner, Square
(score-based), the standard cascade of Croce & Hein 2020 (plus any foolbox 3 attack through `FoolboxAttack`).

Every attack is called the same way and returns a verified `AttackOutcome`:

    outcome = PGD(eps=0.1, steps=20)(model, x, y, targets=None)

See `robustlab.attacks.base` for what "verified" guarantees.
"""

from __future__ import annotations

from robustlab.errors import InputError

from .apgd import APGD, APGDT
from .adaptive import bpda, find_gradient_blockers, is_random
from .base import Attack, AttackOutcome, restrict, transfer
from .cascade import SUITES, Cascade, CascadeOutcome
from .cw import CW
from .fab import FABT
from .fgsm import FGSM
from .foolbox_adapter import FoolboxAttack
from .pgd import PGD
from .square import Square

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "cw": CW, "square": Square, "apgd-ce": APGD,
                                    "apgd-t": APGDT, "fab-t": FABT, "cascade": Cascade}


def get_attack(name: str, **options) -> Attack:
    """Build an attack by name: 'fgsm', 'pgd', 'cw', 'square', 'apgd-ce', 'apgd-t', 'fab-t', 'cascade'
    (the standard suite), 'cascade-quick', or 'foolbox:<AttackClass>'."""
    key = name.strip().lower()
    if key.startswith("cascade-") and key.split("-", 1)[1] in SUITES:  # "cascade-quick"
        return Cascade(suite=key.split("-", 1)[1], **options)
    if key.startswith("foolbox:"):
        return FoolboxAttack(attack_class=name.split(":", 1)[1].strip(), **options)
    if key not in ATTACKS:
        raise InputError("attack", f"unknown attack {name!r}; expected one of: {', '.join(ATTACKS)}, "
                                   "or foolbox:<AttackName> (e.g. foolbox:LinfDeepFoolAttack)")
    return ATTACKS[key](**options)


__all__ = ["APGD", "APGDT", "FABT", "Cascade", "CascadeOutcome", "SUITES", "Attack", "AttackOutcome", "FGSM", "PGD", "CW", "FoolboxAttack", "Square", "get_attack", "restrict", "transfer", "ATTACKS",
           "bpda", "find_gradient_blockers", "is_random"]
