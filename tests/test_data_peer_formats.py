"""Data from every peer, as it is: LLaMA-Factory's sharegpt and Alpaca preference records, and the folders `datasets`
leaves (save_to_disk, shards as load_dataset reads them); each passes prepare, trains, and the loss sees exactly the
final assistant answer."""

import json
import os
import re

import datasets
import pytest
from chat_fixtures import conversation, default_task_records, save_chatml_tokenizer
from peer_fixtures import SYSTEM, peer_files, sharegpt, turn
from transformers import AutoTokenizer

from nemo_dpo.cli.prepare import main as prepare_main
from nemo_dpo.config import ConfigError, load_config, validate
from nemo_dpo.data.batching import collate_microbatches
from nemo_dpo.data.chat_template import ChatTemplate, record_options
from nemo_dpo.data.data_folders import folder_files, split_of
from nemo_dpo.data.pipeline import data_files
from nemo_dpo.data.preference_dataset import read_preference_pairs, tokenize_pairs
from nemo_dpo.data.schemas import RecordOptions, normalize
from nemo_dpo.data.tokenizer import open_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
# ChatML with the tool role and a tools list, as tool-calling templates render them.
WITH_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
OPTIONS = RecordOptions(ChatTemplate(WITH_TOOLS, "t", {"eos_token": "<|im_end|>"}), "\n\nAssistant:")


def messages_of(rendered_prompt_messages, chosen, rejected, tools=None):
    template = OPTIONS.chat_template
    prompt, chosen_text = template.split(rendered_prompt_messages, [{"role": "assistant", "content": chosen}], "", "c",
                                         tools)
    _, rejected_text = template.split(rendered_prompt_messages, [{"role": "assistant", "content": rejected}], "", "r",
                                      tools)
    return {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}


def test_sharegpt_records_render_as_the_conversation_they_are():
    """Speakers become roles (observation: the tool's answer, function_call: the assistant's call), system leads, tools
    reach the template; the record renders as the same messages written as a TRL conversation."""
    tools = [{"name": "lookup", "description": "find a word", "parameters": {"type": "object"}}]
    record = {"system": SYSTEM, "tools": json.dumps(tools),
              "conversations": [turn("human", "Which is a fruit?"), turn("function_call", '{"name": "lookup"}'),
                                turn("observation", "apple: fruit"), turn("gpt", "One moment."),
                                turn("human", "So?")],
              "chosen": turn("gpt", "apple"), "rejected": turn("gpt", "tiger")}
    text, schema = normalize(record, "f:1", OPTIONS)
    expected = messages_of([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which is a fruit?"},
                            {"role": "assistant", "content": '{"name": "lookup"}'},
                            {"role": "tool", "content": "apple: fruit"}, {"role": "assistant", "content": "One moment."},
                            {"role": "user", "content": "So?"}], "apple", "tiger", tools)
    assert schema == "conversations/chosen/rejected (sharegpt)"
    assert {k: text[k] for k in expected} == expected and text["prompt"].startswith("<|im_start|>system\nTools: [")


def test_alpaca_records_render_as_a_user_turn_after_system_and_history():
    record = {"instruction": "Pick the fruit:", "input": "tiger, apple", "chosen": "apple", "rejected": "tiger",
              "system": SYSTEM, "history": [["Hi!", "Hello."]]}
    text, schema = normalize(record, "f:1", OPTIONS)
    expected = messages_of([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"},
                            {"role": "assistant", "content": "Hello."},
                            {"role": "user", "content": "Pick the fruit:\ntiger, apple"}], "apple", "tiger")
    assert schema == "instruction/input/chosen/rejected (Alpaca)" and {k: text[k] for k in expected} == expected
    no_input, _ = normalize({"instruction": "Pick one.", "input": "", "chosen": "a", "rejected": "b"}, "f:2", OPTIONS)
    assert no_input["prompt"].endswith("<|im_start|>user\nPick one.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("record, message", [
    ({"conversations": [turn("human", "q"), turn("gpt", "a")], "chosen": turn("gpt", "b"), "rejected": turn("gpt", "c")},
     "the last turn of 'conversations' is the assistant's; it must be the turn that 'chosen' and 'rejected' answer"),
    ({"conversations": [turn("robot", "q")], "chosen": turn("gpt", "b"), "rejected": turn("gpt", "c")},
     "key 'conversations[0]' is from 'robot'; sharegpt turns are from one of ['human', 'gpt', 'observation', "
     "'function_call', 'system']"),
    ({"conversations": [turn("human", "q")], "chosen": turn("human", "b"), "rejected": turn("gpt", "c")},
     "key 'chosen' message 0 has role 'user'; a response may hold only 'assistant' messages"),
    ({"conversations": [turn("human", "q")], "chosen": turn("gpt", " "), "rejected": turn("gpt", "c")},
     "key 'chosen' is empty"),
    ({"conversations": [], "chosen": turn("gpt", "b"), "rejected": turn("gpt", "c")},
     "key 'conversations' must be a non-empty list of turns, got an empty list"),
    ({"conversations": [{"from": "human"}], "chosen": turn("gpt", "b"), "rejected": turn("gpt", "c")},
     "key 'conversations[0]' must be a turn {\"from\": ..., \"value\": ...} with string values"),
    ({"conversations": [turn("human", "q")], "chosen": turn("gpt", "b"), "rejected": turn("gpt", "c"), "tools": "[{"},
     "key 'tools' is a string but not JSON"),
    ({"instruction": "", "input": "", "chosen": "a", "rejected": "b"}, "keys 'instruction' and 'input' are empty"),
    ({"instruction": "q", "chosen": "a", "rejected": "b", "history": [["only a query"]]},
     "history[0] must be a [query, answer] pair of strings"),
    ({"instruction": "q", "chosen": ["a"], "rejected": "b"}, "key 'chosen' must be a string, got list"),
])
def test_bad_peer_records_are_named(record, message):
    with pytest.raises(ValueError) as err:
        normalize(record, "d.json:row 3", OPTIONS)
    assert str(err.value).startswith("d.json:row 3: ") and message in str(err.value), str(err.value)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


