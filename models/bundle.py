"""The model bundle: model.xml + model.bin + manifest.json, its fingerprint, and its verification."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.errors import BundleCorrupt, BundleNotFound, ExportError
from storelens.fsutil import atomic_write_json, fsync_dir, sha256_file, sha256_files

_LOGGER = logging.getLogger(__name__)

FORMAT = "storelens.bundle/1"
XML_NAME = "model.xml"
BIN_NAME = "model.bin"
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
# What the runtime asks the plugin for. f32 everywhere: left alone, OpenVINO picks bf16 on CPUs that have
# it, and then a catalog built in the cloud and a kiosk's queries disagree (reference/performance.md).
INFERENCE_PRECISION = "f32"
INPUT_SPEC: dict[str, Any] = {"dtype": "u8", "layout": "NHWC", "color": "BGR", "shape": [1, -1, -1, 3]}
_MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KiB; refuse anything absurd before parsing


def canonical_json(obj: Any) -> bytes:
    """Key-sorted, whitespace-free UTF-8 JSON: the form that hashes are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def preprocessing_hash(preprocessing: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a preprocessing spec."""
    return hashlib.sha256(canonical_json(preprocessing)).hexdigest()


def input_hw(preprocessing: dict[str, Any]) -> tuple[int, int]:
    """The (height, width) crops are pre-sized to before the graph: the recipe size over its centre crop
    (224 with crop 0.875 -> 256: Resize(256) then the graph's CenterCrop(224))."""
    share = float(preprocessing.get("crop", 1.0))
    h, w = (int(v) for v in preprocessing["size"])
    return round(h / share), round(w / share)


def compute_model_id(xml: Path, bin: Path) -> str:
    """sha256 over the xml bytes followed by the bin bytes: the model's fingerprint."""
    return sha256_files([xml, bin])


@dataclass(frozen=True, slots=True)
class BundleManifest:
    """manifest.json of a bundle; ``model_id`` is what indexes and kiosks compare."""

    format: str
    model_id: str
    name: str
    source: dict[str, Any]
    pretrained: bool
    input: dict[str, Any]
    preprocessing: dict[str, Any]
    preprocessing_hash: str
    dim: int
    metric: str
    precision: str
    inference_precision: str
    openvino_version: str
    created_at: str
    files: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (deep copy)."""
        return dataclasses.asdict(self)

    def describe(self) -> dict[str, str]:
        """What people call this bundle: its name and version (the export time; the id is a sha256)."""
        return {"name": self.name, "version": self.created_at}

    @classmethod
    def from_dict(cls, data: Any) -> BundleManifest:
        """Build from parsed JSON; BundleCorrupt naming the first bad field."""
        if not isinstance(data, dict):
            raise BundleCorrupt("manifest is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BundleCorrupt(f"manifest has unknown fields: {sorted(unknown)}")
        expected: dict[str, type | tuple[type, ...]] = {
            "format": str, "model_id": str, "name": str, "source": dict, "pretrained": bool,
            "input": dict, "preprocessing": dict, "preprocessing_hash": str, "dim": int, "metric": str,
            "precision": str, "inference_precision": str, "openvino_version": str, "created_at": str,
            "files": dict, "extra": dict,
        }  # fmt: skip
        for name, typ in expected.items():
            if name not in data:
                if name == "extra":
                    continue
                raise BundleCorrupt(f"manifest lacks field {name!r}")
            value = data[name]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise BundleCorrupt(f"manifest field {name!r} has the wrong type")
        if data["format"] != FORMAT:
            raise BundleCorrupt(f"manifest format {data['format']!r} is not {FORMAT!r}")
        if data["precision"] not in PRECISIONS:
            raise BundleCorrupt(f"manifest precision {data['precision']!r} is not one of {PRECISIONS}")
        if data["metric"] != "cosine":
            raise BundleCorrupt(f"manifest metric {data['metric']!r} is not 'cosine'")
        if data["dim"] <= 0:
            raise BundleCorrupt("manifest dim must be positive")
        if preprocessing_hash(data["preprocessing"]) != data["preprocessing_hash"]:
            raise BundleCorrupt("manifest preprocessing_hash does not match its preprocessing")
        for fname in (XML_NAME, BIN_NAME):
            entry = data["files"].get(fname)
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("size"), int)
            ):
                raise BundleCorrupt(f"manifest files entry for {fname} is missing or malformed")
        return cls(**data)


def read_manifest(bundle_dir: Path) -> BundleManifest:
    """Parse manifest.json only (no hashing); BundleNotFound / BundleCorrupt."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleNotFound(f"bundle directory {bundle_dir} does not exist")
    if not path.is_file():
        raise BundleNotFound(f"{path} is missing")
    raw = path.read_bytes()
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise BundleCorrupt(f"{path} is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleCorrupt(f"{path} is not valid JSON: {exc}") from exc
    try:
        return BundleManifest.from_dict(data)
    except BundleCorrupt as exc:
        raise BundleCorrupt(f"{path}: {exc}") from exc


def verify_bundle(bundle_dir: Path) -> BundleManifest:
    """Parse the manifest and check sizes and sha256 of model.xml/model.bin and the model_id."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for fname in (XML_NAME, BIN_NAME):
        path = bundle_dir / fname
        if not path.is_file():
            raise BundleNotFound(f"{path} is missing")
        entry = manifest.files[fname]
        size = path.stat().st_size
        if size != entry["size"]:
            raise BundleCorrupt(f"{path} is {size} bytes, the manifest says {entry['size']}")
        if sha256_file(path) != entry["sha256"]:
            raise BundleCorrupt(f"{path} does not match the sha256 in the manifest")
    model_id = compute_model_id(bundle_dir / XML_NAME, bundle_dir / BIN_NAME)
    if model_id != manifest.model_id:
        raise BundleCorrupt(f"{bundle_dir}: model_id does not match model.xml + model.bin")
    return manifest


_ATTR = re.compile(r'( names?=")([^"]*)(")')
_AUTO = re.compile(r"(?<![0-9A-Za-z])([A-Z][A-Za-z]*)_(\d+)(?![0-9])")


def _canonical_names(xml: Path) -> None:
    """Renumber OpenVINO's auto names (``Gather_542``: a process-wide counter) by order of appearance.

    Only name attributes change, consistently, so the graph is the same; the point is that exporting the
    same source twice gives the same model.xml bytes, hence the same model_id.
    """
    numbers: dict[str, str] = {}

    def renumber(m: re.Match[str]) -> str:
        new = numbers.setdefault(m.group(2), str(len(numbers)))
        return f"{m.group(1)}_{new}"

    def attr(m: re.Match[str]) -> str:
        return m.group(1) + _AUTO.sub(renumber, m.group(2)) + m.group(3)

    text = xml.read_text(encoding="utf-8")
    xml.write_text(_ATTR.sub(attr, text), encoding="utf-8")


def _output_dim(ov_model: Any) -> int:
    shape = ov_model.output(0).get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic:
        raise ExportError(f"model output must be [1, dim], got {shape}")
    return int(shape[1].get_length())


def write_bundle(
    out_dir: Path,
    ov_model: Any,
    *,
    name: str,
    source_kind: str,
    source_path: Path | str | None,
    pretrained: bool,
    preprocessing: dict[str, Any],
    precision: str,
    extra: dict[str, Any] | None = None,
) -> BundleManifest:
    """Save ``ov_model`` as IR in ``out_dir`` and write its manifest, atomically and last."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a folder for the bundle (it is left as it is)")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    # An old manifest must not vouch for half-written new weights if we crash below.
    manifest_path.unlink(missing_ok=True)
    fsync_dir(out_dir)
    xml, bin_ = out_dir / XML_NAME, out_dir / BIN_NAME
    try:
        ov.save_model(ov_model, xml, compress_to_fp16=precision in ("fp16", "int8"))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
        raise ExportError(f"could not save the model to {out_dir}: {exc}") from exc
    _canonical_names(xml)
    for p in (xml, bin_):
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())
    source: dict[str, Any] = {"kind": source_kind, "path": None, "sha256": None}
    if source_path is not None:
        sp = Path(source_path)
        source["path"] = sp.name
        source["sha256"] = sha256_file(sp) if sp.is_file() else None
    files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in (xml, bin_)}
    manifest = BundleManifest(
        format=FORMAT,
        model_id=compute_model_id(xml, bin_),
        name=name,
        source=source,
        pretrained=bool(pretrained),
        input=dict(INPUT_SPEC),
        preprocessing=preprocessing,
        preprocessing_hash=preprocessing_hash(preprocessing),
        dim=_output_dim(ov_model),
        metric="cosine",
        precision=precision,
        inference_precision=INFERENCE_PRECISION,
        openvino_version=ov.get_version(),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        files=files,
        extra=dict(extra or {}),
    )
    atomic_write_json(manifest_path, manifest.to_dict())
    _LOGGER.info(
        "wrote bundle %s: model_id %s dim %d %s", out_dir, manifest.model_id[:12], manifest.dim, precision
    )
    return manifest
