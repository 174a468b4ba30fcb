"""The plugin's options: each a command-line flag and an ini option, merged into one Settings.

The command line wins over the ini file, which wins over the default; paths are made absolute
(relative to the invocation directory on the command line, to the ini file's directory in it), so
xdist workers, which get the controller's Settings, write where the controller would.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .quick import QUICK

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Option:
    """One option: its flag, its ini name (also its dest), how its value is read, its help and default."""

    flag: str
    ini: str
    kind: str  # "string", "path", "int", "bool", "list"
    help: str
    default: Any = None


OPTIONS = [
    Option("--robustlab-device", "robustlab_device", "string",
           "device the audited models run on: auto (where each model is), cpu, cuda or cuda:N; tests skip "
           "when it is unavailable (default auto)", "auto"),
    Option("--robustlab-seed", "robustlab_seed", "int", "seed of every audit (default 0)", 0),
    Option("--robustlab-report", "robustlab_report", "path",
           "directory for results: DIR/<test>/ per audited test (results.json, samples.csv, report.html when "
           "the report renderer is available), DIR/session.json and DIR/summary.md"),
    Option("--robustlab-json", "robustlab_json", "path", "write the session's gates as JSON to FILE"),
    Option("--robustlab-baseline", "robustlab_baseline", "path",
           "baseline FILE (from --robustlab-save-baseline) to compare each test's summary against"),
    Option("--robustlab-save-baseline", "robustlab_save_baseline", "path",
           "save this session's summaries to FILE, per test node id (tests not run keep their entries)"),
    Option("--robustlab-compare-fail", "robustlab_compare_fail", "list",
           "METRIC:AMOUNT (absolute, e.g. robust_accuracy:0.02) or METRIC:PERCENT% (relative to the "
           "baseline value, e.g. robust_accuracy:2%): fail tests whose metric got worse than the baseline "
           "by more; repeatable", ()),
    Option("--robustlab-quick", "robustlab_quick", "bool",
           f"quick gates for pull requests: n <= {QUICK['n']} samples, PGD <= {QUICK['pgd_steps']} steps, "
           f"CW <= {QUICK['cw_steps']} steps x {QUICK['cw_binary_search_steps']} binary-search steps", False),
]


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


def resolve(config: pytest.Config) -> Settings:
    """The session's Settings; a bad value is a pytest.UsageError naming the flag (or ini option)."""
    ini_base = config.inipath.parent if config.inipath else config.rootpath
    cli_base = config.invocation_params.dir
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        given, source = _given(config, opt)
        name = opt.flag if source != "ini" else f"{opt.ini} (ini)"
        base = cli_base if source == "command line" else ini_base
        values[opt.ini[len("robustlab_"):]] = _parse(opt, given, name, base)
    settings = Settings(**values)
    _check(settings)
    return settings


def _given(config: pytest.Config, opt: Option) -> tuple[Any, str]:
    given = config.getoption(opt.ini)
    if given is not None:
        return given, "command line"
    given = config.getini(opt.ini)
    if given in ("", None, []):
        return opt.default, "default"
    return given, "ini"


def _parse(opt: Option, given: Any, name: str, base: Path) -> Any:
    if opt.kind == "path":
        return None if not given else (base / os.path.expanduser(str(given))).resolve()
    if opt.kind == "int":
        try:
            value = int(str(given).strip())
        except ValueError:
            raise pytest.UsageError(f"{name}: expected a non-negative integer, got {given!r}") from None
        if value < 0:
            raise pytest.UsageError(f"{name}: expected a non-negative integer, got {given!r}")
        return value
    if opt.kind == "bool":
        return bool(given)
    if opt.kind == "list":
        return [part for item in given for part in str(item).replace(",", " ").split()]
    text = str(given).strip().lower()
    if not DEVICE_PATTERN.fullmatch(text):
        raise pytest.UsageError(f"{name}: expected auto, cpu, cuda or cuda:N, got {given!r}")
    return text


def _check(settings: Settings) -> None:
    """Options that only make sense together, and files that must exist, before any test runs."""
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


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
