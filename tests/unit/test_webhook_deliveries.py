"""Push reloads (service/webhooks.py, ``POST /webhooks/mlflow``): the signature check against MLflow's own
signing code, the replay window and the delivery ids remembered, payload errors naming the field, and
the route in process (``create_app`` with the fake registry, polling off): a signed alias move makes the
model swap, everything else changes nothing. The same route meets a real ``mlflow server`` in
tests/integration/test_webhooks.py."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from mlflow.webhooks.delivery import _generate_hmac_signature

from fakes import FakeRegistry
from service.api.app import create_app
from service.config import ReloadSettings, Settings
from service.errors import ConfigurationError
from service.metrics import Metrics
from service.registry import ModelRef
from service.webhooks import (
    BadSignature,
    InvalidDelivery,
    ReplayedDelivery,
    StaleDelivery,
    Verifier,
    parse_event,
    read_secret,
    sign,
)

SECRET = "webhook-secret-0123456789abcdef"
NOW = 1_800_000_000.0


def delivery(
    data: dict[str, Any] | None = None,
    *,
    secret: str = SECRET,
    event: str = "model_version_alias.created",
    timestamp: float = NOW,
    delivery_id: str | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and body as MLflow's delivery code builds them (its own signing function)."""
    entity, action = event.split(".")
    payload = {
        "entity": entity,
        "action": action,
        "timestamp": "2027-01-15T08:00:00+00:00",
        "data": data if data is not None else {"name": "m", "alias": "champion", "version": "3"},
    }
    body = json.dumps(payload)
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(timestamp))
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, stamp, body),
    }
    return headers, body.encode()


def verifier(**kwargs: Any) -> Verifier:
    return Verifier(SECRET.encode(), 300.0, clock=lambda: NOW, **kwargs)


# ------------------------------------------------------------------------------------ the signature check
def test_sign_is_mlflows_signature() -> None:
    headers, body = delivery()
    assert (
        sign(SECRET.encode(), headers["X-MLflow-Delivery-Id"], headers["X-MLflow-Timestamp"], body)
        == headers["X-MLflow-Signature"]
    )


def test_a_good_delivery_verifies_and_returns_its_id() -> None:
    headers, body = delivery(delivery_id="d-1")
    assert verifier().verify(headers, body) == "d-1"
    headers, body = delivery(delivery_id="d-2")
    lower = {key.lower(): value for key, value in headers.items()}  # names are case-insensitive
    assert verifier().verify(lower, body) == "d-2"


def test_a_wrong_secret_is_a_bad_signature() -> None:
    headers, body = delivery(secret="another-secret-0123456789")
    with pytest.raises(BadSignature, match="does not verify"):
        verifier().verify(headers, body)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b.replace(b'"3"', b'"4"')),  # the body
        lambda h, b: ({**h, "X-MLflow-Delivery-Id": str(uuid.uuid4())}, b),  # the delivery id
        lambda h, b: ({**h, "X-MLflow-Timestamp": str(int(NOW) - 1)}, b),  # the timestamp
        lambda h, b: ({**h, "X-MLflow-Signature": "v1," + "A" * 44}, b),  # the signature
        lambda h, b: ({**h, "X-MLflow-Signature": h["X-MLflow-Signature"][3:]}, b),  # no version
    ],
    ids=["body", "delivery-id", "timestamp", "signature", "unversioned"],
)
def test_anything_tampered_is_a_bad_signature(tamper: Any) -> None:
    headers, body = tamper(*delivery())
    with pytest.raises(BadSignature):
        verifier().verify(headers, body)


def test_missing_headers_are_named() -> None:
    headers, body = delivery()
    del headers["X-MLflow-Signature"], headers["X-MLflow-Timestamp"]
    with pytest.raises(BadSignature, match="missing X-MLflow-Signature, X-MLflow-Timestamp"):
        verifier().verify(headers, body)


@pytest.mark.parametrize("offset", [-301.0, 301.0, -86_400.0])
def test_a_timestamp_out_of_the_window_is_stale(offset: float) -> None:
    headers, body = delivery(timestamp=NOW + offset)
    with pytest.raises(StaleDelivery, match="FERRY_RELOAD__WEBHOOK_MAX_AGE_S"):
        verifier().verify(headers, body)


def test_a_timestamp_within_the_window_verifies() -> None:
    check = verifier()
    for offset in (-299.0, 0.0, 299.0):
        headers, body = delivery(timestamp=NOW + offset)
        check.verify(headers, body)


