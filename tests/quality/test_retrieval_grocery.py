"""Retrieval quality on real grocery photos (protocol B, half the train photos): adapter and open set.

Catalog = every other train photo + the 81 iconic images; queries = all val photos, which nothing is
fitted or calibrated on. Embeddings are cached per model_id under build/test-cache/quality, so a rerun
takes seconds; a cold run embeds ~1,700 photos (about 30 s on 2 cores).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cloud.open_set import OPEN_SET_KNOWN_LOSS, OpenSetRule, calibrate_open_set, is_match
from cloud.retrieval import fit_lda_adapter, item_scores
from tests.conftest import REPO, shared_path
from tests.models.grocery import N_ITEMS

_LOGGER = logging.getLogger(__name__)

MOBILENET = ("models", "coral", "tf2_mobilenet_v2_1.0_224_ptq.tflite")
GROCERY = ("data", "grocery")
TRAIN_STEP = 2  # every other train photo: halves the embedding cost, costs ~1 point of R@1
OPEN_SET_SEED = 6  # the 16 left-out items of scripts/eval_grocery.py
CACHE = REPO / "build" / "test-cache" / "quality"


def _rows(root: Path) -> dict[str, list[tuple[Path, int]]]:
    def split(name: str) -> list[tuple[Path, int]]:
        out = []
        for line in (root / f"{name}.txt").read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0]:
                out.append((root / parts[0], int(parts[1])))
        return out

    with open(root / "classes.csv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)
        iconic = [(root / row[4].lstrip("/"), int(row[1])) for row in reader]
    return {"train": split("train")[::TRAIN_STEP], "iconic": iconic, "val": split("val")}


@pytest.fixture(scope="session")
def grocery_b(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Model-space vectors and labels of the reduced protocol B, embedded once per model_id."""
    from models.embedder import Embedder
    from models.export import export_model
    from models.images import load_image

    source = shared_path(*MOBILENET)
    rows = _rows(shared_path(*GROCERY))
    bundle = tmp_path_factory.mktemp("quality") / "bundle"
    export_model(str(source), bundle, precision="fp16")
    with Embedder(bundle, mode="latency") as embedder:
        key = hashlib.sha256(json.dumps({k: [str(p) for p, _ in v] for k, v in rows.items()}).encode())
        cache = CACHE / f"{embedder.model_id[:16]}-{key.hexdigest()[:12]}.npz"
        if cache.exists():
            return dict(np.load(cache))
        out: dict[str, np.ndarray] = {}
        for name, split in rows.items():
            vecs = [
                embedder.embed([load_image(p) for p, _ in split[i : i + 64]])
                for i in range(0, len(split), 64)
            ]
            out[name] = np.vstack(vecs)
            out[f"{name}_y"] = np.array([c for _, c in split], np.int64)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)  # type: ignore[arg-type]
    return out


@pytest.mark.slow
@pytest.mark.shared
def test_adapter_and_open_set_on_grocery(grocery_b: dict[str, np.ndarray]) -> None:
    """LDA adapter lifts plain R@1 (~0.52 -> ~0.71); the open-set rule the build ships stays near its promise.

    Measured with the fp16 MobileNetV2 bundle (recipe centre crop 0.875): plain R@1 0.517, adapter 0.713;
    open set (16 items left out), rule calibrated as cloud/build.py does: in-catalog R@1 0.763 free and
    0.718 at the rule, 0.273 of unseen queries answered "no match". (Before the centre crop: adapter
    0.703, 0.751 free and at the rule, 0.127 rejected: the crop made the catalog's held-out photos look
    more alike than store photos, so the same calibration now rejects more of both.)
    """
    d = grocery_b
    x = np.vstack([d["train"], d["iconic"]])
    y = np.concatenate([d["train_y"], d["iconic_y"]])
    qy = d["val_y"]

    adapter = fit_lda_adapter(x, y)
    r1 = float(np.mean(item_scores(adapter.apply(d["val"]) @ adapter.apply(x).T, y, N_ITEMS).argmax(1) == qy))
    plain = float(np.mean(item_scores(d["val"] @ x.T, y, N_ITEMS).argmax(1) == qy))
    _LOGGER.info("protocol B (half train): plain R@1 %.3f, adapter R@1 %.3f", plain, r1)
    assert r1 >= 0.66
    assert r1 >= plain + 0.10

    rng = np.random.default_rng(OPEN_SET_SEED)
    unseen = rng.choice(N_ITEMS, size=round(0.2 * N_ITEMS), replace=False)
    rows = np.flatnonzero(~np.isin(y, unseen))
    xk, yk = x[rows], y[rows]
    shipped = calibrate_open_set(xk, yk, max_known_loss=OPEN_SET_KNOWN_LOSS)
    rule = OpenSetRule.from_dict(json.loads(json.dumps(shipped.to_dict())))
    ad = fit_lda_adapter(xk, yk)
    scores = item_scores(ad.apply(d["val"]) @ ad.apply(xk).T, yk, N_ITEMS)
    known = ~np.isin(qy, unseen)
    correct = (scores.argmax(1) == qy) & known
    answered = np.array([is_match(rule, row) for row in scores])
    free = float(np.mean(correct[known]))
    at_rule = float(np.mean(correct[known] & answered[known]))
    no_match = float(np.mean(~answered[~known]))
    _LOGGER.info("open set: in-catalog R@1 %.3f free, %.3f at the rule; unseen no-match %.3f; rule %s",
                 free, at_rule, no_match, rule.to_dict())  # fmt: skip
    # Calibrated on the catalog to give up 1 point of in-catalog R@1; store photos are harder than the
    # catalog's own held-out photos, and it must not give up more than 5 here. Rejection of unseen items
    # is weak with these features (docs/NOTES.md, retrieval quality).
    assert free - at_rule <= 0.05
    assert no_match >= 0.05
    assert 0.0 < rule.threshold < 2.0
