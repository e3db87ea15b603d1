"""API keys -> tenants. Only sha256 digests of the keys are kept; lookups compare in constant time."""
from __future__ import annotations

import hashlib
import hmac
import logging

log = logging.getLogger("openlora.api")
OPEN_TENANT = "default"


class AuthError(Exception):
    """No key, or a key that maps to no tenant (HTTP 401)."""


class ApiKeys:
    def __init__(self, keys: dict[str, str]):
        self._digests = [(hashlib.sha256(k.encode()).digest(), tenant) for k, tenant in keys.items()]
        self.open = not self._digests

    def log_mode(self, what: str) -> None:
        if self.open:
            log.warning("%s: no API keys configured (OPENLORA_API_KEYS): OPEN single-tenant mode, every request "
                        "is tenant %r", what, OPEN_TENANT)
        else:
            log.info("%s: %d API keys configured, %d tenants", what, len(self._digests),
                     len({t for _, t in self._digests}))

    def tenant(self, key: str | None) -> str:
        """The tenant of ``key``; raises AuthError. In open mode every caller is tenant ``default``."""
        if self.open:
            return OPEN_TENANT
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for d, tenant in self._digests:          # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(d, digest):
                found = tenant
        if found is None:
            raise AuthError("invalid API key")
        return found


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else authorization.strip()
