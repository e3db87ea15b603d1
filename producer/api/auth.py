"""API keys -> tenants. Only sha256 digests of the keys are kept; lookups compare in constant time.

A key file may hold the digests themselves (``{"sha256:<hex>": "tenant"}``), so that no plaintext
key needs to sit on the server's disk. Uvicorn's logs get ``api_key=`` query values redacted.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re

log = logging.getLogger("openlora.api")
OPEN_TENANT = "default"
DIGEST_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_SECRET_IN_TEXT = re.compile(r"(?i)(api[_-]?key=)[^&\s\"']+")
REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error")


def key_digest(key: str) -> str:
    """``sha256:<hex>`` of a plaintext key; a digest in that form is returned as it is."""
    if _DIGEST_RE.match(key):
        return key
    return DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


class AuthError(Exception):
    """No key, or a key that maps to no tenant (HTTP 401)."""


class ApiKeys:
    def __init__(self, keys: dict[str, str]):
        """``keys``: plaintext key or ``sha256:<hex>`` digest -> tenant; only digests are kept."""
        self._digests = [(bytes.fromhex(key_digest(k).removeprefix(DIGEST_PREFIX)), tenant)
                         for k, tenant in keys.items()]
        self.open = not self._digests

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"

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


def redact(value):
    return _SECRET_IN_TEXT.sub(r"\1<redacted>", value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """Blanks ``api_key=...`` in log records (uvicorn logs request paths with their query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) for a in record.args)
        return True


def install_log_redaction() -> None:
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
