"""The attack registry: one registration per attack, read by every face.

The harness (which attacks follow the audit's norm, which take the audit's --steps/--restarts/
--loss), the CLI help, `get_attack` and the pytest plugin's quick mode are all generated from
the entries here, so an attack is added by writing its module and registering it once (see the
registrations at the end of robustlab.attacks).

    register_attack(MIFGSM, summary="momentum iterative FGSM (Dong et al. 2018)",
                    audit_options=("steps", "loss"), quick={"steps": 10})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from robustlab.errors import InputError

from .base import Attack

AUDIT_OPTIONS = ("steps", "restarts", "loss")  # the audit-wide options an attack may take (CLI --steps ...)
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AttackEntry:
    """What the faces need to know about one attack, declared where it is registered.

    norms: the threat models it can evaluate. follows_audit_norm: built for the audit's norm
    (False: it keeps its own, e.g. Carlini-Wagner is the L2 attack). audit_options: which of the
    audit-wide --steps/--restarts/--loss it takes (others keep their published schedule).
    quick: the pull-request budget, field -> largest value (the plugin's --robustlab-quick).
    """

    name: str
    build: Callable[..., Attack]
    summary: str
    norms: tuple[str, ...] = NORMS
    follows_audit_norm: bool = True
    audit_options: tuple[str, ...] = ()
    quick: Mapping[str, int] = field(default_factory=dict)

    def configure(self, attack: Attack, norm: str, **options: int | str | None) -> Attack:
        """`attack` set up for an audit in `norm`, with the audit-wide options this attack takes."""
        changes: dict[str, object] = {}
        if self.follows_audit_norm and attack.norm != norm:
            if norm not in self.norms:
                raise InputError("norm", f"{self.name} evaluates {', '.join(self.norms)} only, not {norm}")
            changes["norm"] = norm
        changes.update({k: v for k, v in options.items() if v is not None and k in self.audit_options})
        return attack.replace(**changes) if changes else attack

    def quick_budget(self, attack: Attack) -> Attack:
        """`attack` with every field capped at the quick budget (a smaller value is kept)."""
        changes = {k: min(getattr(attack, k), cap) for k, cap in self.quick.items() if getattr(attack, k) > cap}
        return attack.replace(**changes) if changes else attack


_REGISTRY: dict[str, AttackEntry] = {}


def register_attack(build: Callable[..., Attack], *, summary: str, name: str | None = None,
                    norms: tuple[str, ...] = NORMS, follows_audit_norm: bool = True,
                    audit_options: tuple[str, ...] = (), quick: Mapping[str, int] | None = None) -> AttackEntry:
    """Register an attack under `name` (default: the class's `name`); returns its entry."""
    key = str(name or getattr(build, "name", "") or "").strip().lower()
    if not key or key in _REGISTRY:
        raise ValueError(f"attack name {key!r} is empty or already registered")
    unknown = set(audit_options) - set(AUDIT_OPTIONS)
    if unknown or not norms or set(norms) - set(NORMS):
        raise ValueError(f"{key}: audit_options must be among {AUDIT_OPTIONS} and norms among {NORMS}")
    entry = AttackEntry(key, build, summary, tuple(norms), follows_audit_norm, tuple(audit_options), dict(quick or {}))
    _REGISTRY[key] = entry
    return entry


def entry(name: str) -> AttackEntry | None:
    """The registered entry of an attack name (None for attacks outside the registry, e.g. foolbox:)."""
    return _REGISTRY.get(name.strip().lower())


def entries() -> tuple[AttackEntry, ...]:
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def help_text() -> str:
    """The attacks for the CLI's --attack help: 'fgsm (one gradient step), pgd (...), ...'."""
    return ", ".join(f"{e.name} ({e.summary})" for e in _REGISTRY.values())
