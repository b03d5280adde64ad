"""Staff logins for the dashboard's review queue: a users file of salted scrypt hashes, HTTP Basic checks.

The file is JSON, ``{"users": {"<name>": {"salt": hex, "hash": hex, "n": N, "r": r, "p": p}}}``, written
atomically by ``storelens dashboard add-staff``. Passwords never leave this module in clear; a decision
is stored with the login name that made it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import threading
from pathlib import Path

from storelens.fsutil import atomic_write_bytes

# scrypt cost: n=2**14, r=8 uses 16 MiB and ~50 ms per check; a brute force of a leaked file pays the same.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
SALT_BYTES = 16
MIN_PASSWORD_CHARS = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CACHE_MAX = 64  # verified (name, password digest) pairs: page loads fetch many crops, each authenticated


class StaffError(Exception):
    """A users file that cannot be read or written, or a bad name/password (names the problem)."""


def check_name(name: str) -> str:
    """A staff login name: letters, digits, '.', '_', '-' (it is stored in every decision)."""
    if not _NAME.match(name):
        raise StaffError(f"staff name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def _hash(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 << 20, dklen=32)


def _read(path: Path) -> dict[str, dict[str, object]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StaffError(f"staff users file {path} is unreadable: {exc}") from exc
    users = raw.get("users") if isinstance(raw, dict) else None
    if not isinstance(users, dict):
        raise StaffError(f"staff users file {path} has no 'users' object")
    return {str(k): v for k, v in users.items() if isinstance(v, dict)}


def add_user(path: Path, name: str, password: str) -> bool:
    """Add ``name`` (or replace its password) in the users file; True when the name is new."""
    check_name(name)
    if len(password) < MIN_PASSWORD_CHARS:
        raise StaffError(f"password too short: at least {MIN_PASSWORD_CHARS} characters")
    users = _read(path)
    salt = os.urandom(SALT_BYTES)
    new = name not in users
    users[name] = {"salt": salt.hex(), "hash": _hash(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P).hex(),
                   "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps({"users": users}, indent=1, sort_keys=True) + "\n").encode())
    os.chmod(path, 0o600)
    return new


class StaffUsers:
    """The logins of one users file, read once; ``check_basic`` answers an Authorization header."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StaffError(f"staff users file {path} does not exist; add a login with "
                             "`storelens dashboard add-staff --users FILE --name NAME`")  # fmt: skip
        self._users = _read(self.path)
        if not self._users:
            raise StaffError(f"staff users file {path} has no users")
        self._ok: dict[tuple[str, bytes], None] = {}
        self._lock = threading.Lock()

    def verify(self, name: str, password: str) -> bool:
        """True when ``password`` is ``name``'s (constant-time compare; unknown names cost the same)."""
        key = (name, hashlib.sha256(password.encode()).digest())
        with self._lock:
            if key in self._ok:
                return True
        entry = self._users.get(name)
        try:
            salt = bytes.fromhex(str(entry["salt"])) if entry else b"\0" * SALT_BYTES
            want = bytes.fromhex(str(entry["hash"])) if entry else b""
            n, r, p = ((int(str(entry[k])) for k in ("n", "r", "p")) if entry
                       else (SCRYPT_N, SCRYPT_R, SCRYPT_P))  # fmt: skip
            got = _hash(password, salt, n, r, p)
        except (KeyError, ValueError) as exc:
            raise StaffError(f"staff users file {self.path}: bad entry for {name!r}") from exc
        ok = entry is not None and hmac.compare_digest(got, want)
        if ok:
            with self._lock:
                if len(self._ok) >= _CACHE_MAX:
                    self._ok.clear()
                self._ok[key] = None
        return ok

    def check_basic(self, header: str | None) -> str | None:
        """The staff name an ``Authorization: Basic ...`` header proves, or None."""
        if not header or not header.startswith("Basic "):
            return None
        try:
            name, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            return None
        if not sep or not _NAME.match(name):
            return None
        return name if self.verify(name, password) else None
