"""Read and write the safetensors format without the ``safetensors`` package.

A file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the end of the header), then the raw little-endian tensor
bytes. The format is simple enough that owning the ~100 lines is cheaper than a
runtime dependency, and lets every malformed file be reported by name.
"""

import json
import os
import struct
import tempfile

import torch

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
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ALIGN = 8


def _read_header(path: str, f, file_size: int) -> tuple[dict, int]:
    """The parsed JSON header and the file offset where tensor data starts."""
    if file_size < 8:
        raise ValueError(f"{path}: truncated safetensors file ({file_size} bytes, the header length alone is 8)")
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
    return header, 8 + header_len


def _check_entry(path: str, name: str, entry, data_size: int) -> tuple[torch.dtype, list, int, int]:
    """Validate one header entry against the file; return dtype, shape, begin, end."""
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
    return dtype, shape, begin, end


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU, each in its own memory."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header, data_start = _read_header(path, f, file_size)
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, begin, end = _check_entry(path, name, entry, file_size - data_start)
            buffer = bytearray(end - begin)
            f.seek(data_start + begin)
            f.readinto(buffer)
            flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
    return tensors


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` to ``path`` (via a temporary file, so readers never see half a file).

    Tensors go in order of decreasing element size after an 8-byte-padded header,
    so each one starts at a multiple of its element size, as the format recommends.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: safetensors metadata must map strings to strings, got {metadata!r}")
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
    order = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header, offset = {}, 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.dtype.itemsize
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _ALIGN)

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for name in order:
                flat = tensors[name].detach().cpu().contiguous().reshape(-1)
                f.write(flat.view(torch.uint8).numpy().data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
