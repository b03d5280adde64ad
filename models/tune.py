"""Tune the last convolutions of a bundle's backbone on a catalog's own images: a new bundle, new model_id.

Frozen ImageNet features plus any linear head top out near 0.75-0.78 recall@1 on store photos (NOTES.md);
retraining the convolutions just before global pooling, on the catalog's photos and augmented views of
them, moves the pooled features themselves. Cloud side, on a CPU, in minutes: the backbone up to the tail
runs once per view in OpenVINO, the tail (a few convolutions and pointwise ops, read from the graph) is
rebuilt in torch and trained with a cosine-softmax loss over the catalog's items, and the tuned weights
are written back into the same graph. The result is an ordinary bundle whose manifest names its base and
the images it was tuned on; every index built with it carries its model_id, so kiosks must run it too.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.bundle import input_hw, verify_bundle, write_bundle
from models.embedder import shared_core
from models.errors import BadImage, TuneError
from models.tail import Tail, TorchTail, find_tail

__all__ = ["TorchTail", "TuneError", "TuneReport", "find_tail", "tune_bundle"]

_LOGGER = logging.getLogger(__name__)

TUNE_CONVS = 4  # MobileNetV2: its last inverted-residual block (expand, depthwise, project) + the 1x1 conv
VIEWS_PER_IMAGE = 6  # the image itself and 5 augmented views
MIN_VIEWS_PER_ITEM = 20  # an item with one image (an iconic shot) gets more views of it
EPOCHS = 3  # measured on grocery (catalog-only choice): the loss flattens after 2-3
LEARNING_RATE = 3e-4
BATCH = 128
MIN_STEPS_PER_EPOCH = 30
SCALE = 16.0  # cosine-softmax temperature
LABEL_SMOOTHING = 0.1
MAX_FEATURE_BYTES = 2 << 30  # the feature bank (fp16) is capped: fewer views per image beyond it
CHECK_COSINE = 0.999  # the torch tail must reproduce the graph this closely
SAVED_COSINE = 0.995  # and the saved (fp16-weight) tuned bundle its tuned tail

Loader = Callable[[], npt.NDArray[np.uint8]]
Augment = Callable[[npt.NDArray[np.uint8], int, int], list[npt.NDArray[np.uint8]]]


class _Extractor:
    """Runs the bundle's graph up to the tail's inputs (and its own output, for checks)."""

    def __init__(self, model: Any, tail: Tail, hw: tuple[int, int], inference_precision: str) -> None:
        import openvino as ov

        outputs = [tail.start, *tail.externals, model.outputs[0]]
        probe = ov.Model(outputs, model.get_parameters(), "tune_features")
        probe.reshape({probe.inputs[0]: ov.PartialShape([1, hw[0], hw[1], 3])})
        config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": inference_precision}
        self.compiled = shared_core().compile_model(probe, "CPU", config)  # see shared_core
        self.tail_input_size = sum(math.prod(out.get_shape()) for out in self.compiled.outputs[:-1])
        self.hw = hw
        self._local = threading.local()

    def __call__(self, img: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.float32]]:
        from models.embedder import fit_to_input

        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self.compiled.create_infer_request()
        x = fit_to_input(np.ascontiguousarray(img), *self.hw)[None]
        result = req.infer({0: x})
        return [np.array(result[out][0]) for out in self.compiled.outputs]


@dataclass
class TuneReport:
    """What a tune did, for the manifest and the CLI."""

    images: int
    skipped: list[str]
    items: int
    views: int
    epochs: int
    loss: list[float]
    tuned_convs: int
    seconds: float = 0.0


def tune_bundle(
    bundle_dir: Path,
    images: Sequence[Loader],
    labels: Sequence[int],
    out_dir: Path,
    *,
    augment: Augment,
    convs: int = TUNE_CONVS,
    epochs: int = EPOCHS,
    views_per_image: int = VIEWS_PER_IMAGE,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    catalog_id: str | None = None,
) -> tuple[Any, TuneReport]:
    """Tune ``bundle_dir`` on labelled catalog images; write the tuned bundle to ``out_dir``.

    ``images`` are loaders returning uint8 BGR arrays (BadImage skips that image). ``augment(img, n,
    seed)`` returns ``n`` deterministic views of an image (the cloud's store-like views,
    ``cloud.retrieval_augment.augmented_views``). Returns the new manifest and a report; TuneError for a
    graph it cannot tune or too little data.
    """
    import time

    import openvino as ov
    import torch
    import torch.nn.functional as fn

    t0 = time.perf_counter()
    manifest = verify_bundle(bundle_dir)
    if manifest.precision == "int8":
        raise TuneError("tune an fp16/fp32 bundle, then export the tuned one as int8 (quantized weights "
                        "cannot be trained)")  # fmt: skip
    if len(images) != len(labels):
        raise TuneError(f"{len(images)} images but {len(labels)} labels")
    label_arr = np.asarray(labels, np.int64)
    items, inverse = np.unique(label_arr, return_inverse=True)
    if len(items) < 2:
        raise TuneError("tuning needs images of at least two items")
    model = ov.Core().read_model(str(Path(bundle_dir) / "model.xml"))
    tail = find_tail(model, convs)
    head = TorchTail(tail)
    hw = input_hw(manifest.preprocessing)
    extractor = _Extractor(model, tail, hw, manifest.inference_precision)

    per_item = np.bincount(inverse)
    view_bytes = 2 * extractor.tail_input_size  # banked as fp16
    # Beyond the memory cap every image gets proportionally fewer views (at least itself).
    scale = min(1.0, MAX_FEATURE_BYTES / (view_bytes * len(images) * views_per_image))

    def n_views(i: int) -> int:
        want = max(views_per_image, math.ceil(MIN_VIEWS_PER_ITEM / per_item[inverse[i]]))
        return max(1, int(want * scale))

    rng_root = np.random.default_rng(seed)
    seeds = rng_root.integers(0, 2**31, len(images))
    skipped: list[str] = []
    banks: list[list[npt.NDArray[np.float16]]] = [[] for _ in range(1 + len(tail.externals))]
    check_out: list[npt.NDArray[np.float32]] = []  # the graph's own output for the first images
    probe: list[npt.NDArray[np.uint8]] = []  # those images
    check_rows: list[int] = []  # and their rows in the banks
    view_labels: list[int] = []
    Outputs = list[list[npt.NDArray[np.float32]]]

    def work(i: int) -> tuple[int, npt.NDArray[np.uint8] | None, Outputs | None, str | None]:
        try:
            img = images[i]()
        except BadImage as exc:
            return i, None, None, str(exc)
        outs = [extractor(v) for v in [img, *augment(img, n_views(i) - 1, int(seeds[i]))]]
        return i, img, outs, None

    with ThreadPoolExecutor(max_workers=2) as pool:
        for i, img, outs, err in pool.map(work, range(len(images))):
            if img is None or outs is None:
                skipped.append(f"image {i}: {err}")
                continue
            if len(check_out) < 8:
                check_rows.append(len(view_labels))
                check_out.append(outs[0][-1])
                probe.append(img)
            for out in outs:
                for b, a in zip(banks, out[:-1], strict=True):
                    b.append(a.astype(np.float16))
                view_labels.append(int(inverse[i]))
    if len(set(view_labels)) < 2:
        raise TuneError("fewer than two items have a readable image")
    feats = [np.stack(b) for b in banks]
    y = torch.tensor(view_labels)
    n = len(y)

    def embed_all() -> Any:
        with torch.no_grad():
            parts = [fn.normalize(head(*_batch(feats, np.arange(s, min(s + 256, n)))), dim=1)
                     for s in range(0, n, 256)]  # fmt: skip
        return torch.cat(parts)

    base = embed_all()
    ref = torch.from_numpy(np.stack(check_out)).reshape(len(check_out), -1)
    cos = float((fn.normalize(ref, dim=1) * base[check_rows]).sum(1).min())
    if cos < CHECK_COSINE:
        raise TuneError(f"the tail rebuilt in torch does not reproduce the graph (cosine {cos:.4f})")
    protos = torch.zeros(len(items), base.shape[1])
    protos.index_add_(0, y, base)
    protos = fn.normalize(protos, dim=1).requires_grad_(True)

    torch.manual_seed(seed)
    params = list(head.params.values())
    opt = torch.optim.Adam([{"params": params, "lr": learning_rate}, {"params": [protos], "lr": 1e-2}])
    # A small catalog still gets MIN_STEPS_PER_EPOCH steps (batches drawn from reshuffled passes).
    batch = min(BATCH, n)
    steps_per_epoch = max(MIN_STEPS_PER_EPOCH, n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[learning_rate, 1e-2], total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    losses: list[float] = []
    order_rng = np.random.default_rng(seed)
    perm, pos = order_rng.permutation(n), 0
    for _ in range(epochs):
        total = 0.0
        for _ in range(steps_per_epoch):
            if pos + batch > n:
                perm, pos = order_rng.permutation(n), 0
            idx = np.sort(perm[pos : pos + batch])
            pos += batch
            z = fn.normalize(head(*_batch(feats, idx)), dim=1)
            logits = SCALE * z @ fn.normalize(protos, dim=1).T
            loss = fn.cross_entropy(logits, y[idx], label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += loss.item()
        losses.append(round(total / steps_per_epoch, 4))
        _LOGGER.info("tune epoch %d: loss %.3f", len(losses), losses[-1])

    head.write_back()
    report = TuneReport(
        images=len(images) - len(skipped), skipped=skipped, items=len(set(view_labels)), views=n,
        epochs=epochs, loss=losses, tuned_convs=convs, seconds=round(time.perf_counter() - t0, 1),
    )  # fmt: skip
    extra = dict(manifest.extra)
    extra["tuned"] = {
        "base_model_id": manifest.model_id,
        "catalog_id": catalog_id or _catalog_id(label_arr),
        "images": report.images, "items": report.items, "views": report.views, "epochs": epochs,
        "convs": convs, "loss": losses, "seed": seed, "learning_rate": learning_rate,
    }  # fmt: skip
    new = write_bundle(
        out_dir, model, name=f"{manifest.name}-tuned", source_kind="tuned",
        source_path=Path(bundle_dir) / "model.xml", pretrained=manifest.pretrained,
        preprocessing=dict(manifest.preprocessing), precision=manifest.precision, extra=extra,
    )  # fmt: skip
    _check_written(out_dir, probe, _batch(feats, np.asarray(check_rows)), head)
    return new, report


def _batch(feats: list[npt.NDArray[np.float16]], idx: npt.NDArray[np.int64]) -> list[Any]:
    import torch

    return [torch.from_numpy(f[idx].astype(np.float32)) for f in feats]


def _catalog_id(labels: npt.NDArray[np.int64]) -> str:
    return hashlib.sha256(labels.tobytes()).hexdigest()[:16]


def _check_written(
    out_dir: Path, probe: list[npt.NDArray[np.uint8]], inputs: list[Any], head: TorchTail
) -> None:
    """The saved bundle must embed ``probe`` like the tuned torch tail does from their banked tail inputs
    (the trunk below the tail is untouched; the weights are saved as fp16: close, not equal)."""
    import torch
    import torch.nn.functional as fn

    from models.embedder import Embedder

    with Embedder(out_dir) as emb:
        got = emb.embed(probe)
    with torch.no_grad():
        ours = fn.normalize(head(*inputs), dim=1).numpy()
    cos = float(np.min(np.sum(ours * got, axis=1)))
    if cos < SAVED_COSINE:
        raise TuneError(f"the saved tuned bundle does not embed like the tuned weights (cosine {cos:.4f})")
