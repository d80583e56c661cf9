"""Settings: environment parsing, nested sections, validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import DEFAULT_TRACKING_URI, Settings, describe_invalid
from service.errors import ConfigurationError
from service.registry import ModelSpec


def test_defaults_are_safe() -> None:
    s = Settings()
    assert s.models == [] and s.device == "auto" and s.host == "127.0.0.1" and s.port == 8000
    assert s.tracking_uri == DEFAULT_TRACKING_URI and s.redis_url is None and s.admin_token is None
    assert s.batch.max_rows > 0 and s.batch.max_wait_ms == 0


def test_environment_with_nested_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_MODELS", "a=models:/a@champion, models:/b/3 ,")
    monkeypatch.setenv("FERRY_BATCH__MAX_ROWS", "128")
    monkeypatch.setenv("FERRY_CACHE__MODELS", '{"a": {"ttl_s": 5, "enabled": false}}')
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u@localhost/mlflow")
    monkeypatch.setenv("FERRY_DEVICE", "CUDA:1")
    s = Settings()
    assert s.models == ["a=models:/a@champion", "models:/b/3"]
    assert s.batch.max_rows == 128
    assert s.cache.models["a"].ttl_s == 5 and s.cache.models["a"].enabled is False
    assert s.tracking_uri == "postgresql://u@localhost/mlflow"
    assert s.device == "cuda:1"


@pytest.mark.parametrize(
    ("key", "value"), [("FERRY_DEVICE", "tpu"), ("FERRY_BATCH__MAX_ROWS", "0"), ("FERRY_PORT", "70000")]
)
def test_nonsense_is_rejected(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_secrets_do_not_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_ADMIN_TOKEN", "s3cret-token")
    monkeypatch.setenv("FERRY_REDIS_URL", "redis://:hunter2@localhost:6379/0")
    s = Settings()
    assert "s3cret" not in repr(s) and "hunter2" not in repr(s)


def test_invalid_settings_are_named_without_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic's own message repeats every input, secrets included (a too-short Redis secret printed
    whole); what Ferry prints names each variable and leaves the values out."""
    monkeypatch.setenv("FERRY_CACHE__REDIS_SECRET", "shortredis")
    monkeypatch.setenv("FERRY_PORT", "eighty")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "shortredis" in str(caught.value)  # what describe_invalid exists to avoid
    text = describe_invalid(caught.value)
    assert "shortredis" not in text and "eighty" not in text
    assert "FERRY_PORT:" in text and "FERRY_CACHE:" in text and "at least 16 characters" in text


@pytest.mark.parametrize(
    ("entry", "name", "uri"),
    [
        ("models:/fraud@champion", "fraud", "models:/fraud@champion"),
        ("f=models:/fraud/3", "f", "models:/fraud/3"),
        ("runs:/0123abcd/model", "model", "runs:/0123abcd/model"),
        ("/mnt/models/fraud", "fraud", "/mnt/models/fraud"),
        ("fraud=/mnt/models", "fraud", "/mnt/models"),
        ("file:///mnt/models/fraud/", "fraud", "file:///mnt/models/fraud/"),
        ("s3://bucket/models/fraud", "fraud", "s3://bucket/models/fraud"),
        ("f=https://host/artifacts/m?x=1", "f", "https://host/artifacts/m?x=1"),
        ("mlflow-artifacts:/1/abc/artifacts/model", "model", "mlflow-artifacts:/1/abc/artifacts/model"),
    ],
)
def test_model_spec_parsing(entry: str, name: str, uri: str) -> None:
    assert ModelSpec.parse(entry) == ModelSpec(name, uri)


@pytest.mark.parametrize(
    "entry", ["nope://bucket/model", "models:/", "bad name=models:/a@b", "relative/model", "file:model"]
)
def test_model_spec_rejects_bad_uris(entry: str) -> None:
    with pytest.raises(ConfigurationError):
        ModelSpec.parse(entry)
