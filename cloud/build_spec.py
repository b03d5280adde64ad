"""What one snapshot build is asked to do: a validated, frozen build spec, and what a build returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.feedback.relearn import DEFAULT_CAP
from cloud.feedback.store import FeedbackSource
from models.port import EmbedderPort
from storelens.snapshot import SnapshotManifest

if TYPE_CHECKING:
    from cloud.featurize import Features

DELTA_MAX_FRACTION = 0.30  # past this share of changed vectors a full rebuild is smaller and cleaner
DEFAULT_EF = 100  # query ef recorded for kiosks: recall ~1.0 on catalogs up to ~100k at < 1 ms


class BuildError(Exception):
    """The build cannot produce a snapshot (no usable items, bad base, model mismatch...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildSpec:
    """One build: ``store``'s items of ``catalog``, embedded by ``bundle`` (or ``embedder``), signed with
    ``private_key`` into ``out_dir``; a delta against ``base`` where small enough. Checked when made.

    ``features``: the store's images already embedded (``cloud.scale``) by ``embedder``, which then only
    names the model; ``feedback``: a feedback store (folder or ``s3://``) whose approved store photos join
    their items (at most ``feedback_cap`` per product); ``created_at``: the build time to record (one for
    all stores of a run); ``archive``: write ``out_dir.tar`` too."""

    catalog: Path
    store: str
    out_dir: Path
    private_key: Ed25519PrivateKey
    bundle: Path | None = None
    embedder: EmbedderPort | None = None
    base: Path | None = None
    version: int | None = None
    M: int = 16
    ef_construction: int = 200
    ef: int = DEFAULT_EF
    cache_dir: Path | None = None
    progress: bool = True
    delta_max_fraction: float = DELTA_MAX_FRACTION
    s3_client: Any = None
    adapter: Literal["lda", "none"] = "lda"
    archive: bool = False
    location_column: str | None = None
    feedback: FeedbackSource | None = None
    feedback_cap: int = DEFAULT_CAP
    features: Features | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.bundle is None and self.embedder is None:
            raise BuildError("need a model bundle or an embedder")
        if self.features is not None and self.feedback is not None:
            raise BuildError("give either pre-embedded features or a feedback folder, not both")
        if self.version is not None and self.version < 1:
            raise BuildError(f"version {self.version} must be 1 or above")
        if self.M < 2 or self.ef_construction < 1 or self.ef < 1:
            raise BuildError(f"bad hnsw parameters M={self.M} ef_construction={self.ef_construction} "
                             f"ef={self.ef}")
        if not 0.0 <= self.delta_max_fraction <= 1.0:
            raise BuildError(f"delta_max_fraction {self.delta_max_fraction} is not within 0..1")
        if self.adapter not in ("lda", "none"):
            raise BuildError(f"unknown adapter {self.adapter!r}")
        if self.feedback_cap < 1:
            raise BuildError(f"feedback_cap {self.feedback_cap} must be 1 or above")


@dataclass(slots=True)
class BuildResult:
    out_dir: Path
    manifest: SnapshotManifest
    report: dict[str, Any] = field(default_factory=dict)
    report_path: Path | None = None
