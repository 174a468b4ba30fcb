"""robustlab's messages: the "robustlab" logger tree, and the handler the command line installs.

Modules log through `get_logger(__name__)` ("robustlab.harness", "robustlab.attacks.base", ...).
The library adds only a NullHandler, so an application decides where messages go
(`logging.basicConfig(level=logging.INFO)` shows the status lines, DEBUG the details); the CLI calls
`install(level)`: one concise line per message on stderr, no timestamps, written around the
progress bars.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable, TextIO

from robustlab import progress

ROOT = "robustlab"
logging.getLogger(ROOT).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """The logger of a robustlab module (its __name__), below "robustlab"."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


class _Formatter(logging.Formatter):
    """'[robustlab] message' for status lines; the level named for the others."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno == logging.INFO:
            return f"[robustlab] {text}"
        return f"[robustlab] {record.levelname.lower()}: {text}"


class _Handler(logging.Handler):
    """Writes to the stderr of the moment (so a redirected or captured stderr gets the lines),
    through robustlab.progress.write so that open bars are not torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            progress.write(self.format(record), sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def level_for(verbose: int = 0, quiet: bool = False) -> int:
    """-q: WARNING (warnings and errors only); default INFO; -v (or more): DEBUG."""
    if quiet:
        return logging.WARNING
    return logging.DEBUG if verbose > 0 else logging.INFO


def install(level: int) -> Callable[[], None]:
    """Send robustlab's messages at `level` and above to stderr, and Python warnings as one warning
    line each (not the file:line and source line Python shows); returns the undo (handler removed,
    level and warning display restored), so an in-process caller (a test calling
    robustlab.cli.main) leaves no trace."""
    logger = logging.getLogger(ROOT)
    handler = _Handler(level)
    handler.setFormatter(_Formatter())
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    shown = warnings.showwarning
    warned = get_logger("robustlab.warnings")

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
             line: str | None = None) -> None:
        ours = category.__name__ == "RobustlabWarning"
        warned.warning(str(message) if ours else f"{category.__name__}: {message}")

    warnings.showwarning = show

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        warnings.showwarning = shown
    return undo
