"""The session's gates as tables: the terminal summary and summary.md (the reports' markdown serializer).

Both show, per gated row, the three things in order: the figure (with its 95% interval), the
evaluation status, the requirement and its outcome; then the baseline and the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Session

HEADER = ["test", "model", "attack", "eps", "clean", "robust [95% CI]", "evaluation", "requirement", "baseline",
          "result"]


def table_rows(gates: list[dict]) -> list[list[str]]:
    """One row of cells per gate record (robustlab.plugin.records), as HEADER names them."""
    body = []
    for g in gates:
        attack = g["attack"] if g["targeted"] == "none" else f"{g['attack']} (targeted: {g['targeted']})"
        eps = "none" if g["eps"] is None else f"{g['norm']} {g['eps']:g}"
        body.append([g["test"], g["model"], attack, eps, _fmt(g["clean_accuracy"]), _robust_cell(g),
                     str(g.get("evaluation") or "-"), _requirement_cell(g), _fmt(g["baseline"]),
                     "PASS" if g["passed"] else "FAIL"])
    return body


def text_table(state: Session) -> str:
    """The terminal summary's table: columns as wide as their widest cell."""
    body = table_rows(state.gates)
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in body)) if body else len(HEADER[i])
              for i in range(len(HEADER))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(HEADER), line(["-" * w for w in widths])] + [line(r) for r in body]
    if not body:
        out.append("(audits ran, no gate was checked)")
    return "\n".join(out)


def markdown_summary(state: Session) -> str:
    """summary.md, written by robustlab.reports.serializers.markdown.gate_summary."""
    from robustlab.reports.serializers.markdown import gate_summary

    failures = [(g["test"], list(g["failures"])) for g in state.gates if not g["passed"]]
    return gate_summary(HEADER, table_rows(state.gates), failures=failures, quick=state.settings.quick)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _robust_cell(g: dict) -> str:
    """The figure with its interval; a certificate row's is its certified accuracy (a proven lower bound)."""
    figure, label = g.get("robust_accuracy"), ""
    if figure is None and g.get("certified_accuracy") is not None:
        figure, label = g["certified_accuracy"], "certified "
    if figure is None:
        return "-"
    low_high = g.get("interval")
    return label + _fmt(figure) + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")


def _requirement_cell(g: dict) -> str:
    """'>= 0.500: meets', or '-' where no threshold was set (a regression gate only)."""
    if g.get("required") is None:
        return "-" if g.get("required_clean") is None else f"clean >= {g['required_clean']:.3f}"
    basis = f": {g['basis']}" if g.get("basis") else ""  # "meets: certified": the lower bound met it
    return f">= {g['required']:.3f}: {g.get('outcome') or '-'}{basis}"
