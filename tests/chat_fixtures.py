"""A tiny Hugging Face tokenizer folder with ChatML special tokens and a ChatML-like template, and multi-turn data for it."""

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from nemo_dpo.data.default_task import DEFAULT_DATA_DIR

# Ours, in the ChatML layout: every turn is <|im_start|>role\ncontent<|im_end|>\n, a default system turn first.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou pick words.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GREETING = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. Ask me anything."}]


def default_task_records(split: str, count: int) -> list:
    with open(os.path.join(DEFAULT_DATA_DIR, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(count)]


def conversation(record: dict) -> dict:
    """A default-task pair as a three-turn conversation: greeting, reply, then the question."""
    return {
        "prompt": GREETING + [{"role": "user", "content": record["prompt"]}],
        "chosen": [{"role": "assistant", "content": record["chosen"]}],
        "rejected": [{"role": "assistant", "content": record["rejected"]}],
    }


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def save_chatml_tokenizer(folder, eos_token: str = "<|im_end|>", template: str = CHATML) -> str:
    """Byte-level BPE trained on default-task conversations, the ChatML markers as special added tokens."""
    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[AddedToken(t, special=True) for t in SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [turn["content"] for r in default_task_records("train", 300) for turns in conversation(r).values()
             for turn in turns]
    tok.train_from_iterator(texts + ["system user assistant You pick words."] * 20, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "pad_token": "<|endoftext|>",
                   "chat_template": template}, f)
    return str(folder)
