"""Small file helpers that several layers need: JSON objects, content hashes, atomic writes.

They live here, importing nothing from the project, so that data/, models/ and
training/ can share them without importing one another.
"""

import hashlib
import json
import os


def read_json_object(path: str) -> dict:
    """A JSON object from an optional file ({} when the file is absent)."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def sha256_files(paths) -> str:
    """Hex SHA-256 of the files' bytes, one after the other in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_atomic(path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` at once: readers see the old file or the whole new one.

    The data goes to a temporary file beside it, is flushed to disk, and is then
    renamed over ``path``. Text is written as UTF-8.
    """
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(folder) -> None:
    """Flush a folder's entries (files created, renamed or removed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
