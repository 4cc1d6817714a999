import json
import os
import re

from nemo_dpo.data import default_task
from nemo_dpo.data.default_task import CATEGORIES, DEFAULT_DATA_DIR, DEFAULT_SEED, generate


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_files_regenerate_byte_identically(tmp_path):
    default_task.main(["--out-dir", str(tmp_path), "--seed", str(DEFAULT_SEED)])
    for name in ("train.jsonl", "validation.jsonl"):
        with open(os.path.join(DEFAULT_DATA_DIR, name), "rb") as shipped, open(tmp_path / name, "rb") as fresh:
            assert shipped.read() == fresh.read(), name


def test_generate_is_a_pure_function_of_the_seed():
    assert generate(7) == generate(7)
    assert generate(7) != generate(8)


def test_splits_sizes_and_disjoint_prompts():
    train = _read(os.path.join(DEFAULT_DATA_DIR, "train.jsonl"))
    validation = _read(os.path.join(DEFAULT_DATA_DIR, "validation.jsonl"))
    assert (len(train), len(validation)) == (default_task.NUM_TRAIN, default_task.NUM_VALIDATION)
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == len(train)
    assert train_prompts.isdisjoint(r["prompt"] for r in validation)


def test_chosen_is_right_and_rejected_is_a_wrong_word_from_the_prompt():
    category_of = {word: category for category, words in CATEGORIES.items() for word in words}
    train, validation = generate(DEFAULT_SEED)
    for record in train + validation:
        assert set(record) == {"prompt", "chosen", "rejected"}
        assert record["chosen"] != record["rejected"]
        listed = [w for w in re.findall(r"[a-z]+", record["prompt"]) if w in category_of]
        assert len({category_of[w] for w in listed}) == len(listed) >= 3
        _, category, _, chosen_word = record["chosen"].rstrip(".").split()
        _, rejected_category, _, rejected_word = record["rejected"].rstrip(".").split()
        assert category == rejected_category
        assert category_of[chosen_word] == category and chosen_word in listed
        assert category_of[rejected_word] != category and rejected_word in listed
