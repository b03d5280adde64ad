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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.bundle import input_hw, verify_bundle, write_bundle
from models.errors import BadImage, ModelError
from models.graph import POOL_TYPES

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


class TuneError(ModelError):
    """A bundle that cannot be tuned (unsupported graph, too few items or images) or a tune that failed."""


# ---- the graph's tail, read into torch ----

_POINTWISE = ("Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum")
_ACTIVATIONS = ("Relu", "Clamp", "Sigmoid", "Swish", "HSwish", "HSigmoid", "Convert")
_CONVS = ("Convolution", "GroupConvolution")


@dataclass
class Tail:
    """The ops between ``start`` (the input of the N-th last convolution) and the global pool."""

    model: Any
    start: Any  # ov Output
    pool: Any  # ov Node
    nodes: list[Any]  # topological order, pool last
    externals: list[Any] = field(default_factory=list)  # non-constant inputs from outside the tail
    trainable: list[tuple[Any, int]] = field(default_factory=list)  # (node, input index) of weights/biases


def _key(output: Any) -> tuple[str, int]:
    return (output.get_node().get_friendly_name(), output.get_index())


def find_tail(model: Any, convs: int = TUNE_CONVS) -> Tail:
    """Locate the last ``convs`` convolutions before global pooling and everything between them."""
    ops = model.get_ordered_ops()
    pools = [
        op for op in ops
        if op.get_type_name() in POOL_TYPES and op.get_output_partial_shape(0).rank.get_length() == 4
        and all(op.get_output_partial_shape(0)[i] == 1 for i in (2, 3))
    ]  # fmt: skip
    if not pools:
        raise TuneError("the bundle has no global pooling node to tune up to")
    pool = pools[-1]
    # Walk input 0 back from the pool, counting convolutions on the main path.
    node, found = pool, 0
    start = None
    while True:
        value = node.input_value(0)
        node = value.get_node()
        if node.get_type_name() in ("Parameter", "Constant"):
            break
        if node.get_type_name() in _CONVS:
            found += 1
            if found == convs:
                start = node.input_value(0)
                break
    if start is None:
        raise TuneError(f"found {found} convolutions before the pool; --tune-convs must be at most that")
    # The tail: nodes downstream of start and upstream of the pool.
    downstream: set[str] = set()
    frontier = [start]
    while frontier:
        out = frontier.pop()
        for target in out.get_target_inputs():
            consumer = target.get_node()
            name = consumer.get_friendly_name()
            if name not in downstream:
                downstream.add(name)
                frontier.extend(consumer.outputs())
    order = {op.get_friendly_name(): i for i, op in enumerate(ops)}
    upstream: dict[str, Any] = {}
    stack = [pool]
    while stack:
        n = stack.pop()
        name = n.get_friendly_name()
        if name in upstream or name not in downstream:
            continue
        upstream[name] = n
        stack.extend(n.input_value(i).get_node() for i in range(n.get_input_size()))
    nodes = sorted(upstream.values(), key=lambda n: order[n.get_friendly_name()])
    tail = Tail(model, start, pool, nodes)
    start_key = _key(start)
    seen_ext: set[tuple[str, int]] = set()
    for n in nodes:
        kind = n.get_type_name()
        if kind not in _POINTWISE + _ACTIVATIONS + _CONVS + POOL_TYPES:
            name = n.get_friendly_name()
            raise TuneError(f"cannot tune through a {kind} op ({name}); try fewer --tune-convs")
        for i in range(n.get_input_size()):
            v = n.input_value(i)
            k = _key(v)
            if k == start_key or v.get_node().get_friendly_name() in upstream or _is_constant(v):
                continue
            if k not in seen_ext:
                seen_ext.add(k)
                tail.externals.append(v)
        if kind in _CONVS:
            tail.trainable.append((n, 1))
            for target in n.output(0).get_target_inputs():  # a bias Add right after the convolution
                add = target.get_node()
                if add.get_type_name() == "Add" and add.get_friendly_name() in upstream:
                    other = 1 - target.get_index()
                    if _is_constant(add.input_value(other)):
                        tail.trainable.append((add, other))
    return tail


def _is_constant(value: Any) -> bool:
    node = value.get_node()
    if node.get_type_name() == "Constant":
        return True
    if node.get_type_name() in ("Parameter", "ReadValue") or node.get_input_size() == 0:
        return False
    return all(_is_constant(node.input_value(i)) for i in range(node.get_input_size()))