def test_a_signed_non_numeric_timestamp_is_invalid_naming_the_header() -> None:
    headers, body = delivery()
    headers["X-MLflow-Timestamp"] = "yesterday"
    headers["X-MLflow-Signature"] = sign(SECRET.encode(), headers["X-MLflow-Delivery-Id"], "yesterday", body)
    with pytest.raises(InvalidDelivery) as caught:
        verifier().verify(headers, body)
    assert caught.value.details == {"field": "X-MLflow-Timestamp"}


def test_a_replayed_delivery_is_refused() -> None:
    check = verifier()
    headers, body = delivery()
    check.verify(headers, body)
    with pytest.raises(ReplayedDelivery, match="accepted before"):
        check.verify(headers, body)
    check.verify(*delivery())  # another delivery still passes


def test_remembered_ids_are_bounded_and_expire_with_the_window() -> None:
    clock = [NOW]
    check = Verifier(SECRET.encode(), 300.0, remembered=3, clock=lambda: clock[0])
    sent = [delivery() for _ in range(4)]
    for headers, body in sent:
        check.verify(headers, body)
    assert len(check._seen) == 3  # the oldest id made room
    with pytest.raises(ReplayedDelivery):
        check.verify(*sent[-1])
    clock[0] = NOW + 301  # every id's timestamp is now out of the window: they are dropped ...
    check.verify(*delivery(timestamp=clock[0]))
    assert len(check._seen) == 1
    with pytest.raises(StaleDelivery):  # ... and their replays are stale instead
        check.verify(*sent[-1])


# ------------------------------------------------------------------------------------------- payloads
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"action": "created"}', "entity"),
        (b'{"entity": "model_version_alias", "action": 3}', "action"),
        (b'{"entity": "model_version_alias", "action": "created", "data": []}', "data"),
        (b'{"entity": "model_version_alias", "action": "created", "data": {"alias": "a"}}', "data.name"),
        (b'{"entity": "model_version_alias", "action": "deleted", "data": {"name": "m", "alias": ""}}', "data.alias"),
        (
            b'{"entity": "model_version_alias", "action": "created", '
            b'"data": {"name": "m", "alias": "a", "version": [1]}}',
            "data.version",
        ),
    ],
)  # fmt: skip
def test_a_bad_payload_names_the_field(body: bytes, field: str) -> None:
    with pytest.raises(InvalidDelivery) as caught:
        parse_event(body)
    assert caught.value.details == {"field": field}
    assert field.split(".")[-1] in caught.value.message or field == "body"


def test_events_parse() -> None:
    assert parse_event(delivery()[1])[0] == "model_version_alias.created"
    deleted = delivery({"name": "m", "alias": "champion"}, event="model_version_alias.deleted")[1]
    assert parse_event(deleted) == ("model_version_alias.deleted", {"name": "m", "alias": "champion"})
    assert parse_event(delivery({}, event="registered_model.created")[1])[0] == "registered_model.created"


# --------------------------------------------------------------------------------------------- secrets
def test_the_secret_comes_from_the_setting_or_a_file(tmp_path: Path) -> None:
    assert read_secret(ReloadSettings()) is None
    assert read_secret(ReloadSettings(webhook_secret=SECRET)) == SECRET.encode()  # type: ignore[arg-type]
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    assert read_secret(ReloadSettings(webhook_secret_file=str(path))) == SECRET.encode()
    path.write_text("short\n")
    with pytest.raises(ConfigurationError, match="at least 16") as caught:
        read_secret(ReloadSettings(webhook_secret_file=str(path)))
    assert "short" not in caught.value.message
    with pytest.raises(ConfigurationError, match="cannot read it"):
        read_secret(ReloadSettings(webhook_secret_file=str(tmp_path / "missing")))


def test_bad_secrets_fail_start_up_without_quoting_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least 16") as caught:
        read_secret(ReloadSettings(webhook_secret="short-secret"))  # type: ignore[arg-type]
    assert "short-secret" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="not both") as caught:
        read_secret(ReloadSettings(webhook_secret=SECRET, webhook_secret_file="/x"))  # type: ignore[arg-type]
    assert SECRET not in str(caught.value)
    assert ReloadSettings(webhook_secret_file="/x").webhooks and not ReloadSettings().webhooks


@pytest.mark.asyncio
async def test_an_unreadable_secret_file_fails_start_up() -> None:
    settings = Settings(
        models=["m=models:/m@champion"],
        reload=ReloadSettings(poll_s=0, webhook_secret_file="/nonexistent/secret"),
    )
    app = create_app(settings, Metrics(process=False), FakeRegistry())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="FERRY_RELOAD__WEBHOOK_SECRET_FILE /nonexistent/secret"):
        async with app.router.lifespan_context(app):
            pass


