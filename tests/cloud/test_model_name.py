"""The bundle's name and version travel with the snapshot (manifest extra) and its announcement."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from cloud.publish import publish_snapshot
from models.bundle import FORMAT, BundleManifest
from storelens import protocol
from storelens.snapshot import read_manifest_unverified
from tests.cloud.conftest import CatalogFiles, CountingEmbedder


class NamedEmbedder(CountingEmbedder):
    """A fake embedder that carries a bundle manifest, as models.embedder.Embedder does."""

    def __init__(self) -> None:
        super().__init__()
        self.manifest = BundleManifest(
            format=FORMAT, model_id=self.model_id, name="mobilenetv2-tuned", source={}, pretrained=True,
            input={}, preprocessing={}, preprocessing_hash="x", dim=self.dim, metric="cosine",
            precision="fp32", inference_precision="f32", openvino_version="test",
            created_at="2026-11-20T10:00:00Z", files={},
        )


def test_snapshot_and_announcement_name_the_bundle(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Without this the staff dashboard can only show the model as a sha256."""
    out = build_snapshot(BuildSpec(catalog=catalog.path, store="store7", out_dir=tmp_path / "snap",
                                   private_key=signing_key, embedder=NamedEmbedder(),
                                   progress=False)).out_dir
    m = read_manifest_unverified(out)
    assert m.extra["model"] == {"name": "mobilenetv2-tuned", "version": "2026-11-20T10:00:00Z"}
    ann = publish_snapshot(out, (tmp_path / "artifacts").as_uri(), None).announcement
    back = protocol.decode(ann.to_bytes(), protocol.SnapshotAnnouncement)
    assert (back.model_name, back.model_version) == ("mobilenetv2-tuned", "2026-11-20T10:00:00Z")


def test_announcement_without_a_name_keeps_its_old_bytes(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A snapshot built before this change (no name) must announce exactly the fields it did."""
    out = build_snapshot(BuildSpec(catalog=catalog.path, store="store7", out_dir=tmp_path / "snap",
                                   private_key=signing_key, embedder=CountingEmbedder(),
                                   progress=False)).out_dir
    assert "model" not in read_manifest_unverified(out).extra
    body = json.loads(publish_snapshot(out, (tmp_path / "a").as_uri(), None).announcement.to_bytes())
    assert "model_name" not in body and "model_version" not in body and body["model_id"]
