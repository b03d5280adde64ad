"""The index snapshot contract: manifest schema, signing, verification (its archive: ``storelens.archive``).

One module for both sides: the cloud writes and signs snapshots with it, the kiosk verifies them with
it before hnswlib ever opens a file. A snapshot is a flat directory:

    manifest.json   the signed manifest (exact bytes are what the signature covers)
    manifest.sig    64-byte detached Ed25519 signature of manifest.json
    <files>         every other file, each listed in manifest["files"] with sha256 and size

Nothing in the directory may be unlisted, at any depth (a nested file named like the manifest is
unlisted too), and nothing in it may be a symlink; names are plain relative paths (one optional
sub-folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storelens import signing
from storelens.errors import ReasonError
from storelens.fsutil import atomic_write_bytes, read_capped, sha256_file

FORMAT = "storelens.snapshot/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
# A manifest holds a few canary vectors; 2 MiB is ample and bounds what we parse from the network.
MAX_MANIFEST_BYTES = 2 << 20
SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127})?$")


def is_safe_name(name: str) -> bool:
    """A snapshot file name a kiosk may write: at most one folder deep, no dot-first part, no ``..``."""
    return bool(SAFE_NAME.match(name)) and ".." not in name.split("/")


class RejectReason(StrEnum):
    """Why a snapshot was refused; stable strings reported on the kiosk status and in CLI output."""

    MISSING_MANIFEST = "missing_manifest"
    MALFORMED = "malformed_manifest"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    UNSUPPORTED_FORMAT = "unsupported_format"
    WRONG_STORE = "wrong_store"
    MODEL_MISMATCH = "model_mismatch"
    DIM_MISMATCH = "dim_mismatch"
    REPLAY = "version_replay"
    EXPIRED = "expired"
    UNSAFE_NAME = "unsafe_file_name"
    MISSING_FILE = "missing_file"
    UNEXPECTED_FILE = "unexpected_file"  # unlisted in the signed manifest, or not a regular file
    SYMLINK = "symlink"  # a symlinked file or folder anywhere in the snapshot
    SIZE_MISMATCH = "size_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    BAD_INDEX = "bad_index"
    BASE_MISMATCH = "base_mismatch"
    BAD_ARCHIVE = "bad_archive"


class SnapshotRejected(ReasonError[RejectReason]):
    """A snapshot failed verification; ``reason`` names the check, ``detail`` says what was found."""

    what = "snapshot refused"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class HnswParams(_Strict):
    M: int = Field(ge=2, le=256)
    ef_construction: int = Field(ge=1, le=10_000)
    ef: int = Field(ge=1, le=10_000)  # hnswlib does not persist ef: the kiosk sets this after load


class Projection(_Strict):
    """Catalog-fitted linear map applied to query embeddings before search (PCA/whitening/adapter)."""

    file: str  # little-endian float32: mean[in_dim] then matrix[in_dim, out_dim]
    in_dim: int = Field(ge=1)
    out_dim: int = Field(ge=1)


class Canary(_Strict):
    """A catalog image whose embedding and expected answer the kiosk checks after loading."""

    sku: str
    image: str | None = None  # file in the snapshot (for model self-tests), optional
    embedding: str  # base64 little-endian float32, model space (before projection)


class SnapshotManifest(_Strict):
    format: Literal["storelens.snapshot/1"] = "storelens.snapshot/1"
    store: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    version: int = Field(ge=1, le=2**53)
    kind: Literal["full", "delta"] = "full"
    base_version: int | None = None
    base_manifest_sha256: str | None = None
    model_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    preprocessing_hash: str
    model_dim: int = Field(ge=1, le=65_536)
    dim: int = Field(ge=1, le=65_536)  # dimension of the indexed vectors (after projection)
    metric: Literal["ip"] = "ip"  # inner product on unit vectors == cosine
    projection: Projection | None = None
    item_count: int = Field(ge=0)
    vector_count: int = Field(ge=0)
    hnsw: HnswParams
    # "no match" below this: top-1 similarity, or top1 + w*(top1-top2) with extra["open_set"] (matching.py)
    threshold: float = Field(ge=-3.0, le=3.0)
    files: dict[str, FileEntry]
    canary: list[Canary] = Field(default_factory=list)
    created_at: str
    expires_at: str | None = None
    key_id: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)  # producer notes (eval figures, build stats)


def manifest_sha256(directory: Path) -> str:
    """sha256 of a snapshot's manifest bytes: its identity for delta chains and announcements."""
    return sha256_file(Path(directory) / MANIFEST)


