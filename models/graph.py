"""Graph surgery with OpenVINO: cut a backbone at global pooling, L2-normalise, bake preprocessing in."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np

from models.errors import ExportError

_LOGGER = logging.getLogger(__name__)

POOL_TYPES = ("AvgPool", "ReduceMean", "AdaptiveAvgPool")
# NormalizeL2 epsilon: keeps an all-zero feature (a black crop through a ReLU net) finite, far below
# any real feature norm.
_L2_EPS = 1e-12


def is_global_pooled(shape: Any) -> bool:
    """True for a static-rank [N, C, 1, 1] with a static C."""
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:
        return False
    return bool(shape[1].is_static and all(d.is_static and d.get_length() == 1 for d in (shape[2], shape[3])))


def find_pool_output(model: Any, pool_node: str | None = None) -> tuple[Any, bool]:
    """The output to cut at, and whether it still needs global average pooling (a named [N,C,H,W] node)."""
    ops = model.get_ordered_ops()
    if pool_node is not None:
        for op in ops:
            if op.get_friendly_name() == pool_node:
                out = op.output(0)
                shape = out.get_partial_shape()
                if is_global_pooled(shape):
                    return out, False
                if shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static:
                    return out, True
                if shape.rank.is_static and shape.rank.get_length() == 2 and shape[1].is_static:
                    return out, False
                raise ExportError(f"node {pool_node!r} has output shape {shape}; need [N,C,H,W] or [N,C]")
        raise ExportError(f"no node named {pool_node!r} in the model")
    for op in reversed(ops):
        if op.get_type_name() in POOL_TYPES and is_global_pooled(op.get_output_partial_shape(0)):
            head_input = _pooled_logits_input(model, op)
            if head_input is not None:
                return head_input, True
            return op.output(0), False
    raise ExportError(
        "found no global pooling node (AvgPool/ReduceMean with an [N,C,1,1] output); pass --pool-node NAME"
    )


def _pooled_logits_input(model: Any, pool: Any) -> Any | None:
    """For nets whose classifier is a conv before the pool (SqueezeNet): the conv's input, else None.

    The pool is over logits when its channel count equals the model's output size; then the features are
    the input of the nearest Convolution above it (through bias Add, ReLU, Convert, FakeQuantize).
    """
    channels = pool.get_output_partial_shape(0)[1].get_length()
    out_shape = model.output(0).get_partial_shape()
    if out_shape.is_dynamic:
        return None
    classes = 1
    for d in list(out_shape.to_shape())[1:]:
        classes *= int(d)
    if classes != channels:
        return None
    node = pool.input_value(0).get_node()
    for _ in range(8):  # a handful of elementwise ops at most between the head conv and the pool
        kind = node.get_type_name()
        if kind == "Convolution":
            _LOGGER.info("%s pools the %d logits; cutting before %s", pool.get_friendly_name(), channels,
                         node.get_friendly_name())  # fmt: skip
            return node.input_value(0)
        if kind not in ("Add", "Relu", "Clamp", "Convert", "FakeQuantize", "Multiply"):
            return None
        node = node.input_value(0).get_node()
    return None


def cut_at_pool(model: Any, pool_node: str | None = None) -> tuple[Any, str]:
    """A model ending at the pooled feature, flattened, f32, L2-normalised: ([1, dim] model, cut node)."""
    import openvino as ov
    import openvino.opset13 as ops

    out, needs_pool = find_pool_output(model, pool_node)
    cut_name = out.get_node().get_friendly_name()
    feat = out
    if needs_pool:
        axes = ops.constant(np.array([2, 3], dtype=np.int64))
        feat = ops.reduce_mean(feat, axes, keep_dims=False).output(0)
    if feat.get_element_type() != ov.Type.f32:
        feat = ops.convert(feat, "f32").output(0)
    channels = feat.get_partial_shape()[1].get_length()
    flat = ops.reshape(feat, ops.constant(np.array([-1, channels], dtype=np.int64)), special_zero=False)
    norm = ops.normalize_l2(flat, ops.constant(np.array([1], dtype=np.int64)), _L2_EPS, "max")
    result = ops.result(norm)
    result.output(0).get_tensor().set_names({"embedding"})
    cut = ov.Model([result], model.get_parameters(), "storelens_embedder")
    _LOGGER.info("cut at %s (%d channels, added pooling: %s)", cut_name, channels, needs_pool)
    return cut, cut_name


def stable_names(model: Any) -> Any:
    """Rename auto-named nodes (``Type_1234``, from a process-wide counter) by graph order, in place.

    Without this the same export gives a different model.xml, hence model_id, in every process.
    """
    for i, op in enumerate(model.get_ordered_ops()):
        name = op.get_friendly_name()
        prefix, _, suffix = name.rpartition("_")
        if prefix == op.get_type_name() and suffix.isdigit():
            op.set_friendly_name(f"{prefix}_{i}")
    return model


def strip_fake_quantize(model: Any) -> int:
    """Replace every FakeQuantize (in place) by its float map, clamp + affine; returns how many.

    A quantized TFLite reads as FakeQuantize ops that the CPU runs in int8 whatever the bundle says; an
    fp32/fp16 bundle should run in float, and int8 comes from NNCF on the float graph instead.
    """
    import openvino.opset13 as ops

    n = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        x, in_lo, in_hi, out_lo, out_hi = (op.input_value(i) for i in range(5))
        clamped = ops.minimum(ops.maximum(x, in_lo), in_hi)
        ratio = ops.divide(ops.subtract(out_hi, out_lo), ops.subtract(in_hi, in_lo))
        mapped = ops.add(ops.multiply(ops.subtract(clamped, in_lo), ratio), out_lo)
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(mapped.output(0))
        n += 1
    if n:
        model.validate_nodes_and_infer_types()
        _LOGGER.info("replaced %d FakeQuantize ops by float clamps: the source was quantized", n)
    return n


# Ops a weight-dequantisation chain (int8 constant -> Convert -> Subtract zero point -> Multiply scale) is
# made of, with their numpy meaning; anything else is left alone.
_CONST_OPS = ("Constant", "Convert", "Subtract", "Multiply", "Reshape", "Unsqueeze", "Transpose")


def _const_value(out: Any) -> np.ndarray | None:
    """The float32 value of a constant-only weight subgraph, or None if it is not one we can evaluate."""
    node = out.get_node()
    kind = node.get_type_name()
    if kind not in _CONST_OPS:
        return None
    if kind == "Constant":
        return np.asarray(node.get_data())
    args = [_const_value(node.input_value(i)) for i in range(node.get_input_size())]
    if any(a is None for a in args):
        return None
    x = args[0]
    assert x is not None
    if kind == "Convert":
        return x.astype(np.float32)
    other = np.asarray(args[1]) if len(args) > 1 else None
    if kind == "Subtract":
        return np.asarray(x - other)
    if kind == "Multiply":
        return np.asarray(x * other)
    if kind == "Transpose":
        return np.transpose(x, other)
    return x.reshape(tuple(node.get_output_shape(0)))  # Reshape, Unsqueeze


def materialize_weights(model: Any) -> int:
    """Fold dequantised weights (int8 -> Convert -> scale) of every convolution into float32 constants.

    A quantized TFLite stores int8 weights behind a Convert/Multiply chain that the CPU plugin runs as
    "decompressed weights". Compiled with 2 streams (the THROUGHPUT hint) that path returned wrong
    vectors (cosine 0.0-0.3 to a 1-stream compile, NaNs, different on every compile); with plain float
    weights 2 streams agree with 1 (cosine 1.0). The IR then stores them as fp16 like any other model.
    """
    import openvino.opset13 as ops

    n = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        weights = op.input_value(1)
        if weights.get_node().get_type_name() == "Constant":
            continue
        value = _const_value(weights)
        if value is None or value.dtype.kind != "f":
            continue
        op.input(1).replace_source_output(ops.constant(np.ascontiguousarray(value, np.float32)).output(0))
        n += 1
    if n:
        model.validate_nodes_and_infer_types()
        _LOGGER.info("folded %d dequantised weight tensors into float constants", n)
    return n


def has_unfolded_int_weights(model: Any) -> bool:
    """True for what ``materialize_weights`` removes: integer weight constants dequantised in the graph
    (Convert -> Multiply) with float activations (no FakeQuantize): wrong in 2-stream compiles."""
    import openvino as ov

    ops = model.get_ordered_ops()
    if any(op.get_type_name() == "FakeQuantize" for op in ops):
        return False  # an int8 (NNCF or TFLite-as-is) model: the int8 path, measured right in 2 streams
    ints = (ov.Type.i8, ov.Type.u8, ov.Type.i4, ov.Type.u4)
    return any(
        op.get_type_name() == "Convert"
        and op.input_value(0).get_node().get_type_name() == "Constant"
        and op.get_input_element_type(0) in ints
        for op in ops
    )


def _centre_crop(image: Any, share: float) -> Any:
    """In-graph centre crop of an NHWC image of any size: the middle ``share`` of its height and width."""
    import openvino.opset13 as ops

    hw = ops.gather(ops.shape_of(image, "i64"), ops.constant(np.array([1, 2], np.int64)), 0)
    scaled = ops.multiply(ops.convert(hw, "f32"), np.float32(share))
    kept = ops.convert(ops.round(scaled, "half_to_even"), "i64")
    kept = ops.maximum(kept, ops.constant(np.array([1, 1], np.int64)))
    begin = ops.divide(ops.subtract(hw, kept), ops.constant(np.array([2, 2], np.int64)))
    end = ops.add(begin, kept)
    step = ops.constant(np.array([1, 1], np.int64))
    return ops.slice(image, begin, end, step, ops.constant(np.array([1, 2], np.int64))).output(0)


def add_preprocessing(model: Any, prep: dict[str, Any]) -> Any:
    """Prepend u8 BGR NHWC any-size input -> centre crop -> resize (on u8) -> colour -> f32 -> mean/scale."""
    import openvino as ov
    from openvino.preprocess import ColorFormat, PrePostProcessor, ResizeAlgorithm

    model = model.clone()  # PrePostProcessor and reshape edit in place; the caller keeps its model
    params = model.get_parameters()
    if len(params) != 1:
        raise ExportError(f"the model must have exactly one input, it has {len(params)}")
    pshape = params[0].get_partial_shape()
    if pshape.rank.is_dynamic or pshape.rank.get_length() != 4:
        raise ExportError(f"the model input must be 4-D, got {pshape}")
    model_layout = _guess_layout(pshape)
    h, w = (int(v) for v in prep["size"])
    # Fix the model's own spatial size to the recipe's so resize has a static target.
    n_axis, c_axis = 0, model_layout.index("C")
    static = [1, 0, 0, 0]
    static[c_axis] = 3
    static[model_layout.index("H")], static[model_layout.index("W")] = h, w
    if any(pshape[i].is_static and pshape[i].get_length() != static[i] for i in range(4) if i != n_axis):
        raise ExportError(f"model input {pshape} ({model_layout}) does not fit the recipe size {h}x{w}")
    model.reshape({params[0].output(0): ov.PartialShape(static)})

    ppp = PrePostProcessor(model)
    inp = ppp.input()
    inp.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(
        ColorFormat.BGR
    ).set_spatial_dynamic_shape()
    inp.model().set_layout(ov.Layout(model_layout))
    steps = inp.preprocess()
    # Resize on u8 first: resizing after the float conversion costs 4-8x (reference/performance.md).
    steps.resize(ResizeAlgorithm.RESIZE_LINEAR)
    if prep["color"] == "RGB":
        steps.convert_color(ColorFormat.RGB)
    mean = [float(v) for v in prep["mean"]]
    scale = [float(v) for v in prep["scale"]]
    model_type = params[0].get_element_type()
    if model_type != ov.Type.u8 or any(mean) or any(s != 1.0 for s in scale):
        steps.convert_element_type(ov.Type.f32)
        if any(mean):
            steps.mean(mean)
        if any(s != 1.0 for s in scale):
            steps.scale(scale)
        if model_type != ov.Type.f32:
            steps.convert_element_type(model_type)
    built = ppp.build()
    share = float(prep.get("crop", 1.0))
    if share < 1.0:
        # The centre crop goes in front of the resize (Resize(size/crop) + CenterCrop(size), the ImageNet
        # evaluation transform): a fresh u8 input feeds a Slice that feeds what the input fed before.
        param = built.get_parameters()[0]
        consumers = list(param.output(0).get_target_inputs())
        cropped = _centre_crop(param.output(0), share)
        for target in consumers:
            target.replace_source_output(cropped)
        built.validate_nodes_and_infer_types()
    built.input(0).get_tensor().set_names({"image"})
    return built


def _guess_layout(pshape: Any) -> str:
    """NCHW when dim 1 is 3, NHWC when the last dim is 3."""
    if pshape[1].is_static and pshape[1].get_length() == 3:
        return "NCHW"
    if pshape[3].is_static and pshape[3].get_length() == 3:
        return "NHWC"
    raise ExportError(f"cannot tell the layout of input {pshape}: no axis of 3 channels")


def build_tiny(seed: int = 0, dim: int = 64) -> Any:
    """A small seeded random conv net (NCHW f32 [1,3,64,64] -> pool [1,dim,1,1] -> 10-way head)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(seed)
    x = ops.parameter([1, 3, 64, 64], np.float32, name="input")
    node: Any = x
    widths = (3, 16, 32, dim)
    for c_in, c_out in itertools.pairwise(widths):
        std = np.sqrt(2.0 / (c_in * 9))  # Kaiming: keeps activations O(1) through the ReLUs
        weight = (rng.standard_normal((c_out, c_in, 3, 3)) * std).astype(np.float32)
        node = ops.convolution(node, ops.constant(weight), [2, 2], [1, 1], [1, 1], [1, 1])
        bias = (rng.standard_normal((1, c_out, 1, 1)) * 0.1).astype(np.float32)
        node = ops.relu(ops.add(node, ops.constant(bias)))
    pooled = ops.reduce_mean(node, ops.constant(np.array([2, 3], dtype=np.int64)), keep_dims=True)
    head_w = (rng.standard_normal((10, dim, 1, 1)) * 0.1).astype(np.float32)
    logits = ops.convolution(pooled, ops.constant(head_w), [1, 1], [0, 0], [0, 0], [1, 1])
    return ov.Model([ops.result(ops.softmax(logits, 1))], [x], "tiny")
