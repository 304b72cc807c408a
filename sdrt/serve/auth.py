"""Authentication: HTTP Basic from ``--api-auth USER:PASS[,USER2:PASS2]`` (what ``webuiapi.set_auth``
sends, as A1111's ``--api-auth``) and ``Authorization: Bearer`` tokens from ``--token-file`` (one per
line; what the ``openai`` client sends as ``api_key``). Comparisons are constant-time (hmac.compare_digest)."""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path

from sdrt.errors import InputError


def parse_api_auth(text: str | None) -> dict[str, str]:
    """'user:pass,user2:pass2' -> {user: pass}; InputError naming the bad entry."""
    users: dict[str, str] = {}
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise InputError(f"--api-auth entries must be USER:PASS, got {entry.split(':')[0]!r}:...")
        users[user] = password
    if text is not None and not users:
        raise InputError("--api-auth is empty; give USER:PASS[,USER2:PASS2]")
    return users


def read_token_file(path: str | None) -> tuple[str, ...]:
    """Tokens from a file, one per line (blank lines and '#' comments skipped)."""
    if path is None:
        return ()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InputError(f"--token-file {path} cannot be read: {exc.strerror or exc}") from None
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not tokens:
        raise InputError(f"--token-file {path} holds no token")
    return tokens


class Authenticator:
    def __init__(self, users: dict[str, str], tokens: tuple[str, ...]):
        self.users = [(u.encode(), p.encode()) for u, p in users.items()]
        self.tokens = [t.encode() for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.tokens)

    def allows(self, header: bytes | None) -> bool:
        if not self.enabled:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(b" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == b"basic" and self.users:
            try:
                user, sep, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            ok = False
            for known_user, known_password in self.users:  # no early exit: the time does not depend on which
                ok |= hmac.compare_digest(user, known_user) & hmac.compare_digest(password, known_password)
            return ok and bool(sep)
        if scheme == b"bearer" and self.tokens:
            ok = False
            for token in self.tokens:
                ok |= hmac.compare_digest(value, token)
            return ok
        return False

    def challenges(self) -> list[tuple[bytes, bytes]]:
        out = []
        if self.users:
            out.append((b"www-authenticate", b'Basic realm="sdrt"'))
        if self.tokens:
            out.append((b"www-authenticate", b'Bearer realm="sdrt"'))
        return out
