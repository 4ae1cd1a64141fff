"""API keys: made once, shown once, stored as a hash, checked in constant time.

A user's key is `<user_id>.<secret>`: the user id says whose record to read (one lookup, no
scan), the secret (32 random bytes, URL-safe base64) is what proves it. Only
`sha256:<hex of the whole key>` is stored. A salted slow hash (argon2) protects guessable
passwords; a 256-bit random secret cannot be guessed, so a fast hash is the right tool here and
keeps every request cheap.

The operator's admin key (the one that creates users) lives in `<work_dir>/admin.key`, made
once with mode 0600 and reused after, or in `$WORKSHOP_ADMIN_KEY`: it is never printed or
passed as a notebook parameter, where executed copies would keep it. Show keys with `mask_key`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from helpers.domain.records import check_id

_SCHEME = "sha256:"
#: Compared against when the user does not exist, so that case takes the same time.
_NO_USER = _SCHEME + "0" * 64
#: The operator's admin key, when it is set in the environment rather than in the file.
ADMIN_KEY_ENV = "WORKSHOP_ADMIN_KEY"
#: The admin key's file, under the work dir.
ADMIN_KEY_FILE = "admin.key"


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


def mask_key(key: str) -> str:
    """`key` as it may be shown: a user key's user and 4 characters of its secret, `ada.Xy3k…`;
    4 characters of any other key."""
    user_id, dot, secret = key.partition(".")
    return f"{user_id}.{secret[:4]}…" if dot else f"{key[:4]}…"


def admin_key_path(work_dir: str | os.PathLike) -> Path:
    """`<work_dir>/admin.key`, where the operator's admin key lives."""
    return Path(work_dir).expanduser() / ADMIN_KEY_FILE


def load_admin_key(work_dir: str | os.PathLike, create: bool = True) -> tuple[str, str]:
    """The operator's admin key and where it is: `$WORKSHOP_ADMIN_KEY` when set, else the
    file `admin_key_path(work_dir)`, which is made (a random key, mode 0600) when missing and
    `create`, and reused after.

    Raises:
        FileNotFoundError: when there is no file and `create` is False, saying where to put it.
        PermissionError: when others than its owner may read or write the file.
        ValueError: when the file is empty.
    """
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV], f"${ADMIN_KEY_ENV}"
    path = admin_key_path(work_dir)
    if create and not path.exists():
        _write_new_key(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no admin key: write the key the API was deployed with to {path} (chmod 600) or "
            f"set ${ADMIN_KEY_ENV}"
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{path} is open to other users (mode {mode:o}): chmod 600 it, or delete it to "
            "make a new admin key"
        )
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"{path} is empty: delete it to make a new admin key")
    return key, str(path)


def _write_new_key(path: Path) -> None:
    """A new random key at `path`, mode 0600 from its first byte; of two processes making it
    at once, the first one's stays (the file appears whole, through a hard link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
        with contextlib.suppress(FileExistsError):  # another process made it first: keep it
            os.link(temp, path)
    finally:
        temp.unlink()


def key_matches(key: str, stored_hash: str | None) -> bool:
    """Whether `key` hashes to `stored_hash` (constant time; False when there is none)."""
    return hmac.compare_digest(hash_key(key), stored_hash or _NO_USER) and stored_hash is not None
