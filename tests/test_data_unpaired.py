"""KTO's unpaired data: TRL's prompt/completion/label records from every format and through `prepare`, bad ones named
by file:line (file:row) and key, pairs unpaired in TRL's order, and the KL completions rotated within chunks."""

import json

import pytest
from chat_fixtures import CHATML
from test_data_readers import KINDS, write

from nemo_dpo.cli.prepare import main
from nemo_dpo.data.chat_template import ChatTemplate
from nemo_dpo.data.pipeline import read_splits
from nemo_dpo.data.preference_dataset import read_preference_pairs
from nemo_dpo.data.schemas import MissingSetting, RecordOptions
from nemo_dpo.data.unpaired import kl_completions, tokenize_examples, unpaired_examples

TEMPLATE = ChatTemplate(CHATML, "test template", {"eos_token": "<|im_end|>"})
SYSTEM = "<|im_start|>system\nYou pick words.<|im_end|>\n"
ROWS = [
    {"prompt": "p0", "completion": "c0", "label": True},
    {"prompt": "p1", "completion": "c1", "label": False},
    {"prompt": "p2", "completion": "c2", "label": True},
]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def read(tmp_path, rows, policy="error", options=RecordOptions(TEMPLATE)):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), read_preference_pairs(str(path), policy, options)


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_gives_the_same_unpaired_records(tmp_path, kind):
    data = read_preference_pairs(write(tmp_path / f"d{KINDS[kind]}", ROWS, kind))
    assert data.records == ROWS
    assert data.schemas == {"prompt/completion/label": 3}


def test_conversational_unpaired_records_are_rendered_by_the_chat_template(tmp_path):
    rows = [{"prompt": [user("Pick a fruit")], "completion": [bot("apple")], "label": True},
            {"prompt": "Pick a fruit", "completion": [bot("tiger")], "label": False}]
    _, data = read(tmp_path, rows)
    prompt = SYSTEM + "<|im_start|>user\nPick a fruit<|im_end|>\n<|im_start|>assistant\n"  # CHATML's default system turn
    assert data.records == [{"prompt": prompt, "completion": "apple<|im_end|>\n", "label": True},
                            {"prompt": prompt, "completion": "tiger<|im_end|>\n", "label": False}]
    assert data.schemas == {"prompt/completion/label (messages)": 2}
    with pytest.raises(MissingSetting, match=r"d.jsonl:1: a conversational record \(message lists\) needs a chat"):
        read(tmp_path, rows, options=RecordOptions())


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "completion": "c", "label": "yes"},
         "key 'label' must be true (desirable) or false (undesirable), got 'yes'"),
        ({"prompt": "p", "completion": "c", "label": 1}, "key 'label' must be true (desirable) or false (undesirable), got 1"),
        ({"prompt": "p", "completion": "c"}, "missing key 'label'"),
        ({"completion": "c", "label": True}, "missing key 'prompt'"),
        ({"prompt": "p", "label": True}, "missing key 'completion'"),
        ({"prompt": "p", "completion": "  ", "label": True}, "key 'completion' is empty"),
        ({"prompt": "p", "completion": 3, "label": True}, "key 'completion' must be a string, got int"),
        ({"prompt": [user("q")], "completion": "c", "label": True},
         "key 'completion' is a string but the prompt is a list of messages"),
        ({"prompt": [user("q")], "completion": [user("c")], "label": True},
         "key 'completion' message 0 has role 'user'; a response may hold only 'assistant' messages"),
    ],
)
def test_bad_unpaired_records_are_named_by_line_and_key(tmp_path, row, message):
    path, _ = read(tmp_path, [ROWS[0]])
    with pytest.raises(ValueError) as err:
        read(tmp_path, [ROWS[0], row])
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), str(err.value)
    _, data = read(tmp_path, [ROWS[0], row], policy="skip")
    assert data.records == [ROWS[0]] and data.skipped[0].startswith(f"{path}:2: ")


@pytest.mark.parametrize("kind", ["parquet", "arrow-stream"])
def test_bad_columnar_rows_are_named_by_row(tmp_path, kind):
    rows = [ROWS[0], {"prompt": "p", "completion": "c"}, ROWS[2]]  # a null label is a missing key
    path = write(tmp_path / f"bad{KINDS[kind]}", rows, kind)
    with pytest.raises(ValueError, match=rf"^{path}:row 1: missing key 'label'"):
        read_preference_pairs(path)


