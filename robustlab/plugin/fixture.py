"""The `robustlab` fixture's object (Gate): audits through robustlab.audit, gates through robustlab.gates.

Every audit is recorded in the session (its configuration, where it was saved, its summary for
baselines); every gate check adds records for the tables and JUnit properties to the test. The
fixture function itself is registered by robustlab.pytest_plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .files import dir_name, render_report
from .marker import AUDIT_OPTIONS, GATE_OPTIONS, MARKER, MARKER_DEFAULTS, audit_kwargs
from .records import gate_records, jsonable, junit_properties, row_key, summary_records
from .session import Session

WORST_CASE = "worst-case"  # robustlab.results.WORST_CASE (not imported here: that module imports pandas)


def skip_unavailable_device(device: str) -> None:
    """Skip the test (with the reason) when --robustlab-device names a GPU this machine lacks."""
    if device in ("auto", "cpu"):
        return
    import torch

    if not torch.cuda.is_available():
        pytest.skip(f"robustlab: device {device!r} requested (--robustlab-device) but CUDA is not available "
                    "(torch.cuda.is_available() is False)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        pytest.skip(f"robustlab: device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")


class Gate:
    """The `robustlab` fixture: `check(model, data)` runs the audit the marker describes and gates it.

    Also `audit(model, data, **options)`, `assert_robust(result, ...)`, `assert_no_regression(result,
    baseline=None)`; `options` holds the merged settings (command line/ini, then marker, then call).
    """

    def __init__(self, nodeid: str, state: Session, marker: dict,
                 properties: list[tuple[str, object]] | None = None) -> None:
        self.nodeid = nodeid
        self._properties = [] if properties is None else properties  # the item's user_properties (JUnit XML)
        self._state = state
        self.marker = marker
        self.settings = state.settings
        self._dirs: dict[int, str] = {}  # id(result) -> where it was saved
        self._results: list[Any] = []    # keeps ids stable while the test runs
        self._pending: list[Any] = []    # audit() results not yet compared with the baseline
        self._audit_records: dict[int, dict] = {}  # id(result) -> its record in the session's audits

    # ------------------------------------------------------------ options
    @property
    def options(self) -> dict:
        """Marker arguments over their defaults, with the session's device, seed and quick flag."""
        merged = dict(MARKER_DEFAULTS)
        merged.update(self.marker)
        merged.update(device=self.settings.device, seed=self.settings.seed, quick=self.settings.quick)
        return merged

    def _merge(self, overrides: dict) -> dict:
        names = list(MARKER_DEFAULTS) + list(AUDIT_OPTIONS) + list(GATE_OPTIONS)
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise TypeError(f"robustlab fixture: unknown argument(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(names)}")
        merged = self.options
        merged.update(overrides)
        if "attacks" in overrides:
            merged["attack"] = overrides["attacks"]
        merged.pop("attacks", None)
        return merged

    # ------------------------------------------------------------ verbs
    def audit(self, model: Any, data: Any = "digits", **options: Any) -> Any:
        """robustlab.audit with this session's device, seed and quick mode; saved under --robustlab-report."""
        config = self._merge(options)
        if "attack" not in self.marker and "attack" not in options and "attacks" not in options:
            config["attack"] = None  # robustlab.audit's default attacks, not the marker's default
        result = self._run(model, data, config, require_eps=False)
        if self._compares():
            self._pending.append(result)
        return result

    def check(self, model: Any, data: Any = "digits", **options: Any) -> Any:
        """Audit `model` as the marker (and `options`) say, and fail the test if a gate fails.

        Gates: worst-case robust accuracy (over every attack, suite member, probe and adaptive attack
        the audit ran) >= min_accuracy at every eps, clean accuracy >= min_clean_accuracy, certified
        accuracy >= min_certified_accuracy (with certify='ibp', 'crown' or 'smoothing[:SIGMA]': the
        audit's certificate row at each eps), and, with --robustlab-baseline and
        --robustlab-compare-fail, no regression against this test's baseline. Returns the AuditResult.
        """
        __tracebackhide__ = True
        from robustlab import gates

        config = self._merge(options)
        thresholds = {k: config.get(k) for k in ("min_accuracy", "min_clean_accuracy", "min_certified_accuracy")}
        if all(v is None for v in thresholds.values()) and not self._compares():
            raise TypeError("robustlab.check: nothing to gate; give min_accuracy (or min_clean_accuracy) in "
                            f"@pytest.mark.{MARKER}(...) or to check(), min_certified_accuracy to check(), or "
                            "compare with --robustlab-baseline and --robustlab-compare-fail")
        for key, value in thresholds.items():  # bad thresholds fail before any attack runs
            gates.check_fraction(key, value)
        certified = thresholds.pop("min_certified_accuracy")
        if certified is not None:  # a certified threshold without certificates fails before any work too
            gates.check_certify(certify=config.get("certify"), min_certified_accuracy=certified, argument="certify=")
            thresholds["min_certified_accuracy"] = certified
        result = self._run(model, data, config, require_eps=True, save=False)
        checks = []
        if any(v is not None for v in thresholds.values()):
            checks += gates.evaluate_robust(result, attack=WORST_CASE, eps=config["eps"], norm=config["norm"],
                                            targeted=config["targeted"], **thresholds)
        checks += self._regression_checks(result, None, None)
        self._finish(result, checks, gated=gates.select_rows(
            result.summary, attack=WORST_CASE, eps=config["eps"], norm=config["norm"],
            targeted=config["targeted"]), source=f"@pytest.mark.{MARKER}")
        return result

    def assert_robust(self, result: Any, **kwargs: Any) -> list:
        """robustlab.assert_robust, defaulting to the marker's eps/thresholds and to the worst case (the
        marker's `attack` says what runs, not what is gated); recorded in the summary."""
        __tracebackhide__ = True
        from robustlab import gates

        merged = {k: self.marker[k] for k in ("eps", "min_accuracy", "min_clean_accuracy", "norm",
                                              "targeted") if k in self.marker}
        merged.update(kwargs)
        checks = gates.evaluate_robust(result, **merged)
        gated = gates.select_rows(result.summary, **{k: v for k, v in merged.items()
                                                     if k in ("attack", "eps", "norm", "targeted", "model")})
        self._finish(result, checks, gated=gated, source="robustlab.assert_robust")
        return checks

    def assert_no_regression(self, result: Any, baseline: Any = None, *, margin: Any = None) -> list:
        """robustlab.assert_no_regression; baseline defaults to this test's entry in --robustlab-baseline,
        margin to --robustlab-compare-fail (else robustlab.gates.DEFAULT_MARGIN)."""
        __tracebackhide__ = True
        if baseline is None and self.nodeid not in self._state.baseline():
            where = self.settings.baseline or "no --robustlab-baseline given"
            raise AssertionError(f"robustlab: no baseline for {self.nodeid} ({where}); save one with "
                                 "--robustlab-save-baseline FILE or pass baseline=")
        self._pending = [r for r in self._pending if r is not result]
        checks = self._regression_checks(result, baseline, margin, required=True)
        self._finish(result, checks, gated=None, title="robustness regression")
        return checks

    def compare_pending(self) -> None:
        """Compare the audit() results the test did not compare itself with its baseline (after the test)."""
        from robustlab.gates import RobustnessGateError

        pending, self._pending = self._pending, []
        messages = []
        for result in pending:
            try:
                self._finish(result, self._regression_checks(result, None, None), gated=None,
                             title="robustness regression")
            except RobustnessGateError as error:
                messages.append(str(error))
        if messages:
            pytest.fail("\n".join(messages), pytrace=False)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    # ------------------------------------------------------------ internals
    def _compares(self) -> bool:
        return bool(self.settings.compare_fail) and self.nodeid in self._state.baseline()

    def _regression_checks(self, result: Any, baseline: Any, margin: Any, required: bool = False) -> list:
        from robustlab import gates

        if baseline is None:
            entry = self._state.baseline().get(self.nodeid)
            if entry is None or (not required and not self.settings.compare_fail):
                return []
            if bool(entry.get("quick", False)) != self.settings.quick:
                def mode(quick: bool) -> str:
                    return "with --robustlab-quick" if quick else "without --robustlab-quick"

                pytest.fail(f"robustlab: the baseline of {self.nodeid} in {self.settings.baseline} was saved "
                            f"{mode(entry.get('quick', False))} and this session runs {mode(self.settings.quick)}; "
                            "fewer samples and steps give different numbers, so compare like with like "
                            "(keep one baseline per mode)", pytrace=False)
            baseline = entry["summary"]
        if margin is None:
            margin = self.settings.compare_fail or gates.DEFAULT_MARGIN
        return gates.evaluate_regression(result, baseline, margin=margin)

    def _run(self, model: Any, data: Any, config: dict, *, require_eps: bool, save: bool = True) -> Any:
        """Audit; saved under --robustlab-report now, or (save=False) by _finish once the gates judged it."""
        import robustlab as _rl

        if require_eps and config["eps"] is None:
            raise TypeError(f"robustlab.check: no eps; give @pytest.mark.{MARKER}(eps=...) or check(..., eps=...)")
        kwargs = audit_kwargs(config)
        result = _rl.audit(model, data, progress=False, **kwargs)
        self._results.append(result)
        self._state.summaries.setdefault(self.nodeid, []).extend(summary_records(result))
        models = sorted(str(m) for m in result.summary["model"].unique())
        record = {"test": self.nodeid, "order": len(self._state.audits), "models": models,
                  "results_dir": None, "seconds": result.metadata.get("seconds"), "quick": self.settings.quick,
                  "config": jsonable({k: v for k, v in kwargs.items() if k != "attacks"}),
                  "attacks": jsonable([a if isinstance(a, str) else a.config() for a in kwargs["attacks"]])}
        self._state.audits.append(record)
        self._audit_records[id(result)] = record
        if save:
            self._save(result)
        return result

    def _save(self, result: Any) -> str | None:
        """Write (or rewrite, once gates have judged it) the result's directory and report."""
        if self.settings.report is None:
            return None
        if id(result) in self._dirs:
            target = Path(self._dirs[id(result)])
        else:
            name = dir_name(self.nodeid)
            candidate, k = name, 1
            while candidate in self._state.used_dirs:
                k += 1
                candidate = f"{name}-{k}"
            self._state.used_dirs.add(candidate)
            target = self.settings.report / candidate
        result.save(target)
        render_report(target)
        self._dirs[id(result)] = str(target)
        if id(result) in self._audit_records:
            self._audit_records[id(result)]["results_dir"] = str(target)
        return str(target)

    def _finish(self, result: Any, checks: list, *, gated: Any, title: str = "robustness gate failed",
                source: str | None = None) -> None:
        __tracebackhide__ = True
        from robustlab import gates

        thresholds = [c for c in checks if c.kind != "regression"]
        if id(result) in self._audit_records:  # audited through this fixture
            if thresholds:  # the requirement and its outcome travel with the results, into the report
                gates.record_requirements(result, [c.judgement(source or "robustlab.assert_robust")
                                                   for c in thresholds])
            if thresholds or id(result) not in self._dirs:
                self._save(result)
        where = self._dirs.get(id(result))

        def found(model: str, norm: str, eps: Any, targeted: str) -> str | None:
            """The evaluation status of this gated row's own threat model."""
            return gates.evaluation(result, model=model, norm=norm, eps=eps, targeted=targeted)

        entry = self._state.baseline().get(self.nodeid)
        before = {} if entry is None else {row_key(r): r.get("robust_accuracy") for r in entry.get("summary", [])}
        self._state.gates.extend(gate_records(self.nodeid, checks, gated, where, found, len(self._state.gates),
                                              before))
        self._properties.extend(junit_properties(checks, start=sum(1 for name, _ in self._properties
                                                                    if name.endswith(".metric"))))
        context = f"{self.nodeid}" + ("; --robustlab-quick" if self.settings.quick else "")
        if where and (Path(where) / "report.html").exists():
            where = f"{where} (report: {Path(where) / 'report.html'})"
        gates.raise_if_failed(checks, result=result, results_dir=where, title=title, context=context)
