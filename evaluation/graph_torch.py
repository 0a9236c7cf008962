"""Run a frozen TensorFlow inference GraphDef with PyTorch ops.

`GraphModule` takes the sub-graph between the given input tensors and output tensors, folds whatever
depends on constants only at load time, and replays the remaining nodes as torch calls. Tensors keep
TensorFlow's NHWC layout; convolutions and pools see them as NCHW views in channels_last memory (a
free permute). Each op follows TensorFlow's semantics: SAME/VALID padding, padding excluded from
average pools, TF1 legacy bilinear resize, BatchNormWithGlobalNormalization.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.graphdef import NUMPY_DTYPES, GraphDef, NodeDef


def tensor_name(name: str) -> str:
    """Normalise "node" to "node:0"."""
    return name if ":" in name else f"{name}:0"


@functools.lru_cache(maxsize=32)
def _resize_taps(in_size: int, out_size: int, align_corners: bool, device: torch.device):
    """Lower/upper source indices and the fraction between them, as TF's LegacyScaler computes them."""
    if align_corners and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    source = torch.arange(out_size, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
    lower = source.floor()
    upper = torch.clamp(source.ceil(), max=in_size - 1)
    return lower.long().to(device), upper.long().to(device), (source - lower).to(device)


def legacy_resize_bilinear(images: torch.Tensor, size: tuple[int, int], align_corners: bool = False
                           ) -> torch.Tensor:
    """TF1 ResizeBilinear (half_pixel_centers=False) of NHWC float32 images.

    The source coordinate of output index i is i * in/out in float32 (no anti-aliasing, no half-pixel
    offset); the lerps run in TensorFlow's order: top = tl + (tr - tl) * dx, bottom likewise,
    out = top + (bottom - top) * dy.
    """
    y0, y1, dy = _resize_taps(images.shape[1], size[0], align_corners, images.device)
    x0, x1, dx = _resize_taps(images.shape[2], size[1], align_corners, images.device)
    # Lerp along x on every source row first: the rows then picked for top and bottom hold exactly
    # TF's per-pixel values, and the work scales with the (smaller) source height.
    left, right = images.index_select(2, x0), images.index_select(2, x1)
    columns = left + (right - left) * dx[:, None]
    top, bottom = columns.index_select(1, y0), columns.index_select(1, y1)
    return top + (bottom - top) * dy[:, None, None]


def same_padding(in_size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after): the extra pixel goes after."""
    total = max((math.ceil(in_size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - in_size, 0)
    return total // 2, total - total // 2


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _spatial(node: NodeDef, key: str, default=(1, 1, 1, 1)) -> tuple[int, int]:
    if node.attr.get("data_format", "NHWC") != "NHWC":
        raise NotImplementedError(f"{node.name}: data_format {node.attr['data_format']} is not supported")
    values = node.attr.get(key, list(default))
    if len(values) != 4 or values[0] != 1 or values[3] != 1:
        raise NotImplementedError(f"{node.name}: {key}={values} (only spatial values are supported)")
    return values[1], values[2]


def _padding(node: NodeDef, x: torch.Tensor, kernel, stride, dilation=(1, 1)):
    """SAME/VALID as (pad tuple for F.pad or None, symmetric padding for the torch op)."""
    padding = node.attr["padding"]
    if padding == "VALID":
        return None, (0, 0)
    if padding != "SAME":
        raise NotImplementedError(f"{node.name}: padding {padding} is not supported")
    top, bottom = same_padding(x.shape[1], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[2], kernel[1], stride[1], dilation[1])
    if top == bottom and left == right:
        return None, (top, left)
    return (left, right, top, bottom), (0, 0)


# ------------------------------------------------------------------------------------------------
# Ops. A builder gets the node and its inputs' constant values (None for runtime inputs) and returns
# a function of the runtime inputs, in order.


def _bind(fn: Callable, consts: list) -> Callable:
    """fn(*all inputs) -> function of the runtime inputs only, constants filled in."""
    if all(c is None for c in consts):
        return fn

    def bound(*runtime):
        it = iter(runtime)
        return fn(*[next(it) if c is None else c for c in consts])
    return bound


def _simple(fn_of_node: Callable) -> Callable:
    return lambda node, consts: _bind(fn_of_node(node), consts)


def _conv2d(node: NodeDef, consts: list) -> Callable:
    if consts[1] is None:
        raise NotImplementedError(f"{node.name}: runtime convolution filters are not supported")
    stride = _spatial(node, "strides")
    dilation = _spatial(node, "dilations")
    weight = consts[1].permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)  # HWIO->OIHW
    kernel = weight.shape[2:]

    def conv(x):
        pad, symmetric = _padding(node, x, kernel, stride, dilation)
        x = _nchw(x)
        if pad is not None:
            x = F.pad(x, pad)
        return _nhwc(F.conv2d(x, weight, stride=stride, padding=symmetric, dilation=dilation))
    return _bind(conv, [consts[0]])


def _batch_norm(node: NodeDef, consts: list) -> Callable:
    """BatchNormWithGlobalNormalization: (x - mean) * (rsqrt(var + eps) * gamma) + beta per channel,
    the per-channel factor evaluated first, as TensorFlow's kernel does."""
    if any(c is None for c in consts[1:]):
        raise NotImplementedError(f"{node.name}: runtime batch-norm parameters are not supported")
    mean, var, beta, gamma = consts[1:]
    scale = torch.rsqrt(var + torch.tensor(node.attr["variance_epsilon"], dtype=var.dtype))
    if node.attr.get("scale_after_normalization", False):
        scale = scale * gamma
    return _bind(lambda x: (x - mean) * scale + beta, [consts[0]])


def _pool(kind: str) -> Callable:
    def build(node: NodeDef, consts: list) -> Callable:
        kernel, stride = _spatial(node, "ksize"), _spatial(node, "strides")

        def pool(x):
            pad, symmetric = _padding(node, x, kernel, stride)
            x = _nchw(x)
            if kind == "max":
                if pad is not None:
                    x = F.pad(x, pad, value=-math.inf)
                return _nhwc(F.max_pool2d(x, kernel, stride, padding=symmetric))
            if pad is None:  # TF averages over the valid (unpadded) cells only
                return _nhwc(F.avg_pool2d(x, kernel, stride, padding=symmetric, count_include_pad=False))
            total = F.avg_pool2d(F.pad(x, pad), kernel, stride, divisor_override=1)
            count = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), pad), kernel, stride, divisor_override=1)
            return _nhwc(total / count)
        return _bind(pool, consts)
    return build


