"""Push reloads: MLflow registry webhooks that make the reloader check a model at once.

MLflow 3's tracking server (SQL backend) POSTs a JSON delivery to each webhook subscribed to an event,
``{"entity", "action", "timestamp", "data"}``, with the headers ``X-MLflow-Delivery-Id`` (a UUID),
``X-MLflow-Timestamp`` (Unix seconds) and, when the webhook has a secret, ``X-MLflow-Signature``:
``v1,`` and the base64 HMAC-SHA256, under the secret, of ``DELIVERY_ID.TIMESTAMP.BODY``. Ferry accepts
``model_version_alias.created`` (``data``: ``name``, ``alias``, ``version``) and
``model_version_alias.deleted`` (``name``, ``alias``).

A delivery is refused unless its signature verifies under ``FERRY_RELOAD__WEBHOOK_SECRET`` (compared in
constant time), its timestamp is within ``FERRY_RELOAD__WEBHOOK_MAX_AGE_S`` of Ferry's clock, and its
delivery id was not accepted before (the last ``REMEMBERED`` ids are kept, each until its timestamp is
out of the window). An accepted event for a served ``models:/NAME@ALIAS`` (or the challenger alias
beside one) runs what a poll runs for that model in the background, ``Reloader.check`` and then
``ModelSet.follow_challenger``; the answer does not wait for it. Events for anything else are answered
200 and counted as ignored. ``ferry_webhooks_total`` counts every delivery
by event and outcome.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar

import orjson

from service.config import ReloadSettings
from service.errors import BadRequest, ConfigurationError, FerryError
from service.lifecycle import ModelSet, ModelSlot
from service.metrics import Metrics
from service.reloader import Reloader

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_VERSION = "v1"
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
"""The events that re-check a model; any other authenticated event is ``other`` and ignored."""
OUTCOMES = ("accepted", "ignored", "bad_signature", "stale", "replayed", "invalid")
REMEMBERED = 10_000
"""Delivery ids kept to refuse replays (bounded memory: about 1 MiB)."""
MIN_SECRET_BYTES = 16
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


class WebhookError(FerryError):
    """A delivery refused; ``outcome`` is its ``ferry_webhooks_total`` label."""

    outcome: ClassVar[str] = "invalid"


class BadSignature(WebhookError):
    status = HTTPStatus.UNAUTHORIZED
    code = "bad_signature"
    outcome = "bad_signature"


class StaleDelivery(WebhookError):
    status = HTTPStatus.UNAUTHORIZED
    code = "stale_delivery"
    outcome = "stale"


class ReplayedDelivery(WebhookError):
    status = HTTPStatus.CONFLICT
    code = "replayed_delivery"
    outcome = "replayed"


class InvalidDelivery(WebhookError, BadRequest):
    status = HTTPStatus.BAD_REQUEST
    code = "bad_request"
    outcome = "invalid"


def read_secret(reload: ReloadSettings) -> bytes | None:
    """The webhook secret, from ``webhook_secret`` or the file ``webhook_secret_file`` (one trailing
    newline dropped); ``None`` when neither is set (the route is off). ``ConfigurationError``, never
    quoting the secret, when the file cannot be read or holds too short a secret."""
    if reload.webhook_secret is not None and reload.webhook_secret_file is not None:
        raise ConfigurationError(
            "set FERRY_RELOAD__WEBHOOK_SECRET or FERRY_RELOAD__WEBHOOK_SECRET_FILE, not both"
        )
    if reload.webhook_secret is not None:
        secret, where = reload.webhook_secret.get_secret_value().encode(), "FERRY_RELOAD__WEBHOOK_SECRET"
    elif reload.webhook_secret_file is None:
        return None
    else:
        path = reload.webhook_secret_file
        where = f"FERRY_RELOAD__WEBHOOK_SECRET_FILE {path}"
        try:
            with open(path, "rb") as file:
                secret = file.read().removesuffix(b"\n").removesuffix(b"\r")
        except OSError as exc:
            raise ConfigurationError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"{where}: the secret must be at least {MIN_SECRET_BYTES} bytes (e.g. openssl rand -hex 32)"
        )
    return secret


def sign(secret: bytes, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


class Verifier:
    """Checks a delivery's signature, age and novelty (``verify``)."""

    def __init__(
        self,
        secret: bytes,
        max_age_s: float = 300.0,
        remembered: int = REMEMBERED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret, self._max_age_s, self._remembered, self._clock = secret, max_age_s, remembered, clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        """Accepted delivery ids, oldest first, with the time after which their timestamp is stale."""

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """The delivery id of an authentic, fresh, first delivery; else ``BadSignature`` (missing or
        wrong signature: another secret, a changed body or headers), ``StaleDelivery`` (timestamp out of
        the window) or ``ReplayedDelivery`` (an id accepted before). The signature is checked first, so
        nothing else is said about a delivery that is not authentic."""
        lowered = {key.lower(): value for key, value in headers.items()}
        given = lowered.get(SIGNATURE_HEADER.lower(), "")
        delivery_id = lowered.get(DELIVERY_HEADER.lower(), "")
        timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
        needed = ((SIGNATURE_HEADER, given), (DELIVERY_HEADER, delivery_id), (TIMESTAMP_HEADER, timestamp))
        missing = [name for name, value in needed if not value]
        if missing:
            raise BadSignature(
                f"missing {', '.join(missing)}: give the MLflow webhook the secret of "
                "FERRY_RELOAD__WEBHOOK_SECRET (MlflowClient().create_webhook(..., secret=...))"
            )
        expected = sign(self._secret, delivery_id, timestamp, body).encode()
        matched = False
        for candidate in given.split():  # Standard Webhooks allows several, space-separated
            matched |= hmac.compare_digest(candidate.encode(errors="replace"), expected)
        if not matched:
            raise BadSignature(
                f"{SIGNATURE_HEADER} does not verify: the webhook's secret is not "
                "FERRY_RELOAD__WEBHOOK_SECRET, or the body or headers were changed"
            )
        try:
            sent = int(timestamp)
        except ValueError:
            raise InvalidDelivery(
                f"{TIMESTAMP_HEADER} must be Unix seconds, not {timestamp[:40]!r}", field=TIMESTAMP_HEADER
            ) from None
        now = self._clock()
        if abs(now - sent) > self._max_age_s:
            raise StaleDelivery(
                f"{TIMESTAMP_HEADER} is {now - sent:.0f} s from Ferry's clock; deliveries more than "
                f"{self._max_age_s:g} s away (FERRY_RELOAD__WEBHOOK_MAX_AGE_S) are refused"
            )
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if delivery_id in self._seen:
            raise ReplayedDelivery(f"{DELIVERY_HEADER} {delivery_id[:64]!r} was accepted before")
        self._seen[delivery_id] = sent + self._max_age_s
        while len(self._seen) > self._remembered:
            self._seen.popitem(last=False)
        return delivery_id


def parse_event(body: bytes) -> tuple[str, dict[str, Any]]:
    """``(event, data)`` of a delivery's JSON body; ``InvalidDelivery`` naming the field that is wrong.
    The alias events must name a model and an alias."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidDelivery(f"the body is not JSON: {exc}", field="body") from None
    if not isinstance(payload, dict):
        raise InvalidDelivery("the body must be a JSON object", field="body")
    for field in ("entity", "action"):
        if not isinstance(payload.get(field), str) or not payload[field]:
            raise InvalidDelivery(f"'{field}' must be a non-empty string", field=field)
    event = f"{payload['entity']}.{payload['action']}"
    data = payload.get("data")
    if event not in ALIAS_EVENTS:
        return event, data if isinstance(data, dict) else {}
    if not isinstance(data, dict):
        raise InvalidDelivery(f"'data' of {event} must be an object", field="data")
    for field in ("name", "alias"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise InvalidDelivery(
                f"'data.{field}' of {event} must be a non-empty string", field=f"data.{field}"
            )
    if "version" in data and not isinstance(data["version"], str | int):
        raise InvalidDelivery(f"'data.version' of {event} must be a string", field="data.version")
    return event, data


def follows(models: ModelSet, slot: ModelSlot, name: str, alias: str) -> bool:
    """Whether ``slot`` is served from ``models:/name@alias``, or takes its challenger from there."""
    match = _ALIAS_URI.match(slot.spec.uri)
    if match is not None and match["name"] == name and match["alias"] == alias:
        return True
    return models.challenger_uri(slot.spec) == f"models:/{name}@{alias}"


class WebhookReceiver:
    """Verifies deliveries and re-checks the models they name, at most one check per model at a time
    (deliveries that arrive during one make it run once more after)."""

    def __init__(self, verifier: Verifier, models: ModelSet, reloader: Reloader, metrics: Metrics) -> None:
        self._verifier, self._models, self._reloader, self._metrics = verifier, models, reloader, metrics
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    def receive(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Handle one delivery; its answer (``outcome``, and the models re-checked or why none) or a
        ``WebhookError``. Returns before any model is checked."""
        event = "unknown"
        try:
            delivery_id = self._verifier.verify(headers, body)
            event, data = parse_event(body)
        except WebhookError as exc:
            self._count(event, exc.outcome)
            log.warning("webhook refused (%s): %s", exc.outcome, exc.message)
            raise
        if event not in ALIAS_EVENTS:
            self._count(event, "ignored")
            log.info(
                "webhook %s: event %s ignored (only %s re-check models)", delivery_id, event, ALIAS_EVENTS
            )
            return {"outcome": "ignored", "event": event, "reason": "not an alias event"}
        name, alias = data["name"], data["alias"]
        slots = [slot for slot in self._models.slots() if follows(self._models, slot, name, alias)]
        if not slots:
            self._count(event, "ignored")
            log.info(
                "webhook %s: %s of %s@%s ignored: no model served from it", delivery_id, event, name, alias
            )
            return {
                "outcome": "ignored",
                "event": event,
                "reason": f"no model is served from models:/{name}@{alias}",
            }
        names = [slot.name for slot in slots]
        for slot in slots:
            self._recheck(slot)
        self._count(event, "accepted")
        log.info(
            "webhook %s: %s of %s@%s (version %s); checking %s now",
            delivery_id,
            event,
            name,
            alias,
            data.get("version", "-"),
            ", ".join(names),
        )
        return {"outcome": "accepted", "event": event, "models": names}

    async def close(self) -> None:
        """Cancel the checks in progress (at shutdown)."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def idle(self) -> None:
        """Until no check started by a delivery is running (for tests)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def _count(self, event: str, outcome: str) -> None:
        label = event if event in ALIAS_EVENTS or event == "unknown" else "other"
        self._metrics.webhooks.labels(label, outcome).inc()

    def _recheck(self, slot: ModelSlot) -> None:
        if slot.name in self._running:
            self._again.add(slot.name)
            return
        task = asyncio.create_task(self._follow(slot), name=f"webhook-check-{slot.name}")
        self._running[slot.name] = task

    async def _follow(self, slot: ModelSlot) -> None:
        """What a poll does for this model: ``Reloader.check`` until a check ran to its end (a load in
        progress, which may be of the version before the move, is waited for, then the alias is looked
        up again), then, with challenger traffic on, ``ModelSet.follow_challenger``."""
        try:
            await self._follow_until_done(slot)
        finally:  # no await between the last look at ``_again`` and this: no delivery is lost
            self._running.pop(slot.name, None)

    async def _follow_until_done(self, slot: ModelSlot) -> None:
        while not self._models.shutting_down:
            self._again.discard(slot.name)
            try:
                result = await self._reloader.check(slot)
            except Exception:
                log.exception("model %s: alias check after a webhook failed; polling goes on", slot.name)
                return
            if result == "loading":
                pending = slot.loading
                if pending is not None and not pending.task.done():
                    await asyncio.wait([pending.task])
                else:
                    await asyncio.sleep(0.05)
                continue
            log.debug("model %s: check after a webhook: %s", slot.name, result)
            if self._models.challenger_uri(slot.spec) is not None:
                try:  # after the champion, as a poll does: a challenger is kept only beside one
                    await self._models.follow_challenger(slot.name)
                except Exception:
                    log.exception("model %s: challenger check after a webhook failed", slot.name)
            if slot.name not in self._again:
                return
