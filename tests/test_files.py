"""nemo_dpo/files.py: JSON objects with the file named, content hashes, writes that are never half done."""

import hashlib
import os

import pytest

from nemo_dpo.files import fsync_dir, read_json_object, sha256_files, write_atomic


def test_read_json_object_names_the_file(tmp_path):
    assert read_json_object(str(tmp_path / "absent.json")) == {}
    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    assert read_json_object(str(path)) == {"a": 1}
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        read_json_object(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path}: expected a JSON object, got list"):
        read_json_object(str(path))


def test_sha256_files_hashes_the_bytes_in_order(tmp_path):
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(os.urandom(3 * (1 << 20) + 5))  # more than one read block
    small.write_bytes(b"tail")
    paths = [str(big), str(small)]
    # The digest of the concatenation, as the reference cache's keys have always been.
    assert sha256_files(paths) == hashlib.sha256(big.read_bytes() + small.read_bytes()).hexdigest()
    assert sha256_files(paths[::-1]) != sha256_files(paths)


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    write_atomic(path, "step_10")
    write_atomic(str(path), "step_20 \u2713")
    assert path.read_text(encoding="utf-8") == "step_20 \u2713"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with pytest.raises(TypeError):
        write_atomic(path, 3)  # fails mid-write: the old file stays, the temporary goes
    assert path.read_bytes() == b"\x00\x01"
    fsync_dir(tmp_path)
    assert os.listdir(tmp_path) == ["latest"]
