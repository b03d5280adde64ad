"""The shared embedding cache: immutable shards any number of writers add to; no Ray needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow", reason="the shared cache needs the 'scale' extra (make setup)")

from cloud.scale.parquet_cache import CacheError, ParquetCache


def test_shards_of_two_writers_read_back_as_one_cache(tmp_path: Path) -> None:
    """Two writers (two workers) must not overwrite each other; another model sees none of the vectors."""
    a, b = ParquetCache(str(tmp_path / "c"), "model:pre"), ParquetCache(str(tmp_path / "c"), "model:pre")
    v1, v2 = np.arange(4, dtype=np.float32), np.ones(4, np.float32)
    a.write({"aa": v1}, {"aa": b"jpeg-a"})
    b.write({"bb": v2}, {})
    vec_keys, thumb_keys = a.known()
    assert len(vec_keys) == 2 and len(thumb_keys) == 1
    assert ParquetCache(str(tmp_path / "c"), "another:model").known() == (frozenset(), thumb_keys)
    vecs = a.vectors(["aa", "bb", "cc"], 4)
    assert set(vecs) == {"aa", "bb"} and np.array_equal(vecs["aa"], v1) and np.array_equal(vecs["bb"], v2)
    assert a.vectors(["aa"], 8) == {}  # a vector of another width is not this model's
    assert a.thumbs(["aa", "bb"]) == {"aa": b"jpeg-a"}
    assert not [p for p in (tmp_path / "c").rglob(".*")]  # no half-written shard left behind


def test_an_unusable_cache_uri_is_a_named_error(tmp_path: Path) -> None:
    """A URI pyarrow cannot open must be a CacheError naming it, never a traceback from pyarrow."""
    with pytest.raises(CacheError, match="nosuchscheme"):
        ParquetCache("nosuchscheme://bucket/x", "m:p").known()
    cache = ParquetCache(str(tmp_path / "c"), "m:p")
    cache.write({"aa": np.ones(4, np.float32)}, {})
    for shard in (tmp_path / "c" / "emb").rglob("part-*.parquet"):  # a foreign file where a shard was
        shard.write_bytes(b"not parquet")
    with pytest.raises(CacheError, match="cannot read"):
        cache.known()
