"""Fleet test helpers: seeded tiny bundles (good, other, constant-output), a generated catalog, releases."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

N_ITEMS = 12


def export_tiny(out: Path, *, seed: int = 0, constant: bool = False) -> Path:
    """A bundle like ``model export --source tiny`` with another seed, or one with a constant output."""
    import openvino as ov
    import openvino.opset13 as ops

    from models.bundle import write_bundle
    from models.export import recipe
    from models.graph import add_preprocessing, cut_at_pool

    rng = np.random.default_rng(seed)
    x = ops.parameter([1, 3, 64, 64], np.float32, name="input")
    node: Any = x
    for c_in, c_out in itertools.pairwise((3, 16, 32, 64)):
        std = 0.0 if constant else np.sqrt(2.0 / (c_in * 9))  # constant: zero weights, bias only
        weight = (rng.standard_normal((c_out, c_in, 3, 3)) * std).astype(np.float32)
        node = ops.convolution(node, ops.constant(weight), [2, 2], [1, 1], [1, 1], [1, 1])
        bias = (np.abs(rng.standard_normal((1, c_out, 1, 1))) * 0.1).astype(np.float32)
        node = ops.relu(ops.add(node, ops.constant(bias)))
    pooled = ops.reduce_mean(node, ops.constant(np.array([2, 3], dtype=np.int64)), keep_dims=True)
    head = ops.convolution(
        pooled,
        ops.constant((rng.standard_normal((10, 64, 1, 1)) * 0.1).astype(np.float32)),
        [1, 1],
        [0, 0],
        [0, 0],
        [1, 1],
    )
    model = ov.Model([ops.result(ops.softmax(head, 1))], [x], "tiny")
    cut, _ = cut_at_pool(model, None)
    prep = recipe("tiny")
    write_bundle(
        out,
        add_preprocessing(cut, prep),
        name=f"tiny-s{seed}{'-const' if constant else ''}",
        source_kind="recipe",
        source_path=None,
        pretrained=False,
        preprocessing=prep,
        precision="fp32",
    )
    return out


def item_image(item: int, variant: int, size: int = 96) -> np.ndarray:
    """A BGR picture unique to ``item`` (coloured blocks); ``variant`` adds seeded noise."""
    rng = np.random.default_rng(1000 + item)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = cv2.resize(blocks, (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int16)
    noise = np.random.default_rng(item * 100 + variant).integers(-12, 13, img.shape)
    out: np.ndarray = np.clip(img + noise * (variant > 0), 0, 255).astype(np.uint8)
    return out


def make_catalog(root: Path, stores: list[str], n_items: int = N_ITEMS, per_item: int = 2) -> Path:
    """A JSON Lines catalog; every item is carried by every store."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_items):
        imgs = []
        for v in range(per_item):
            p = root / "img" / f"item{i}_{v}.png"
            p.parent.mkdir(exist_ok=True)
            assert cv2.imwrite(str(p), item_image(i, v))
            imgs.append(str(p.relative_to(root)))
        rows.append(
            {
                "sku": f"SKU-{i:03d}",
                "title": f"Item {i}",
                "price": f"{i}.50",
                "stores": stores,
                "images": imgs,
            }
        )
    path = root / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_release(
    tmp: Path, bundle: Path, catalog: Path, stores: list[str], key: Ed25519PrivateKey, *, sequence: int
) -> Any:
    """build_release into a file:// artifact store under ``tmp/artifacts``."""
    from cloud.fleet.release import build_release

    return build_release(
        bundle,
        catalog,
        stores,
        key,
        (tmp / "artifacts").as_uri(),
        sequence=sequence,
        release_id=f"rel{sequence}",
        cache_dir=tmp / "cache",
    )


def desired(rel: Any, store: str, kiosk: str, **kw: Any) -> Any:
    from storelens.protocol import DesiredRelease

    return DesiredRelease(
        kiosk=kiosk,
        store=store,
        release=rel.manifest.release,
        sequence=rel.manifest.sequence,
        url=rel.url,
        sig_url=rel.sig_url,
        **kw,
    )
