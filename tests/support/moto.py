"""moto's S3 in server mode on a free loopback port (the project's S3 tests talk HTTP to it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def moto_s3(*, endpoint_env: bool = False) -> Iterator[str]:
    """Start moto, put fake credentials in the environment and yield its ``http://host:port``.

    ``endpoint_env``: also set ``AWS_ENDPOINT_URL_S3`` (boto3's own variable), so code that makes its
    own client, as the feedback store does, reaches moto with no endpoint option.
    """
    moto_server = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        mp.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    if endpoint_env:
        mp.setenv("AWS_ENDPOINT_URL_S3", url)
    try:
        yield url
    finally:
        server.stop()
        mp.undo()
