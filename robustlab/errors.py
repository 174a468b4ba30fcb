"""Errors robustlab raises. Each names the argument at fault and what was expected.

`InputError` is raised before any work starts (bad shapes, NaNs, labels out of range, impossible
epsilons...). `VerificationError` means an attack produced an output that violates its threat
model: that is a bug in robustlab (or in a third-party attack run through the adapter), never a
result to be reported.
"""

from __future__ import annotations


class RobustlabError(Exception):
    """Base class of every error robustlab raises on purpose."""


class InputError(RobustlabError, ValueError):
    """A user-supplied argument, model or data set is unusable; nothing was run."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument}: {problem}")


class UntrustedFileError(InputError):
    """Loading this file would unpickle arbitrary Python objects, and the user did not opt in."""


class VerificationError(RobustlabError, AssertionError):
    """An attack output left its epsilon ball or the input bounds: a bug, never a silent row."""
