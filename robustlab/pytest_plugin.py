"""The pytest plugin: robustness gates in a model's CI.

    import pytest

    @pytest.mark.robustness(attack="pgd", eps=0.1, min_accuracy=0.5)
    def test_release_candidate_is_robust(robustlab, my_model, my_test_data):
        robustlab.check(my_model, my_test_data)

`attack` names the attacks the audit runs (beside the attack suite and the integrity checks' attacks);
the gate reads the per-sample worst case over every row of the audit ("worst-case"), never one
attack's row: each attack alone is only an upper bound of robust accuracy.

The marker's thresholds are the requirement (`min_accuracy=0.5` at eps 0.1 is
`robust_accuracy>=0.5@0.1`): each gated row is judged `meets`, `does not meet` or `cannot be judged`
(evaluation not established: an integrity check failed); the judgements are saved with the results
(metadata["requirements"]) so the test's report shows them. The summary shows, per gate, the figure
with its 95% interval, the evaluation status, then the requirement and its outcome.

Registered through the `pytest11` entry point, so it is active wherever robustlab is installed.
It is a face (see DESIGN.md): it parses options and marker arguments, calls the harness
(`robustlab.audit`) and the gates (`robustlab.gates`), records what it saw and prints a summary.
At import time it needs pytest and the standard library only; torch, pandas and the harness are
imported inside the fixture and hooks, when a test asks for them, so sessions that never use the
fixture pay nothing.

Options (group "robustlab"; each is also an ini option `robustlab_*` in `[tool.pytest.ini_options]`,
the command line wins; paths in the ini file are relative to it):
  --robustlab-device auto|cpu|cuda[:N]   where models are audited; tests skip if it is unavailable
  --robustlab-seed N                     the audit's seed (default 0)
  --robustlab-report DIR                 DIR/<test>/ results (+ report.html), DIR/session.json, DIR/summary.md
  --robustlab-json FILE                  the session's gates as JSON (also with no report dir)
  --robustlab-baseline FILE              compare against a baseline saved by --robustlab-save-baseline
  --robustlab-save-baseline FILE         save this session's summaries as a baseline (per test node id)
  --robustlab-compare-fail METRIC:AMOUNT[%]  fail a test whose metric got worse than the baseline by more
                                         (repeatable; "2%" relative to the baseline, "0.02" absolute)
  --robustlab-quick                      fewer samples and steps, for pull requests (see QUICK)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MARKER = "robustness"
MARKER_DEFAULTS: dict[str, Any] = {
    "attack": "pgd", "eps": None, "min_accuracy": None, "norm": "linf", "targeted": "none", "n": None,
    "steps": None, "restarts": None, "min_clean_accuracy": None, "name": None,
}
# Further keyword arguments check()/audit() pass straight to robustlab.audit.
AUDIT_OPTIONS = ("attacks", "seed", "bounds", "mean", "std", "classes", "output", "batch_size", "loss", "checks",
                 "explain", "suite")
# --robustlab-quick: caps (a smaller value from the marker or the call is kept).
QUICK = {"n": 64, "pgd_steps": 10, "cw_steps": 20, "cw_binary_search_steps": 3}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
SESSION_SCHEMA = "robustlab.pytest-session/2"  # /2: gates carry interval, evaluation and outcome
BASELINE_SCHEMA = "robustlab.baseline/1"  # the same string as robustlab.gates.BASELINE_SCHEMA
WORKER_KEY = "robustlab_session"
WORST_CASE = "worst-case"  # robustlab.results.WORST_CASE (not imported here: that module imports pandas)


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class _Option:
    flag: str
    ini: str
    kind: str  # "string", "path", "int", "bool", "list"
    help: str
    default: Any = None


OPTIONS = [
    _Option("--robustlab-device", "robustlab_device", "string",
            "device the audited models run on: auto (where each model is), cpu, cuda or cuda:N; tests skip "
            "when it is unavailable (default auto)", "auto"),
    _Option("--robustlab-seed", "robustlab_seed", "int", "seed of every audit (default 0)", 0),
    _Option("--robustlab-report", "robustlab_report", "path",
            "directory for results: DIR/<test>/ per audited test (results.json, samples.csv, report.html when "
            "the report renderer is available), DIR/session.json and DIR/summary.md"),
    _Option("--robustlab-json", "robustlab_json", "path", "write the session's gates as JSON to FILE"),
    _Option("--robustlab-baseline", "robustlab_baseline", "path",
            "baseline FILE (from --robustlab-save-baseline) to compare each test's summary against"),
    _Option("--robustlab-save-baseline", "robustlab_save_baseline", "path",
            "save this session's summaries to FILE, per test node id (tests not run keep their entries)"),
    _Option("--robustlab-compare-fail", "robustlab_compare_fail", "list",
            "METRIC:AMOUNT (absolute, e.g. robust_accuracy:0.02) or METRIC:PERCENT% (relative to the "
            "baseline value, e.g. robust_accuracy:2%): fail tests whose metric got worse than the baseline "
            "by more; repeatable", ()),
    _Option("--robustlab-quick", "robustlab_quick", "bool",
            f"quick gates for pull requests: n <= {QUICK['n']} samples, PGD <= {QUICK['pgd_steps']} steps, "
            f"CW <= {QUICK['cw_steps']} steps x {QUICK['cw_binary_search_steps']} binary-search steps", False),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("robustlab", "robustness gates (robustlab)")
    for opt in OPTIONS:
        dest = opt.ini
        if opt.kind == "bool":
            group.addoption(opt.flag, action="store_true", default=None, dest=dest, help=opt.help.replace("%", "%%"))
            parser.addini(opt.ini, opt.help + " (ini: true/false)", type="bool", default=opt.default)
        elif opt.kind == "list":
            group.addoption(opt.flag, action="append", default=None, dest=dest, metavar="METRIC:AMOUNT",
                            help=opt.help.replace("%", "%%"))  # argparse %-formats help texts
            parser.addini(opt.ini, opt.help + " (ini: space-separated)", type="args", default=[])
        else:
            metavar = {"path": "DIR" if opt.flag == "--robustlab-report" else "FILE", "int": "N"}.get(opt.kind,
                                                                                                   "DEVICE")
            group.addoption(opt.flag, action="store", default=None, dest=dest, metavar=metavar,
                            help=opt.help.replace("%", "%%"))
            parser.addini(opt.ini, opt.help, type="string", default="")


@dataclass
class Settings:
    """Options after merging the command line over the ini file; paths absolute."""

    device: str = "auto"
    seed: int = 0
    report: Path | None = None
    json: Path | None = None
    baseline: Path | None = None
    save_baseline: Path | None = None
    compare_fail: list[str] = field(default_factory=list)
    quick: bool = False

    def to_dict(self) -> dict:
        return {"device": self.device, "seed": self.seed, "report": _str(self.report), "json": _str(self.json),
                "baseline": _str(self.baseline), "save_baseline": _str(self.save_baseline),
                "compare_fail": list(self.compare_fail), "quick": self.quick}

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        paths = {k: None if data.get(k) is None else Path(data[k]) for k in ("report", "json", "baseline",
                                                                             "save_baseline")}
        return cls(device=data["device"], seed=int(data["seed"]), compare_fail=list(data["compare_fail"]),
                   quick=bool(data["quick"]), **paths)


def _settings(config: pytest.Config) -> Settings:
    ini_base = config.inipath.parent if config.inipath else config.rootpath
    cli_base = config.invocation_params.dir
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        key = opt.ini[len("robustlab_"):]
        given = config.getoption(opt.ini)
        source = "command line"
        if given is None:
            given = config.getini(opt.ini)
            source = "ini"
            if given in ("", None, []):
                given = opt.default
                source = "default"
        name = opt.flag if source != "ini" else f"{opt.ini} (ini)"
        if opt.kind == "path":
            values[key] = None if not given else ((cli_base if source == "command line" else ini_base)
                                                  / os.path.expanduser(str(given))).resolve()
        elif opt.kind == "int":
            try:
                values[key] = int(str(given).strip())
            except ValueError:
                raise pytest.UsageError(f"{name}: expected a non-negative integer, got {given!r}") from None
            if values[key] < 0:
                raise pytest.UsageError(f"{name}: expected a non-negative integer, got {given!r}")
        elif opt.kind == "bool":
            values[key] = bool(given)
        elif opt.kind == "list":
            values[key] = [part for item in given for part in str(item).replace(",", " ").split()]
        else:
            text = str(given).strip().lower()
            if not DEVICE_PATTERN.fullmatch(text):
                raise pytest.UsageError(f"{name}: expected auto, cpu, cuda or cuda:N, got {given!r}")
            values[key] = text
    settings = Settings(**values)
    if settings.baseline is not None and not settings.baseline.is_file():
        raise pytest.UsageError(f"--robustlab-baseline: {settings.baseline} does not exist; create it with "
                                "--robustlab-save-baseline FILE")
    if settings.compare_fail:
        from robustlab.errors import InputError
        from robustlab.gates import parse_margin

        for spec in settings.compare_fail:
            try:
                parse_margin(spec)
            except InputError as error:
                raise pytest.UsageError(f"--robustlab-compare-fail: {error.problem}") from None
        if settings.baseline is None:
            raise pytest.UsageError("--robustlab-compare-fail needs a baseline: pass --robustlab-baseline FILE")
    return settings


# ---------------------------------------------------------------------------- session state
class _Session:
    """What this process saw: one record per gate check, the summaries per test, the results dirs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gates: list[dict] = []          # one per checked summary row (see _gate_records)
        self.audits: list[dict] = []         # one per audit run through the fixture
        self.summaries: dict[str, list] = {}  # nodeid -> summary records, for --robustlab-save-baseline
        self.used_dirs: set[str] = set()
        self._baseline: dict | None = None
        self.written: list[str] = []

    def baseline(self) -> dict:
        """nodeid -> baseline entry; {} without --robustlab-baseline. Read once per process."""
        if self._baseline is None:
            path = self.settings.baseline
            if path is None:
                self._baseline = {}
            elif not path.is_file():
                raise pytest.UsageError(f"--robustlab-baseline: {path} does not exist; create it with "
                                        "--robustlab-save-baseline FILE")
            else:
                try:
                    document = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError) as error:
                    raise pytest.UsageError(f"--robustlab-baseline: cannot read {path}: {error}") from None
                if not isinstance(document, dict) or document.get("schema") != BASELINE_SCHEMA:
                    raise pytest.UsageError(f"--robustlab-baseline: {path} is not a robustlab baseline "
                                            f"(schema {BASELINE_SCHEMA!r})")
                self._baseline = document.get("tests", {})
        return self._baseline

    def to_json(self) -> dict:
        return {"gates": self.gates, "audits": self.audits, "summaries": self.summaries}

    def merge(self, data: dict) -> None:
        self.gates.extend(data.get("gates", []))
        self.audits.extend(data.get("audits", []))
        for nodeid, records in data.get("summaries", {}).items():
            self.summaries.setdefault(nodeid, []).extend(records)


