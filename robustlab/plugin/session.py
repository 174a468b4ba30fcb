"""What one pytest process saw, and the files written when the session ends.

Each xdist worker keeps its own Session and hands it to the controller as JSON (to_json/merge);
only the controller writes session.json, summary.md, --robustlab-json and the baseline.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys

from .baseline import load_baseline, save_baseline
from .files import write
from .quick import QUICK
from .settings import Settings
from .tables import markdown_summary

SESSION_SCHEMA = "robustlab.pytest-session/2"  # /2: gates carry interval, evaluation and outcome


class Session:
    """One record per gate check, one per audit, the summaries per test, the results dirs used."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gates: list[dict] = []          # one per checked summary row (robustlab.plugin.records)
        self.audits: list[dict] = []         # one per audit run through the fixture
        self.summaries: dict[str, list] = {}  # nodeid -> summary records, for --robustlab-save-baseline
        self.used_dirs: set[str] = set()
        self._baseline: dict | None = None
        self.written: list[str] = []

    def baseline(self) -> dict:
        """nodeid -> baseline entry; {} without --robustlab-baseline. Read once per process."""
        if self._baseline is None:
            self._baseline = load_baseline(self.settings.baseline)
        return self._baseline

    def to_json(self) -> dict:
        return {"gates": self.gates, "audits": self.audits, "summaries": self.summaries}

    def merge(self, data: dict) -> None:
        self.gates.extend(data.get("gates", []))
        self.audits.extend(data.get("audits", []))
        for nodeid, records in data.get("summaries", {}).items():
            self.summaries.setdefault(nodeid, []).extend(records)

    @property
    def failed(self) -> int:
        return sum(1 for g in self.gates if not g["passed"])

    def document(self) -> dict:
        """session.json: the options, whether every gate passed, each gate and each audit."""
        import robustlab as _rl

        return {
            "schema": SESSION_SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "robustlab_version": _rl.__version__,
            "python_version": sys.version.split()[0],
            "options": self.settings.to_dict(),
            "quick_limits": QUICK if self.settings.quick else None,
            "passed": all(g["passed"] for g in self.gates),
            "gates": [{k: v for k, v in g.items() if k != "order"} for g in self.gates],
            "audits": [{k: v for k, v in a.items() if k != "order"} for a in self.audits],
        }

    def write_outputs(self) -> None:
        """The controller's files, in a stable order (by test, then as checked); paths go to `written`."""
        if not self.gates and not self.audits:
            return
        self.gates.sort(key=lambda g: (g["test"], g["order"]))
        self.audits.sort(key=lambda a: (a["test"], a["order"]))
        settings = self.settings
        text = json.dumps(self.document(), indent=2, allow_nan=False) + "\n"
        if settings.report is not None:
            settings.report.mkdir(parents=True, exist_ok=True)
            write(settings.report / "session.json", text)
            write(settings.report / "summary.md", markdown_summary(self))
            self.written += [str(settings.report / "session.json"), str(settings.report / "summary.md")]
        if settings.json is not None:
            write(settings.json, text)
            self.written.append(str(settings.json))
        if settings.save_baseline is not None and self.summaries:
            save_baseline(settings.save_baseline, self.summaries, settings.quick)
            self.written.append(str(settings.save_baseline))
