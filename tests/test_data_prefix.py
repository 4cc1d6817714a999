"""model.data.data_prefix: one file or a list of files per split (NeMo-Aligner's form), read in order as one dataset."""

import json

import pytest
from chat_fixtures import default_task_records, save_chatml_tokenizer, write_jsonl

from nemo_dpo.config import ConfigError, load_config, validate
from nemo_dpo.data import pipeline
from nemo_dpo.data.chat_template import record_options
from nemo_dpo.data.pipeline import data_files, load_run_data, read_splits


def lists(train: list, validation: list) -> str:
    """The override giving each split a list of files, as NeMo-Aligner's configs write it."""
    return f"model.data.data_prefix={{train: [{', '.join(train)}], validation: [{', '.join(validation)}]}}"


@pytest.fixture
def files(tmp_path):
    rows = default_task_records("train", 30)
    return {
        "a": write_jsonl(tmp_path / "a.jsonl", rows[:20]),
        "b": write_jsonl(tmp_path / "b.jsonl", rows[20:]),
        "c": write_jsonl(tmp_path / "c.jsonl", default_task_records("validation", 8)),
    }


def test_a_list_per_split_is_read_in_order_as_one_dataset(files):
    a, b, c = files["a"], files["b"], files["c"]
    cfg = load_config("gpt_dpo", [lists([a, b], [c])])
    validate(cfg, 1)
    splits = data_files(cfg.model.data)
    assert splits == {"train": [a, b], "validation": [c]}
    lines = []
    records, skipped = read_splits(splits, "error", record_options(cfg.model), lines.append)
    expected = default_task_records("train", 30)
    assert [r["prompt"] for r in records["train"]] == [r["prompt"] for r in expected] and skipped == []
    assert lines == [f"train: jsonl file {a}: 20 prompt/chosen/rejected",
                     f"train: jsonl file {b}: 10 prompt/chosen/rejected",
                     f"validation: jsonl file {c}: 8 prompt/chosen/rejected"]


def test_a_bad_record_of_a_listed_file_is_named_by_that_file_and_line(files):
    a, b = files["a"], files["b"]
    with open(b, "a") as f:
        f.write('{"prompt": "p", "chosen": \n')
    options = record_options(load_config("gpt_dpo").model)
    with pytest.raises(ValueError, match=rf"^{b}:11: invalid JSON"):
        read_splits({"train": [a, b]}, "error", options, print)
    lines = []
    records, skipped = read_splits({"train": [a, b]}, "skip", options, lines.append)
    assert len(records["train"]) == 30 and len(skipped) == 1 and skipped[0].startswith(f"{b}:11: invalid JSON")
    assert lines[-1].startswith(f"train: skipped 1 bad record(s) of {b} (model.data.on_bad_record=skip), e.g. {b}:11")


def test_every_listed_file_is_checked_before_work_starts(files, tmp_path, monkeypatch):
    a, c = files["a"], files["c"]
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=rf"^model.data.data_prefix.train: file {missing} does not exist$"):
        validate(load_config("gpt_dpo", [lists([a, missing], [c])]), 1)
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ConfigError, match=rf"^model.data.data_prefix.validation: {csv}: unknown data file extension"):
        validate(load_config("gpt_dpo", [lists([a], [c, str(csv)])]), 1)
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1")
    monkeypatch.setattr(pipeline, "pyarrow_missing", lambda: "reading Parquet and Arrow files needs pyarrow (test)")
    with pytest.raises(ConfigError, match=r"^model.data.data_prefix.train: reading Parquet and Arrow files needs pyarrow"):
        validate(load_config("gpt_dpo", [lists([a, str(parquet)], [c])]), 1)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.data.data_prefix.train=5", "train"),
        ("model.data.data_prefix.train=[]", "train"),
        ("model.data.data_prefix.validation=[a.jsonl, 3]", "validation"),
        ("model.data.data_prefix.train=[[a.jsonl]]", "train"),
        ("model.data.data_prefix={train: {file: a.jsonl}}", "train"),
    ],
)
def test_any_other_value_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^model.data.data_prefix.{key} must be a path or a non-empty list of "
                                          r"paths, or null, got "):
        validate(load_config("gpt_dpo", [override]), 1)


def test_one_file_runs_as_before_and_two_files_count_both(files, tmp_path):
    """A file given alone or as a list of one: the same console lines and cache inputs; two files: their pairs."""
    a, b, c = files["a"], files["b"], files["c"]
    tokenizer = save_chatml_tokenizer(tmp_path / "tok")
    common = [f"model.tokenizer.model={tokenizer}", "model.global_batch_size=8", "model.micro_batch_size=2",
              "model.encoder_seq_length=512", "model.max_position_embeddings=512"]

    def run(data_override):
        cfg = load_config("gpt_dpo", [*common, *data_override])
        validate(cfg, 1)
        lines = []
        return load_run_data(cfg.model, str(tmp_path / "run"), 0, lines.append), lines

    alone, alone_lines = run([f"model.data.data_prefix.train={a}", f"model.data.data_prefix.validation={c}"])
    listed, listed_lines = run([lists([a], [c])])
    assert alone_lines == listed_lines and alone.input_files() == listed.input_files()
    assert alone.files == {"train": [a], "validation": [c]} and alone.input_files()[:2] == [a, c]
    assert f"train: 20 pairs from {a} (longest" in "\n".join(alone_lines)

    both, both_lines = run([lists([a, b], [c])])
    assert len(both.pairs["train"]) == 30 and both.input_files()[:3] == [a, b, c]
    assert f"train: 30 pairs from {a}, {b} (longest" in "\n".join(both_lines)


@pytest.mark.slow
def test_a_run_trains_on_the_pairs_of_every_listed_file(data_training_runs):
    """2 processes (one of tests/data_training_runs.py's runs): two training files and a validation list of one, the
    tokenizer trained on both."""
    run = data_training_runs["listed_files"]
    a, b, c = run.files["a"], run.files["b"], run.files["c"]
    assert run.status == 0, run.console[-3000:]
    out = run.console
    assert f"train: jsonl file {a}: 40 prompt/chosen/rejected" in out
    assert f"train: jsonl file {b}: 24 prompt/chosen/rejected" in out
    assert f"tokenizer: training a SentencePiece model (vocab_size 512) on {a}, {b}," in out
    assert f"train: 64 pairs from {a}, {b} (longest" in out and f"validation: 16 pairs from {c} (longest" in out
    progress = json.loads((run.folder / "run" / "checkpoints" / "step_2" / "nemo_dpo.json").read_text())["progress"]
    assert progress["step"] == 2 and progress["train_pairs"] == 64  # the epoch the run drew its batches from
