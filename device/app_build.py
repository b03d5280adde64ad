"""Construction helpers of the composition root: the configured embedder and transport, the bench camera."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from device.camera.port import Image
from device.comms import InMemoryTransport, Transport
from device.config import BrokerConfig, ModelConfig
from models.port import EmbedderPort


def make_embedder(m: ModelConfig) -> EmbedderPort:
    """The configured model: the shipped FakeEmbedder, or the OpenVINO bundle."""
    if m.kind == "fake":
        from models.fake import FakeEmbedder

        return FakeEmbedder(m.fake_dim)
    from models.embedder import Embedder

    assert m.bundle is not None
    return Embedder(m.bundle, mode=m.mode, cache_dir=m.cache_dir)


def make_transport(b: BrokerConfig, kiosk_id: str) -> Transport:
    """The configured MQTT transport (paho, AWS IoT, or none: offline, events wait in the outbox)."""
    client_id = b.client_id or kiosk_id
    if b.transport == "none":
        return InMemoryTransport(online=False)
    if b.transport == "aws":
        from device.comms.aws_transport import AwsIotTransport

        assert b.endpoint and b.cert and b.key
        return AwsIotTransport(b.endpoint, 8883, client_id, b.cert, b.key, b.ca)
    from device.comms.paho_transport import PahoTransport

    return PahoTransport(
        b.url, client_id, username=b.username, password=b.password(),
        ca=str(b.ca) if b.ca else None, cert=str(b.cert) if b.cert else None,
        key=str(b.key) if b.key else None,
    )


def relative_to(path: Path | None, root: Path | None) -> str | None:
    if path is None or root is None:
        return None
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return None


def default_synthetic() -> Iterator[Image]:
    """The bench camera: rendered items held up in turn, forever."""
    from device.camera.synthetic import make_scene, render_items

    scene = make_scene(render_items(6))
    while True:
        yield from scene.frames()
