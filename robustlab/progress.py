"""Progress bars (tqdm) on robustlab's long loops, drawn only when someone is watching.

Automatic rule: bars are drawn when stderr is a terminal, the environment variable CI is unset, no
pytest test is running (PYTEST_CURRENT_TEST), the process is not a torchrun rank other than 0, and
robustlab's log level is INFO or lower (logging left unconfigured counts as INFO; `robustlab -q`
sets WARNING). Forcing them, strongest first:
`using(True/False)` for a block (what `audit(progress=...)` does), `configure(enabled=True/False)` for
the process, the environment variable ROBUSTLAB_PROGRESS=1/0.

Loops call `steps(iterable, desc)`, which returns the iterable itself when bars are off (nothing is
added per iteration), or open `bar(desc, total)` and `update` it. Bars count Python integers only,
never a tensor, so they add no host sync to a GPU loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

from robustlab.errors import InputError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

ENV = "ROBUSTLAB_PROGRESS"
DELAY = 0.5  # seconds before a bar is drawn: loops shorter than that never flash one
_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

_configured: bool | None = None
_forced: contextvars.ContextVar[bool | None] = contextvars.ContextVar("robustlab_progress", default=None)


def configure(enabled: bool | None = None) -> bool | None:
    """Force bars on (True) or off (False) for this process, or back to the automatic rule (None).
    Returns the previous setting."""
    global _configured
    if enabled is not None and not isinstance(enabled, bool):
        raise InputError("enabled", f"must be True, False or None, got {enabled!r}")
    previous, _configured = _configured, enabled
    return previous


@contextlib.contextmanager
def using(enabled: bool | None) -> Iterator[None]:
    """Force bars on or off inside the block; None leaves the current setting."""
    token = _forced.set(enabled) if enabled is not None else None
    try:
        yield
    finally:
        if token is not None:
            _forced.reset(token)


def honours(keyword: str) -> Callable[[F], F]:
    """Decorator: a boolean `keyword` argument of the call (e.g. audit(progress=False)) forces bars
    on or off for the call's duration; other values leave the rule as it is."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.get(keyword)
            with using(value if isinstance(value, bool) else None):
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def environment_setting() -> bool | None:
    """ROBUSTLAB_PROGRESS as True/False, None when unset; a value that is neither is an InputError."""
    text = os.environ.get(ENV, "").strip().lower()
    if not text:
        return None
    if text not in _WORDS:
        raise InputError(ENV, f"expected 1 or 0 (also true/false, yes/no, on/off), got {os.environ[ENV]!r}")
    return _WORDS[text]


def enabled() -> bool:
    """Whether a bar opened now is drawn."""
    for setting in (_forced.get(), _configured):
        if setting is not None:
            return setting
    try:
        from_env = environment_setting()
    except InputError:
        from_env = None  # checked (and refused) where a run starts: robustlab.cli, audit(); never mid-loop
    return from_env if from_env is not None else automatic()


def automatic() -> bool:
    """The automatic rule alone (see the module docstring)."""
    if os.environ.get("CI") or os.environ.get("PYTEST_CURRENT_TEST"):
        return False
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 alone draws
        return False
    try:
        tty = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        tty = False
    return tty and log_level() <= logging.INFO


def log_level() -> int:
    """robustlab's effective log level; INFO while logging is unconfigured (no level set on the
    robustlab loggers and no root handler), where Python's default WARNING is nobody's choice."""
    logger = logging.getLogger("robustlab")
    if logger.level == logging.NOTSET and not logging.getLogger().handlers:
        return logging.INFO
    return logger.getEffectiveLevel()


class _Off:
    """The bar when bars are off: every call is a no-op."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Off":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


OFF = _Off()


def bar(desc: str, total: int | None = None, *, unit: str = "it", initial: int = 0) -> Any:
    """A context-managed bar (tqdm) to `update(n)` by hand, or OFF when bars are off."""
    if not enabled():
        return OFF
    return _tqdm(None, desc=desc, total=total, unit=unit, initial=initial)


def steps(iterable: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it",
          initial: int = 0) -> Iterable[T]:
    """`iterable` itself when bars are off; else it wrapped in a bar that advances per item."""
    if not enabled():
        return iterable
    return _tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial)


def _tqdm(iterable: Iterable[Any] | None, **options: Any) -> Any:
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread
    if options["total"] is None and iterable is not None and hasattr(iterable, "__len__"):
        options["total"] = options["initial"] + len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, file=sys.stderr, leave=False, dynamic_ncols=True, delay=DELAY, **options)


def write(text: str, stream: TextIO) -> None:
    """Write a line to stream without tearing the bars drawn there (log lines use this)."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None and getattr(tqdm_module.tqdm, "_instances", None):
        tqdm_module.tqdm.write(text, file=stream)
        return
    stream.write(text + "\n")
    stream.flush()