class TorchTail:
    """The tail as a torch function of (start, externals); weights and biases are trainable tensors."""

    def __init__(self, tail: Tail) -> None:
        import torch

        self.tail = tail
        self._const: dict[tuple[str, int], Any] = {}
        self.params: dict[tuple[str, int], Any] = {}
        for node, idx in tail.trainable:
            value = self._constant(node.input_value(idx)).clone().float().requires_grad_(True)
            self.params[(node.get_friendly_name(), idx)] = value
        self._torch = torch

    def _constant(self, value: Any) -> Any:
        import torch

        k = _key(value)
        if k not in self._const:
            node = value.get_node()
            if node.get_type_name() == "Constant":
                data = np.asarray(node.get_data())
                t = torch.from_numpy(data.astype(np.float32) if data.dtype.kind == "f" else data.copy())
            else:
                t = _apply(node, [self._constant(node.input_value(i)) for i in range(node.get_input_size())])
            self._const[k] = t.detach()
        return self._const[k]

    def __call__(self, x: Any, *externals: Any) -> Any:
        """Pooled [N, C] features (not normalised) for start features ``x`` [N, C, H, W]."""
        values: dict[tuple[str, int], Any] = {_key(self.tail.start): x}
        for v, t in zip(self.tail.externals, externals, strict=True):
            values[_key(v)] = t
        for node in self.tail.nodes:
            name = node.get_friendly_name()
            args = []
            for i in range(node.get_input_size()):
                v = node.input_value(i)
                k = _key(v)
                if (name, i) in self.params:
                    args.append(self.params[(name, i)])
                elif k in values:
                    args.append(values[k])
                else:
                    args.append(self._constant(v))
            values[(name, 0)] = _apply(node, args)
        return values[(self.tail.pool.get_friendly_name(), 0)].flatten(1)

    def write_back(self) -> None:
        """Replace the graph's weight and bias inputs by the trained values (shapes as before)."""
        import openvino.opset13 as ops

        for node, idx in self.tail.trainable:
            value = self.params[(node.get_friendly_name(), idx)].detach().numpy().astype(np.float32)
            shape = tuple(node.input_value(idx).get_partial_shape().to_shape())
            node.input(idx).replace_source_output(ops.constant(value.reshape(shape)).output(0))
        self.tail.model.validate_nodes_and_infer_types()


def _pads(node: Any, x: Any, w: Any) -> tuple[list[int], list[int]]:
    attrs = node.get_attributes()
    auto = str(attrs.get("auto_pad", "explicit")).lower()
    strides, dil = list(attrs["strides"]), list(attrs["dilations"])
    if auto in ("same_upper", "same_lower"):
        begin, end = [], []
        for i, (s, d) in enumerate(zip(strides, dil, strict=True)):
            size, k = x.shape[2 + i], w.shape[-2 + i]
            out = math.ceil(size / s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            lo = total // 2 if auto == "same_upper" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
        return begin, end
    if auto == "valid":
        return [0, 0], [0, 0]
    return list(attrs["pads_begin"]), list(attrs["pads_end"])


def _apply(node: Any, args: list[Any]) -> Any:
    """One OpenVINO op in torch (the ops ``find_tail`` admits, plus constant-folding helpers)."""
    import torch
    import torch.nn.functional as fn

    kind = node.get_type_name()
    if kind == "Convert":
        return args[0].float() if node.get_output_element_type(0).is_real() else args[0]
    if kind in _POINTWISE:
        a, b = args
        binary: dict[str, Callable[[Any, Any], Any]] = {
            "Add": torch.add, "Subtract": torch.sub, "Multiply": torch.mul, "Divide": torch.div,
            "Maximum": torch.maximum, "Minimum": torch.minimum,
        }  # fmt: skip
        return binary[kind](a, b)
    if kind == "Relu":
        return fn.relu(args[0])
    if kind == "Clamp":
        attrs = node.get_attributes()
        return args[0].clamp(float(attrs["min"]), float(attrs["max"]))
    if kind == "Sigmoid":
        return torch.sigmoid(args[0])
    if kind == "Swish":
        beta = args[1] if len(args) > 1 else 1.0
        return args[0] * torch.sigmoid(args[0] * beta)
    if kind == "HSwish":
        return fn.hardswish(args[0])
    if kind == "HSigmoid":
        return fn.hardsigmoid(args[0])
    if kind in _CONVS:
        x, w = args
        groups = 1
        if kind == "GroupConvolution":
            groups = w.shape[0]
            w = w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])
        begin, end = _pads(node, x, w)
        attrs = node.get_attributes()
        if begin != end:
            x = fn.pad(x, [begin[1], end[1], begin[0], end[0]])
            pad: list[int] = [0, 0]
        else:
            pad = begin
        return fn.conv2d(x, w, stride=list(attrs["strides"]), padding=pad, dilation=list(attrs["dilations"]),
                         groups=groups)  # fmt: skip
    if kind in POOL_TYPES:
        if kind == "ReduceMean":
            return args[0].mean(dim=(2, 3), keepdim=True)
        return fn.adaptive_avg_pool2d(args[0], 1)
    raise TuneError(f"cannot evaluate a {kind} op ({node.get_friendly_name()}) in the tuning tail")


# ---- views and features ----


