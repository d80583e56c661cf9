"""The README stays true: it starts with the two commands, and its configuration table lists every
setting Ferry reads (names derived from the Settings tree, not a hand-kept list)."""

from __future__ import annotations

import re
from pathlib import Path

from delivery_support import setting_env_names

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make serve", "make test"]


def test_every_setting_is_in_the_configuration_table() -> None:
    names, _ = setting_env_names()
    names = {n for n in names if not any(other.startswith(n + "__") for other in names)}  # not sections
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", README.read_text(), flags=re.MULTILINE))
    aliases = {"FERRY_TRACKING_URI", "FERRY_REGISTRY_URI"}  # FERRY_ spellings of MLflow's own variables
    missing = sorted(names - documented - aliases)
    assert not missing, f"settings missing from README's configuration table: {missing}"
    stale = sorted(documented - names)
    assert not stale, f"README documents settings Ferry does not read: {stale}"