def _concat(axis_first: bool) -> Callable:
    def build(node: NodeDef, consts: list) -> Callable:
        axis_const = consts[0] if axis_first else consts[-1]
        if axis_const is None:
            raise NotImplementedError(f"{node.name}: a runtime concat axis is not supported")
        axis = int(axis_const)  # read once here: reading a GPU scalar per call would sync the device
        values = consts[1:] if axis_first else consts[:-1]
        return _bind(lambda *xs: torch.cat(xs, dim=axis), values)
    return build


def _reshape(node: NodeDef, consts: list) -> Callable:
    if consts[1] is None:
        raise NotImplementedError(f"{node.name}: a runtime reshape shape is not supported")
    shape = [int(s) for s in consts[1].tolist()]
    return _bind(lambda x: x.reshape(shape), [consts[0]])


def _expand_dims(node: NodeDef, consts: list) -> Callable:
    if consts[1] is None:
        raise NotImplementedError(f"{node.name}: a runtime ExpandDims axis is not supported")
    axis = int(consts[1])
    return _bind(lambda x: x.unsqueeze(axis), [consts[0]])


def _matmul(node: NodeDef):
    ta, tb = node.attr.get("transpose_a", False), node.attr.get("transpose_b", False)
    return lambda a, b: torch.matmul(a.T if ta else a, b.T if tb else b)


def _resize(node: NodeDef, consts: list) -> Callable:
    if node.attr.get("half_pixel_centers", False):
        raise NotImplementedError(f"{node.name}: half_pixel_centers=True is not supported")
    if consts[1] is None:
        raise NotImplementedError(f"{node.name}: runtime resize sizes are not supported")
    size = tuple(int(s) for s in consts[1].tolist())
    align_corners = node.attr.get("align_corners", False)
    return _bind(lambda x: legacy_resize_bilinear(x.float(), size, align_corners), [consts[0]])


def _cast(node: NodeDef):
    dtype = torch.from_numpy(np.zeros(0, NUMPY_DTYPES[int(node.attr["DstT"])])).dtype
    return lambda x: x.to(dtype)


