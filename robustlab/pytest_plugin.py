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
It is a face (see DESIGN.md): this module holds the hooks and options only, as pytest-benchmark's
plugin.py does; the fixture, the marker, the session's records, the tables and the baselines are
in robustlab.plugin (one module each). At import time it needs pytest and the standard library
only; torch, pandas and the harness are imported inside the fixture and hooks, when a test asks for
them, so sessions that never use the fixture pay nothing.

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

import json
from typing import Any

import pytest

from robustlab.plugin.files import dir_name as _dir_name  # noqa: F401 - re-exported (tests, users)
from robustlab.plugin.fixture import Gate, skip_unavailable_device
from robustlab.plugin.marker import MARKER, MARKER_HELP, marker_problem
from robustlab.plugin.quick import QUICK  # noqa: F401 - re-exported: the quick-mode caps
from robustlab.plugin.session import Session
from robustlab.plugin.settings import OPTIONS, Settings, resolve
from robustlab.plugin.tables import text_table

WORKER_KEY = "robustlab_session"
_STATE = pytest.StashKey[Session]()
_GATE = pytest.StashKey[Gate]()


# ---------------------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("robustlab", "robustness gates (robustlab)")
    for opt in OPTIONS:
        help_text = opt.help.replace("%", "%%")  # argparse %-formats help texts
        if opt.kind == "bool":
            group.addoption(opt.flag, action="store_true", default=None, dest=opt.ini, help=help_text)
            parser.addini(opt.ini, opt.help + " (ini: true/false)", type="bool", default=opt.default)
        elif opt.kind == "list":
            group.addoption(opt.flag, action="append", default=None, dest=opt.ini, metavar="METRIC:AMOUNT",
                            help=help_text)
            parser.addini(opt.ini, opt.help + " (ini: space-separated)", type="args", default=[])
        else:
            metavar = {"path": "DIR" if opt.flag == "--robustlab-report" else "FILE", "int": "N"}.get(opt.kind,
                                                                                                   "DEVICE")
            group.addoption(opt.flag, action="store", default=None, dest=opt.ini, metavar=metavar, help=help_text)
            parser.addini(opt.ini, opt.help, type="string", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "robustlab_settings" in workerinput:
        settings = Settings.from_dict(workerinput["robustlab_settings"])  # resolved once, by the controller
    else:
        settings = resolve(config)
    config.stash[_STATE] = Session(settings)


# ---------------------------------------------------------------------------- xdist
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


# ---------------------------------------------------------------------------- session end
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Workers hand their records to the controller; the controller writes the session's files."""
    config = session.config
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    if hasattr(config, "workerinput"):
        config.workeroutput[WORKER_KEY] = json.dumps(state.to_json(), allow_nan=False)  # type: ignore[attr-defined]
        return
    state.write_outputs()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The gates table, through pytest's terminal reporter (so -q, capture and xdist behave)."""
    state = config.stash.get(_STATE, None)
    if state is None or hasattr(config, "workerinput") or not (state.gates or state.audits):
        return
    terminalreporter.section("robustlab robustness gates")
    for line in text_table(state).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"{len(state.gates)} gates, {state.failed} failed"
                                + ("; quick mode" if state.settings.quick else ""))
    for path in state.written:
        terminalreporter.write_line(f"robustlab: wrote {path}")


# ---------------------------------------------------------------------------- marker and fixture
def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return
    problem = marker_problem(marker)
    if problem:
        pytest.fail(f"@pytest.mark.{MARKER} on {item.nodeid}: {problem}", pytrace=False)
    if "robustlab" not in getattr(item, "fixturenames", ()):
        pytest.fail(f"@pytest.mark.{MARKER} on {item.nodeid}: the test does not use the `robustlab` fixture, so "
                    "the gate would never run; add a `robustlab` argument and call robustlab.check(model, data)",
                    pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """With --robustlab-compare-fail: audits a test ran through `robustlab.audit(...)` and did not
    compare itself (check() and assert_no_regression() do) are compared with its baseline once it passes."""
    result = yield
    gate = item.stash.get(_GATE, None)
    if gate is not None and gate.pending:
        gate.compare_pending()
    return result


@pytest.fixture
def robustlab(request: pytest.FixtureRequest) -> Gate:
    """Robustness gates for this test: `check(model, data)` runs the audit the marker describes.

    Also `audit(model, data, **options)`, `assert_robust(result, ...)`, `assert_no_regression(result,
    baseline=None)`; `options` holds the merged settings (command line/ini, then marker, then call).
    """
    state = request.config.stash[_STATE]
    marker = request.node.get_closest_marker(MARKER)
    problem = marker_problem(marker) if marker is not None else None
    if problem:
        pytest.fail(f"@pytest.mark.{MARKER} on {request.node.nodeid}: {problem}", pytrace=False)
    skip_unavailable_device(state.settings.device)
    gate = Gate(request.node.nodeid, state, dict(marker.kwargs) if marker is not None else {},
                properties=request.node.user_properties)
    request.node.stash[_GATE] = gate
    return gate
