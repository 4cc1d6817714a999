"""Rows of a local data file, whatever its format: JSON Lines (optionally gzipped), JSON, Parquet or Arrow.

Every format yields the same thing, ``(where, load)``: ``where`` names the record
for messages (``file:line N`` for JSON Lines, ``file:row N`` for the others, rows
counted from 0 as ``datasets`` and pandas index them) and ``load()`` returns the
record's Python value or raises ``ValueError`` starting with ``where``. Decoding is
deferred to ``load`` so that one undecodable line is one bad record, which
``model.data.on_bad_record`` may skip, while a file that cannot be read at all
(unknown extension, damaged gzip or Parquet, pyarrow missing) raises at once.
"""

import codecs
import gzip
import importlib.util
import json
import os
import zlib
from functools import partial

# Extension -> format name. `.json` is JSON Lines (what `datasets`' to_json writes) or one JSON array.
FORMATS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".json": "json",
    ".json.gz": "json.gz",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format starts with it; the stream format (datasets' save_to_disk) does not
PYARROW_HINT = "pip install pyarrow (or pip install 'nemo-dpo[data]')"


def data_format(path: str) -> str:
    """The format named by ``path``'s extension; ValueError for any other."""
    name = os.path.basename(path).lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return FORMATS[ext]
    raise ValueError(f"{path}: unknown data file extension; expected one of {', '.join(FORMATS)}")


def needs_pyarrow(path: str) -> bool:
    return data_format(path) in ("parquet", "arrow")


def pyarrow_missing() -> str | None:
    """Why Parquet and Arrow files cannot be read here, or None when they can (checked before a run starts)."""
    if importlib.util.find_spec("pyarrow") is None:
        return f"reading Parquet and Arrow files needs pyarrow, which is not installed: {PYARROW_HINT}"
    return None


def _pyarrow(path: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{path}: reading {data_format(path)} files needs pyarrow: {PYARROW_HINT}") from err
    return pyarrow


def _json_value(raw: bytes, where: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from e
    except RecursionError as e:
        raise ValueError(f"{where}: JSON nested too deeply") from e


def _given(value):
    return value


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _json_lines(path: str, lines):
    line_no = 0
    try:
        for line_no, raw in enumerate(lines, start=1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows start UTF-8 files with one
            if raw.strip():
                yield f"{path}:{line_no}", partial(_json_value, raw, f"{path}:{line_no}")
    except (OSError, EOFError, zlib.error) as err:  # a damaged gzip stream
        raise ValueError(f"{path}: cannot read past line {line_no} ({err})") from err


def _json(path: str):
    """JSON Lines, or a whole-file JSON array (one record per element) when the file starts with '['."""
    with _open_bytes(path) as f:
        try:
            head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
            f.seek(0)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: cannot read ({err})") from err
        if not head.startswith(b"["):
            yield from _json_lines(path, f)
            return
        try:
            value = _json_value(f.read().removeprefix(codecs.BOM_UTF8), path)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: cannot read ({err})") from err
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON array of records or JSON Lines")
    for row, item in enumerate(value):
        yield f"{path}:row {row}", partial(_given, item)


def _columnar(path: str, batches):
    """Rows of record batches; a null column value is a missing key (a columnar file has every column in every row)."""
    row = 0
    for batch in batches:
        for item in batch.to_pylist():
            present = {key: value for key, value in item.items() if value is not None}
            yield f"{path}:row {row}", partial(_given, present)
            row += 1


def _arrow_batches(path: str, kind: str):
    pa = _pyarrow(path)
    try:
        if kind == "parquet":
            yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=1024)
            return
        with pa.memory_map(path) as source:
            if source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
            else:
                source.seek(0)
                yield from pa.ipc.open_stream(source)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable {kind} file ({err})") from err


def read_rows(path: str):
    """``(where, load)`` for every record of ``path``, in file order (blank JSON lines are not records)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: preference data file not found")
    kind = data_format(path)
    if kind in ("parquet", "arrow"):
        yield from _columnar(path, _arrow_batches(path, kind))
    elif kind.startswith("jsonl"):
        with _open_bytes(path) as f:
            yield from _json_lines(path, f)
    else:
        yield from _json(path)