_STATE = pytest.StashKey[_Session]()
_GATE = pytest.StashKey["Gate"]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(attack='pgd', eps=..., min_accuracy=..., norm='linf', targeted='none', n=None, steps=None, "
        "restarts=None, min_clean_accuracy=None, name=None): a robustness gate, run by the `robustlab` "
        "fixture's check(); it reads the worst case over every attack the audit ran")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "robustlab_settings" in workerinput:
        settings = Settings.from_dict(workerinput["robustlab_settings"])  # resolved once, by the controller
    else:
        settings = _settings(config)
    config.stash[_STATE] = _Session(settings)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: workers use the controller's settings (absolute paths, same choices)."""
    state = node.config.stash.get(_STATE, None)
    if state is not None:
        node.workerinput["robustlab_settings"] = state.settings.to_dict()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: collect a finished worker's records."""
    state = node.config.stash.get(_STATE, None)
    payload = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    if state is not None and payload:
        state.merge(json.loads(payload))


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    if hasattr(config, "workerinput"):  # an xdist worker: hand everything to the controller
        config.workeroutput[WORKER_KEY] = json.dumps(state.to_json(), allow_nan=False)  # type: ignore[attr-defined]
        return
    if not state.gates and not state.audits:
        return
    state.gates.sort(key=lambda g: (g["test"], g["order"]))
    state.audits.sort(key=lambda a: (a["test"], a["order"]))
    settings = state.settings
    document = _session_document(state)
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    if settings.report is not None:
        settings.report.mkdir(parents=True, exist_ok=True)
        _write(settings.report / "session.json", text)
        _write(settings.report / "summary.md", _markdown(state))
        state.written += [str(settings.report / "session.json"), str(settings.report / "summary.md")]
    if settings.json is not None:
        _write(settings.json, text)
        state.written.append(str(settings.json))
    if settings.save_baseline is not None and state.summaries:
        _save_baseline(settings.save_baseline, state.summaries, settings.quick)
        state.written.append(str(settings.save_baseline))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or hasattr(config, "workerinput") or not (state.gates or state.audits):
        return
    terminalreporter.section("robustlab robustness gates")
    for line in _table(state).splitlines():
        terminalreporter.write_line(line)
    failed = sum(1 for row in _rows(state) if not row["passed"])
    terminalreporter.write_line(f"{len(_rows(state))} gates, {failed} failed"
                                + ("; quick mode" if state.settings.quick else ""))
    for path in state.written:
        terminalreporter.write_line(f"robustlab: wrote {path}")


