"""python -m nemo_dpo.data.prepare: exit status and messages on good, bad and unreadable data, on one process."""

import json
import subprocess
import sys

import pytest
import torch.distributed as dist
from bos_fixtures import save_bos_tokenizer
from chat_fixtures import conversation, default_task_records, save_chatml_tokenizer, write_jsonl
from transformers import AutoTokenizer

from nemo_dpo.cli.prepare import main


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_bad_records_fail_under_error_and_are_listed(tmp_path, capsys):
    tok = save_chatml_tokenizer(tmp_path / "tok")
    rows = [conversation(r) for r in default_task_records("validation", 6)]
    rows[4]["chosen"] = [{"role": "user", "content": "not an answer"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with open(path, "a") as f:
        f.write('{"prompt": "p", "chosen": \n')
    settings = [f"model.tokenizer.model={tok}", "model.global_batch_size=4", "model.micro_batch_size=2"]

    status, out, _ = run(capsys, "--data", path, *settings)
    assert status == 1
    assert "records: 7 read, 5 usable, 2 bad (model.data.on_bad_record=error)" in out
    assert f"  {path}:5: key 'chosen' message 0 has role 'user'" in out
    assert f"  {path}:7: invalid JSON" in out
    assert "format: jsonl; record schemas: 5 prompt/chosen/rejected (messages)" in out
    assert f"chat template: {tok}/tokenizer_config.json" in out
    assert "PROBLEM: 2 bad record(s)" in out
    assert not dist.is_initialized()

    status, out, _ = run(capsys, "--data", path, *settings, "model.data.on_bad_record=skip", "--show", "1")
    assert status == 0 and "PROBLEM" not in out and "  ... and 1 more" in out
    assert "pairs: 5 remain = 1 global batches of model.global_batch_size=4 (1 unused per epoch)" in out

    status, out, _ = run(capsys, "--data", path, *settings, "model.data.on_bad_record=skip", "model.encoder_seq_length=30",
                         "model.data.overflow=drop")
    assert status == 1 and "with model.data.overflow=drop: 0 prompt-truncated, 5 dropped" in out
    assert "PROBLEM: 0 usable pairs, fewer than model.global_batch_size (4): a run would stop" in out


def test_unreadable_data_or_missing_settings_exit_2(tmp_path, capsys):
    rows = [conversation(r) for r in default_task_records("validation", 2)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    status, _, err = run(capsys, "--data", path, f"model.tokenizer.cache_dir={tmp_path}")
    assert status == 2 and f"error: {path}:1: a conversational record (message lists) needs a chat template: " \
                           f"set model.data.chat_template" in err
    status, _, err = run(capsys, "--data", tmp_path / "x.csv")
    assert status == 2 and "x.csv: preference data file not found" in err
    status, _, err = run(capsys, "model.encoder_seq_lenght=12")
    assert status == 2 and "did you mean 'model.encoder_seq_length'" in err


def test_token_counts_include_the_bos(tmp_path, capsys):
    """With a Llama-style tokenizer the prompt lengths are those of its own call, tokenizer(prompt), BOS included."""
    folder = save_bos_tokenizer(tmp_path / "tok", "llama")
    rows = default_task_records("validation", 8)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    status, out, _ = run(capsys, "--data", path, f"model.tokenizer.model={folder}", "model.global_batch_size=4",
                         "model.micro_batch_size=2", "--json", tmp_path / "r.json")
    assert status == 0 and f"tokenizer: {folder}/tokenizer.json (400 tokens; before each prompt: [1])" in out
    hf = AutoTokenizer.from_pretrained(folder)
    prompts = [len(hf(r["prompt"])["input_ids"]) for r in rows]
    responses = [len(hf(r[side] + "</s>", add_special_tokens=False)["input_ids"]) for r in rows
                 for side in ("chosen", "rejected")]
    totals = [2 * p + c + r for p, c, r in zip(prompts, responses[::2], responses[1::2])]
    tokens = json.loads((tmp_path / "r.json").read_text())[0]["tokens"]
    assert (tokens["prompt"]["min"], tokens["prompt"]["max"]) == (min(prompts), max(prompts))
    assert tokens["prompt"]["mean"] == pytest.approx(sum(prompts) / len(prompts))
    assert (tokens["pair_total"]["min"], tokens["pair_total"]["max"]) == (min(totals), max(totals))


@pytest.mark.slow
def test_the_config_files_by_default_from_the_command_line(tmp_path):
    """No --data: the config's train and validation files, with the tokenizer trained on the train file as a run would."""
    train = write_jsonl(tmp_path / "train.jsonl", default_task_records("train", 300))
    ran = subprocess.run([sys.executable, "-m", "nemo_dpo.data.prepare", f"model.data.data_prefix.train={train}",
                          f"model.tokenizer.cache_dir={tmp_path / 'cache'}", "--json", tmp_path / "r.json"],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    reports = json.loads((tmp_path / "r.json").read_text())
    assert [r["file"] for r in reports][0] == train and reports[1]["file"].endswith("default/validation.jsonl")
    assert [r["pairs"] for r in reports] == [300, 200] and "== " + train in ran.stdout
