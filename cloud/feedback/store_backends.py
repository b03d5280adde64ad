"""Where a feedback store's objects live (``cloud.feedback.store`` holds what they mean): a local folder
(atomic, fsynced writes; decisions appended to one log) or an S3 prefix via boto3 (one object per decision,
immutable reads cached in memory, crops in a local cache checked against their sha256). Both raise
FeedbackStoreError naming the location and the key."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from storelens.fsutil import atomic_write_bytes, fsync_dir


class FeedbackStoreError(Exception):
    """A record or decision that cannot be read or written (names the record and the problem)."""


class CorruptCrop(FeedbackStoreError):
    """A stored crop whose bytes do not match the sha256 it is stored under."""


DECISIONS_LOG = "decisions.jsonl"
_T = TypeVar("_T")


class Backend(Protocol):
    """Where the layout lives: a local folder or an S3 prefix (keys are ``records/...``, ``crops/...``)."""

    where: str

    def exists(self, key: str) -> bool: ...
    def read(self, key: str) -> bytes | None: ...  # None when there is no such object
    def write(self, key: str, data: bytes) -> None: ...  # durable when it returns
    def names(self, folder: str) -> list[str]: ...  # object names directly under folder/, sorted
    def append_decision(self, line: bytes) -> None: ...
    def decision_lines(self) -> list[str]: ...
    def local_file(self, key: str) -> Path: ...  # a local file with the object (absent if it is absent)


class Folder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)
        for d in ("records", "crops"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.root / key, data)

    def names(self, folder: str) -> list[str]:
        return sorted(p.name for p in (self.root / folder).iterdir() if p.is_file())

    def append_decision(self, line: bytes) -> None:
        fd = os.open(self.root / DECISIONS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.root)

    def decision_lines(self) -> list[str]:
        log = self.root / DECISIONS_LOG
        return log.read_text(encoding="utf-8").splitlines() if log.exists() else []

    def local_file(self, key: str) -> Path:
        return self.root / key


_MISSING = ("404", "NoSuchKey", "NotFound")


class S3Prefix:
    """The layout under ``s3://bucket/prefix`` via boto3 (endpoint from boto3's own settings, e.g.
    ``AWS_ENDPOINT_URL_S3``); every S3 failure becomes a FeedbackStoreError naming the key."""

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, client: Any = None) -> None:
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.where = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._s3 = client or boto3.client("s3")
        self._cache_dir = cache_dir
        self._cached: dict[str, bytes] = {}  # immutable objects already read (records, decisions)
        self._call("reach the bucket", lambda: self._s3.head_bucket(Bucket=bucket))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()``, any S3 failure a FeedbackStoreError naming ``what``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise FeedbackStoreError(f"{self.where}: cannot {what} (S3 {code}: {exc})") from exc
        except BotoCoreError as exc:
            raise FeedbackStoreError(f"{self.where}: cannot {what} ({exc})") from exc

    def _absent_is_none(self, fn: Callable[[], _T]) -> Callable[[], _T | None]:
        """``fn`` returning None where S3 says there is no such object."""
        from botocore.exceptions import ClientError

        def call() -> _T | None:
            try:
                return fn()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _MISSING:
                    return None
                raise

        return call

    def exists(self, key: str) -> bool:
        head = self._absent_is_none(lambda: self._s3.head_object(Bucket=self.bucket, Key=self._key(key)))
        return self._call(f"check {key}", head) is not None

    def read(self, key: str) -> bytes | None:
        if key in self._cached:
            return self._cached[key]
        get = self._absent_is_none(
            lambda: bytes(self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())
        )
        data = self._call(f"read {key}", get)
        if data is not None and not key.startswith("crops/"):  # crops go to the file cache instead
            self._cached[key] = data
        return data

    def write(self, key: str, data: bytes) -> None:
        # Not cached: the collector writes for months and never reads back.
        self._call(
            f"write {key}", lambda: self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        )

    def names(self, folder: str) -> list[str]:
        base = self._key(folder) + "/"
        out: list[str] = []

        def walk() -> None:
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                out.extend(o["Key"][len(base):] for o in page.get("Contents", []))

        self._call(f"list {folder}/", walk)
        return sorted(n for n in out if n and "/" not in n)

    def append_decision(self, line: bytes) -> None:
        self.write(f"decisions/{time.time_ns():020d}-{secrets.token_hex(4)}.json", line)

    def decision_lines(self) -> list[str]:
        lines = []
        for name in self.names("decisions"):
            data = self.read(f"decisions/{name}")
            if data is not None:
                lines.append(data.decode("utf-8", "replace").strip())
        return lines

    def local_file(self, key: str) -> Path:
        path = self._cache_dir / key
        if path.is_file():
            return path
        data = self.read(key)
        if data is None:
            return path  # absent: callers check is_file()
        want = Path(key).stem
        if key.startswith("crops/") and hashlib.sha256(data).hexdigest() != want:
            raise CorruptCrop(f"{self.where}: {key} does not match its sha256 (corrupt object)")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return path


def default_cache_dir(location: str) -> Path:
    """Where crops of an S3 feedback store are cached locally: per bucket and prefix, under the user's
    cache folder (``XDG_CACHE_HOME``, else ``~/.cache``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(location.encode()).hexdigest()[:16]
    return base / "storelens" / "feedback" / tag