# ------------------------------------------------------------------------------- the route, in process
class Served:
    def __init__(self, client: httpx.AsyncClient, registry: FakeRegistry, metrics: Metrics, app: Any):
        self.client, self.registry, self.metrics, self.app = client, registry, metrics, app

    def count(self, **labels: str) -> float:
        return sum(
            s.value
            for family in self.metrics.registry.collect()
            for s in family.samples
            if s.name == "ferry_webhooks_total" and all(s.labels.get(k) == v for k, v in labels.items())
        )

    async def post(self, headers: dict[str, str], body: bytes) -> httpx.Response:
        r = await self.client.post("/webhooks/mlflow", headers=headers, content=body)
        await self.app.state.webhooks.idle()  # the check the delivery started, if any, is over
        return r

    async def version(self) -> str:
        r = await self.client.post("/predict", json={"model": "m", "inputs": [[1.0, 1.0]]})
        assert r.status_code == 200, r.text
        return str(r.headers["X-Model-Version"])


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    registry = FakeRegistry(version="2")
    metrics = Metrics(process=False)
    settings = Settings(
        models=["m=models:/m@champion", "pinned=models:/m/2"],
        reload=ReloadSettings(poll_s=0, webhook_secret=SECRET),  # type: ignore[arg-type]
    )
    app = create_app(settings, metrics, registry)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        for _ in range(500):
            if app.state.pipeline.models.ready():
                break
            await asyncio.sleep(0.01)
        assert app.state.pipeline.models.ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferry") as client:
            yield Served(client, registry, metrics, app)


