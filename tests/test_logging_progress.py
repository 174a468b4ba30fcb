"""Messages through the "robustlab" logger, -v/-q on the command line, and progress bars (issue 12)."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

import robustlab
from robustlab import progress
from robustlab.attacks import APGD, FABT, Square
from robustlab.cli import main
from robustlab.errors import InputError
from robustlab.model import ModelUnderTest
from support import digits_model, digits_test

REPO = Path(__file__).resolve().parents[1]
FAST = ["--attack", "fgsm,pgd", "--suite", "none", "--eps", "0.05,0.1", "--steps", "3", "--n", "20", "--checks",
        "none"]
BAR = re.compile(r"\d+/\d+ \[\d\d:\d\d")  # tqdm's "n/total [elapsed": only a bar writes it


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "digits-net.pt"
    torch.jit.trace(digits_model(), digits_test().x[:2]).save(str(path))
    return str(path)


def _status_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("[robustlab] ")]


def _robustlab_logger_is_untouched() -> None:
    logger = logging.getLogger("robustlab")
    assert logger.level == logging.NOTSET
    assert all(isinstance(h, logging.NullHandler) for h in logger.handlers), logger.handlers


# ---------------------------------------------------------------------------- the command line
def test_status_lines_by_default_and_quiet_before_or_after_the_command(scripted, tmp_path, capsys):
    assert main(["audit", "--model", scripted, "--out", str(tmp_path / "a"), *FAST]) == 0
    out, err = capsys.readouterr()
    lines = _status_lines(err)
    assert "[robustlab] digits-net: clean accuracy" in lines[0] and "on 20 samples" in lines[0]
    assert "[robustlab] digits-net: pgd eps=0.1 done in" in err
    assert not any(": debug: " in line for line in lines)
    assert "worst-case" in out  # the results table stays on stdout
    _robustlab_logger_is_untouched()  # the CLI's handler is removed when main returns

    for args in (["-q", "audit", "--model", scripted, "--out", str(tmp_path / "b"), *FAST],
                 ["audit", "--model", scripted, "--out", str(tmp_path / "c"), *FAST, "--quiet"]):
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert err == "", err
        assert "worst-case" in out and "results:" in out
    _robustlab_logger_is_untouched()


def test_cli_warnings_are_one_line_each_without_source_lines(tmp_path, capsys):
    """A RobustlabWarning (here: a factory audited at its random initialisation) reaches a CLI user as
    one '[robustlab] warning:' line, not Python's 'file.py:123: RobustlabWarning' and source line."""
    factory = tmp_path / "net.py"
    factory.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                       "torch.nn.Linear(64, 10))\n")
    import warnings

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["audit", "--model", f"{factory}:build", "--random-init", "--out", str(tmp_path / "a"), *FAST]) == 0
        assert warnings.showwarning is shown  # main restores Python's display when it returns
    _, err = capsys.readouterr()
    warned = [line for line in err.splitlines() if "warning" in line.lower()]
    assert warned and all(line.startswith("[robustlab] warning: ") for line in warned), err
    assert "untrained model" in err and "RobustlabWarning" not in err and "warnings.warn" not in err


