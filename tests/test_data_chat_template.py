"""Chat templates: rendered as transformers renders them, found where the config says, and the loss sees only the assistant's turn."""

import json
import os

import pytest
from chat_fixtures import CHATML, conversation, default_task_records, save_chatml_tokenizer, write_jsonl
from transformers import AutoTokenizer

from nemo_dpo.config import ConfigError, load_config, validate
from nemo_dpo.data.batching import collate_microbatches
from nemo_dpo.data.chat_template import ChatTemplate, record_options, template_source
from nemo_dpo.data.preference_dataset import read_preference_pairs, tokenize_pairs
from nemo_dpo.data.schemas import RecordOptions
from nemo_dpo.data import tokenizer as tokenizer_module
from nemo_dpo.data.tokenizer import load_or_train_tokenizer, open_tokenizer, train_tokenizer

# Uses what Hugging Face templates use: bos/eos variables, tojson, loop controls, namespace, raise_exception.
FANCY = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "#{{ ns.n }} {{ m.role | upper }}: {{ m.content | trim }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{{ messages[0] | tojson }}\n{% if add_generation_prompt %}#{{ ns.n + 1 }} ASSISTANT:{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief. \"ünïcode\""}, {"role": "user", "content": " Hi "},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


@pytest.mark.parametrize("template", [CHATML, FANCY])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_exactly_as_transformers(tmp_path, template, messages, add_generation_prompt):
    folder = save_chatml_tokenizer(tmp_path / "tok", template=template)
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    json.dump({**config, "bos_token": "<|endoftext|>"}, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    hf = AutoTokenizer.from_pretrained(folder)
    ours = ChatTemplate(template, "t", {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render(messages, add_generation_prompt) == expected


def test_template_sources_and_precedence(tmp_path, tok_dir):
    assert template_source(None, None) is None
    assert template_source(None, tok_dir) == (CHATML, os.path.join(tok_dir, "tokenizer_config.json"))
    assert template_source("{{ 'x' }}", tok_dir) == ("{{ 'x' }}", "model.data.chat_template")  # the config wins
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{{ 'file' }}")
    assert template_source(str(jinja), tok_dir) == ("{{ 'file' }}", str(jinja))
    folder = tmp_path / "hf"
    save_chatml_tokenizer(folder, template=None)
    assert template_source(None, str(folder)) is None
    (folder / "chat_template.jinja").write_text("{{ 'jinja file' }}")  # how recent transformers save it
    assert template_source(None, str(folder))[0] == "{{ 'jinja file' }}"
    named = tmp_path / "named"
    save_chatml_tokenizer(named, template=[{"name": "tool_use", "template": "{{ 'tools' }}"},
                                           {"name": "default", "template": "{{ 'chat' }}"}])
    assert template_source(None, str(named))[0] == "{{ 'chat' }}"


@pytest.mark.parametrize("overrides, pattern", [
    (['model.data.chat_template="{% for m in messages %}"'],  # quoted: a dotlist value is YAML
     r"model.data.chat_template: not a valid Jinja chat template \(line 1: Unexpected end of template"),
    (["model.data.chat_template=/no/such/template.jinja"],
     r"model.data.chat_template: '/no/such/template.jinja' is neither Jinja text .* nor an existing file"),
    (["model.data.implicit_prompt_delimiter=''"], r"model.data.implicit_prompt_delimiter must be a non-empty string"),
])
def test_config_refuses_unusable_settings_before_any_work(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(load_config("gpt_dpo", overrides), 1)


def test_loss_mask_covers_exactly_the_assistant_turns(tmp_path, tok_dir):
    """Acceptance: multi-turn data through the real reader, tokenizer and batching; the loss sees the assistant's answer only.

    The oracle is transformers' own rendering: the answer is the text the template adds after the generation prompt.
    """
    rows = [conversation(r) for r in default_task_records("validation", 8)]
    rows[3]["prompt"].insert(0, {"role": "system", "content": "Answer in one sentence."})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = load_config("gpt_dpo", [f"model.tokenizer.model={tok_dir}", f"model.data.data_prefix.train={path}"])
    validate(cfg, 1)
    records = read_preference_pairs(path, "error", record_options(cfg.model)).records
    tokenizer = open_tokenizer(tok_dir)
    pairs, stats = tokenize_pairs(records, tokenizer, 256, "truncate_prompt")
    assert stats["truncated"] == stats["dropped"] == 0
    batch = collate_microbatches(pairs, 8, tokenizer.pad_id)[0]

    hf = AutoTokenizer.from_pretrained(tok_dir)
    im_start, im_end = tokenizer.encode("<|im_start|>")[0], tokenizer.encode("<|im_end|>")[0]
    assert im_end == tokenizer.eos_id
    for row_index in range(16):
        row, side = rows[row_index // 2], ("chosen", "rejected")[row_index % 2]
        prompt_text = hf.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        whole = hf.apply_chat_template(row["prompt"] + row[side], tokenize=False)
        answer = whole[len(prompt_text):]
        assert answer == row[side][0]["content"] + "<|im_end|>\n"  # the template's assistant turn, header excluded
        expected = hf.encode(answer.rstrip("\n"), add_special_tokens=False)  # the turn, ending with its <|im_end|>
        mask = batch.loss_mask[row_index].bool()
        assert batch.labels[row_index][mask].tolist() == expected
        # Where the loss is: from the last prompt token to the one before the final <|im_end|>, nowhere else.
        prompt_ids = hf.encode(prompt_text, add_special_tokens=False)
        tokens = batch.tokens[row_index]
        assert tokens[: len(prompt_ids)].tolist() == prompt_ids
        assert mask.nonzero().flatten().tolist() == list(range(len(prompt_ids) - 1, len(prompt_ids) + len(expected) - 1))
        # The prompt holds system/user turns, an earlier assistant turn with its own <|im_end|>, and the header:
        # none of those tokens is a target.
        assert hf.decode(prompt_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
        assert prompt_ids.count(im_end) >= 3
        assert im_start not in batch.labels[row_index][mask].tolist()
        assert batch.labels[row_index][mask].tolist().count(im_end) == 1  # one EOS, not two


def test_eos_is_appended_when_the_turn_does_not_end_with_it(tmp_path):
    """With eos_token <|endoftext|>, a ChatML turn ends with <|im_end|>\\n, so the EOS is appended after it."""
    folder = save_chatml_tokenizer(tmp_path / "tok", eos_token="<|endoftext|>")
    tokenizer = open_tokenizer(folder)
    row = conversation(default_task_records("validation", 1)[0])
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    options = RecordOptions(ChatTemplate(CHATML, "t", {"eos_token": tokenizer.eos_token}))
    pair = tokenize_pairs(read_preference_pairs(path, "error", options).records, tokenizer, 256, "drop")[0][0]
    assert pair.chosen == tokenizer.encode(row["chosen"][0]["content"] + "<|im_end|>\n") + [tokenizer.eos_id]


def test_trained_tokenizer_learns_the_rendered_text(tmp_path, monkeypatch):
    """model.tokenizer.model=null: the SentencePiece corpus is the rendered conversations, and the template's EOS text is EOS."""
    template = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
                "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [conversation(r) for r in default_task_records("train", 400)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = load_config("gpt_dpo", [f"model.data.chat_template={json.dumps(template)}", f"model.data.data_prefix.train={path}",
                                  f"model.tokenizer.cache_dir={tmp_path / 'cache'}"])
    validate(cfg, 1)
    options = record_options(cfg.model)
    assert options.chat_template.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    corpus = []

    def train_and_keep_corpus(texts_files, vocab_size, out_path):
        corpus.extend(open(texts_files[0], encoding="utf-8").read().splitlines())
        return train_tokenizer(texts_files, vocab_size, out_path)

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", train_and_keep_corpus)
    tokenizer = load_or_train_tokenizer(None, [path], 512, str(tmp_path / "cache"), options)
    records = read_preference_pairs(path, "error", options).records
    assert corpus[:3] == [" ".join(records[0][key].split()) for key in ("prompt", "chosen", "rejected")]
    assert len(corpus) == 3 * len(rows)
    assert records[0]["prompt"].endswith("<user> " + rows[0]["prompt"][-1]["content"] + "\n<assistant>")
    assert records[0]["chosen"] == " " + rows[0]["chosen"][0]["content"] + "</s>\n"
    pairs, _ = tokenize_pairs(records, tokenizer, 128, "drop")
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            assert side[-1] == tokenizer.eos_id and side.count(tokenizer.eos_id) == 1
    assert tokenizer.decode(pairs[0].chosen[:-1]) == rows[0]["chosen"][0]["content"]
    # Another template renders other text: another tokenizer.
    brackets = template.replace("<{{ m.role }}>", "[{{ m.role }}]").replace("<assistant>", "[assistant]")
    other = RecordOptions(ChatTemplate(brackets, "t", options.chat_template.special_tokens))
    assert load_or_train_tokenizer(None, [path], 512, str(tmp_path / "cache"), other).model_path != tokenizer.model_path


def test_a_template_file_is_an_input_of_the_caches(tmp_path):
    """Editing a .jinja file changes the trained tokenizer's cache key, and it is listed for the reference cache's hash."""
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHATML)
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(r) for r in default_task_records("train", 200)])
    cfg = load_config("gpt_dpo", [f"model.data.chat_template={jinja}", f"model.data.data_prefix.train={path}"])
    options = record_options(cfg.model)
    assert options.files() == [str(jinja)] and options.chat_template.origin == str(jinja)
    first = load_or_train_tokenizer(None, [path], 400, str(tmp_path / "cache"), options)
    jinja.write_text(CHATML.replace("You pick words.", "You choose words."))
    second = load_or_train_tokenizer(None, [path], 400, str(tmp_path / "cache"), record_options(cfg.model))
    assert first.model_path != second.model_path
    inline = load_config("gpt_dpo", [f"model.data.chat_template={json.dumps(CHATML)}"])
    assert record_options(inline.model).files() == []