def describe_files(directory: Path, names: list[str]) -> dict[str, FileEntry]:
    """Hash and size each named file of a snapshot directory for its manifest."""
    out: dict[str, FileEntry] = {}
    for name in sorted(names):
        p = Path(directory) / name
        out[name] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
    return out


def write_signed(directory: Path, manifest: SnapshotManifest, private_key: Ed25519PrivateKey) -> bytes:
    """Write manifest.json and its signature into ``directory``; return the manifest bytes."""
    stamped = manifest.model_copy(update={"key_id": signing.key_id(private_key.public_key())})
    data = (json.dumps(stamped.model_dump(mode="json"), indent=1, sort_keys=True) + "\n").encode()
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    atomic_write_bytes(Path(directory) / MANIFEST, data)
    atomic_write_bytes(Path(directory) / SIGNATURE, signing.sign(private_key, data))
    return data


def read_manifest_unverified(directory: Path) -> SnapshotManifest:
    """Parse a manifest without checking anything else (for tooling on trusted local output only)."""
    return _parse(read_capped(Path(directory) / MANIFEST, MAX_MANIFEST_BYTES))


def _parse(data: bytes) -> SnapshotManifest:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotRejected(RejectReason.MALFORMED, f"manifest is not UTF-8 JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SnapshotRejected(RejectReason.MALFORMED, "manifest is not a JSON object")
    if raw.get("format") != FORMAT:
        raise SnapshotRejected(
            RejectReason.UNSUPPORTED_FORMAT, f"format {raw.get('format')!r}, want {FORMAT}"
        )
    try:
        return SnapshotManifest.model_validate(raw, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SnapshotRejected(RejectReason.MALFORMED, f"{where}: {first['msg']}") from exc


def verify_snapshot(
    directory: Path,
    public_keys: list[Ed25519PublicKey],
    *,
    model_id: str | None = None,
    model_dim: int | None = None,
    store: str | None = None,
    seen: tuple[int, str] | None = None,
    base: tuple[int, str] | None = None,
    now: datetime | None = None,
    check_index: bool = True,
) -> SnapshotManifest:
    """Verify a snapshot directory completely before anything loads it; raise SnapshotRejected.

    ``seen`` is (highest version accepted so far, its manifest sha256): a lower version, or the same
    version with other content, is a replay. ``base`` is (version, manifest sha256) of the snapshot a
    delta must chain to.
    """
    directory = Path(directory)
    mpath, spath = directory / MANIFEST, directory / SIGNATURE
    if not directory.is_dir():
        raise SnapshotRejected(RejectReason.MISSING_MANIFEST, f"no {MANIFEST} in {directory}")
    present = scan_files(directory)  # before reading anything: no symlink is ever followed
    if MANIFEST not in present:
        raise SnapshotRejected(RejectReason.MISSING_MANIFEST, f"no {MANIFEST} in {directory}")
    try:
        data = read_capped(mpath, MAX_MANIFEST_BYTES)
    except ValueError as exc:
        raise SnapshotRejected(RejectReason.MALFORMED, str(exc)) from exc
    if SIGNATURE not in present:
        raise SnapshotRejected(RejectReason.UNSIGNED, f"no {SIGNATURE} beside the manifest")
    sig = read_capped(spath, 1024)
    if signing.verify(public_keys, data, sig) is None:
        raise SnapshotRejected(RejectReason.BAD_SIGNATURE, "signature does not verify with any pinned key")
    m = _parse(data)
    digest = hashlib.sha256(data).hexdigest()
    _check_identity(m, digest, model_id=model_id, model_dim=model_dim, store=store, seen=seen, base=base)
    if m.expires_at is not None and _parse_ts(m.expires_at) <= (now or datetime.now(UTC)):
        raise SnapshotRejected(RejectReason.EXPIRED, f"expired at {m.expires_at}")
    _check_files(directory, m, present)
    if check_index and "index.bin" in m.files:
        from storelens import vindex  # local: keeps hnswlib out of pure-contract users

        try:
            vindex.check_header(directory / "index.bin", dim=m.dim, count=None)
        except vindex.IndexFileError as exc:
            raise SnapshotRejected(RejectReason.BAD_INDEX, str(exc)) from exc
    return m


def _check_identity(
    m: SnapshotManifest,
    digest: str,
    *,
    model_id: str | None,
    model_dim: int | None,
    store: str | None,
    seen: tuple[int, str] | None,
    base: tuple[int, str] | None,
) -> None:
    if store is not None and m.store != store:
        raise SnapshotRejected(RejectReason.WRONG_STORE, f"built for store {m.store!r}, this is {store!r}")
    if model_id is not None and m.model_id != model_id:
        raise SnapshotRejected(
            RejectReason.MODEL_MISMATCH, f"built by model {m.model_id[:12]}, running {model_id[:12]}"
        )
    if model_dim is not None and m.model_dim != model_dim:
        raise SnapshotRejected(RejectReason.DIM_MISMATCH, f"model dim {m.model_dim}, running {model_dim}")
    want_dim = m.projection.out_dim if m.projection else m.model_dim
    if m.dim != want_dim or (m.projection is not None and m.projection.in_dim != m.model_dim):
        raise SnapshotRejected(RejectReason.DIM_MISMATCH, f"index dim {m.dim} inconsistent with projection")
    if seen is not None:
        seen_version, seen_sha = seen
        if m.version < seen_version or (m.version == seen_version and digest != seen_sha):
            raise SnapshotRejected(RejectReason.REPLAY, f"version {m.version} <= already seen {seen_version}")
    if m.kind == "delta":
        if m.base_version is None or m.base_manifest_sha256 is None:
            raise SnapshotRejected(RejectReason.MALFORMED, "delta without base_version/base_manifest_sha256")
        if base is not None and (m.base_version, m.base_manifest_sha256) != base:
            raise SnapshotRejected(
                RejectReason.BASE_MISMATCH, f"delta chains to v{m.base_version}, active is v{base[0]}"
            )


def scan_files(directory: Path) -> set[str]:
    """Relative names of every regular file below ``directory``, at any depth, symlinks never followed.

    SnapshotRejected: ``symlink`` for a symlinked file or folder anywhere, ``unexpected_file`` for any
    other entry that is neither a folder nor a regular file (fifo, socket, device node).
    """
    found: set[str] = set()
    pending = [(Path(directory), "")]  # iterative: a hostile tree of any depth cannot exhaust the stack
    try:
        while pending:
            folder, prefix = pending.pop()
            with os.scandir(folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    rel = prefix + entry.name
                    if entry.is_symlink():
                        raise SnapshotRejected(RejectReason.SYMLINK, f"{rel!r} is a symlink")
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((Path(entry.path), rel + "/"))
                    elif entry.is_file(follow_symlinks=False):
                        found.add(rel)
                    else:
                        raise SnapshotRejected(RejectReason.UNEXPECTED_FILE, f"{rel!r} is not a regular file")
    except OSError as exc:
        raise SnapshotRejected(RejectReason.MISSING_FILE, f"cannot list {directory}: {exc}") from exc
    return found


def _check_files(directory: Path, m: SnapshotManifest, present: set[str]) -> None:
    """Every file listed, and only those: ``present`` is :func:`scan_files` of ``directory``."""
    for name in m.files:
        if not is_safe_name(name):
            raise SnapshotRejected(RejectReason.UNSAFE_NAME, f"file name {name!r}")
    extra = sorted(present - set(m.files) - {MANIFEST, SIGNATURE})  # only the top-level pair is exempt
    if extra:
        raise SnapshotRejected(RejectReason.UNEXPECTED_FILE, f"unlisted file {extra[0]!r}")
    for name, entry in sorted(m.files.items()):
        p = directory / name
        if name not in present:
            raise SnapshotRejected(RejectReason.MISSING_FILE, f"{name} is missing")
        size = p.stat().st_size
        if size != entry.size:
            raise SnapshotRejected(
                RejectReason.SIZE_MISMATCH, f"{name} is {size} bytes, manifest says {entry.size}"
            )
    for name, entry in sorted(m.files.items()):  # sizes first: cheap, catches truncation early
        if sha256_file(directory / name) != entry.sha256:
            raise SnapshotRejected(RejectReason.HASH_MISMATCH, f"{name} sha256 differs from the manifest")


def _parse_ts(ts: str) -> datetime:
    try:
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SnapshotRejected(RejectReason.MALFORMED, f"bad timestamp {ts!r}") from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601 with a Z suffix (millisecond precision)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