# ---------------------------------------------------------------------------- marker
def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return
    problem = _marker_problem(marker)
    if problem:
        pytest.fail(f"@pytest.mark.{MARKER} on {item.nodeid}: {problem}", pytrace=False)
    if "robustlab" not in getattr(item, "fixturenames", ()):
        pytest.fail(f"@pytest.mark.{MARKER} on {item.nodeid}: the test does not use the `robustlab` fixture, so "
                    "the gate would never run; add a `robustlab` argument and call robustlab.check(model, data)",
                    pytrace=False)


def _marker_problem(marker: Any) -> str | None:
    allowed = ", ".join(MARKER_DEFAULTS)
    if marker.args:
        return f"takes keyword arguments only ({allowed}), got positional {marker.args!r}"
    unknown = [k for k in marker.kwargs if k not in MARKER_DEFAULTS]
    if unknown:
        return (f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"allowed: {allowed}")
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """With --robustlab-compare-fail: audits a test ran through `robustlab.audit(...)` and did not
    compare itself (check() and assert_no_regression() do) are compared with its baseline once it passes."""
    result = yield
    gate = item.stash.get(_GATE, None)
    if gate is not None and gate._pending:
        gate._compare_pending()
    return result


# ---------------------------------------------------------------------------- fixture
@pytest.fixture
def robustlab(request: pytest.FixtureRequest) -> "Gate":
    """Robustness gates for this test: `check(model, data)` runs the audit the marker describes.

    Also `audit(model, data, **options)`, `assert_robust(result, ...)`, `assert_no_regression(result,
    baseline=None)`; `options` holds the merged settings (command line/ini, then marker, then call).
    """
    state = request.config.stash[_STATE]
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None and _marker_problem(marker):
        pytest.fail(f"@pytest.mark.{MARKER} on {request.node.nodeid}: {_marker_problem(marker)}", pytrace=False)
    _skip_unavailable_device(state.settings.device)
    gate = Gate(request.node.nodeid, state, dict(marker.kwargs) if marker is not None else {},
                properties=request.node.user_properties)
    request.node.stash[_GATE] = gate
    return gate


