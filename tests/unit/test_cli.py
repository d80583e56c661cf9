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


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", None, True),
        ("10.1.2.3", None, True),
        ("::", None, True),
        ("0.0.0.0", "a-key", False),
        ("127.0.0.1", None, False),
        ("127.0.0.2", None, False),
        ("localhost", None, False),
        ("::1", None, False),
    ],
)
def test_listening_beyond_loopback_without_api_keys_is_warned_about(
    host: str, keys: str | None, warned: bool
) -> None:
    from service.cli import exposure_warning
    from service.config import Settings

    warning = exposure_warning(Settings(host=host, api_keys=keys))
    assert (warning is not None) == warned
    if warned:
        assert warning is not None and "FERRY_API_KEYS" in warning and host in warning
