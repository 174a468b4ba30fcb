"""CI runs exactly the README's test command (the README promises it; a drift would hide failures)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Run the test suite"):]
    block = re.search(r"```bash\n(.*?)\n```", section, re.S)
    assert block, "the README's 'Run the test suite' has no bash block"
    return block.group(1).strip()


def test_ci_runs_the_readmes_test_command():
    command = _readme_test_command()
    assert "pytest" in command
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in lines, f".ci/run does not run the README's test command:\n{command}"