def _skip_unavailable_device(device: str) -> None:
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
    """The `robustlab` fixture."""

    def __init__(self, nodeid: str, state: _Session, marker: dict,
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
        allowed = set(MARKER_DEFAULTS) | set(AUDIT_OPTIONS)
        unknown = sorted(k for k in overrides if k not in allowed)
        if unknown:
            raise TypeError(f"robustlab fixture: unknown argument(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(list(MARKER_DEFAULTS) + list(AUDIT_OPTIONS))}")
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
        the audit ran) >= min_accuracy at every eps, clean accuracy >= min_clean_accuracy, and, with
        --robustlab-baseline and --robustlab-compare-fail, no regression against this test's baseline.
        Returns the AuditResult.
        """
        __tracebackhide__ = True
        from robustlab import gates

        config = self._merge(options)
        if config["min_accuracy"] is None and config["min_clean_accuracy"] is None and not self._compares():
            raise TypeError("robustlab.check: nothing to gate; give min_accuracy (or min_clean_accuracy) in "
                            f"@pytest.mark.{MARKER}(...) or to check(), or compare with --robustlab-baseline "
                            "and --robustlab-compare-fail")
        for key in ("min_accuracy", "min_clean_accuracy"):  # bad thresholds fail before any attack runs
            gates.check_fraction(key, config[key])
        result = self._run(model, data, config, require_eps=True, save=False)
        checks = []
        if config["min_accuracy"] is not None or config["min_clean_accuracy"] is not None:
            checks += gates.evaluate_robust(result, attack=WORST_CASE, eps=config["eps"],
                                            min_accuracy=config["min_accuracy"],
                                            min_clean_accuracy=config["min_clean_accuracy"], norm=config["norm"],
                                            targeted=config["targeted"])
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

    def _compare_pending(self) -> None:
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
                mode = lambda quick: "with --robustlab-quick" if quick else "without --robustlab-quick"  # noqa: E731
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
        kwargs = _audit_kwargs(config)
        result = _rl.audit(model, data, progress=False, **kwargs)
        self._results.append(result)
        self._state.summaries.setdefault(self.nodeid, []).extend(_summary_records(result))
        models = sorted(str(m) for m in result.summary["model"].unique())
        record = {"test": self.nodeid, "order": len(self._state.audits), "models": models,
                  "results_dir": None, "seconds": result.metadata.get("seconds"), "quick": self.settings.quick,
                  "config": _jsonable({k: v for k, v in kwargs.items() if k != "attacks"}),
                  "attacks": _jsonable([a if isinstance(a, str) else a.config() for a in kwargs["attacks"]])}
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
            name = _dir_name(self.nodeid)
            candidate, k = name, 1
            while candidate in self._state.used_dirs:
                k += 1
                candidate = f"{name}-{k}"
            self._state.used_dirs.add(candidate)
            target = self.settings.report / candidate
        result.save(target)
        _render_report(target)
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

        def found(model, norm, eps, targeted) -> str | None:
            """The evaluation status of this gated row's own threat model."""
            return gates.evaluation(result, model=model, norm=norm, eps=eps, targeted=targeted)

        entry = self._state.baseline().get(self.nodeid)
        before = {} if entry is None else {_key(r): r.get("robust_accuracy") for r in entry.get("summary", [])}
        self._state.gates.extend(_gate_records(self.nodeid, checks, gated, where, found, len(self._state.gates),
                                               before))
        self._properties.extend(junit_properties(checks, start=sum(1 for name, _ in self._properties
                                                                     if name.endswith(".metric"))))
        context = f"{self.nodeid}" + ("; --robustlab-quick" if self.settings.quick else "")
        if where and (Path(where) / "report.html").exists():
            where = f"{where} (report: {Path(where) / 'report.html'})"
        gates.raise_if_failed(checks, result=result, results_dir=where, title=title, context=context)


