"""Bundles: export round trips per source type, fingerprints, and refusal of tampered or mismatched files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle import FORMAT, compute_model_id, read_manifest, verify_bundle
from models.embedder import Embedder
from models.errors import BundleCorrupt, BundleNotFound, ExportError
from models.export import export_model
from tests.conftest import shared_path


def _crop(seed: int = 0, h: int = 120, w: int = 90) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check_bundle(out: Path, dim: int) -> None:
    manifest = verify_bundle(out)
    assert manifest.format == FORMAT and manifest.dim == dim and manifest.metric == "cosine"
    assert manifest.input == {"dtype": "u8", "layout": "NHWC", "color": "BGR", "shape": [1, -1, -1, 3]}
    assert manifest.inference_precision == "f32"
    assert manifest.model_id == compute_model_id(out / "model.xml", out / "model.bin")
    with Embedder(out) as embedder:
        vec = embedder.embed_one(_crop())
    assert vec.shape == (dim,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5


def test_tiny_round_trip(tiny_bundle: Path) -> None:
    """A tiny export must verify, load, and describe itself as untrained."""
    _check_bundle(tiny_bundle, 64)
    manifest = read_manifest(tiny_bundle)
    assert manifest.pretrained is False and manifest.source["kind"] == "recipe"
    assert manifest.preprocessing["size"] == [64, 64] and manifest.precision == "fp16"


def test_same_export_same_model_id(tiny_bundle: Path, tmp_path: Path) -> None:
    """Seeded recipes must be reproducible: the same command gives the same fingerprint."""
    again = export_model("tiny", tmp_path / "again", precision="fp16")
    assert again.model_id == read_manifest(tiny_bundle).model_id


def test_ir_re_export(tiny_bundle: Path, tmp_path: Path) -> None:
    """Re-exporting a bundle's model.xml at fp32 must keep preprocessing and embeddings, not re-wrap them."""
    manifest = export_model(str(tiny_bundle / "model.xml"), tmp_path / "re", precision="fp32")
    assert manifest.preprocessing_hash == read_manifest(tiny_bundle).preprocessing_hash
    _check_bundle(tmp_path / "re", 64)
    with Embedder(tiny_bundle) as a, Embedder(tmp_path / "re") as b:
        assert float(a.embed_one(_crop()) @ b.embed_one(_crop())) > 0.9999


@pytest.mark.slow
def test_pytorch_state_dict_round_trip(resnet18_bundles: dict[str, Path]) -> None:
    """A torchvision-style resnet18 .pth must export as pretrained with its source hashed."""
    manifest = read_manifest(resnet18_bundles["pth"])
    assert manifest.pretrained is True and manifest.source["kind"] == "pytorch"
    assert manifest.source["path"] == "resnet18.pth" and len(manifest.source["sha256"]) == 64
    _check_bundle(resnet18_bundles["pth"], 512)
    # Different weights, different fingerprint; the recipe without weights is marked untrained.
    untrained = verify_bundle(resnet18_bundles["recipe"])
    assert untrained.pretrained is False and untrained.model_id != manifest.model_id
    assert untrained.extra["seed"] == 0


@pytest.mark.slow
@pytest.mark.shared
def test_tflite_round_trip(mobilenet_bundles: dict[str, Path]) -> None:
    """The quantized Coral MobileNetV2 must export at 1280-d with the u8 RGB recipe."""
    _check_bundle(mobilenet_bundles["fp16"], 1280)
    manifest = read_manifest(mobilenet_bundles["fp16"])
    assert manifest.preprocessing["color"] == "RGB" and manifest.source["kind"] == "tflite"
    assert manifest.extra["source_fake_quantize"] > 0


@pytest.mark.slow
@pytest.mark.shared
def test_onnx_squeezenet_fp16_input(tmp_path: Path) -> None:
    """SqueezeNet (float16 input, classifier conv before the pool) must cut at fire9's 512 features."""
    source = shared_path("models", "winml", "SqueezeNet_fp16.onnx")
    manifest = export_model(str(source), tmp_path / "sq", precision="fp16")
    assert manifest.preprocessing["color"] == "BGR"
    assert manifest.preprocessing["mean"] == [104.0, 117.0, 123.0]
    assert "fire9" in manifest.extra["cut"]
    _check_bundle(tmp_path / "sq", 512)


def test_tampered_bin_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """One flipped byte in model.bin must be refused by name, not silently serve other embeddings."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.bin").write_bytes(bytes(data))
    with pytest.raises(BundleCorrupt, match=r"model\.bin"):
        verify_bundle(bad)
    with pytest.raises(BundleCorrupt):
        Embedder(bad)


def test_manifest_of_other_weights_refused(tiny_bundle: Path, tmp_path: Path, calib_dir: Path) -> None:
    """Weights swapped under a manifest (even a well-formed one) must be refused."""
    other = tmp_path / "other"
    export_model("tiny", other, precision="int8", calibration=calib_dir)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_bundle, mixed)
    shutil.copy(other / "model.bin", mixed / "model.bin")
    with pytest.raises(BundleCorrupt):
        verify_bundle(mixed)
    # A manifest whose file hashes were edited to match still fails on model_id.
    manifest = json.loads((mixed / "manifest.json").read_text())
    manifest["files"]["model.bin"] = json.loads((other / "manifest.json").read_text())["files"]["model.bin"]
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleCorrupt, match="model_id"):
        verify_bundle(mixed)


@pytest.mark.parametrize(
    "edit",
    [lambda m: m.pop("dim"), lambda m: m.update(dim="64"), lambda m: m.update(format="x/9"),
     lambda m: m["preprocessing"].update(size=[1, 1])],
    ids=["missing-field", "wrong-type", "format", "preprocessing-hash"],
)  # fmt: skip
def test_bad_manifest_fields_refused(tiny_bundle: Path, tmp_path: Path, edit: object) -> None:
    """A manifest with a missing, mistyped or inconsistent field must raise BundleCorrupt."""
    bad = tmp_path / "b"
    shutil.copytree(tiny_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)  # type: ignore[operator]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleCorrupt):
        read_manifest(bad)


def test_missing_files_and_junk(tiny_bundle: Path, tmp_path: Path) -> None:
    """Missing dir/manifest/xml -> BundleNotFound; non-JSON manifest -> BundleCorrupt."""
    with pytest.raises(BundleNotFound):
        read_manifest(tmp_path / "nope")
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    (b / "model.xml").unlink()
    with pytest.raises(BundleNotFound, match=r"model\.xml"):
        verify_bundle(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleCorrupt):
        read_manifest(b)


def test_bad_sources_raise_export_error(tmp_path: Path) -> None:
    """Unknown recipes, missing files and unreadable models give ExportError, not a traceback."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    for source in ("resnet9000", str(tmp_path / "missing.onnx"), str(junk)):
        with pytest.raises(ExportError):
            export_model(source, tmp_path / "out")
    with pytest.raises(ExportError, match="calibration"):
        export_model("tiny", tmp_path / "out", precision="int8")
    with pytest.raises(ExportError, match="no node"):
        export_model("tiny", tmp_path / "out", pool_node="does-not-exist")