def _augment(img: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Random resized crop (30-100% of the area), flip, brightness/contrast jitter."""
    h, w = img.shape[:2]
    ch, cw = h, w
    for _ in range(10):
        area = rng.uniform(0.3, 1.0) * h * w
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        ch, cw = h, w
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = img[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    gain, offset = rng.uniform(0.75, 1.25), rng.uniform(-25, 25)
    jittered: npt.NDArray[np.uint8] = np.clip(out.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
    return jittered


class _Extractor:
    """Runs the bundle's graph up to the tail's inputs (and its own output, for checks)."""

    def __init__(self, model: Any, tail: Tail, hw: tuple[int, int], inference_precision: str) -> None:
        import openvino as ov

        outputs = [tail.start, *tail.externals, model.outputs[0]]
        probe = ov.Model(outputs, model.get_parameters(), "tune_features")
        probe.reshape({probe.inputs[0]: ov.PartialShape([1, hw[0], hw[1], 3])})
        config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": inference_precision}
        self.compiled = ov.Core().compile_model(probe, "CPU", config)
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
    convs: int = TUNE_CONVS,
    epochs: int = EPOCHS,
    views_per_image: int = VIEWS_PER_IMAGE,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    catalog_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Any, TuneReport]:
    """Tune ``bundle_dir`` on labelled catalog images; write the tuned bundle to ``out_dir``.

    ``images`` are loaders returning uint8 BGR arrays (BadImage skips that image). Returns the new
    manifest and a report. TuneError for a graph it cannot tune or too little data.
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
    first = extractor(np.zeros((*hw, 3), np.uint8))
    view_bytes = sum(a.size for a in first[:-1]) * 2
    budget_views = max(len(images), MAX_FEATURE_BYTES // max(view_bytes, 1))

    def n_views(i: int) -> int:
        want = max(views_per_image, math.ceil(MIN_VIEWS_PER_ITEM / per_item[inverse[i]]))
        return int(max(1, min(want, budget_views * want // max(len(images) * views_per_image, 1))))

    rng_root = np.random.default_rng(seed)
    seeds = rng_root.integers(0, 2**31, len(images))
    skipped: list[str] = []
    banks: list[list[npt.NDArray[np.float16]]] = [[] for _ in range(1 + len(tail.externals))]
    check_out: list[npt.NDArray[np.float32]] = []
    probe: list[npt.NDArray[np.uint8]] = []
    check_rows: list[int] = []
    view_labels: list[int] = []
    lock = threading.Lock()
    done = [0]

    def work(i: int) -> tuple[int, list[list[npt.NDArray[np.float32]]] | None, str | None]:
        try:
            img = images[i]()
        except BadImage as exc:
            return i, None, str(exc)
        rng = np.random.default_rng(int(seeds[i]))
        outs = [extractor(img)]
        outs += [extractor(_augment(img, rng)) for _ in range(n_views(i) - 1)]
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(images))
        return i, outs, None

    with ThreadPoolExecutor(max_workers=2) as pool:
        for i, outs, err in pool.map(work, range(len(images))):
            if outs is None:
                skipped.append(f"image {i}: {err}")
                continue
            if len(check_out) < 8:
                check_rows.append(len(view_labels))
                check_out.append(outs[0][-1])
                probe.append(images[i]())
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
    n_items = int(inverse.max()) + 1
    protos = torch.zeros(n_items, base.shape[1])
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
    _check_written(out_dir, probe, extractor, head)
    return new, report


def _batch(feats: list[npt.NDArray[np.float16]], idx: npt.NDArray[np.int64]) -> list[Any]:
    import torch

    return [torch.from_numpy(f[idx].astype(np.float32)) for f in feats]


def _catalog_id(labels: npt.NDArray[np.int64]) -> str:
    return hashlib.sha256(labels.tobytes()).hexdigest()[:16]


def _check_written(
    out_dir: Path, probe: list[npt.NDArray[np.uint8]], extractor: _Extractor, head: TorchTail
) -> None:
    """The saved bundle must embed like the tuned torch tail (its weights saved as fp16: close, not equal).

    The extractor was compiled before the weights changed, and the trunk below the tail is untouched, so
    its tail inputs are still right for the tuned graph.
    """
    import torch
    import torch.nn.functional as fn

    from models.embedder import Embedder

    with Embedder(out_dir) as emb:
        got = emb.embed(probe)
    feats = [extractor(p)[:-1] for p in probe]
    inputs = [torch.from_numpy(np.stack([f[j] for f in feats])) for j in range(len(feats[0]))]
    with torch.no_grad():
        ours = fn.normalize(head(*inputs), dim=1).numpy()
    cos = float(np.min(np.sum(ours * got, axis=1)))
    if cos < SAVED_COSINE:
        raise TuneError(f"the saved tuned bundle does not embed like the tuned weights (cosine {cos:.4f})")
