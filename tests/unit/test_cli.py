"""The ``ferry`` CLI: clear errors for settings that cannot work, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main


def test_serve_without_models_says_how_to_configure_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert "FERRY_MODELS" in capsys.readouterr().err


def test_serve_with_invalid_settings_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--device", "tpu", "--model", "models:/m@a"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["register-demo", "--models-dir"], ["bench", "--loadtests-dir"]])
def test_scripts_outside_the_repository_are_reported(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("ferry ")
