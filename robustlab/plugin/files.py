"""Where the plugin writes: a readable, unique directory per test, atomic files, report.html."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path


def dir_name(nodeid: str) -> str:
    """A directory name for a test node id: readable, unique (a hash is added where characters were lost)."""
    readable = nodeid.replace("::", "__").replace("/", "_").replace("\\", "_")
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", readable)
    if safe != readable or len(safe) > 120:
        safe = f"{safe[:110]}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"
    return safe


def write(path: Path, text: str) -> None:
    """Atomic: write a sibling temporary file, then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_report(directory: Path) -> None:
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
