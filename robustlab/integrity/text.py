"""What each check means and what to do when it fires: the words users read (no torch here).

The words are declared with each check in the registry (robustlab.integrity.catalogue).

The words of verdicts themselves (evaluation status, requirement outcomes) are the ground floor's:
robustlab.verdicts.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from . import catalogue


class _Texts(Mapping[str, tuple[str, str, str]]):
    """check id -> (title, what it means when it fires, what to do next), from the check registry."""

    def __getitem__(self, check: str) -> tuple[str, str, str]:
        spec = catalogue.get(check)
        if spec is None:
            raise KeyError(check)
        return spec.title, spec.means, spec.next_step

    def __iter__(self) -> Iterator[str]:
        return iter([s.id for s in catalogue.checks()])

    def __len__(self) -> int:
        return len(catalogue.checks())


CHECKS: Mapping[str, tuple[str, str, str]] = _Texts()


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
