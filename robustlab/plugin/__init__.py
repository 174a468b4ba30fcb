"""The pytest plugin's parts, one job each; the hooks and options live in robustlab.pytest_plugin.

    settings   the plugin's options, merged from the command line over the ini file (Settings)
    quick      --robustlab-quick: the caps on samples, suite and attack steps
    marker     @pytest.mark.robustness: its arguments and how they become robustlab.audit arguments
    fixture    the `robustlab` fixture (Gate): audit, check, assert_robust, assert_no_regression
    session    what one pytest process saw (Session), xdist hand-over, the files written at the end
    records    one record per gated row, the test's JUnit properties
    tables     the terminal table and summary.md (written by the reports' markdown serializer)
    baseline   reading and saving --robustlab-baseline files
    files      result directories: names, atomic writes, report.html

Like the hook module, every part needs pytest and the standard library only at import time; torch,
pandas, the harness and the gates are imported when a test uses the fixture.
"""
