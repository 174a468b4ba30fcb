"""HTML and markdown reports rendered from a saved results directory (no torch needed).

Not implemented yet (tracked in the issue "The HTML robustness report"). This package exists so
that `robustlab.reports` resolves; it exports nothing.
"""
