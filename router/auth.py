"""Who is calling the router: API keys and admin keys, parsed the same way over HTTP and gRPC.

Owns `identify(config, authorization)`: the `Authorization` header (HTTP) or `authorization`
metadata (gRPC), always `Bearer <key>` (scheme case-insensitive), checked against every
configured key in constant time (`hmac.compare_digest` on each, no early exit). The answer
is a `Caller`:
- `owner`: the fingerprint of the key used (never the key itself). A request belongs to the
  key that started it: only that key, or an admin key, may abort it (`may_abort`).
- `admin`: the key is one of `admin_key_list`. Admin keys are separate from client keys;
  they open what changes the cluster (RegisterWorker / DeregisterWorker) and, with
  `protect_admin_endpoints`, the operator pages (/metrics, /workers, /docs). An admin key
  is also accepted wherever a client key is.

With no keys configured at all the router is open, as it always was: every caller is the
anonymous owner "" and may register workers. With client keys but no admin keys, nobody may
register or deregister workers over the API (a client key never stands in for an admin key).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from baton.protos.errors import BatonError, ErrorCode


@dataclass(frozen=True)
class Caller:
    """An authenticated (or, on an open router, anonymous) caller."""

    owner: str
    """Fingerprint of the key ("" when the router has no keys)."""
    admin: bool
    """True when the key is an admin key (or the router is open)."""

    def may_abort(self, request_owner: str) -> bool:
        """True when this caller may abort a request started by `request_owner`."""
        return self.admin or self.owner == request_owner


def parse_bearer(authorization: Optional[str]) -> Optional[str]:
    """The key of an `Authorization: Bearer <key>` value (None when absent or another scheme)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _matches(token: bytes, keys: Sequence[str]) -> bool:
    found = False
    for key in keys:  # every key is compared: the time does not say which one (or how many) matched
        found |= hmac.compare_digest(token, key.encode())
    return found


def fingerprint(key: str) -> str:
    """A stable, non-reversible name for a key (what requests record as their owner)."""
    return hashlib.sha256(b"baton key owner\0" + key.encode()).hexdigest()[:16]


class AuthError(BatonError):
    """UNAUTHENTICATED, with the OpenAI error code the HTTP gateway sends (`reason`)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(ErrorCode.UNAUTHENTICATED, message)
        self.reason = reason
        """missing_api_key, invalid_api_key or admin_key_required."""


def identify(config: Any, authorization: Optional[str], *, admin: bool = False) -> Caller:
    """The caller behind `authorization` (an HTTP header or gRPC metadata value); AuthError
    (UNAUTHENTICATED) when a key is needed and missing or wrong. `admin`: the call needs an
    admin key (see the module doc for an open router)."""
    client_keys = tuple(getattr(config, "api_key_list", ()))
    admin_keys = tuple(getattr(config, "admin_key_list", ()))
    if not client_keys and not admin_keys:
        return Caller(owner="", admin=True)
    token = parse_bearer(authorization)
    raw = token.encode() if token is not None else b""
    is_admin = token is not None and _matches(raw, admin_keys)
    if admin:
        if is_admin:
            return Caller(owner=fingerprint(token), admin=True)
        if not authorization:
            raise AuthError("This operation needs an admin key. Send it as 'Authorization: Bearer <key>'.",
                            "missing_api_key")
        raise AuthError("This operation needs an admin key (--admin-api-keys-file); client API keys do not open it.",
                        "admin_key_required")
    if is_admin:
        return Caller(owner=fingerprint(token), admin=True)
    if not client_keys:  # admin keys only: the client API stays open
        return Caller(owner="", admin=False)
    if not authorization:
        raise AuthError("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", "missing_api_key")
    if token is None or not _matches(raw, client_keys):
        raise AuthError("Incorrect API key provided.", "invalid_api_key")
    return Caller(owner=fingerprint(token), admin=False)
