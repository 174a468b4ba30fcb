"""The report's sections, in reading order. Each is one module with

    ID: str                      anchor in the page
    TITLE: str                   heading (and table-of-contents entry)
    applies(result) -> bool      whether the results hold what the section shows
    render(result) -> str        the section's HTML body (everything from results escaped)

where `result` is a loaded `robustlab.results.AuditResult`. Sections that have nothing to show
(no targeted rows, no minimal-perturbation runs, no image or tabular examples) do not apply and
are left out, so later work (defenses, explanations, integrity checks) plugs in as one new module
in `SECTIONS`, shown when its results are present.

Layout: what a reader came for is open (the verdict, the accuracy table and curves, the defenses
table); detail (per-class tables, matrices, histograms, example images, explanation tables, the
audited configuration) sits in `html.fold`s, closed, each headed by one line with its key figure, so
the page shows every section's headline without scrolling through its detail. A fold holding a
failure a reader must not miss (a flagged saliency method, a failed sanity check; in the verdict,
failed integrity checks) opens by itself. Printing opens every fold.
"""

from __future__ import annotations

from . import accuracy, audited, defenses, examples, explanations, norms, per_class, targeted, verdict

SECTIONS = [verdict, audited, accuracy, defenses, targeted, per_class, norms, examples, explanations]