def junit_properties(checks: list, start: int = 0) -> list[tuple[str, object]]:
    """Each gate check as test properties, so `pytest --junitxml` carries the figures CI systems show:
    robustlab.gate.N.{metric, threat_model, measured, interval, required, evaluation, outcome}."""
    out: list[tuple[str, object]] = []
    for number, check in enumerate(checks, start):
        j = check.judgement() if check.kind != "regression" else None
        prefix = f"robustlab.gate.{number}"
        eps = "none" if check.eps is None else f"{check.eps:g}"
        out += [(f"{prefix}.metric", check.metric if check.kind != "regression" else f"{check.metric} (regression)"),
                (f"{prefix}.threat_model", f"model={check.model} attack={check.attack} norm={check.norm} eps={eps} "
                                           f"targeted={check.targeted}"),
                (f"{prefix}.measured", _num(check.measured)),
                (f"{prefix}.interval", "" if j is None or not j.get("interval") else
                 "[{:.4f}, {:.4f}]".format(*j["interval"])),
                (f"{prefix}.required", _num(check.required)),
                (f"{prefix}.evaluation", (j or {}).get("evaluation") or ""),
                (f"{prefix}.outcome", (j or {}).get("outcome") or ("pass" if check.passed else "fail"))]
    return out


def _audit_kwargs(config: dict) -> dict:
    """robustlab.audit keyword arguments for a merged configuration (quick caps applied)."""
    attack = config["attack"]
    if attack is None:
        from robustlab.harness import DEFAULT_ATTACKS

        attack = list(DEFAULT_ATTACKS)
    attacks = [attack] if isinstance(attack, str) or not isinstance(attack, (list, tuple)) else list(attack)
    kwargs: dict[str, Any] = {
        "attacks": attacks, "norm": config["norm"], "targeted": config["targeted"], "n": config["n"],
        "steps": config["steps"], "restarts": config["restarts"], "seed": config["seed"],
        "device": config["device"], "name": config["name"],
    }
    if config["eps"] is not None:
        kwargs["eps"] = config["eps"]
    for key in AUDIT_OPTIONS:
        if key in config and key != "attacks":
            kwargs[key] = config[key]
    if config.get("quick"):
        from robustlab.attacks import Attack, get_attack

        kwargs["n"] = QUICK["n"] if config["n"] is None else min(int(config["n"]), QUICK["n"])
        if kwargs.get("suite", "standard") == "standard":
            kwargs["suite"] = "quick"  # the quick cascade (robustlab.attacks.cascade); verdicts say it is weaker
        steps = config["steps"]
        capped = []
        for spec in attacks:
            built = get_attack(spec) if isinstance(spec, str) and spec.strip().lower() in ("pgd", "cw") else spec
            if isinstance(built, Attack) and built.name == "pgd":
                built = built.replace(steps=min(steps or built.steps, QUICK["pgd_steps"]),
                                      **({"restarts": config["restarts"]} if config["restarts"] else {}))
            elif isinstance(built, Attack) and built.name == "cw":
                built = built.replace(steps=min(steps or built.steps, QUICK["cw_steps"]),
                                      binary_search_steps=min(built.binary_search_steps,
                                                              QUICK["cw_binary_search_steps"]))
            capped.append(built)
        kwargs.update(attacks=capped, steps=None, restarts=None)
    return kwargs


