"""The last layers of a bundle's backbone, read from its OpenVINO graph into torch (for models.tune).

``find_tail`` takes everything between the input of the N-th convolution before global pooling and the
pool; ``TorchTail`` evaluates those ops in torch with the convolutions' weights and biases as trainable
tensors and writes trained values back into the graph. Ops it does not know raise TuneError by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.errors import TuneError
from models.graph import POOL_TYPES, is_global_pooled

_POINTWISE = ("Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum")
_ACTIVATIONS = ("Relu", "Clamp", "Sigmoid", "Swish", "HSwish", "HSigmoid", "Convert")
CONVS = ("Convolution", "GroupConvolution")


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


def find_tail(model: Any, convs: int) -> Tail:
    """Locate the last ``convs`` convolutions before global pooling and everything between them."""
    ops = model.get_ordered_ops()
    pools = [
        op for op in ops
        if op.get_type_name() in POOL_TYPES and is_global_pooled(op.get_output_partial_shape(0))
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
        if node.get_type_name() in CONVS:
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
        if kind not in _POINTWISE + _ACTIVATIONS + CONVS + POOL_TYPES:
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
        if kind in CONVS:
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
        self.tail = tail
        self._const: dict[tuple[str, int], Any] = {}
        self.params: dict[tuple[str, int], Any] = {}
        for node, idx in tail.trainable:
            value = self._constant(node.input_value(idx)).clone().float().requires_grad_(True)
            self.params[(node.get_friendly_name(), idx)] = value

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
    if kind in CONVS:
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
