"""The HTML serializer: one self-contained page (CSS, images and script inline) from section fragments.

The page carries a Content-Security-Policy that forbids every network request; its one script is
allowed by hash, so even markup that escaped escaping could not run. Everything from results goes
through `esc`.
"""

from __future__ import annotations

import base64
import hashlib
import html
from dataclasses import dataclass
from typing import Any, Iterable, Sequence


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


@dataclass
class Fragment:
    id: str
    title: str
    body: str


def cell(text: Any, *, sort: Any = None, cls: str = "", style: str = "", raw: bool = False) -> str:
    attrs = ""
    if sort is not None:
        attrs += f' data-v="{esc(sort)}"'
    if cls:
        attrs += f' class="{esc(cls)}"'
    if style:
        attrs += f' style="{esc(style)}"'
    return f"<td{attrs}>{text if raw else esc(text)}</td>"


def table(headers: Sequence[str], rows: Iterable[str], *, sortable: bool = False, cls: str = "",
          caption: str = "", text: int = 1) -> str:
    """A data table; the first `text` columns hold text (left-aligned), the rest figures."""
    klass = " ".join(c for c in ("data", "sortable" if sortable else "", cls) if c)
    head = "".join(f'<th scope="col"{" class=l" if i < text else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table class="{klass}">{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def fold(headline: str, body: str, *, open: bool = False, cls: str = "") -> str:
    """A section's detail behind a one-line headline (`<details>`/`<summary>`): the reader sees the key
    figure without scrolling through what backs it; printing opens every fold (SCRIPT). `headline` is
    HTML, already escaped."""
    klass = " ".join(c for c in ("fold", cls) if c)
    return f'<details class="{klass}"{" open" if open else ""}><summary>{headline}</summary>{body}</details>'


def figure(uri: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{esc(uri)}" alt="{esc(alt)}">{cap}</figure>'


def heat(value: float) -> str:
    """Background for an accuracy cell: red (0%) through amber to green (100%)."""
    if value is None or value != value:
        return ""
    hue = 120 * max(0.0, min(1.0, float(value)))
    return f"background: hsl({hue:.0f} 70% 88%)"


CSS = """
:root { --fg:#1d2329; --muted:#5b6570; --line:#d8dde3; --bg:#ffffff; --panel:#f6f8fa;
  --pass:#1a7f37; --pass-bg:#dafbe1; --fail:#b42318; --fail-bg:#ffe4e0; --none:#5b6570; --none-bg:#eef1f4;
  --warn:#9a6700; --warn-bg:#fff3cd; --accent:#0b5cad; }
* { box-sizing: border-box; }
html { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg); background: var(--bg); }
body { margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 0 28px 48px; }
header.top { background: #14202b; color: #fff; padding: 22px 0 18px; }
header.top .inner { max-width: 1180px; margin: 0 auto; padding: 0 28px; }
header.top h1 { margin: 0 0 4px; font-size: 24px; font-weight: 650; overflow-wrap: anywhere; }
header.top p { margin: 0; color: #c3ced8; font-size: 13.5px; overflow-wrap: anywhere; }
nav.toc { position: sticky; top: 0; z-index: 5; background: rgba(255,255,255,.96); border-bottom: 1px solid var(--line); }
nav.toc ol { max-width: 1180px; margin: 0 auto; padding: 8px 28px; list-style: none; display: flex; flex-wrap: wrap; gap: 4px 18px; font-size: 13.5px; counter-reset: toc; }
nav.toc li { counter-increment: toc; }
nav.toc li::before { content: counter(toc) ". "; color: var(--muted); }
nav.toc a { color: var(--accent); text-decoration: none; }
section { margin-top: 24px; }
section > h2 { font-size: 19px; margin: 0 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); counter-increment: sec; }
main { counter-reset: sec; }
section > h2::before { content: counter(sec) ". "; color: var(--muted); font-weight: 500; }
h3 { font-size: 15.5px; margin: 22px 0 8px; overflow-wrap: anywhere; }
p.lead { font-size: 16px; margin: 0 0 14px; }
p.note, .muted { color: var(--muted); font-size: 13px; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 12.5px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
.card { border: 1px solid var(--line); border-left: 6px solid var(--none); border-radius: 8px; padding: 14px 16px; background: #fff; break-inside: avoid; }
.card.pass { border-left-color: var(--pass); } .card.fail { border-left-color: var(--fail); }
.card h3 { margin: 0 0 2px; font-size: 17px; display: flex; justify-content: space-between; gap: 10px; align-items: baseline; }
.card .tm { color: var(--muted); font-size: 13px; margin-bottom: 10px; }
.badge { display: inline-block; font-size: 12px; font-weight: 700; letter-spacing: .03em; padding: 2px 9px; border-radius: 999px; text-transform: uppercase; }
.badge.pass { color: var(--pass); background: var(--pass-bg); } .badge.fail { color: var(--fail); background: var(--fail-bg); }
.badge.none { color: var(--none); background: var(--none-bg); } .badge.warn { color: var(--warn); background: var(--warn-bg); }
.bigrow { display: flex; gap: 28px; align-items: flex-end; margin: 8px 0 8px; flex-wrap: wrap; }
.arrow { font-size: 22px; color: var(--muted); padding-bottom: 16px; }
.big { font-size: 30px; font-weight: 700; line-height: 1.1; }
.big small { display: block; font-size: 12px; font-weight: 500; color: var(--muted); }
.steps { display: flex; gap: 6px; flex-wrap: wrap; margin: 6px 0 10px; }
.step { font-size: 12.5px; padding: 3px 8px; border-radius: 6px; white-space: nowrap; }
.checks { margin: 6px 0 0; padding: 0; list-style: none; font-size: 13px; }
.checks li { margin: 3px 0; overflow-wrap: anywhere; }
.ok { color: var(--pass); font-weight: 700; } .bad { color: var(--fail); font-weight: 700; } .warn { color: var(--warn); font-weight: 700; } .est { color: var(--accent); font-weight: 700; }
ol.verdict { list-style: none; padding: 0; margin: 8px 0 10px; display: grid; grid-template-columns: 1.15fr 1fr 1fr; gap: 8px; }
ol.verdict li { background: var(--panel); border-radius: 6px; padding: 7px 10px; overflow-wrap: anywhere; }
ol.verdict .label { display: block; font-size: 11px; font-weight: 600; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); }
ol.verdict .big { display: block; }
ol.verdict b { font-size: 15px; }
ol.verdict small { display: block; font-size: 12px; font-weight: 500; color: var(--muted); }
.cards.verdicts { grid-template-columns: 1fr; }
table.verdicts { margin: 4px 0 8px; width: 100%; }
table.verdicts td:first-child { white-space: nowrap; overflow-wrap: normal; }
table.verdicts td small { font-size: 11.5px; }
table.compact td.l, table.compact th { white-space: nowrap; }
.up { color: var(--pass); font-size: 12px; } .down { color: var(--fail); font-size: 12px; }
.integrity { margin-top: 10px; font-size: 13px; padding: 6px 10px; border-radius: 6px; background: var(--warn-bg); color: #5c4300; }
.scroll { overflow-x: auto; }
table.data { border-collapse: collapse; font-size: 13.5px; margin: 6px 0 14px; min-width: 50%; }
table.data caption { text-align: left; font-weight: 600; padding: 4px 0; }
table.data th, table.data td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: right; vertical-align: top; }
table.data th { background: var(--panel); font-weight: 600; white-space: nowrap; position: relative; }
table.data td:first-child, table.data th:first-child, table.data td.l, table.data th.l { text-align: left; }
table.data td.l { overflow-wrap: anywhere; max-width: 420px; }
/* in a box that scrolls sideways a wide table keeps its words whole (a squeezed table broke 'DigitsCNN'
   into 'DigitsC NN'); its box scrolls instead */
.scroll > table.data td.l { overflow-wrap: break-word; }
table.sortable th { cursor: pointer; user-select: none; padding-right: 20px; }
table.sortable th::after { content: "\\2195"; position: absolute; right: 6px; color: #9aa5b1; font-size: 11px; }
table.sortable th[aria-sort=ascending]::after { content: "\\25B2"; color: var(--accent); }
table.sortable th[aria-sort=descending]::after { content: "\\25BC"; color: var(--accent); }
tr.worst td { font-weight: 700; border-top: 1.5px solid #9aa5b1; }
tr.certified td { font-style: italic; color: #2d4a66; }
tr.sep td { border-top: 2px solid #9aa5b1; }
table.kv { border-collapse: collapse; font-size: 13.5px; width: 100%; }
table.kv th { text-align: left; font-weight: 600; color: var(--muted); width: 200px; padding: 4px 12px 4px 0; vertical-align: top; border-bottom: 1px solid var(--line); }
table.kv td { padding: 4px 0; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 8px 28px; }
figure { margin: 8px 0 16px; break-inside: avoid; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; }
details { margin: 8px 0 12px; }
summary { cursor: pointer; color: var(--accent); font-size: 14px; }
details.fold { margin: 6px 0; padding: 0 12px; border: 1px solid var(--line); border-radius: 6px; }
details.fold > summary { margin: 0 -12px; padding: 6px 12px; color: var(--fg); overflow-wrap: anywhere; }
details.fold > summary::marker { color: var(--accent); }
details.fold > summary:hover { background: var(--panel); }
details.fold[open] { padding-bottom: 6px; }
details.fold[open] > summary { margin-bottom: 8px; border-bottom: 1px solid var(--line); background: var(--panel); }
.card { overflow-x: auto; }
pre { background: var(--panel); padding: 10px 12px; border-radius: 6px; overflow-x: auto; font-size: 12px; }
table.examples { border-collapse: collapse; font-size: 12px; margin: 6px 0 16px; }
table.examples th { font-weight: 600; padding: 4px 8px; text-align: center; background: var(--panel); border-bottom: 1px solid var(--line); }
table.examples th.grp { border-left: 2px solid #fff; }
table.examples td { padding: 6px 6px; text-align: center; vertical-align: top; border-bottom: 1px solid var(--line); }
table.examples td.start { border-left: 2px solid var(--line); }
table.examples img { width: 72px; height: 72px; image-rendering: pixelated; display: block; margin: 0 auto 3px; border: 1px solid #cfd6dd; }
.pred { display: block; line-height: 1.3; overflow-wrap: anywhere; max-width: 110px; margin: 0 auto; }
.flip { color: var(--fail); font-weight: 700; } .held { color: var(--pass); }
.bar { display: inline-block; height: 9px; vertical-align: middle; border-radius: 2px; }
.bar.pos { background: #d6604d; } .bar.neg { background: #4393c3; }
.legend { font-size: 12.5px; color: var(--muted); }
.up { color: var(--pass); font-weight: 700; } .down { color: var(--fail); font-weight: 700; } .same { color: var(--muted); }
footer { margin-top: 40px; padding-top: 12px; border-top: 1px solid var(--line); font-size: 12.5px; color: var(--muted); }
@media print {
  html { font-size: 11.5px; }
  nav.toc { display: none; }
  header.top { background: #fff; color: #000; border-bottom: 2px solid #000; padding: 0 0 8px; }
  header.top p { color: #333; }
  main, header.top .inner { max-width: none; padding: 0; }
  section { margin-top: 18px; }
  section > h2 { break-after: avoid; }
  h3 { break-after: avoid; }
  table, figure, .card { break-inside: avoid; }
  tr { break-inside: avoid; }
  summary { color: #000; }
  a { color: #000; text-decoration: none; }
  .card, .badge, .step, .integrity, ol.verdict li, td { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  @page { margin: 14mm 12mm; }
}
"""

# Sorts tables with class "sortable" by clicking a header (numbers from data-v, else text), and opens
# every <details> before printing so a printout shows everything.
SCRIPT = """(function () {
  function key(td) { var v = td.getAttribute('data-v'); if (v !== null && v !== '' && !isNaN(+v)) return +v; return td.textContent.trim().toLowerCase(); }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.querySelectorAll('thead th');
    heads.forEach(function (th, col) {
      th.setAttribute('tabindex', '0');
      function sort() {
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        heads.forEach(function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.forEach(function (r, i) { r._i = i; });
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (typeof x !== typeof y) { x = String(x); y = String(y); }
          return (x < y ? -1 : x > y ? 1 : a._i - b._i) * (asc ? 1 : -1);
        });
        rows.forEach(function (r) { r.classList.remove('sep'); body.appendChild(r); });
      }
      th.addEventListener('click', sort);
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sort(); } });
    });
  });
  window.addEventListener('beforeprint', function () { document.querySelectorAll('details').forEach(function (d) { d.open = true; }); });
})();"""


def csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'")


def page(*, title: str, subtitle: str, fragments: Sequence[Fragment], footer: str = "") -> str:
    """The whole document. `title`/`subtitle` are plain text; fragment bodies are HTML already escaped."""
    nav = "".join(f'<li><a href="#{esc(f.id)}">{esc(f.title)}</a></li>' for f in fragments)
    body = "\n".join(f'<section id="{esc(f.id)}"><h2>{esc(f.title)}</h2>\n{f.body}\n</section>' for f in fragments)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp(SCRIPT)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta name="generator" content="robustlab">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header class="top"><div class="inner"><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></div></header>
<nav class="toc" aria-label="Sections"><ol>{nav}</ol></nav>
<main>
{body}
<footer>{footer}</footer>
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""
