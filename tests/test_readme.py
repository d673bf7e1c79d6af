"""The README is the front door: its first lines are the two commands, and it documents every setting."""

from __future__ import annotations

from harness.processes import ROOT
from service.config import Settings

README = (ROOT / "README.md").read_text()


def test_first_lines_are_the_two_commands() -> None:
    commands = [line.split("#")[0].strip() for line in README.splitlines()[1:4] if line.strip()]
    assert commands == ["make serve", "make test"]


def test_every_setting_is_in_the_configuration_table() -> None:
    for name in Settings.model_fields:
        assert f"| `GRU_{name.upper()}` |" in README, f"GRU_{name.upper()} is missing from the README table"


def test_ci_runs_the_readme_test_command() -> None:
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
