"""--robustlab-baseline and --robustlab-save-baseline: one file, each test's summary under its node id.

Saving merges: tests not run in this session keep their entries, so a partial run (-k, a failed
job) never drops the rest of the baseline.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import pytest

from .files import write

BASELINE_SCHEMA = "robustlab.baseline/1"  # the same string as robustlab.gates.BASELINE_SCHEMA


def load_baseline(path: Path | None) -> dict:
    """nodeid -> baseline entry; {} without a path. A missing or foreign file is a pytest.UsageError."""
    if path is None:
        return {}
    if not path.is_file():
        raise pytest.UsageError(f"--robustlab-baseline: {path} does not exist; create it with "
                                "--robustlab-save-baseline FILE")
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise pytest.UsageError(f"--robustlab-baseline: cannot read {path}: {error}") from None
    if not isinstance(document, dict) or document.get("schema") != BASELINE_SCHEMA:
        raise pytest.UsageError(f"--robustlab-baseline: {path} is not a robustlab baseline "
                                f"(schema {BASELINE_SCHEMA!r})")
    return document.get("tests", {})


def save_baseline(path: Path, summaries: dict[str, list], quick: bool) -> None:
    """Merge this session's tests into the baseline file (entries of tests not run are kept)."""
    import robustlab as _rl

    tests: dict = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and old.get("schema") == BASELINE_SCHEMA:
                tests = dict(old.get("tests", {}))
        except (OSError, json.JSONDecodeError):
            tests = {}
    for nodeid in sorted(summaries):
        tests[nodeid] = {"quick": quick, "summary": summaries[nodeid]}
    document = {"schema": BASELINE_SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "robustlab_version": _rl.__version__, "tests": dict(sorted(tests.items()))}
    write(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