def test_the_loss_mask_of_sharegpt_data_covers_exactly_the_final_answer(tmp_path, tok_dir):
    """LLaMA-Factory's demo layout (a JSON array, multi-turn, system prompts on some records), through the real reader,
    tokenizer and batching; the oracle is transformers' rendering of the same conversation."""
    rows = [sharegpt(r, SYSTEM if i % 2 else None) for i, r in enumerate(default_task_records("validation", 8))]
    path = tmp_path / "dpo_en_demo.json"
    path.write_text(json.dumps(rows, indent=2))
    cfg = load_config("gpt_dpo", [f"model.tokenizer.model={tok_dir}", f"model.data.data_prefix.train={path}"])
    validate(cfg, 1)
    data = read_preference_pairs(str(path), "error", record_options(cfg.model))
    assert data.schemas == {"conversations/chosen/rejected (sharegpt)": 8}
    tokenizer = open_tokenizer(tok_dir)
    pairs, stats = tokenize_pairs(data.records, tokenizer, 256, "truncate_prompt")
    assert stats["truncated"] == stats["dropped"] == 0
    batch = collate_microbatches(pairs, 8, tokenizer.pad_id)[0]
    hf = AutoTokenizer.from_pretrained(tok_dir)
    roles = {"human": "user", "gpt": "assistant"}
    for index in range(16):
        row, side = rows[index // 2], ("chosen", "rejected")[index % 2]
        messages = ([{"role": "system", "content": row["system"]}] if "system" in row else []) + [
            {"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
        prompt_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answer = hf.apply_chat_template(messages + [{"role": "assistant", "content": row[side]["value"]}],
                                        tokenize=False)[len(prompt_text):]
        assert answer == row[side]["value"] + "<|im_end|>\n"
        expected = hf.encode(answer.rstrip("\n"), add_special_tokens=False)
        prompt_ids = hf.encode(prompt_text, add_special_tokens=False)
        mask = batch.loss_mask[index].bool()
        assert batch.tokens[index][: len(prompt_ids)].tolist() == prompt_ids
        assert batch.labels[index][mask].tolist() == expected
        assert mask.nonzero().flatten().tolist() == list(range(len(prompt_ids) - 1, len(prompt_ids) + len(expected) - 1))


def test_split_names_are_read_as_load_dataset_reads_them():
    assert split_of("data/train-00000-of-00002.parquet") == "train"
    assert split_of(os.path.join("hh", "test.jsonl.gz")) == "test"
    assert split_of(os.path.join("validation", "part.parquet")) == "validation"
    assert split_of("my_dev_set.json") == "validation" and split_of("prefs_train.jsonl") == "train"
    assert split_of("trainer_notes.jsonl") is None and split_of("constraint.parquet") is None


def test_folders_stand_for_their_files(tmp_path):
    files = peer_files(tmp_path)
    saved, repo = files["saved"], files["shards"]
    assert folder_files(saved, "train") == ("datasets save_to_disk", [f"{saved}/data-00000-of-00002.arrow",
                                                                      f"{saved}/data-00001-of-00002.arrow"])
    assert folder_files(repo, "train") == ("data files, split train", [f"{repo}/data/train-00000-of-00002.parquet",
                                                                       f"{repo}/data/train-00001-of-00002.jsonl"])
    assert folder_files(repo, "test")[1] == [f"{repo}/data/test-00000-of-00001.jsonl"]
    assert folder_files(repo, None)[0] == "data files" and len(folder_files(repo, None)[1]) == 3
    with pytest.raises(ValueError, match=rf"^{repo}: its file names mark the splits \['test', 'train'\] \(as load_dataset "
                                         r"reads them\) and none is validation; name the files to use$"):
        folder_files(repo, "validation")
    both = tmp_path / "dict"
    datasets.DatasetDict(train=datasets.Dataset.from_list([conversation(r) for r in default_task_records("train", 4)]),
                         test=datasets.Dataset.from_list([conversation(r) for r in default_task_records("validation", 4)])
                         ).save_to_disk(str(both))
    assert folder_files(str(both), "train") == ("datasets save_to_disk, split train",
                                                [f"{both}/train/data-00000-of-00001.arrow"])
    with pytest.raises(ValueError, match=r"a datasets DatasetDict with the splits \['train', 'test'\] and none for "
                                         r"validation; name one of its split folders"):
        folder_files(str(both), "validation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=rf"model.data.data_prefix.train: {tmp_path / 'empty'}: a folder with no data "
                                          r"files"):
        validate(load_config("gpt_dpo", [f"model.data.data_prefix.train={tmp_path / 'empty'}"]), 1)
    cfg = load_config("gpt_dpo", [f"model.data.data_prefix={{train: [{saved}, {files['sharegpt']}], validation: [{repo}]}}"])
    with pytest.raises(ValueError, match=r"^model.data.data_prefix.validation: .* none is validation"):
        data_files(cfg.model.data)
    lines = []
    cfg = load_config("gpt_dpo", [f"model.data.data_prefix={{train: [{saved}, {files['sharegpt']}]}}"])
    assert data_files(cfg.model.data, lines.append)["train"][2] == files["sharegpt"]
    assert lines == [f"train: {saved} is datasets save_to_disk: 2 file(s)"]


@pytest.mark.parametrize("kind, schema, printed", [
    ("sharegpt", "16 conversations/chosen/rejected (sharegpt)", None),
    ("alpaca", "16 instruction/input/chosen/rejected (Alpaca)", None),
    ("saved", "8 prompt/chosen/rejected (messages)", "is datasets save_to_disk: 2 file(s)"),
    ("shards", "8 conversations/chosen/rejected (sharegpt)", "is data files: 3 file(s)"),
])
def test_each_passes_prepare_which_names_the_schema(tmp_path, capsys, tok_dir, kind, schema, printed):
    path = peer_files(tmp_path)[kind]
    status = prepare_main(["--data", path, f"model.tokenizer.model={tok_dir}", "model.global_batch_size=8",
                           "model.micro_batch_size=2", "model.encoder_seq_length=256", "model.max_position_embeddings=256"])
    out = capsys.readouterr().out
    assert status == 0 and schema in out and "PROBLEM" not in out, out
    assert printed is None or f"{path} {printed}" in out


def test_every_schema_in_the_readme_has_an_example_record_that_reads_as_named():
    """Each bullet of the README's schema list shows one record, which is read as the schema the bullet names."""
    data = README.split("Every format holds records in any of these schemas", 1)[1].split("\n### ", 1)[0]
    bullets = re.findall(r"\n- \*\*(.*?)\n(?=\n- \*\*|\nConversational, sharegpt)", data, re.S)
    assert len(bullets) == 7
    for bullet in bullets:
        names = set(re.findall(r"`([\w/]+(?: \([\w ,.]+\))?)`", bullet))
        block = re.search(r"```json\n(.*?)```", bullet, re.S).group(1)
        decoder, text, at = json.JSONDecoder(), block.strip(), 0
        while at < len(text):
            record, end = decoder.raw_decode(text, at)
            _, schema = normalize(record, "README", OPTIONS)
            assert schema in names or schema.split(" (")[0] in names, (schema, names)
            at = end + len(text[end:]) - len(text[end:].lstrip())


@pytest.mark.slow
def test_one_run_trains_on_all_of_them(data_training_runs):
    """2 processes (one of tests/data_training_runs.py's runs): the train split lists the sharegpt file, the Alpaca
    file, the save_to_disk folder and the shards folder (its train shards only: 64 pairs in all); 2 steps."""
    run = data_training_runs["peer_formats"]
    files = run.files
    assert run.status == 0, run.console[-3000:]
    out = run.console
    assert f"train: jsonl file {files['alpaca']}: 16 instruction/input/chosen/rejected (Alpaca)" in out
    assert f"train: json file {files['sharegpt']}: 16 conversations/chosen/rejected (sharegpt)" in out
    assert f"train: {files['saved']} is datasets save_to_disk: 2 file(s)" in out
    assert f"train: {files['shards']} is data files, split train: 2 file(s)" in out
    assert re.search(r"train: 64 pairs from .* \(longest \d+ tokens, 0 prompt-truncated and 0 dropped", out), out
    rows = [json.loads(line) for line in open(run.folder / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2] and rows[-1]["split"] == "val"
