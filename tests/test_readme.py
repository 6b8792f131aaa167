"""The README stays true: its two set-up commands, CI calling its test command, and the settings table."""

from __future__ import annotations

import re
from pathlib import Path

from loraloop.settings import settings_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_settings_table_matches_the_settings() -> None:
    assert settings_markdown() in (ROOT / "README.md").read_text(), "run: python -m loraloop.settings"
