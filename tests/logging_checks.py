"""Checks of a run's TensorBoard events and plots, shared by the unit tests and the tests that launch runs."""

import json
import os
import zlib

import numpy as np
from tensorboard.backend.event_processing import event_accumulator


def read_tensorboard(folder) -> tuple:
    """({tag: [(step, value)]}, [(step, config text)]) as TensorBoard itself reads ``folder``."""
    acc = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("config/text_summary")]
    return series, texts


def assert_tensorboard_matches_metrics(log_dir) -> None:
    """Every numeric value of every metrics.jsonl row is a TensorBoard point at its step, and nothing else is;
    the newest config text is config.yaml."""
    rows = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]
    want = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "split"):
                want.setdefault(f"{row['split']}/{key}", []).append((row["step"], value))
    got, texts = read_tensorboard(os.path.join(log_dir, "tensorboard"))
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # same steps, each once
        expected = np.array([v for _, v in points], dtype=np.float32)  # TensorBoard stores float32
        np.testing.assert_array_equal(np.array([v for _, v in got[tag]], dtype=np.float32), expected, err_msg=tag)
    config = open(os.path.join(log_dir, "config.yaml")).read()
    assert texts and texts[-1][1] == f"```yaml\n{config}```"


def png_size(path) -> tuple:
    """(width, height) of a well-formed PNG: the signature, every chunk's CRC, IHDR first and IEND last."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        crc = int.from_bytes(data[at + 8 + length : at + 12 + length], "big")
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind}"
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND" and any(k == b"IDAT" for k, _ in chunks), path
    return int.from_bytes(chunks[0][1][:4], "big"), int.from_bytes(chunks[0][1][4:8], "big")


def colour_share(path, hex_colour: str) -> float:
    """The fraction of the image's pixels within a small distance of ``hex_colour`` (a plotted line's)."""
    from matplotlib.image import imread

    pixels = imread(path)[..., :3]
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return float((np.abs(pixels - rgb).max(axis=-1) < 0.06).mean())
