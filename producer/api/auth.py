"""API keys: `dbk_<id>_<secret>`, made by `docbatch api-key create`, shown once, kept as the secret's sha256.

The secret is 32 random bytes, so a plain sha256 is as good as a slow password hash (there is nothing to guess
from), and a request costs one primary-key read. A missing, malformed, unknown or revoked key is 401.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Depends, Request

from producer.api.context import ApiContext, context
from producer.api.errors import ApiError

PREFIX = "dbk"


@dataclass(frozen=True)
class NewKey:
    key_id: str
    secret_sha256: str
    token: str  # what the client sends; shown once


def new_key() -> NewKey:
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return NewKey(key_id, secret_hash(secret), f"{PREFIX}_{key_id}_{secret}")


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def caller(request: Request, ctx: ApiContext = Depends(context)) -> str:
    """FastAPI dependency: the id of the key the request carries, or 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("You didn't provide an API key. Provide it in an Authorization header: "
                            "Authorization: Bearer <key> (keys come from `docbatch api-key create NAME`).")
    prefix, _, rest = token.strip().partition("_")
    key_id, _, secret = rest.partition("_")
    key = ctx.store.get_api_key(key_id) if prefix == PREFIX and key_id and secret else None
    if key is None or key.revoked_at is not None or not hmac.compare_digest(key.secret_sha256, secret_hash(secret)):
        raise _unauthorized("Incorrect API key provided.")
    return key.id
