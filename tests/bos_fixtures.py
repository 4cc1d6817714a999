"""Tiny Hugging Face tokenizer folders that do and do not start a text with BOS, and TRL's tokenization of DPO pairs.

All are byte-level BPE trained on the default task with ``<s>`` and ``</s>`` as
special tokens; the Llama-style one has Llama's post-processor (``<s> $A``), so
``tokenizer(text)`` starts with ``<s>``, the GPT-2 style one has none.
"""

import json
import os
import types

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from chat_fixtures import default_task_records

BOS, EOS = "<s>", "</s>"
# What tokenizer(text) makes of text $A, by style (Llama's tokenizer with add_eos_token: llama_add_eos).
POST_PROCESSORS = {"llama": f"{BOS} $A", "llama_add_eos": f"{BOS} $A {EOS}", "gpt2": None}


def save_bos_tokenizer(folder, style: str = "llama", template: str | None = None) -> str:
    """A tokenizer.json + tokenizer_config.json folder (with ``template`` as its chat_template, if given)."""
    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [r[key] for r in default_task_records("train", 300) for key in ("prompt", "chosen", "rejected")]
    tok.train_from_iterator(texts + ["[INST] [/INST] <|user|> <|assistant|>"] * 20, trainer)
    template_processing = POST_PROCESSORS[style]
    if template_processing is not None:
        specials = [(token, tok.token_to_id(token)) for token in (BOS, EOS) if token in template_processing.split()]
        tok.post_processor = processors.TemplateProcessing(single=template_processing, special_tokens=specials)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "unk_token": "<unk>"}
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(folder)


def trl_tokenized(tokenizer_dir: str, rows: list, tmp_path) -> list:
    """TRL 1.16's own tokenization of DPO rows: ``DPOTrainer._prepare_dataset``'s prompt_ids, chosen_ids, rejected_ids.

    Its tokenizer is transformers' AutoTokenizer of the folder, as TRL's users load it;
    the method reads nothing of the trainer but its tokenizer, so no model is built.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False)
    dataset = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list(rows),
                                          tokenizer, args, "train")
    return [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in dataset]
