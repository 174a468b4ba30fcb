"""Attacks: FGSM, PGD, APGD (CE and targeted DLR), FAB-T (targeted minimum-norm), Carlini-Wagner, Square
(score-based), the standard cascade of Croce & Hein 2020 (plus any foolbox 3 attack through `FoolboxAttack`).

Every attack is called the same way and returns a verified `AttackOutcome`:

    outcome = PGD(eps=0.1, steps=20)(model, x, y, targets=None)

See `robustlab.attacks.base` for what "verified" guarantees.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from robustlab.errors import InputError

from .apgd import APGD, APGDT
from .adaptive import bpda, find_gradient_blockers, is_random
from .base import Attack, AttackOutcome, restrict, transfer
from .cascade import SUITES, Cascade, CascadeOutcome
from .cw import CW
from .fab import FABT
from .fgsm import FGSM
from .mifgsm import MIFGSM
from .noise import RandomNoise
from .foolbox_adapter import FoolboxAttack
from .pgd import PGD
from .square import Square
from . import registry

from .registry import AttackEntry, register_attack

# One registration per attack: the harness, the CLI help, get_attack and the plugin's quick mode read them.
register_attack(FGSM, summary="one gradient step", audit_options=("loss",))
register_attack(PGD, summary="projected gradient descent from a random start", audit_options=("steps", "restarts", "loss"),
                quick={"steps": 10})
register_attack(CW, summary="Carlini-Wagner, minimal L2", norms=("l2",), follows_audit_norm=False,
                audit_options=("steps",), quick={"steps": 20, "binary_search_steps": 3})
register_attack(Square, summary="score-based black-box search")
register_attack(APGD, summary="step-size-free PGD, cross-entropy")
register_attack(APGDT, summary="targeted APGD, DLR loss, top-9 classes")
register_attack(FABT, summary="targeted minimal-norm FAB")
register_attack(MIFGSM, summary="momentum iterative FGSM", audit_options=("steps", "loss"), quick={"steps": 10})
register_attack(RandomNoise, summary="random points of the eps ball, a baseline", quick={"draws": 10})
register_attack(Cascade, summary="the standard cascade")


class _Registered(Mapping[str, Callable[..., Attack]]):
    """Read-only view: attack name -> class, always current with the registry."""

    def __getitem__(self, name: str) -> Callable[..., Attack]:
        found = registry.entry(name)
        if found is None:
            raise KeyError(name)
        return found.build

    def __iter__(self) -> Iterator[str]:
        return iter(registry.names())

    def __len__(self) -> int:
        return len(registry.names())


ATTACKS: Mapping[str, Callable[..., Attack]] = _Registered()


def get_attack(name: str, **options) -> Attack:
    """Build an attack by name: a registered one ('fgsm', 'pgd', 'cw', 'square', 'apgd-ce', 'apgd-t',
    'fab-t', 'mifgsm', 'cascade': the standard suite), 'cascade-quick', or 'foolbox:<AttackClass>'."""
    key = name.strip().lower()
    if key.startswith("cascade-") and key.split("-", 1)[1] in SUITES:  # "cascade-quick"
        return Cascade(suite=key.split("-", 1)[1], **options)
    if key.startswith("foolbox:"):
        return FoolboxAttack(attack_class=name.split(":", 1)[1].strip(), **options)
    found = registry.entry(key)
    if found is None:
        raise InputError("attack", f"unknown attack {name!r}; expected one of: {', '.join(registry.names())}, "
                                   "or foolbox:<AttackName> (e.g. foolbox:LinfDeepFoolAttack)")
    return found.build(**options)


__all__ = ["APGD", "APGDT", "FABT", "Cascade", "CascadeOutcome", "SUITES", "Attack", "AttackOutcome", "FGSM", "PGD", "CW", "FoolboxAttack", "Square", "get_attack", "restrict", "transfer", "ATTACKS",
           "AttackEntry", "register_attack", "MIFGSM", "RandomNoise",
           "bpda", "find_gradient_blockers", "is_random"]
