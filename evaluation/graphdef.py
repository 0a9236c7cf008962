"""A small, dependency-free reader and writer for TensorFlow GraphDef protobufs.

Only the messages an inference graph needs are covered: GraphDef, NodeDef, AttrValue (and its
ListValue), TensorProto and TensorShapeProto. The reader turns the wire format into plain Python
objects (Const tensors become numpy arrays); the writer does the reverse, so tests and benchmarks can
build stand-in graphs without TensorFlow. Field numbers follow tensorflow/core/framework/*.proto.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# DataType enum values (types.proto) and their numpy equivalents.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_HALF = 9, 10, 19
NUMPY_DTYPES = {
    DT_FLOAT: np.float32, DT_DOUBLE: np.float64, DT_INT32: np.int32, DT_UINT8: np.uint8,
    DT_INT16: np.int16, DT_INT8: np.int8, DT_INT64: np.int64, DT_BOOL: np.bool_, DT_HALF: np.float16,
}
DATA_TYPES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}

# Wire types.
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


@dataclass
class Shape:
    """A TensorShapeProto: dims is None for an unknown rank; a dim of -1 is unknown."""
    dims: list[int] | None


@dataclass
class NodeDef:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)  # "node", "node:1" or "^control_node"
    attr: dict[str, Any] = field(default_factory=dict)
    device: str = ""

    @property
    def data_inputs(self) -> list[str]:
        return [i for i in self.inputs if not i.startswith("^")]


@dataclass
class GraphDef:
    nodes: list[NodeDef]
    producer: int = 0  # VersionDef.producer (or the deprecated GraphDef.version)

    def by_name(self) -> dict[str, NodeDef]:
        return {node.name: node for node in self.nodes}


class DataTypeAttr(int):
    """An AttrValue of kind `type` (a DataType enum), kept apart from plain integer attributes."""


# ------------------------------------------------------------------------------------------------
# Reading


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: memoryview):
    """Yield (field number, wire type, value); LENGTH values are memoryviews of the payload."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == FIXED64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == LENGTH:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == FIXED32:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number}): not a GraphDef?")
        yield number, wire, value
    if pos != end:
        raise ValueError("truncated protobuf message: the .pb file is incomplete or corrupt")


def _varints(wire: int, value) -> list[int]:
    """A repeated varint field arrives either packed (one LENGTH record) or one record per value."""
    if wire == VARINT:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _read_varint(value, pos)
        out.append(v)
    return out


def _floats(wire: int, value, fmt: str) -> list[float]:
    size = struct.calcsize(fmt)
    raw = bytes(value)
    return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))


def _read_shape(buf: memoryview) -> Shape:
    dims, unknown_rank = [], False
    for number, wire, value in _fields(buf):
        if number == 2:
            size = 0
            for n, w, v in _fields(value):
                if n == 1:
                    size = _signed64(v)
            dims.append(size)
        elif number == 3:
            unknown_rank = bool(value)
    return Shape(None if unknown_rank else dims)


def _read_tensor(buf: memoryview) -> np.ndarray:
    dtype, shape, content = DT_FLOAT, Shape([]), None
    values: list = []
    for number, wire, value in _fields(buf):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = _read_shape(value)
        elif number == 4:
            content = bytes(value)
        elif number == 5:
            values += _floats(wire, value, "f")
        elif number == 6:
            values += _floats(wire, value, "d")
        elif number in (7, 10, 11, 13, 16, 17):  # int32, int64, bool, half (as int bits), uint32, uint64
            values += [_signed64(v) for v in _varints(wire, value)]
        elif number == 8:
            values.append(bytes(value))
    dims = shape.dims or []
    if dtype == DT_STRING:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(dims) if int(np.prod(dims)) == len(values) else array
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype} in GraphDef")
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    count = int(np.prod(dims))
    if content is not None:
        return np.frombuffer(content, dtype=np_dtype.newbyteorder("<")).astype(np_dtype).reshape(dims)
    if dtype == DT_HALF:
        values = np.array(values, dtype=np.uint16).view(np.float16).tolist()
    # TensorFlow's rule: fewer values than elements repeats the last one (no values: zeros).
    array = np.zeros(count, dtype=np_dtype)
    if values:
        array[:len(values)] = values[:count]
        array[len(values):] = values[-1]
    return array.reshape(dims)


def _read_list(buf: memoryview) -> list:
    out: list = []
    for number, wire, value in _fields(buf):
        if number == 2:
            out.append(bytes(value).decode())
        elif number == 3:
            out += [_signed64(v) for v in _varints(wire, value)]
        elif number == 4:
            out += _floats(wire, value, "f")
        elif number == 5:
            out += [bool(v) for v in _varints(wire, value)]
        elif number == 6:
            out += [DataTypeAttr(v) for v in _varints(wire, value)]
        elif number == 7:
            out.append(_read_shape(value))
        elif number == 8:
            out.append(_read_tensor(value))
    return out


