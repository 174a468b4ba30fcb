"""Reports rendered from a saved results directory alone: no model, no torch.

    from robustlab.reports import render, write_summary, compare
    render("audit/")                     # audit/report.html: one self-contained file
    write_summary("audit/")              # audit/summary.md: for CI step summaries and PR comments
    compare("base/", "candidate/", "diff.html")   # what got better or worse ("diff.md" for markdown)

The report is a list of sections (`robustlab.reports.sections.SECTIONS`), each one template with
its figures; serializers (`serializers.html`, `serializers.markdown`) turn them into one format.
Imports: robustlab.results and robustlab.errors from the core; pandas, numpy and (lazily)
matplotlib.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from robustlab.errors import InputError
from robustlab.results import AuditResult, load, write_file

from . import facts
from .serializers import html as _html
from .serializers import markdown as _markdown

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.md"

__all__ = ["render", "write_summary", "compare", "render_html", "REPORT_NAME", "SUMMARY_NAME"]


def _load(results_dir: str | os.PathLike, argument: str = "results_dir") -> AuditResult:
    path = Path(results_dir)
    if not path.is_dir():
        raise InputError(argument, f"{path} is not a robustlab results directory (no such directory)")
    if not (path / "results.json").exists():
        raise InputError(argument, f"{path} is not a robustlab results directory (no results.json)")
    return load(path)


def _write(path: Path, text: str) -> Path:
    """Write atomically: a reader never sees half a report; written into a results directory, the
    report's digest joins results.json in the same step (robustlab.results.write_file)."""
    return write_file(path, text)


def render_html(result: AuditResult) -> str:
    """The report of one loaded result as an HTML string."""
    from .sections import SECTIONS

    fragments = [_html.Fragment(s.ID, s.TITLE, s.render(result)) for s in SECTIONS if s.applies(result)]
    names = facts.models(result)
    meta = result.metadata
    data = meta.get("data") or {}
    started = str(meta.get("started") or "")[:19].replace("T", " ")
    subtitle = " · ".join(x for x in (
        f"data: {data.get('source')} (n={data.get('n')})" if data else "",
        f"run {started} UTC" if started else "",
        f"robustlab {meta.get('robustlab_version')}" if meta.get("robustlab_version") else "") if x)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (f"Rendered {_html.esc(generated)} by robustlab from results.json, samples.csv and examples.npz alone. "
              "Every figure comes from those files; nothing in this page was fetched from the network.")
    return _html.page(title=f"Robustness audit: {', '.join(names) or 'no models'}", subtitle=subtitle,
                      fragments=fragments, footer=footer)


def render(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Render results_dir into one self-contained HTML file (default: results_dir/report.html)."""
    result = _load(results_dir)
    target = Path(out) if out is not None else Path(results_dir) / REPORT_NAME
    return _write(target, render_html(result))


def write_summary(results_dir: str | os.PathLike, *, named: str | os.PathLike | None = None) -> Path:
    """Write results_dir/summary.md: verdict, thresholds, key figures, in markdown.

    named: where results_dir will be, when it is a new version not yet swapped in
    (robustlab.results.AuditResult.save(also=...)): the report's path is shown there."""
    result = _load(results_dir)
    report = Path(results_dir) / REPORT_NAME
    shown = Path(named) / REPORT_NAME if named is not None else report
    text = _markdown.summary(result, report=str(shown) if report.exists() else None)
    return _write(Path(results_dir) / SUMMARY_NAME, text)


def compare(dir_a: str | os.PathLike, dir_b: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Compare two results directories; HTML, or markdown when `out` ends in .md."""
    from . import diff
    from .sections import comparison

    a, b = _load(dir_a, "dir_a"), _load(dir_b, "dir_b")
    comp = diff.build(a, b, str(dir_a), str(dir_b))
    target = Path(out)
    if target.suffix.lower() in (".md", ".markdown"):
        return _write(target, _markdown.comparison(comp))
    counts = comp.counts()
    return _write(target, _html.page(
        title="Robustness comparison",
        subtitle=f"A: {dir_a} → B: {dir_b} · {counts['better']} better, {counts['worse']} worse, "
                 f"{counts['same']} unchanged",
        fragments=[_html.Fragment(s.ID, s.TITLE, s.render(comp)) for s in comparison.SECTIONS],
        footer="Rendered by robustlab from two results directories alone."))
