"""Credentials: API keys for the inference routes, the bearer token of the admin API.

Keys are kept only as SHA-256 digests and compared in constant time against every configured key.
A refusal says the same thing whatever was wrong (missing, malformed or unknown), and never echoes
what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from fastapi import Request
from pydantic import SecretStr

from service.errors import Unauthorized


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyRing:
    """The accepted credentials, as digests."""

    def __init__(self, secrets: SecretStr | None, *, allow_api_key_header: bool = True) -> None:
        raw = secrets.get_secret_value() if secrets is not None else ""
        self._digests = [digest(part.strip()) for part in raw.split(",") if part.strip()]
        self._header = allow_api_key_header

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, request: Request) -> None:
        """Raise ``Unauthorized`` unless the request carries one of the keys."""
        self.check_headers(request.headers)

    def check_headers(self, headers: Mapping[str, str]) -> None:
        """``check`` on headers with lower-case names (HTTP's, or a gRPC call's metadata)."""
        presented = self._presented(headers)
        ok = False
        if presented is not None:
            candidate = digest(presented)
            for known in self._digests:  # no early exit: the time does not depend on which key matched
                ok |= hmac.compare_digest(candidate, known)
        if not ok:
            raise Unauthorized("missing or invalid credentials")

    def _presented(self, headers: Mapping[str, str]) -> str | None:
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if self._header:
            return headers.get("x-api-key") or None
        return None