def test_verbose_adds_debug_lines(scripted, tmp_path, capsys):
    assert main(["audit", "--model", scripted, "--out", str(tmp_path / "a"), *FAST, "-v"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^\[robustlab\] debug: audit plan: models digits-net; 20 samples; attacks fgsm, pgd; suite none;"
                     r" linf eps 0\.05, 0\.1;", err, re.MULTILINE), err
    assert re.search(r"^\[robustlab\] debug: pgd eps=0\.1 on digits-net: \d+ samples in batches of \d+, \d+ gradient "
                     r"calls", err, re.MULTILINE), err
    assert "[robustlab] digits-net: clean accuracy" in err  # status lines stay
    assert main(["-v", "report", str(tmp_path / "a")]) == 0  # accepted before the command too
    _robustlab_logger_is_untouched()


@pytest.mark.parametrize("args, env, match", [
    (["-q", "report", "DIR", "-v"], None, r"-q/--quiet and -v/--verbose exclude each other"),
    (["report", "DIR"], "sometimes", r"ROBUSTLAB_PROGRESS: expected 1 or 0 .*got 'sometimes'"),
])
def test_bad_message_options_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, env, match):
    if env is not None:
        monkeypatch.setenv("ROBUSTLAB_PROGRESS", env)
    out_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main([str(out_dir) if a == "DIR" else a for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not out_dir.exists()
    _robustlab_logger_is_untouched()


# ---------------------------------------------------------------------------- the library
def test_messages_go_to_the_robustlab_logger_and_a_callable(digits_module, caplog):
    said: list[str] = []
    data = digits_test(20)
    with caplog.at_level(logging.INFO, logger="robustlab"):
        robustlab.audit(digits_module, data, attacks=["fgsm"], eps=[0.1], suite="none", checks="none",
                        name="net", progress=said.append)
    records = [r for r in caplog.records if r.name == "robustlab.harness"]
    assert [r.getMessage() for r in records] == said
    assert re.fullmatch(r"net: clean accuracy \d+\.\d% on 20 samples", said[0]), said
    assert any(m.startswith("net: fgsm eps=0.1 done in ") for m in said)
    with caplog.at_level(logging.WARNING, logger="robustlab"):
        caplog.clear()
        robustlab.audit(digits_module, data, attacks=["fgsm"], eps=[0.1], suite="none", checks="none")
    assert not [r for r in caplog.records if r.name.startswith("robustlab") and r.levelno < logging.WARNING]


def test_the_library_installs_no_handler_and_no_bar_runs_inside_pytest(monkeypatch, capsys):
    import robustlab.harness  # noqa: F401 - everything that logs is imported
    import robustlab.pytest_plugin  # noqa: F401

    _robustlab_logger_is_untouched()
    assert logging.getLogger("robustlab").handlers  # the NullHandler: no "no handlers" fallback to stderr
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert os.environ.get("PYTEST_CURRENT_TEST")
    assert not progress.enabled()  # a terminal, but a test is running
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("ROBUSTLAB_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # pytest's own capture: logging configured at WARNING
    assert progress.enabled()  # the same terminal outside a test


class _Terminal:
    """A stand-in stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_the_automatic_rule_and_what_forces_it(monkeypatch):
    for name in ("PYTEST_CURRENT_TEST", "CI", "ROBUSTLAB_PROGRESS", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # logging unconfigured: counts as INFO
    assert progress.enabled()
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # configured, at the default WARNING
    assert not progress.enabled()
    monkeypatch.setattr(root, "level", logging.INFO)  # basicConfig(level=INFO)
    assert progress.enabled()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setenv("CI", "true")
    assert not progress.enabled()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("RANK", "1")  # torchrun: only rank 0 draws
    assert not progress.enabled()
    monkeypatch.delenv("RANK")
    logger = logging.getLogger("robustlab")
    monkeypatch.setattr(logger, "level", logging.WARNING)  # robustlab -q, or an application's choice
    assert not progress.enabled()
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # not a terminal
    assert not progress.enabled()
    monkeypatch.setenv("ROBUSTLAB_PROGRESS", "1")
    assert progress.enabled()
    previous = progress.configure(enabled=False)  # the API wins over the environment
    try:
        assert not progress.enabled()
        with progress.using(True):  # and a block (audit(progress=True)) over both
            assert progress.enabled()
        assert not progress.enabled()
    finally:
        progress.configure(previous)
    monkeypatch.setenv("ROBUSTLAB_PROGRESS", "0")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert not progress.enabled()
    with pytest.raises(InputError, match="enabled: must be True, False or None"):
        progress.configure(enabled="yes")  # type: ignore[arg-type]


def test_off_costs_nothing_per_iteration():
    with progress.using(False):
        steps = range(10)
        assert progress.steps(steps, "x") is steps  # the loop iterates the range itself
        assert progress.bar("x", 10) is progress.OFF


def test_audit_progress_true_draws_bars_on_any_stream(digits_module, monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    robustlab.audit(digits_module, digits_test(20), attacks=["pgd"], eps=[0.1], steps=3, suite="none",
                    checks="none", name="net", progress=True)
    err = capsys.readouterr().err
    assert "net (none)" in err and "pgd:" in err and BAR.search(err), err
    robustlab.audit(digits_module, digits_test(20), attacks=["pgd"], eps=[0.1], steps=3, suite="none",
                    checks="none", name="net", progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- no host sync per iteration
CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("attack", [APGD(eps=0.1, steps=12), FABT(eps=0.1, steps=6, n_targets=2),
                                    Square(eps=0.1, queries=40)], ids=lambda a: a.name)
def test_bars_add_no_conversion_to_python_values(attack, digits_module, monkeypatch, capsys):
    """Every tensor -> Python conversion (a host sync on a GPU) counted with bars off and on: the same
    number, while the iteration bar advanced once per step."""
    data = digits_test(16)
    counted: list[str] = []

    def run(on: bool) -> tuple[int, torch.Tensor]:
        mut = ModelUnderTest(digits_module, bounds=(0.0, 1.0), name="net")
        mut.inspect(data.x)  # the probe passes are not part of the attack
        counted.clear()
        with monkeypatch.context() as m:
            for name in CONVERSIONS:
                original = getattr(torch.Tensor, name)

                def spy(self, *args, _original=original, _name=name, **kwargs):
                    counted.append(_name)
                    return _original(self, *args, **kwargs)

                m.setattr(torch.Tensor, name, spy)
            with progress.using(on):
                outcome = attack(mut, data.x, data.y, seed=3)
        return len(counted), outcome.x_adv

    monkeypatch.setattr(progress, "DELAY", 0.0)
    run(False)  # first calls may fill caches
    off, x_off = run(False)
    assert capsys.readouterr().err == ""
    on, x_on = run(True)
    err = capsys.readouterr().err
    assert on == off, f"bars added {on - off} conversions to Python values"
    assert torch.equal(x_on, x_off)
    what = "queries" if attack.name == "square" else "steps"
    assert f"{attack.label} {what}:" in err and f"{attack.label}:" in err and BAR.search(err), err


# ---------------------------------------------------------------------------- real processes
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "PYTEST_CURRENT_TEST", "ROBUSTLAB_PROGRESS", "RANK", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_no_bar_when_stderr_is_not_a_terminal(scripted, tmp_path):
    done = subprocess.run([sys.executable, "-m", "robustlab", "audit", "--model", scripted, "--out",
                           str(tmp_path / "a"), *FAST], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[robustlab] digits-net: clean accuracy" in done.stderr
    assert "\r" not in done.stderr and not BAR.search(done.stderr), done.stderr
    assert all(line.startswith("[robustlab] ") for line in done.stderr.splitlines()), done.stderr


CLI = """
import sys
from robustlab import cli, progress
progress.DELAY = 0.0  # draw every bar at once, however fast the machine
sys.argv[0] = "robustlab"
cli.entry()
"""
SLOW_LOOP = """
import time
from robustlab import progress
for _ in progress.steps(range(8), "waiting", unit="tick"):
    time.sleep(0.15)
"""


def _on_a_terminal(command: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run command with stderr on a pseudo-terminal (120 columns); (exit status, what it wrote there)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed its end
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif process.poll() is not None:
                break
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return process.returncode, b"".join(chunks).decode(errors="replace")


def test_a_bar_appears_on_a_terminal_and_not_with_ci_or_the_env_switch():
    code, written = _on_a_terminal([sys.executable, "-c", SLOW_LOOP], _env())
    assert code == 0 and "waiting:" in written and re.search(r"\d/8 \[00:0\d", written), written
    for switch in ({"CI": "1"}, {"ROBUSTLAB_PROGRESS": "0"}):
        code, written = _on_a_terminal([sys.executable, "-c", SLOW_LOOP], _env(**switch))
        assert code == 0 and written == "", (switch, written)


@pytest.mark.slow
def test_cli_on_a_terminal_draws_bars_around_status_lines_and_quiet_draws_none(scripted, tmp_path):
    args = [sys.executable, "-c", CLI, "audit", "--model", scripted, "--attack", "fgsm,apgd-ce", "--suite", "none",
            "--eps", "0.1", "--n", "10", "--checks", "none"]
    code, written = _on_a_terminal(args + ["--out", str(tmp_path / "a")], _env())
    assert code == 0, written
    for bar in ("digits-net: clean:", "digits-net (none):", "fgsm:", "apgd-ce:", "apgd-ce steps:"):
        assert re.search(re.escape(bar) + r" +\d+%\|", written), (bar, written)
    # every status line starts on a line of its own: bars are cleared before it is written
    assert re.search(r"(^|\n|\r)\[robustlab\] digits-net: apgd-ce eps=0\.1 done in \d", written), written
    code, written = _on_a_terminal(args + ["--out", str(tmp_path / "b"), "-q"], _env())
    assert code == 0 and written == "", written


# ---------------------------------------------------------------------------- documentation
def test_readme_documents_the_message_options_and_progress_control():
    readme = (REPO / "README.md").read_text()
    for text in ("-v/--verbose", "-q/--quiet", progress.ENV, "robustlab.progress.configure(enabled=",
                 'logging.getLogger("robustlab")', "progress=True"):
        assert text in readme, text