OPS: dict[str, Callable] = {
    "Identity": _simple(lambda node: lambda x: x),
    # TF raises on NaN/Inf here; the feature extractor checks its outputs instead (no sync per layer).
    "CheckNumerics": _simple(lambda node: lambda x: x),
    "Relu": _simple(lambda node: F.relu),
    "Softmax": _simple(lambda node: lambda x: torch.softmax(x, dim=-1)),
    "Conv2D": _conv2d,
    "BatchNormWithGlobalNormalization": _batch_norm,
    "MaxPool": _pool("max"),
    "AvgPool": _pool("avg"),
    "Concat": _concat(axis_first=True),
    "ConcatV2": _concat(axis_first=False),
    "Reshape": _reshape,
    "ExpandDims": _expand_dims,
    "Cast": _simple(_cast),
    "MatMul": _simple(_matmul),
    "ResizeBilinear": _resize,
    "BiasAdd": _simple(lambda node: torch.add),
    "Add": _simple(lambda node: torch.add),
    "AddV2": _simple(lambda node: torch.add),
    "Sub": _simple(lambda node: torch.sub),
    "Mul": _simple(lambda node: torch.mul),
    "RealDiv": _simple(lambda node: torch.div),
}


class GraphModule:
    """A GraphDef sub-graph compiled into a flat list of torch calls on one device.

    `inputs` are the tensors fed at run time (e.g. ["ExpandDims:0"]), `outputs` the tensors returned.
    `constant(name)` evaluates a tensor that depends on constants only (e.g. a MatMul's weights).
    """

    def __init__(self, graph: GraphDef, inputs: list[str], outputs: list[str],
                 device: torch.device | str = "cpu"):
        self.nodes = graph.by_name()
        self.device = torch.device(device)
        self.input_names = [tensor_name(n) for n in inputs]
        self.output_names = [tensor_name(n) for n in outputs]
        self._consts: dict[str, torch.Tensor] = {}  # folded values, on the CPU
        self._strings: set[str] = set()  # string constants (the JPEG bytes): known, but not usable
        self._runtime: set[str] = set(self.input_names)
        self._steps: list[tuple[str, Callable, list[str]]] = []
        for name in self.output_names:
            self._compile(name)

    def constant(self, name: str) -> np.ndarray:
        name = tensor_name(name)
        self._compile(name)
        if name not in self._consts:
            raise ValueError(f"{name} depends on the graph input, it is not a constant")
        return self._consts[name].numpy()

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        env = dict(zip(self.input_names, inputs))
        for out_name, fn, arg_names in self._steps:
            env[out_name] = fn(*[env[a] for a in arg_names])
        return [env[n] if n in env else self._consts[n].to(self.device) for n in self.output_names]

    def _known(self, name: str) -> bool:
        return name in self._consts or name in self._runtime or name in self._strings

    def _compile(self, name: str) -> None:
        node_name, index = name.rsplit(":", 1)
        if index != "0":
            raise NotImplementedError(f"{name}: only the first output of a node is supported")
        # Iterative depth-first walk: the Inception graph is deep enough to matter for recursion.
        stack = [node_name]
        while stack:
            if stack[-1] not in self.nodes:
                raise KeyError(f"tensor {stack[-1]}:0 not found in the graph")
            node = self.nodes[stack[-1]]
            pending = [i for i in map(tensor_name, node.data_inputs) if not self._known(i)]
            if pending:
                stack += [p.rsplit(":", 1)[0] for p in pending]
                continue
            stack.pop()
            if not self._known(tensor_name(node.name)):
                self._compile_node(node)

    def _compile_node(self, node: NodeDef) -> None:
        out_name = tensor_name(node.name)
        if node.op == "Const":
            value = node.attr["value"]
            if value.dtype == object:
                self._strings.add(out_name)
            else:
                self._consts[out_name] = torch.from_numpy(np.array(value))
            return
        args = [tensor_name(i) for i in node.data_inputs]
        strings = [a for a in args if a in self._strings]
        if strings:
            raise NotImplementedError(f"node {node.name} ({node.op}) needs the string tensor {strings[0]}: feed "
                                      f"the graph after its JPEG decoding, at ExpandDims:0")
        if node.op not in OPS:
            raise NotImplementedError(f"node {node.name}: op {node.op} is not supported by the torch converter")
        if all(a in self._consts for a in args):  # constant folding, on the CPU
            with torch.no_grad():
                self._consts[out_name] = OPS[node.op](node, [self._consts[a] for a in args])()
            return
        consts = [self._consts[a].to(self.device) if a in self._consts else None for a in args]
        fn = OPS[node.op](node, consts)
        self._steps.append((out_name, fn, [a for a in args if a not in self._consts]))
        self._runtime.add(out_name)
