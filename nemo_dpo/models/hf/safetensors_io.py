"""Read and write safetensors files with the ``safetensors`` package, damaged files reported by tensor.

A file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the end of the header), then the raw tensor bytes.

The package reads and writes; a short check of the header comes first because
the package's own errors name neither the tensor nor the offsets. Measured with
safetensors 0.8: a file cut short gives "Error while deserializing header:
incomplete metadata, file not fully covered", a header length past the end of
the file "invalid header length", and an unknown dtype "invalid JSON in
header: unknown variant `F7`". After the check they read "<file>: truncated
safetensors file: tensor 'x' ends at byte ...", "header length N exceeds file
size M" and "tensor 'x': unknown dtype 'F7'".
"""

import json
import os
import struct
import tempfile

import safetensors
import safetensors.torch
import torch

# The dtypes a model's weights come in, by their safetensors names.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(path: str) -> tuple[dict, int]:
    """The parsed JSON header and the size of the data section after it."""
    file_size = os.path.getsize(path)
    if file_size < 8:
        raise ValueError(f"{path}: truncated safetensors file ({file_size} bytes, the header length alone is 8)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > file_size:
            raise ValueError(
                f"{path}: truncated safetensors file: header length {header_len} exceeds file size {file_size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    return header, file_size - 8 - header_len


def _check_entry(path: str, name: str, entry, data_size: int) -> None:
    """One header entry: a known dtype, a shape, and offsets that fit the shape and the file."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"{path}: tensor {name!r}: header entry needs dtype, shape and data_offsets, got {entry!r}")
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r}: unknown dtype {entry['dtype']!r} (known: {list(DTYPES)})")
    dtype, shape, offsets = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"{path}: tensor {name!r}: invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"{path}: tensor {name!r}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = torch.Size(shape).numel() * dtype.itemsize
    if not 0 <= begin <= end or end - begin != expected:
        raise ValueError(
            f"{path}: tensor {name!r}: data_offsets {offsets} span {end - begin} bytes, "
            f"shape {shape} of {entry['dtype']} needs {expected}"
        )
    if end > data_size:
        raise ValueError(
            f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the data section, "
            f"which has only {data_size} bytes"
        )


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU, each in its own memory (not a map of the file)."""
    header, data_size = _read_header(path)
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, data_size)
    try:
        mapped = safetensors.torch.load_file(path)
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path}: {err}") from err
    return {name: tensor.clone() for name, tensor in mapped.items()}


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` to ``path`` (via a temporary file, so readers never see half a file).

    The package pads the header to a multiple of 8 bytes and orders tensors by
    decreasing alignment, so each starts at a multiple of its element size.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: safetensors metadata must map strings to strings, got {metadata!r}")
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPES.values():
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}; cannot store it as a weight "
                f"(safetensors dtypes read here: {list(DTYPES)})"
            )
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        safetensors.torch.save_file(contiguous, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
