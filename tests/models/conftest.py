"""Session fixtures: bundles exported once (tiny everywhere; real models when ../shared is present)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.export import export_model
from tests.conftest import shared_path

MOBILENET = ("models", "coral", "tf2_mobilenet_v2_1.0_224_ptq.tflite")
GROCERY = ("data", "grocery")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fp16 bundle (dim 64, random weights), exported in well under a second."""
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    export_model("tiny", out, precision="fp16")
    return out


@pytest.fixture(scope="session", autouse=True)
def _export_once_per_session(tiny_bundle: Path) -> None:
    """The first export in a process starts a library ThreadPoolExecutor that lives for the process;
    starting it here, before any test, keeps the leaked-thread guard about our threads."""


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 smooth random photos (PNG and JPEG) for int8 calibration."""
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(7)
    for i in range(12):
        img = cv2.GaussianBlur(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), (9, 9), 0)
        cv2.imwrite(str(folder / f"{i}.{'png' if i % 2 else 'jpg'}"), img)
    return folder


@pytest.fixture(scope="session")
def mobilenet_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp16 and int8 (NNCF, calibrated on grocery train photos only) bundles of the Coral MobileNetV2."""
    source = shared_path(*MOBILENET)
    train = shared_path(*GROCERY, "train")
    root = tmp_path_factory.mktemp("mobilenet")
    export_model(str(source), root / "fp16", precision="fp16")
    export_model(str(source), root / "int8", precision="int8", calibration=train)
    return {"fp16": root / "fp16", "int8": root / "int8"}


@pytest.fixture(scope="session")
def resnet18_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """resnet18 from a saved random torchvision-style .pth, and the untrained recipe (both fp16).

    Session-scoped also because torch's tracing leaves a ThreadPoolExecutor running for the process.
    """
    import torch

    from models.resnet import build_resnet

    root = tmp_path_factory.mktemp("resnet18")
    pth = root / "resnet18.pth"
    torch.save(build_resnet("resnet18", seed=3).state_dict(), pth)
    export_model(str(pth), root / "pth", precision="fp16")
    export_model("resnet18", root / "recipe", precision="fp16")
    return {"pth_file": pth, "pth": root / "pth", "recipe": root / "recipe"}