# ---------------------------------------------------------------------------- records and outputs
def _key(row: dict) -> tuple:
    eps = _num(row.get("eps"))
    return (str(row.get("model")), str(row.get("attack")), str(row.get("norm")), eps, str(row.get("targeted")))


def _gate_records(nodeid: str, checks: list, gated: Any, where: str | None, found: Any, start: int,
                  before: dict) -> list:
    """One record per (model, attack, norm, eps, targeted) row that was gated or failed a check.

    `before`: this test's baseline robust accuracy per row key (shown even without --robustlab-compare-fail).
    `found(model, norm, eps, targeted)`: the evaluation status of that threat model, or None.
    """
    rows: dict[tuple, dict] = {}

    def record(key: tuple, model, attack, norm, eps, targeted, clean, robust, n) -> dict:
        if key not in rows:
            rows[key] = {"test": nodeid, "order": start + len(rows), "model": model, "attack": attack, "norm": norm,
                         "eps": eps, "targeted": targeted, "n": n, "clean_accuracy": _num(clean),
                         "robust_accuracy": _num(robust), "interval": _interval(robust, n),
                         "evaluation": found(model, norm, eps, targeted) or "not evaluated",
                         "required": None, "required_clean": None, "outcome": None,
                         "baseline": _num(before.get(key)), "passed": True, "checks": [],
                         "failures": [], "results_dir": where}
        return rows[key]

    if gated is not None:
        for _, row in gated.iterrows():
            key = _key(row.to_dict())
            record(key, *key, row["clean_accuracy"], row["robust_accuracy"], int(row["n"]))
    for check in checks:
        if _key(check.to_dict()) not in rows and check.passed:
            continue  # regression checks on rows no gate looks at are shown only when they fail
        key = _key(check.to_dict())
        entry = record(key, *key, check.clean_accuracy,
                       check.measured if check.metric == "robust_accuracy" else None, check.n)
        if check.kind == "min_accuracy":
            entry["required"] = check.required
            entry["outcome"] = check.outcome
        elif check.kind == "min_clean_accuracy":
            entry["required_clean"] = check.required
        elif check.kind == "regression" and check.metric == "robust_accuracy":
            entry["baseline"] = check.baseline
        entry["checks"].append(check.to_dict())
        if not check.passed:
            entry["passed"] = False
            entry["failures"].append(check.line())
    return list(rows.values())


def _rows(state: _Session) -> list[dict]:
    return state.gates


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _interval(robust: Any, n: Any) -> list | None:
    """The 95% Wilson interval of a robust accuracy over n samples (robustlab.verdicts.interval)."""
    if _num(robust) is None or _num(n) is None:
        return None
    from robustlab.verdicts import interval

    found = interval(_num(robust), int(n))
    return list(found) if found else None


def _robust_cell(g: dict) -> str:
    if g.get("robust_accuracy") is None:
        return "-"
    low_high = g.get("interval")
    return _fmt(g["robust_accuracy"]) + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")


