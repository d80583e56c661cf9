"""Push reloads against a real ``mlflow server`` (sqlite: a SQL backend, which MLflow's webhooks need)
sending real webhooks to a real Ferry (``POST /webhooks/mlflow``) that polls once an hour, so only a
delivery can explain a swap.

MLflow refuses webhook URLs that are not https or that resolve to private addresses (127.0.0.1 is
one): the test server allows them with ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` and
``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``, both meant for development only. It also caches the webhooks
of each event for ``MLFLOW_WEBHOOK_CACHE_TTL`` (60 s by default), so a webhook created after an alias
was set would not fire for up to a minute: 0 here.

What is shown: a webhook whose secret is not Ferry's gets 401 (MLflow's own ``test_webhook`` reports the
status) and its real delivery changes nothing; with Ferry's secret, moving @champion makes Ferry serve
the new version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from mlflow_stores import log_linear, register, start_tracking_server, tracking

from conftest import Registry, Server, metric, start_server, stop_server, wait_until

pytestmark = pytest.mark.integration
SECRET = "push-reload-secret-0123456789abcdef"
ROW = [[1.0, 0.0, 0.0, 0.0]]
"""output = weight * sum(row) + 1: versions 1, 2 and 3 have weights 2, 3 and 4."""
EXPECTED = {"1": 3.0, "2": 4.0, "3": 5.0}
WEBHOOK_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "0",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An ``mlflow server`` with ``linear`` v1 (@champion), v2 and v3."""
    root = tmp_path_factory.mktemp("webhooks")
    server = start_tracking_server(root / "mlflow", env=WEBHOOK_ENV)
    try:
        with tracking(server.url):
            versions = [register("linear", log_linear(2.0), "champion")]
            versions += [register("linear", log_linear(weight)) for weight in (3.0, 4.0)]
        assert versions == ["1", "2", "3"]
        yield server
    finally:
        stop_server(server)


def served(ferry: Server) -> str:
    r = httpx.post(f"{ferry.url}/predict", json={"model": "linear", "inputs": ROW}, timeout=30)
    assert r.status_code == 200, r.text
    version = r.headers["X-Model-Version"]
    assert r.json()["outputs"][0][0] == pytest.approx(EXPECTED[version])
    return str(version)


def webhooks(ferry: Server, outcome: str) -> float:
    return metric(httpx.get(f"{ferry.url}/metrics", timeout=10).text, "ferry_webhooks_total", outcome=outcome)


def test_an_alias_move_reaches_ferry_by_webhook_and_a_wrong_secret_changes_nothing(
    mlflow_server: Server, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    ferry = start_server(
        Registry(root=tmp_path, tracking_uri=mlflow_server.url),
        "linear=models:/linear@champion",
        tmp_path / "ferry",
        extra_env={"FERRY_RELOAD__POLL_S": "3600", "FERRY_RELOAD__WEBHOOK_SECRET": SECRET},
    )
    url = f"{ferry.url}/webhooks/mlflow"
    try:
        assert served(ferry) == "1"

        # A webhook with another secret: MLflow's test delivery gets 401, and so does the real one.
        wrong = client.create_webhook(
            name="ferry-wrong-secret",
            url=url,
            events=["model_version_alias.created"],
            secret="not-ferrys-secret-0123456789",
        )
        result = client.test_webhook(wrong.webhook_id)
        assert (result.success, result.response_status) == (False, 401), result.response_body
        assert "bad_signature" in (result.response_body or "")
        client.set_registered_model_alias("linear", "champion", "2")
        assert wait_until(lambda: webhooks(ferry, "bad_signature") >= 2, 60, 0.2), ferry.log(3000)
        assert served(ferry) == "1"  # polling is an hour away: nothing moved
        assert webhooks(ferry, "accepted") == 0
        client.delete_webhook(wrong.webhook_id)

        # Ferry's secret: the test delivery (an example model Ferry does not serve) is ignored, 200;
        # moving @champion makes Ferry serve the new version without a poll.
        hook = client.create_webhook(
            name="ferry",
            url=url,
            events=["model_version_alias.created", "model_version_alias.deleted"],
            secret=SECRET,
        )
        result = client.test_webhook(hook.webhook_id)
        assert (result.success, result.response_status) == (True, 200), result.response_body
        assert '"ignored"' in (result.response_body or "")
        client.set_registered_model_alias("linear", "champion", "3")
        assert wait_until(lambda: served(ferry) == "3", 60, 0.2), f"never served v3:\n{ferry.log(3000)}"
        assert webhooks(ferry, "accepted") == 1
        log = ferry.log()
        assert "model_version_alias.created of linear@champion (version 3)" in log
        assert "now serves v3 (was v1)" in log
    finally:
        stop_server(ferry)
