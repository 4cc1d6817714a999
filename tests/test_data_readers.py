"""Every file format gives the same records, names bad ones by file:line or file:row, and fails clearly when unreadable."""

import gzip
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chat_fixtures import CHATML, conversation, default_task_records

from nemo_dpo.config import ConfigError, load_config, validate
from nemo_dpo.data.chat_template import ChatTemplate
from nemo_dpo.data.preference_dataset import read_preference_pairs
from nemo_dpo.data.readers import data_format
from nemo_dpo.data.schemas import RecordOptions
from nemo_dpo.data.tokenizer import load_or_train_tokenizer

ROWS = [
    {"prompt": "p0", "chosen": "c0", "rejected": "r0"},
    {"prompt": "p1", "chosen": "c1", "rejected": "r1", "chosen_reward": 2.5, "rejected_reward": -1.0},
    {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
]
EXPECTED = [
    {"prompt": "p0", "chosen": "c0", "rejected": "r0", "chosen_reward": 1.0, "rejected_reward": 0.0},
    {"prompt": "p1", "chosen": "c1", "rejected": "r1", "chosen_reward": 2.5, "rejected_reward": -1.0},
    {"prompt": "p2", "chosen": "c2", "rejected": "r2", "chosen_reward": 1.0, "rejected_reward": 0.0},
]


def write(path, rows, kind: str) -> str:
    """``rows`` in format ``kind``; Arrow stream is what datasets' save_to_disk writes, Arrow file the IPC file format."""
    path = str(path)
    keys = {key: None for row in rows for key in row}
    rows = [{**keys, **row} for row in rows] if kind in ("parquet", "arrow-stream", "arrow-file") else rows
    if kind in ("jsonl", "jsonl.gz"):
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        with (gzip.open(path, "wb") if kind.endswith(".gz") else open(path, "wb")) as f:
            f.write(data)
    elif kind == "json":
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    else:
        table = pa.Table.from_pylist(rows)
        writer = pa.ipc.new_stream if kind == "arrow-stream" else pa.ipc.new_file
        with pa.OSFile(path, "wb") as sink, writer(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)
    return path


KINDS = {"jsonl": ".jsonl", "jsonl.gz": ".jsonl.gz", "json": ".json", "parquet": ".parquet",
         "arrow-stream": ".arrow", "arrow-file": ".arrow"}


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_gives_the_same_records(tmp_path, kind):
    path = write(tmp_path / f"d{KINDS[kind]}", ROWS, kind)
    data = read_preference_pairs(path)
    assert data.records == EXPECTED
    assert data.file_format == kind.split("-")[0]
    assert data.schemas == {"prompt/chosen/rejected": 3}


@pytest.mark.parametrize("kind", ["parquet", "arrow-stream", "arrow-file", "json"])
def test_bad_rows_are_named_by_row_and_skippable(tmp_path, kind):
    rows = [ROWS[0], {"prompt": "p", "chosen": "same", "rejected": "same"}, ROWS[2], {"prompt": "p", "chosen": "c"}]
    path = write(tmp_path / f"bad{KINDS[kind]}", rows, kind)
    with pytest.raises(ValueError, match=rf"^{path}:row 1: 'chosen' and 'rejected' are identical"):
        read_preference_pairs(path)
    data = read_preference_pairs(path, "skip")
    assert [r["prompt"] for r in data.records] == ["p0", "p2"]
    assert data.skipped[0].startswith(f"{path}:row 1: ")
    # In a columnar file a missing value is a null, reported as the missing key it stands for.
    assert data.skipped[1].startswith(f"{path}:row 3: missing key 'rejected'")


def test_conversational_parquet_rows_render_like_jsonl(tmp_path):
    rows = [conversation(r) for r in default_task_records("validation", 4)]
    options = RecordOptions(ChatTemplate(CHATML, "test", {"eos_token": "<|im_end|>"}))
    from_jsonl = read_preference_pairs(write(tmp_path / "c.jsonl", rows, "jsonl"), "error", options)
    from_parquet = read_preference_pairs(write(tmp_path / "c.parquet", rows, "parquet"), "error", options)
    assert from_parquet.records == from_jsonl.records
    assert from_parquet.schemas == {"prompt/chosen/rejected (messages)": 4}


def test_gzip_lines_are_numbered_like_plain_lines(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n{"prompt": \n'))
    with pytest.raises(ValueError, match=rf"^{path}:3: invalid JSON"):
        read_preference_pairs(str(path))


def test_damaged_files_are_file_errors_even_with_skip(tmp_path):
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS * 200))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"^{cut}: cannot read past line \d+"):
        read_preference_pairs(str(cut), "skip")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=rf"^{broken}: not a readable parquet file"):
        read_preference_pairs(str(broken), "skip")
    array = tmp_path / "a.json"
    array.write_text('[{"prompt": "p", "chosen": "c"')
    with pytest.raises(ValueError, match=rf"^{array}: invalid JSON"):
        read_preference_pairs(str(array), "skip")


def test_unknown_extension_is_refused_by_the_reader_and_the_config(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"d.csv: unknown data file extension; expected one of .jsonl, .jsonl.gz"):
        data_format(str(path))
    with pytest.raises(ConfigError, match=r"model.data.data_prefix.train: .*d.csv: unknown data file extension"):
        validate(load_config("gpt_dpo", [f"model.data.data_prefix.train={path}"]), 1)


def test_without_pyarrow_parquet_fails_with_the_install_command(tmp_path, monkeypatch):
    path = write(tmp_path / "d.parquet", ROWS, "parquet")
    for name in [n for n in sys.modules if n == "pyarrow" or n.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import pyarrow now raises ImportError
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "pyarrow" else object())
    with pytest.raises(ImportError, match=r"reading parquet files needs pyarrow: pip install pyarrow"):
        read_preference_pairs(path)
    with pytest.raises(ConfigError, match=r"model.data.data_prefix.train: reading Parquet and Arrow files needs "
                                          r"pyarrow, which is not installed: pip install pyarrow"):
        validate(load_config("gpt_dpo", [f"model.data.data_prefix.train={path}"]), 1)


def test_tokenizer_trains_on_the_same_text_from_any_format(tmp_path):
    """The trained tokenizer's corpus comes through the reader: Parquet and JSONL of the same records agree."""
    rows = default_task_records("validation", 200)
    jsonl = load_or_train_tokenizer(None, [write(tmp_path / "v.jsonl", rows, "jsonl")], 300, str(tmp_path / "cache"))
    parquet = load_or_train_tokenizer(None, [write(tmp_path / "v.parquet", rows, "parquet")], 300,
                                      str(tmp_path / "cache"))
    assert jsonl.model_path != parquet.model_path  # the cache key hashes each file's own bytes
    vocabulary = [(jsonl._sp.id_to_piece(i), jsonl._sp.get_score(i)) for i in range(jsonl.vocab_size)]
    assert vocabulary == [(parquet._sp.id_to_piece(i), parquet._sp.get_score(i)) for i in range(parquet.vocab_size)]


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.json", "bom_array.json", "bom.jsonl.gz"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name):
    """Editors on Windows start UTF-8 files with a BOM: line 1 stays a record, an array stays an array."""
    path = tmp_path / name
    text = json.dumps(ROWS) if name == "bom_array.json" else "".join(json.dumps(r) + "\n" for r in ROWS)
    data = b"\xef\xbb\xbf" + text.encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    read = read_preference_pairs(str(path), "error")
    assert read.records == EXPECTED and read.skipped == []
