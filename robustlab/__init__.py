"""robustlab: adversarial robustness audits for PyTorch classifiers.

    import robustlab
    result = robustlab.audit(model, "digits", attacks=["fgsm", "pgd", "cw"], eps=[0.05, 0.1])
    result.summary        # one row per (model, attack, norm, eps, targeted)
    result.save("out/"); robustlab.load("out/")

Names are resolved lazily so `import robustlab` (and the CLI's --help) stay fast, and so that
`robustlab.results` can be used where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "audit": ("robustlab.harness", "audit"),
    "AuditResult": ("robustlab.results", "AuditResult"),
    "load": ("robustlab.results", "load"),
    "ModelUnderTest": ("robustlab.model", "ModelUnderTest"),
    "wrap": ("robustlab.model", "ModelUnderTest"),
    "Bounds": ("robustlab.threat", "Bounds"),
    "load_model": ("robustlab.loading", "load_model"),
    "load_data": ("robustlab.data", "load_data"),
    "InputError": ("robustlab.errors", "InputError"),
    "VerificationError": ("robustlab.errors", "VerificationError"),
    "RobustlabError": ("robustlab.errors", "RobustlabError"),
    "assert_robust": ("robustlab.gates", "assert_robust"),
    "assert_no_regression": ("robustlab.gates", "assert_no_regression"),
    "RobustnessGateError": ("robustlab.gates", "RobustnessGateError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robustlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