def _read_attr(buf: memoryview) -> Any:
    result: Any = None
    for number, wire, value in _fields(buf):
        if number == 1:
            result = _read_list(value)
        elif number == 2:
            raw = bytes(value)
            try:
                result = raw.decode()
            except UnicodeDecodeError:
                result = raw
        elif number == 3:
            result = _signed64(value)
        elif number == 4:
            result = struct.unpack("<f", bytes(value))[0]
        elif number == 5:
            result = bool(value)
        elif number == 6:
            result = DataTypeAttr(value)
        elif number == 7:
            result = _read_shape(value)
        elif number == 8:
            result = _read_tensor(value)
    return result


def _read_node(buf: memoryview) -> NodeDef:
    node = NodeDef(name="", op="")
    for number, wire, value in _fields(buf):
        if number == 1:
            node.name = bytes(value).decode()
        elif number == 2:
            node.op = bytes(value).decode()
        elif number == 3:
            node.inputs.append(bytes(value).decode())
        elif number == 4:
            node.device = bytes(value).decode()
        elif number == 5:
            key, attr = "", None
            for n, w, v in _fields(value):
                if n == 1:
                    key = bytes(v).decode()
                elif n == 2:
                    attr = _read_attr(v)
            node.attr[key] = attr
    return node


def parse_graph_def(data: bytes) -> GraphDef:
    """Parse serialized GraphDef bytes (the content of a frozen .pb file)."""
    graph = GraphDef(nodes=[])
    for number, wire, value in _fields(memoryview(data)):
        if number == 1 and wire == LENGTH:
            graph.nodes.append(_read_node(value))
        elif number == 3 and wire == VARINT:
            graph.producer = graph.producer or value
        elif number == 4 and wire == LENGTH:
            for n, w, v in _fields(value):
                if n == 1:
                    graph.producer = v
    if not graph.nodes:
        raise ValueError("no nodes found: this is not a TensorFlow GraphDef")
    return graph


# ------------------------------------------------------------------------------------------------
# Writing


def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers: ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint_bytes(number << 3 | wire)


def _length_field(number: int, payload: bytes) -> bytes:
    return _key(number, LENGTH) + _varint_bytes(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _key(number, VARINT) + _varint_bytes(value)


def _packed_varints(number: int, values) -> bytes:
    return _length_field(number, b"".join(_varint_bytes(int(v)) for v in values)) if len(values) else b""


def _shape_bytes(dims) -> bytes:
    if dims is None:
        return _varint_field(3, 1)
    return b"".join(_length_field(2, _varint_field(1, int(d)) if d else b"") for d in dims)


def _tensor_bytes(array) -> bytes:
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        strings = [s.encode() if isinstance(s, str) else bytes(s) for s in array.reshape(-1)]
        return (_varint_field(1, DT_STRING) + _length_field(2, _shape_bytes(array.shape))
                + b"".join(_length_field(8, s) for s in strings))
    if array.dtype not in DATA_TYPES:
        raise ValueError(f"cannot write a tensor of dtype {array.dtype}")
    payload = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return (_varint_field(1, DATA_TYPES[array.dtype]) + _length_field(2, _shape_bytes(array.shape))
            + _length_field(4, payload))


def _list_bytes(values: list) -> bytes:
    if not values:
        return b""
    first = values[0]
    if isinstance(first, str):
        return b"".join(_length_field(2, v.encode()) for v in values)
    if isinstance(first, DataTypeAttr):
        return _packed_varints(6, values)
    if isinstance(first, bool):
        return _packed_varints(5, values)
    if isinstance(first, int):
        return _packed_varints(3, values)
    if isinstance(first, float):
        return _length_field(4, struct.pack(f"<{len(values)}f", *values))
    if isinstance(first, Shape):
        return b"".join(_length_field(7, _shape_bytes(v.dims)) for v in values)
    raise TypeError(f"unsupported list attribute element {first!r}")


def _attr_bytes(value: Any) -> bytes:
    if isinstance(value, list):
        return _length_field(1, _list_bytes(value))
    if isinstance(value, (str, bytes)):
        return _length_field(2, value.encode() if isinstance(value, str) else value)
    if isinstance(value, DataTypeAttr):
        return _varint_field(6, int(value))
    if isinstance(value, bool):
        return _varint_field(5, int(value))
    if isinstance(value, int):
        return _varint_field(3, value)
    if isinstance(value, float):
        return _key(4, FIXED32) + struct.pack("<f", value)
    if isinstance(value, Shape):
        return _length_field(7, _shape_bytes(value.dims))
    if isinstance(value, np.ndarray):
        return _length_field(8, _tensor_bytes(value))
    raise TypeError(f"unsupported attribute value {value!r}")


def _node_bytes(node: NodeDef) -> bytes:
    out = [_length_field(1, node.name.encode()), _length_field(2, node.op.encode())]
    out += [_length_field(3, i.encode()) for i in node.inputs]
    if node.device:
        out.append(_length_field(4, node.device.encode()))
    for key in sorted(node.attr):
        entry = _length_field(1, key.encode()) + _length_field(2, _attr_bytes(node.attr[key]))
        out.append(_length_field(5, entry))
    return b"".join(out)


def serialize_graph_def(graph: GraphDef) -> bytes:
    """Serialize to GraphDef wire bytes that TensorFlow's GraphDef.ParseFromString accepts."""
    body = b"".join(_length_field(1, _node_bytes(node)) for node in graph.nodes)
    return body + _length_field(4, _varint_field(1, graph.producer))