def _requirement_cell(g: dict) -> str:
    """'>= 0.500: meets', or '-' where no threshold was set (a regression gate only)."""
    if g.get("required") is None:
        return "-" if g.get("required_clean") is None else f"clean >= {g['required_clean']:.3f}"
    return f">= {g['required']:.3f}: {g.get('outcome') or '-'}"


def _table_rows(state: _Session) -> tuple[list[str], list[list[str]]]:
    """The three things in order: the figure (with its 95% interval), the evaluation status, the requirement."""
    header = ["test", "model", "attack", "eps", "clean", "robust [95% CI]", "evaluation", "requirement", "baseline",
              "result"]
    body = []
    for g in _rows(state):
        attack = g["attack"] if g["targeted"] == "none" else f"{g['attack']} (targeted: {g['targeted']})"
        eps = "none" if g["eps"] is None else f"{g['norm']} {g['eps']:g}"
        body.append([g["test"], g["model"], attack, eps, _fmt(g["clean_accuracy"]), _robust_cell(g),
                     str(g.get("evaluation") or "-"), _requirement_cell(g), _fmt(g["baseline"]),
                     "PASS" if g["passed"] else "FAIL"])
    return header, body


def _table(state: _Session) -> str:
    header, body = _table_rows(state)
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) if body else len(header[i]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]
    if not body:
        out.append("(audits ran, no gate was checked)")
    return "\n".join(out)


def _markdown(state: _Session) -> str:
    header, body = _table_rows(state)
    failed = sum(1 for g in _rows(state) if not g["passed"])
    escape = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["## Robustness gates", "",
             f"{len(body)} gates, {failed} failed" + (" (quick mode)" if state.settings.quick else "") + ".", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in body:
        cells = [f"`{escape(row[0])}`"] + [escape(c) for c in row[1:-1]] + [
            "✅ pass" if row[-1] == "PASS" else "❌ **FAIL**"]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [g for g in _rows(state) if not g["passed"]]
    if failures:
        lines += ["", "### Failures", ""]
        for g in failures:
            lines += [f"- `{escape(g['test'])}`: " + "; ".join(escape(f) for f in g["failures"])]
    lines += ["", "robust: the worst case over every attack, with its 95% Wilson interval over n samples. "
                  "evaluation: established (standard attack suite, every integrity check passed), weaker than "
                  "standard (quick or no suite, or no checks), or not established (a check failed: the gate "
                  "cannot be judged and fails). requirement: the gate's threshold and its outcome."]
    return "\n".join(lines) + "\n"


def _session_document(state: _Session) -> dict:
    import robustlab as _rl

    return {
        "schema": SESSION_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "robustlab_version": _rl.__version__,
        "python_version": sys.version.split()[0],
        "options": state.settings.to_dict(),
        "quick_limits": QUICK if state.settings.quick else None,
        "passed": all(g["passed"] for g in state.gates),
        "gates": [{k: v for k, v in g.items() if k != "order"} for g in state.gates],
        "audits": [{k: v for k, v in a.items() if k != "order"} for a in state.audits],
    }


def _save_baseline(path: Path, summaries: dict[str, list], quick: bool) -> None:
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
    _write(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def _summary_records(result: Any) -> list[dict]:
    from robustlab.results import _records

    return _records(result.summary)


def _render_report(directory: Path) -> None:
    """report.html via robustlab.reports.render(results_dir, out=...), when the renderer exists."""
    try:
        import robustlab.reports as reports
    except ImportError:
        return
    render = getattr(reports, "render", None)
    if not callable(render):
        return
    try:
        render(directory, out=directory / "report.html")
    except Exception as error:  # noqa: BLE001 - a broken report must not change a gate's verdict
        warnings.warn(f"robustlab: could not render {directory / 'report.html'}: {type(error).__name__}: {error}",
                      RuntimeWarning, stacklevel=2)


def _dir_name(nodeid: str) -> str:
    """A directory name for a test node id: readable, unique (a hash is added where characters were lost)."""
    readable = nodeid.replace("::", "__").replace("/", "_").replace("\\", "_")
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", readable)
    if safe != readable or len(safe) > 120:
        safe = f"{safe[:110]}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"
    return safe


def _write(path: Path, text: str) -> None:
    """Atomic: write a sibling temporary file, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return repr(value)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
