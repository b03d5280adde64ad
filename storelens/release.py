"""The release contract: one signed ``release.json`` pairing a model bundle with the snapshots it built.

The cloud writes it (cloud/fleet/release.py), the kiosk verifies it (device/update/) before fetching
anything it names. ``release.sig`` is the detached Ed25519 signature of the exact ``release.json`` bytes.
``sequence`` only grows: a kiosk refuses a release at or below the highest it has accepted (no downgrade
to an older, validly signed release; an ops rollback is a new release pointing at old content).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storelens import signing
from storelens.errors import ReasonError

FORMAT = "storelens.release/1"
RELEASE_JSON = "release.json"
RELEASE_SIG = "release.sig"
MAX_RELEASE_BYTES = 1 << 20  # a release names a bundle and one snapshot per store: a few KiB per store
BUNDLE_FILES = ("manifest.json", "model.xml", "model.bin")
_RELEASE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ReleaseRejected(ReasonError[str]):
    """A release.json that fails parsing or its signature; ``reason`` is a stable string."""

    what = "release refused"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Artifact(_Strict):
    """One downloadable file: where, how big, what hash."""

    url: str = Field(min_length=1, max_length=4096)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=1 << 40)


class BundleRef(_Strict):
    model_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    dim: int = Field(ge=1, le=65_536)
    name: str = ""
    files: dict[str, Artifact]  # exactly BUNDLE_FILES


class StoreSnapshotRef(_Strict):
    version: int = Field(ge=1)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    archive: Artifact  # the snapshot tar (storelens.archive.pack)


class ReleaseManifest(_Strict):
    format: Literal["storelens.release/1"] = "storelens.release/1"
    release: str = Field(pattern=_RELEASE_ID.pattern)
    sequence: int = Field(ge=1, le=2**53)
    created_at: str
    bundle: BundleRef
    stores: dict[str, StoreSnapshotRef]
    key_id: str = ""
    notes: str = ""

    def to_bytes(self) -> bytes:
        """The canonical bytes that get signed and published."""
        return (json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True) + "\n").encode()


def check_release_id(value: str) -> str:
    """Release ids appear in file names and topics' payloads: [A-Za-z0-9_.-], 1-64 chars."""
    if not _RELEASE_ID.match(value):
        raise ValueError(f"release id {value!r} must be 1-64 of [A-Za-z0-9_.-]")
    return value


def sign_release(manifest: ReleaseManifest, private_key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """(release.json bytes, signature) with the key id stamped in."""
    stamped = manifest.model_copy(update={"key_id": signing.key_id(private_key.public_key())})
    data = stamped.to_bytes()
    if len(data) > MAX_RELEASE_BYTES:
        raise ValueError(f"release.json is {len(data)} bytes, over {MAX_RELEASE_BYTES}")
    return data, signing.sign(private_key, data)


def verify_release(data: bytes, signature: bytes, public_keys: list[Ed25519PublicKey]) -> ReleaseManifest:
    """Check the signature over the exact bytes first, then parse; ReleaseRejected on any problem."""
    if len(data) > MAX_RELEASE_BYTES:
        raise ReleaseRejected("malformed", f"release.json larger than {MAX_RELEASE_BYTES} bytes")
    if signing.verify(public_keys, data, signature) is None:
        raise ReleaseRejected("bad_signature", "release signature does not verify with any pinned key")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReleaseRejected("malformed", f"release.json is not UTF-8 JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ReleaseRejected(
            "unsupported_format", f"format {raw.get('format') if isinstance(raw, dict) else None!r}"
        )
    try:
        m = ReleaseManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ReleaseRejected(
            "malformed", f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        ) from exc
    if set(m.bundle.files) != set(BUNDLE_FILES):
        raise ReleaseRejected("malformed", f"bundle files must be exactly {BUNDLE_FILES}")
    return m


JOB_OPERATION = "storelens.release"
_ENVELOPE = ("v", "type", "ts", "kiosk", "store")


def job_document(desired: Any) -> dict[str, Any]:
    """The IoT Job document for a DesiredRelease (one document for many things: no kiosk/store)."""
    doc = {k: v for k, v in desired.model_dump(mode="json").items() if k not in _ENVELOPE}
    return {"operation": JOB_OPERATION, **doc}


def desired_from_job(doc: Any, *, store: str, kiosk: str) -> Any:
    """Parse a job document back into the DesiredRelease for this kiosk; ValueError if it is not ours."""
    from storelens.protocol import DesiredRelease

    if not isinstance(doc, dict) or doc.get("operation") != JOB_OPERATION:
        raise ValueError(f"not a {JOB_OPERATION} job document")
    fields = {k: v for k, v in doc.items() if k != "operation" and k not in _ENVELOPE}
    try:
        return DesiredRelease(kiosk=kiosk, store=store, **fields)
    except ValidationError as exc:
        raise ValueError(f"bad job document: {exc.errors()[0]['msg']}") from exc
