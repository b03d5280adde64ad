"""``catalog build --engine ray``: one catalog, N stores -> embeddings on an actor pool -> N snapshots.

The catalog's photos are embedded once for every store asked for (``cloud.scale.embed``), then each
store's snapshot (adapter, calibration, index, signing) is a Ray task running ``cloud.build``'s own
``build_snapshot`` on that store's share of the vectors, with one ``created_at`` for the run: the same
bytes the single-process path writes for the same inputs. Output directories must be on a filesystem
every worker sees (a cluster: a shared mount). Ray is joined at ``--ray-address`` / ``RAY_ADDRESS``, else
started here on loopback with the machine's CPUs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud.build import BuildError, BuildSpec, build_snapshot
from cloud.catalog import Catalog, load_catalog
from cloud.featurize import Features, _collect, _Context, _Job, _thumbs_after_bad_first
from cloud.scale.embed import BATCH, EmbedderFactory, EmbeddingSpace, embed_jobs, make_jobs
from cloud.scale.parquet_cache import CacheError

_LOGGER = logging.getLogger(__name__)

ALL_STORES = "all"


@dataclass(slots=True)
class ScaleSummary:
    """What one Ray build did, for the command line and the run report."""

    stores: dict[str, str] = field(default_factory=dict)  # store -> snapshot dir, or "error: ..."
    photos: int = 0
    embedded: int = 0
    cache_hits: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # reason -> photos
    embed_s: float = 0.0
    stores_s: float = 0.0
    actors: int = 0

    def lines(self) -> list[str]:
        """Human summary, one fact a line."""
        failed = sum(self.failures.values())
        by_reason = ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items())) or "none"
        ok = sum(not v.startswith("error:") for v in self.stores.values())
        return [
            f"photos {self.photos}: embedded {self.embedded}, cache hits {self.cache_hits}, "
            f"failed {failed} ({by_reason}); {self.actors} embedding actors, {self.embed_s:.1f} s",
            f"snapshots {ok} of {len(self.stores)} stores in {self.stores_s:.1f} s",
            *(f"store {s}: {v}" for s, v in sorted(self.stores.items()) if v.startswith("error:")),
        ]


def resolve_stores(catalog: Catalog, stores: list[str]) -> list[str]:
    """The stores asked for; ``all`` means every store the catalog names."""
    if stores == [ALL_STORES]:
        named = sorted({s for it in catalog.items for s in it.stores})
        if not named:
            raise BuildError("the catalog names no stores: give them with --store")
        return named
    return list(dict.fromkeys(stores))


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Join a cluster (``address`` or ``RAY_ADDRESS``) or start Ray here on loopback; stop what we started."""
    try:
        import ray
    except ImportError as exc:
        raise BuildError("the Ray engine needs the 'scale' extra: pip install 'storelens[scale]'") from exc
    if ray.is_initialized():  # the caller's session (tests, a notebook): use it, leave it running
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:  # every port on loopback: nothing listens on the machine's network address
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BuildError(f"cannot start or join Ray ({address or 'local'}): {exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def store_features(jobs: list[_Job], store: str, dim: int) -> Features:
    """What ``cloud.featurize.featurize`` returns for this store's items, from the shared jobs."""
    import numpy as np

    mine = [j for j in jobs if j.item.carried_by(store)]
    feats = Features(dim=dim, vectors=np.zeros((0, dim), np.float32), rows=[], thumbs={})
    feats.embedded = sum(j.embedded for j in mine)
    feats.cache_hits = sum(j.error is None and not j.embedded for j in mine)
    _collect(mine, feats)
    return feats


def _build_store(
    feats: Features, store: str, catalog_path: str, out: str, key: bytes, space: EmbeddingSpace,
    created_at: datetime, options: dict[str, Any],
) -> str:  # fmt: skip
    """One store's snapshot (a Ray task); returns its directory or ``error: reason``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        build_snapshot(BuildSpec(catalog=Path(catalog_path), store=store, out_dir=Path(out),
                                 private_key=Ed25519PrivateKey.from_private_bytes(key),
                                 embedder=space, features=feats, created_at=created_at, progress=False,
                                 **options))  # fmt: skip
    except (BuildError, OSError, ValueError) as exc:
        _LOGGER.warning("store %s: %s", store, exc)
        return f"error: {exc}"
    return out


def build_stores(
    catalog_path: Path,
    stores: list[str],
    out_dirs: dict[str, Path] | Path,
    private_key: Any,
    factory: EmbedderFactory,
    *,
    cache_uri: str | None = None,
    download_dir: Path | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    batch_size: int = BATCH,
    created_at: datetime | None = None,
    progress: bool = True,
    location_column: str | None = None,
    **options: Any,
) -> ScaleSummary:
    """Embed once on the actor pool, then one Ray task per store; Ray must be running (``ray_session``).

    ``out_dirs``: a directory per store, or a parent directory (``PARENT/<store>``). ``download_dir``:
    where http(s) photos are kept between builds (a local folder each worker can write; None: fetched
    each build, retried all the same). ``options`` go to ``build_snapshot`` (M, ef_construction, ef,
    archive, adapter, base, version).
    """
    import ray

    summary = ScaleSummary()
    catalog = load_catalog(catalog_path, location_column=location_column, progress=progress)
    names = resolve_stores(catalog, stores)
    outs = out_dirs if isinstance(out_dirs, dict) else {s: Path(out_dirs) / s for s in names}
    items = [it for it in catalog.items if any(it.carried_by(s) for s in names)]
    if not items:
        bad = len(catalog.errors)
        raise BuildError(f"catalog has no valid items for {', '.join(names)} ({bad} bad rows)")
    space = factory.space()
    resources: Any = ray.available_resources
    summary.actors = actors or max(1, int(resources().get("CPU", 1) // cpus_per_actor))
    t0 = time.monotonic()
    jobs = make_jobs(items)
    try:
        outcome = embed_jobs(jobs, factory, space, base_dir=catalog.base_dir, cache_uri=cache_uri,
                             download_dir=download_dir, actors=summary.actors, cpus_per_actor=cpus_per_actor,
                             batch_size=batch_size, progress=progress)  # fmt: skip
    except CacheError as exc:
        raise BuildError(str(exc)) from exc
    except ray.exceptions.RayError as exc:
        raise BuildError(
            f"embedding failed on Ray ({type(exc).__name__}: {exc}); finished batches are in the cache: "
            "run the build again to resume"
        ) from exc
    # Items whose first photo failed: thumbnail from their first good one, decoded here (rare).
    _thumbs_after_bad_first(jobs, _context(catalog, space, download_dir))
    summary.photos = len(jobs)
    summary.embedded = sum(j.embedded and j.error is None for j in jobs)
    summary.cache_hits = sum(j.error is None and not j.embedded for j in jobs)
    summary.failures = outcome.reasons
    summary.embed_s = round(time.monotonic() - t0, 2)
    t1 = time.monotonic()
    summary.stores = fan_out(jobs, {s: outs[s] for s in names}, catalog_path, private_key, space,
                             created_at=created_at or datetime.now(UTC), progress=progress,
                             location_column=location_column, **options)  # fmt: skip
    summary.stores_s = round(time.monotonic() - t1, 2)
    return summary


def fan_out(
    jobs: list[_Job],
    outs: dict[str, Path],
    catalog_path: Path,
    private_key: Any,
    space: EmbeddingSpace,
    *,
    created_at: datetime,
    progress: bool = True,
    max_in_flight: int | None = None,
    **options: Any,
) -> dict[str, str]:
    """One Ray task per store over the embedded jobs; store -> snapshot dir or ``error: reason``.

    Each task gets only its store's vectors (made here, just before it is submitted), and at most
    ``max_in_flight`` are out at once: the whole catalog's vectors (1M photos x 1280 dims: 5 GB) never
    travel to a task, and the object store holds a few stores' worth at a time.
    """
    import ray
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    task = ray.remote(num_cpus=1, max_retries=2)(_build_store)
    resources: Any = ray.available_resources
    max_in_flight = max_in_flight or 2 * max(1, int(resources().get("CPU", 1)))
    todo = list(outs.items())
    pending: dict[Any, str] = {}
    results: dict[str, str] = {}
    bar = _bar(len(todo), progress)
    while todo or pending:
        while todo and len(pending) < max_in_flight:
            s, out = todo.pop(0)
            feats = store_features(jobs, s, space.dim)
            pending[task.remote(feats, s, str(catalog_path), str(out), key, space, created_at, options)] = s
        done, _ = ray.wait(list(pending), num_returns=1)
        store = pending.pop(done[0])
        try:
            results[store] = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            results[store] = f"error: {type(exc).__name__}: {exc}"
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def _context(catalog: Catalog, space: EmbeddingSpace, download_dir: Path | None) -> _Context:
    from cloud.feeds.download import Downloader
    from models.images import decode_image

    return _Context(catalog.base_dir, None, "", space.dim, decode_image, None, Downloader(download_dir))


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="stores", unit="snapshot")