def test_unpaired_records_need_kto(tmp_path):
    path, _ = read(tmp_path, ROWS)
    with pytest.raises(ValueError, match=rf"^{path}: 3 unpaired record\(s\) \(prompt/completion/label.*"
                                         r"model.dpo.preference_loss=dpo learns from pairs; unpaired examples need "
                                         r"model.dpo.preference_loss=kto"):
        read_splits({"train": [path]}, "error", RecordOptions(), print, "dpo")
    records, _ = read_splits({"train": [path]}, "error", RecordOptions(), print, "kto")
    assert records["train"] == ROWS


def test_pairs_are_unpaired_in_trls_order():
    """Unpaired records and the pairs' chosen in reading order, then the pairs' rejected (TRL's unpair order)."""
    records = [{"prompt": "a", "chosen": "ca", "rejected": "ra", "chosen_reward": 1.0, "rejected_reward": 0.0},
               {"prompt": "u", "completion": "cu", "label": False},
               {"prompt": "b", "chosen": "cb", "rejected": "rb", "chosen_reward": 1.0, "rejected_reward": 0.0}]
    assert [(e["prompt"], e["completion"], e["label"]) for e in unpaired_examples(records)] == [
        ("a", "ca", True), ("u", "cu", False), ("b", "cb", True), ("a", "ra", False), ("b", "rb", False)]


def test_kl_completions_rotate_by_one_within_chunks():
    """TRL's add_kl_completion_ids over batches of per_device_train_batch_size: [last] + the rest; a short last chunk."""
    assert kl_completions(list("abcdefg"), 3) == list("cabfdeg")
    assert kl_completions(list("abcd"), 4) == list("dabc")


class WordTokenizer:
    """Each word one id (its length), EOS 0, no BOS: enough to see which completion went where."""

    start_ids, eos_id, eos_token = [], 0, None

    def encode(self, text):
        return [len(word) for word in text.split()]


def test_items_hold_the_completion_its_kl_completion_and_the_label():
    examples = [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "bb cc", "label": False},
                {"prompt": "q", "completion": "ddd", "label": True}]
    items, stats = tokenize_examples(examples, WordTokenizer(), max_seq_length=64, overflow="drop", chunk=2)
    assert [(i.prompt, i.chosen, i.rejected, i.chosen_reward, i.rejected_reward) for i in items] == [
        ([1], [1, 0], [2, 2, 0], 1.0, 1.0), ([1], [2, 2, 0], [1, 0], 0.0, 0.0), ([1], [3, 0], [3, 0], 1.0, 1.0)]
    assert stats["pairs"] == 3 and stats["desirable"] == 2
    # Both sequences must fit: the first example's completion does, its KL completion does not (dropped, as an
    # over-long pair is).
    items, stats = tokenize_examples(examples, WordTokenizer(), max_seq_length=3, overflow="drop", chunk=2)
    assert stats["dropped"] == 2 and [i.chosen for i in items] == [[3, 0]]


def test_prepare_reports_kto_examples(tmp_path, capsys):
    rows = [{"prompt": f"Pick word {i}", "completion": f"word {i}", "label": i % 2 == 0} for i in range(6)]
    rows.insert(2, {"prompt": "Pick", "completion": "word", "label": "maybe"})
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = ["model.global_batch_size=4", "model.micro_batch_size=2", f"model.tokenizer.cache_dir={tmp_path}"]

    status = main(["--data", str(path), *settings, "model.dpo.preference_loss=kto"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "format: jsonl; record schemas: 6 prompt/completion/label" in out
    assert f"  {path}:3: key 'label' must be true (desirable) or false (undesirable), got 'maybe'" in out
    assert "  kl_completion " in out and "  example_total " in out
    assert "examples: 6 remain = 1 global batches of model.global_batch_size=4 (2 unused per epoch)" in out

    status = main(["--data", str(path), *settings, "model.data.on_bad_record=skip"])
    out = capsys.readouterr().out
    assert status == 1 and f"PROBLEM: {path}: 6 unpaired record(s)" in out, out
