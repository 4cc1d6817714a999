"""BOS as the model was trained: the tokenizer's own rule, once per sequence, checked against TRL and transformers.

TRL's DPOTrainer (its own tokenization of a DPO dataset) is the oracle for plain
text; transformers' AutoTokenizer for what a tokenizer folder encodes to.
"""

import json
import os

import pytest
import sentencepiece as spm
from bos_fixtures import save_bos_tokenizer, trl_tokenized
from chat_fixtures import conversation, default_task_records, write_jsonl
from transformers import AutoTokenizer

from nemo_dpo.data.chat_template import ChatTemplate
from nemo_dpo.data.preference_dataset import read_preference_pairs, tokenize_pairs
from nemo_dpo.data.schemas import RecordOptions
from nemo_dpo.data.tokenizer import HFTokenizer, load_tokenizer_from_dir, open_tokenizer

# Llama-2 / Mistral style: the template prints the BOS itself.
INST_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Zephyr style: no bos_token in the template.
ROLES_WITHOUT_BOS = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _ours(path: str, tokenizer, options: RecordOptions = RecordOptions()) -> list:
    """nemo-dpo's pairs for a data file: the real reader, tokenizer and token rule."""
    pairs, stats = tokenize_pairs(read_preference_pairs(path, "error", options).records, tokenizer, 512,
                                  "truncate_prompt")
    assert stats["truncated"] == stats["dropped"] == 0
    return [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]


def _sequences(pairs: list) -> list:
    return [p["prompt_ids"] + p[side] for p in pairs for side in ("chosen_ids", "rejected_ids")]


