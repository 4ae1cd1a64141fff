"""API keys: made once, shown once, stored as a hash, checked in constant time.

A user's key is `<user_id>.<secret>`: the user id says whose record to read (one lookup, no
scan), the secret (32 random bytes, URL-safe base64) is what proves it. Only
`sha256:<hex of the whole key>` is stored. A salted slow hash (argon2) protects guessable
passwords; a 256-bit random secret cannot be guessed, so a fast hash is the right tool here and
keeps every request cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from helpers.domain.records import check_id

_SCHEME = "sha256:"
#: Compared against when the user does not exist, so that case takes the same time.
_NO_USER = _SCHEME + "0" * 64


def new_key(user_id: str) -> str:
    """A fresh key for `user_id` (hand it to the user once; store `hash_key` of it)."""
    check_id("user_id", user_id)
    return f"{user_id}.{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return _SCHEME + hashlib.sha256(key.encode()).hexdigest()


def key_user(key: str) -> str | None:
    """The user id a key claims, or None when it is not shaped like a key."""
    user_id, dot, secret = key.partition(".")
    if not dot or len(secret) < 32 or len(key) > 200:
        return None
    try:
        return check_id("user_id", user_id)
    except ValueError:
        return None


def key_matches(key: str, stored_hash: str | None) -> bool:
    """Whether `key` hashes to `stored_hash` (constant time; False when there is none)."""
    return hmac.compare_digest(hash_key(key), stored_hash or _NO_USER) and stored_hash is not None
