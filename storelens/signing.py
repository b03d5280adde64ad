"""Ed25519 keys and detached signatures over exact manifest bytes (shared by cloud and device)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from storelens.fsutil import atomic_write_bytes

SIGNATURE_BYTES = 64


class SigningKeyError(Exception):
    """A key file is missing, unreadable or not an Ed25519 key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: first 16 hex chars of sha256 over its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Create an Ed25519 key pair as PEM files (private 0600); return the key id."""
    if private_path.exists():
        raise SigningKeyError(f"refusing to overwrite existing private key {private_path}")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(private_path, pem)
    private_path.chmod(0o600)
    pub = key.public_key()
    atomic_write_bytes(
        public_path,
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    return key_id(pub)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key, with a clear error for anything else."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key, with a clear error for anything else."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"cannot load public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return key


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Detached Ed25519 signature of ``data``."""
    return private_key.sign(data)


def verify(public_keys: list[Ed25519PublicKey], data: bytes, signature: bytes) -> str | None:
    """Return the key id of the pinned key that signed ``data``, or None if none did."""
    if len(signature) != SIGNATURE_BYTES:
        return None
    for pub in public_keys:
        try:
            pub.verify(signature, data)
        except InvalidSignature:
            continue
        return key_id(pub)
    return None
