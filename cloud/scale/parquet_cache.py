"""An embedding cache many machines share: immutable Parquet shards on a local path or ``s3://``.

Layout under the root (a directory, or any URI ``pyarrow.fs.FileSystem.from_uri`` reads)::

    emb/<model tag>/part-<uuid>.parquet   key (sha256 + decode version), vec (little-endian f4 bytes)
    thumb/part-<uuid>.parquet             key, jpeg

Each writer (one Ray actor's batch) writes its own new shard, never touching another's, so there are no
locks and no lost updates on S3 or NFS; a shard appears whole (local: written aside, then renamed; S3: one
PUT). A worker killed mid-batch loses that batch only. Keys are the SQLite cache's
(``cloud.cache._pixels_key``): image sha256 and ``models.images.DECODE_VERSION``. The model tag is a hash
of the model fingerprint (model id + preprocessing hash), which each row also carries, so readers only
list one model's shards. Duplicate keys across shards are harmless (same pixels, same model, same vector).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.cache import _pixels_key

_LOGGER = logging.getLogger(__name__)

SUFFIX = ".parquet"


class CacheError(Exception):
    """The shared cache cannot be opened or read (bad URI, no access)."""


def model_tag(fingerprint: str) -> str:
    """Directory name for one embedding space: short, filesystem-safe, stable."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


class ParquetCache:
    """Read what is cached for one model fingerprint; append shards of new vectors and thumbnails."""

    def __init__(self, uri: str, fingerprint: str) -> None:
        import pyarrow.fs as pafs

        try:
            self._fs, root = pafs.FileSystem.from_uri(uri if "://" in uri else _absolute(uri))
        except (ValueError, OSError) as exc:
            raise CacheError(f"cannot open the embedding cache {uri!r}: {exc}") from exc
        self.uri = uri
        self.fingerprint = fingerprint
        self._emb = f"{root.rstrip('/')}/emb/{model_tag(fingerprint)}"
        self._thumb = f"{root.rstrip('/')}/thumb"

    # ---- reading ----

    def _shards(self, directory: str) -> list[str]:
        import pyarrow.fs as pafs

        try:
            infos = self._fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        except OSError as exc:
            raise CacheError(f"cannot list the embedding cache {self.uri!r}: {exc}") from exc
        return sorted(
            i.path for i in infos if i.is_file and i.base_name.endswith(SUFFIX) and i.base_name[0] != "."
        )

    def _read(self, directory: str, columns: list[str], keys: Iterable[str] | None = None) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        shards = self._shards(directory)
        if not shards:
            return None
        try:
            data = ds.dataset(shards, format="parquet", filesystem=self._fs)
            flt = None if keys is None else pc.field("key").isin(pa.array(sorted(set(keys)), pa.string()))
            return data.to_table(columns=columns, filter=flt)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CacheError(f"cannot read the embedding cache {self.uri!r}: {exc}") from exc

    def known(self) -> tuple[frozenset[str], frozenset[str]]:
        """Keys with a vector for this model, and keys with a thumbnail (the key column only is read)."""
        emb = self._read(self._emb, ["key"])
        thumbs = self._read(self._thumb, ["key"])
        return (
            frozenset(emb.column("key").to_pylist()) if emb is not None else frozenset(),
            frozenset(thumbs.column("key").to_pylist()) if thumbs is not None else frozenset(),
        )

    def vectors(self, shas: Iterable[str], dim: int) -> dict[str, npt.NDArray[np.float32]]:
        """sha256 -> cached vector for these images (rows of another width are ignored)."""
        want = {_pixels_key(s): s for s in shas}
        table = self._read(self._emb, ["key", "vec"], want) if want else None
        out: dict[str, npt.NDArray[np.float32]] = {}
        if table is None:
            return out
        for key, blob in zip(table.column("key").to_pylist(), table.column("vec").to_pylist(), strict=True):
            if len(blob) == 4 * dim:
                out[want[key]] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        return out

    def thumbs(self, shas: Iterable[str]) -> dict[str, bytes]:
        """sha256 -> cached thumbnail JPEG for these images."""
        want = {_pixels_key(s): s for s in shas}
        table = self._read(self._thumb, ["key", "jpeg"], want) if want else None
        if table is None:
            return {}
        keys, jpegs = table.column("key").to_pylist(), table.column("jpeg").to_pylist()
        return {want[k]: bytes(j) for k, j in zip(keys, jpegs, strict=True)}

    # ---- writing ----

    def write(self, vectors: dict[str, npt.NDArray[np.float32]], thumbs: dict[str, bytes]) -> None:
        """One new shard per kind (when there is something to write), each appearing whole."""
        import pyarrow as pa

        if vectors:
            keys = list(vectors)
            self._write_shard(self._emb, pa.table({
                "key": pa.array([_pixels_key(k) for k in keys], pa.string()),
                "model": pa.array([self.fingerprint] * len(keys), pa.string()),
                "vec": pa.array([vectors[k].astype("<f4").tobytes() for k in keys], pa.binary()),
            }))  # fmt: skip
        if thumbs:
            keys = list(thumbs)
            self._write_shard(self._thumb, pa.table({
                "key": pa.array([_pixels_key(k) for k in keys], pa.string()),
                "jpeg": pa.array([thumbs[k] for k in keys], pa.binary()),
            }))  # fmt: skip

    def _write_shard(self, directory: str, table: Any) -> None:
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        name = f"part-{uuid.uuid4().hex}{SUFFIX}"
        local = isinstance(self._fs, pafs.LocalFileSystem)
        # Local/NFS: write under a dot-name readers skip, then rename. S3: a PUT appears whole anyway.
        target = f"{directory}/.{name}.tmp" if local else f"{directory}/{name}"
        self._fs.create_dir(directory, recursive=True)
        pq.write_table(table, target, filesystem=self._fs)
        if local:
            self._fs.move(target, f"{directory}/{name}")


def _absolute(path: str) -> str:
    from pathlib import Path

    return str(Path(path).expanduser().resolve())