def test_plain_text_pairs_are_tokenized_as_trl_tokenizes_them(tmp_path):
    """Llama style: every sequence starts with the one BOS TRL also puts there; GPT-2 style: no BOS, as in TRL."""
    rows = [{key: r[key] for key in ("prompt", "chosen", "rejected")} for r in default_task_records("validation", 16)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    for style in ("llama", "gpt2"):
        folder = save_bos_tokenizer(tmp_path / style, style)
        ours = _ours(path, open_tokenizer(folder))
        assert ours == trl_tokenized(folder, rows, tmp_path), style
        bos = AutoTokenizer.from_pretrained(folder).bos_token_id
        for sequence in _sequences(ours):
            assert sequence.count(bos) == (1 if style == "llama" else 0)
            assert (sequence[0] == bos) == (style == "llama")


def test_one_bos_whether_or_not_the_prompt_text_starts_with_it(tmp_path):
    """A prompt whose text starts with <s> gets no second BOS: where nemo-dpo differs from TRL, whose tokenizer call
    adds one before the text's own."""
    records = default_task_records("validation", 8)
    rows = [{"prompt": "<s>" * (i % 2) + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for i, r in enumerate(records)]
    folder = save_bos_tokenizer(tmp_path / "tok", "llama")
    tokenizer = open_tokenizer(folder)
    ours = _ours(write_jsonl(tmp_path / "pairs.jsonl", rows), tokenizer)
    for i, (mine, trl) in enumerate(zip(ours, trl_tokenized(folder, rows, tmp_path))):
        leading = 1 + i % 2  # TRL's BOS, then the text's
        assert trl["prompt_ids"][:leading] == [tokenizer.bos_id] * leading
        assert mine == {**trl, "prompt_ids": trl["prompt_ids"][leading - 1 :]}
    for sequence in _sequences(ours):
        assert sequence[0] == tokenizer.bos_id and sequence.count(tokenizer.bos_id) == 1


def test_a_tokenizer_that_also_appends_eos_gives_one_bos_and_one_eos(tmp_path):
    """Where nemo-dpo differs from TRL: TRL appends the EOS text and the tokenizer's rule another EOS."""
    rows = [{key: r[key] for key in ("prompt", "chosen", "rejected")} for r in default_task_records("validation", 8)]
    folder = save_bos_tokenizer(tmp_path / "tok", "llama_add_eos")
    tokenizer = open_tokenizer(folder)
    assert tokenizer.start_ids == [tokenizer.bos_id]
    ours = _ours(write_jsonl(tmp_path / "pairs.jsonl", rows), tokenizer)
    for mine, trl in zip(ours, trl_tokenized(folder, rows, tmp_path)):
        assert trl["chosen_ids"][-2:] == trl["rejected_ids"][-2:] == [tokenizer.eos_id] * 2
        assert mine == {**trl, "chosen_ids": trl["chosen_ids"][:-1], "rejected_ids": trl["rejected_ids"][:-1]}
    for sequence in _sequences(ours):
        assert sequence.count(tokenizer.bos_id) == sequence.count(tokenizer.eos_id) == 1


def test_conversations_get_exactly_one_bos_whether_the_template_prints_it_or_not(tmp_path):
    """A template that prints bos_token: none is added, the tokens are TRL's (transformers' apply_chat_template).
    One without (where nemo-dpo differs from TRL, whose apply_chat_template adds none): one rule for all text, so the
    tokenizer's BOS starts the rendered prompt; the responses are TRL's."""
    rows = [conversation(r) for r in default_task_records("validation", 8)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    for name, template in (("with_bos", INST_WITH_BOS), ("without_bos", ROLES_WITHOUT_BOS)):
        folder = save_bos_tokenizer(tmp_path / name, "llama", template=template)
        tokenizer = open_tokenizer(folder)
        options = RecordOptions(ChatTemplate(template, "t", {"bos_token": "<s>", "eos_token": "</s>"}))
        ours = _ours(path, tokenizer, options)
        added = [] if template == INST_WITH_BOS else [tokenizer.bos_id]
        theirs = trl_tokenized(folder, rows, tmp_path)
        assert ours == [{**trl, "prompt_ids": added + trl["prompt_ids"]} for trl in theirs]
        for sequence in _sequences(ours):
            assert sequence[0] == tokenizer.bos_id and sequence.count(tokenizer.bos_id) == 1, name


def _slow_only_folder(folder) -> str:
    """tokenizer.model (SentencePiece BPE, Llama's ids), tokenizer_config.json with an added special token, and
    special_tokens_map.json; no tokenizer.json."""
    os.makedirs(folder)
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(r[key] + "\n" for r in default_task_records("train", 300) for key in ("prompt", "chosen"))
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(folder, "tokenizer"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    for name in ("corpus.txt", "tokenizer.vocab"):
        os.remove(os.path.join(folder, name))
    size = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model")).get_piece_size()
    added = {"content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False,
             "single_word": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "added_tokens_decoder": {str(size): added}}, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"additional_special_tokens": ["<|im_start|>"]}, f)
    return str(folder)


def test_a_slow_only_folder_loads_and_encodes_as_auto_tokenizer(tmp_path):
    """tokenizer.model + tokenizer_config.json (older Llama/Mistral folders): AutoTokenizer's conversion, its added
    token, its add_bos_token."""
    folder = _slow_only_folder(tmp_path / "slow")
    assert sorted(os.listdir(folder)) == ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    ours, reference = load_tokenizer_from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert isinstance(ours, HFTokenizer) and ours.model_path == os.path.join(folder, "tokenizer.model")
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (len(reference), 1, 2)
    im_start = reference.convert_tokens_to_ids("<|im_start|>")
    assert im_start == ours.vocab_size - 1  # the added token, beyond the SentencePiece pieces
    texts = ["Pick the tool: brown, wolf, train, axe.", " The tool is axe.", "<|im_start|>user\nHi</s>",
             "<s>Pick  two   spaces", "émoji 🙂 survives byte fallback"]
    for text in texts:
        assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
    assert im_start in ours.encode(texts[2])
    assert ours.start_ids == [1]
    rows = [{"prompt": text, "chosen": " yes", "rejected": " no"} for text in texts]
    ours_pairs = _ours(write_jsonl(tmp_path / "pairs.jsonl", rows), ours)
    assert [p["prompt_ids"] for p in ours_pairs] == [reference(text)["input_ids"] for text in texts[:3]] + [
        reference(texts[3], add_special_tokens=False)["input_ids"], reference(texts[4])["input_ids"]]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.model").write_bytes(b"not sentencepiece")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match=f"{broken}: transformers' AutoTokenizer cannot load this tokenizer folder"):
        load_tokenizer_from_dir(str(broken))
