"""The shared embedding cache: immutable shards any number of writers add to; no Ray needed."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, with fake credentials in the environment."""
    moto_server = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        mp.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()
    mp.undo()


@pytest.mark.integration
def test_the_cache_lives_on_s3(s3_endpoint: str) -> None:
    """Workers on other machines share the cache through S3: shards written there read back whole."""
    import boto3

    boto3.client("s3", endpoint_url=f"http://{s3_endpoint}").create_bucket(Bucket="cache")
    uri = f"s3://cache/embeddings?endpoint_override={s3_endpoint}&scheme=http"
    v = np.linspace(0, 1, 8, dtype=np.float32)
    ParquetCache(uri, "m:p").write({"aa": v}, {"aa": b"jpeg"})
    ParquetCache(uri, "m:p").write({"bb": v * 2}, {})
    reader = ParquetCache(uri, "m:p")
    assert len(reader.known()[0]) == 2
    got = reader.vectors(["aa", "bb"], 8)
    assert np.array_equal(got["aa"], v) and np.array_equal(got["bb"], v * 2)
    assert reader.thumbs(["aa"]) == {"aa": b"jpeg"}