@pytest.mark.asyncio
async def test_the_route_is_off_without_a_secret() -> None:
    app = create_app(
        Settings(models=["m=models:/m@champion"], reload=ReloadSettings(poll_s=0)), Metrics(process=False)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ferry") as client:
        r = await client.post("/webhooks/mlflow", content=delivery()[1])
    assert r.status_code == 404


@pytest.mark.asyncio
async def test_a_signed_alias_move_swaps_the_model(served: Served) -> None:
    assert await served.version() == "2"
    served.registry.version = "3"  # the alias moved in the registry
    r = await served.post(*delivery(timestamp=_now()))
    assert r.status_code == 200 and r.json() == {
        "outcome": "accepted",
        "event": "model_version_alias.created",
        "models": ["m"],  # not "pinned": served from a version, not from the alias
    }
    assert await served.version() == "3"
    assert served.count(event="model_version_alias.created", outcome="accepted") == 1
    served.registry.version = "4"  # deleted: checked again as well (the registry answers what it has)
    r = await served.post(
        *delivery({"name": "m", "alias": "champion"}, event="model_version_alias.deleted", timestamp=_now())
    )
    assert r.json()["outcome"] == "accepted" and await served.version() == "4"


@pytest.mark.asyncio
async def test_refusals_change_nothing_and_say_why(served: Served) -> None:
    served.registry.version = "3"
    loads = len(served.registry.loads)
    wrong = await served.post(*delivery(secret="another-secret-0123456789", timestamp=_now()))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "bad_signature"
    assert "WWW-Authenticate" not in wrong.headers
    unsigned = await served.client.post("/webhooks/mlflow", content=delivery()[1])
    assert unsigned.status_code == 401 and "missing X-MLflow-Signature" in unsigned.text
    stale = await served.post(*delivery(timestamp=_now() - 3600))
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "stale_delivery"
    headers, body = delivery({"name": "m"}, timestamp=_now())
    bad = await served.post(headers, body)
    assert bad.status_code == 400 and bad.json()["error"]["details"] == {"field": "data.alias"}
    assert len(served.registry.loads) == loads and await served.version() == "2"
    assert served.count(outcome="bad_signature") == 2
    assert served.count(outcome="stale") == 1 and served.count(outcome="invalid") == 1
    good = delivery(timestamp=_now())
    assert (await served.post(*good)).status_code == 200
    replay = await served.post(*good)
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "replayed_delivery"
    assert served.count(outcome="replayed") == 1


@pytest.mark.asyncio
async def test_events_for_what_ferry_does_not_serve_are_ignored(served: Served) -> None:
    served.registry.version = "3"
    for data, event in [
        ({"name": "other", "alias": "champion", "version": "1"}, "model_version_alias.created"),
        ({"name": "m", "alias": "challenger", "version": "3"}, "model_version_alias.created"),
        ({"name": "m", "version": "3"}, "model_version.created"),
    ]:
        r = await served.post(*delivery(data, event=event, timestamp=_now()))
        assert r.status_code == 200 and r.json()["outcome"] == "ignored", r.text
    assert await served.version() == "2"
    assert served.count(event="model_version_alias.created", outcome="ignored") == 2
    assert served.count(event="other", outcome="ignored") == 1


def _now() -> float:
    return time.time()


class AliasRegistry(FakeRegistry):
    """``FakeRegistry`` whose aliases point at versions of their own (``aliases``)."""

    def __init__(self, aliases: dict[str, str]) -> None:
        super().__init__()
        self.aliases = aliases

    def resolve(self, uri: str) -> ModelRef:
        base, _, alias = uri.partition("@")
        version = self.aliases[alias]
        source = f"{base}/{version}"
        return ModelRef(uri=uri, alias=alias, version=version, download_uri=source, source=source)


@pytest.mark.asyncio
async def test_a_challenger_alias_move_is_followed_as_a_poll_follows_it() -> None:
    registry = AliasRegistry({"champion": "2", "challenger": "3"})
    settings = Settings(
        models=["m=models:/m@champion"],
        reload=ReloadSettings(poll_s=0, webhook_secret=SECRET),  # type: ignore[arg-type]
        challenger={"mode": "shadow"},  # type: ignore[arg-type]
    )
    app = create_app(settings, Metrics(process=False), registry)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        models = app.state.pipeline.models

        def challenger() -> str | None:
            version = models.challenger("m")
            return None if version is None else str(version.version)

        for _ in range(500):
            if models.ready() and challenger() is not None:
                break
            await asyncio.sleep(0.01)
        assert challenger() == "3"
        registry.aliases["challenger"] = "4"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f") as client:
            data = {"name": "m", "alias": "challenger", "version": "4"}
            headers, body = delivery(data, timestamp=_now())
            r = await client.post("/webhooks/mlflow", headers=headers, content=body)
            await app.state.webhooks.idle()
        assert r.status_code == 200 and r.json()["models"] == ["m"], r.text
        assert challenger() == "4" and models.active("m").version == "2"


@pytest.mark.asyncio
async def test_the_route_takes_no_api_key_its_signature_is_the_authentication() -> None:
    settings = Settings(
        models=["m=models:/m@champion"],
        api_keys="inference-key",  # type: ignore[arg-type]
        reload=ReloadSettings(poll_s=0, webhook_secret=SECRET),  # type: ignore[arg-type]
    )
    app = create_app(settings, Metrics(process=False), FakeRegistry())  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://f") as client,
    ):
        assert (await client.post("/predict", json={"inputs": [[1.0, 1.0]]})).status_code == 401
        headers, body = delivery({"name": "other", "alias": "champion"}, timestamp=_now())
        r = await client.post("/webhooks/mlflow", headers=headers, content=body)
        assert r.status_code == 200 and r.json()["outcome"] == "ignored", r.text
        r = await client.post(
            "/webhooks/mlflow", headers={"Authorization": "Bearer inference-key"}, content=body
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"


async def until(condition: Any, what: str) -> None:
    """Until ``condition()`` holds; fails after 10 s of event-loop turns rather than hanging."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def deliver(served: Served) -> str:
    """A signed move of m@champion, without waiting for the check it starts; its outcome."""
    headers, body = delivery(timestamp=_now())
    r = await served.client.post("/webhooks/mlflow", headers=headers, content=body)
    assert r.status_code == 200, r.text
    return str(r.json()["outcome"])


@pytest.mark.asyncio
async def test_deliveries_during_a_check_are_not_lost(served: Served) -> None:
    """A move while the check of the previous one is loading runs the check once more after it."""
    served.registry.gate.clear()  # loads wait
    served.registry.version = "3"
    assert await deliver(served) == "accepted"
    await until(lambda: served.registry.loads[-1] == ("m", "3"), "the check loads v3")
    served.registry.version = "4"
    assert await deliver(served) == "accepted"
    served.registry.gate.set()
    await served.app.state.webhooks.idle()
    assert await served.version() == "4"
    assert [v for name, v in served.registry.loads if name == "m"][-2:] == ["3", "4"]


@pytest.mark.asyncio
async def test_a_load_in_progress_is_waited_for_then_the_alias_looked_up_again(served: Served) -> None:
    """A delivery that finds another load of the model running (the admin API's, here) does not skip
    it, as a poll does: it waits, then checks the alias again."""
    models = served.app.state.pipeline.models
    served.registry.gate.clear()
    served.registry.version = "3"
    admin = asyncio.create_task(models.load("m", reason="admin"))
    await until(lambda: served.registry.loads[-1] == ("m", "3"), "the admin load of v3")
    served.registry.version = "4"
    assert await deliver(served) == "accepted"
    served.registry.gate.set()
    await admin
    await served.app.state.webhooks.idle()
    assert await served.version() == "4"
