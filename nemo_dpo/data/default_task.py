"""The embedded default preference task: "category picking".

A prompt lists a few words from distinct categories and asks for the one of a
given category; the chosen answer names it, the rejected answer names another
word from the same prompt. Every word appears often across the training split,
so a tiny transformer trained from scratch with DPO alone can learn which
category each word belongs to, and the held-out validation split (new prompts,
known words) measures exactly that.

Regenerate the shipped files with:
    python -m nemo_dpo.data.default_task --out-dir nemo_dpo/data/default
"""

import argparse
import json
import os
import random

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")
DEFAULT_SEED = 1234
NUM_TRAIN = 4000
NUM_VALIDATION = 200

# Ten words per category; no word belongs to two categories (no "orange").
CATEGORIES = {
    "animal": ["cat", "dog", "horse", "tiger", "lion", "rabbit", "mouse", "bear", "wolf", "sheep"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
    "colour": ["red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "grey"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "boat", "plane", "taxi", "tractor", "scooter"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "pliers", "axe", "spanner"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "banjo", "clarinet"],
}

PROMPT_TEMPLATES = [
    "Which of these is {article} {category}: {words}?",
    "Pick the {category}: {words}.",
    "Name the {category} in this list: {words}.",
    "Find the {category} among {words}.",
]
ANSWER_TEMPLATE = "The {category} is {word}."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _make_pair(rng: random.Random) -> dict:
    """One random example: 3-4 words from distinct categories, one of which is asked for."""
    categories = rng.sample(sorted(CATEGORIES), rng.choice([3, 4]))
    words = [rng.choice(CATEGORIES[c]) for c in categories]
    target = rng.randrange(len(categories))
    distractor = rng.choice([i for i in range(len(categories)) if i != target])
    category = categories[target]
    order = list(range(len(words)))
    rng.shuffle(order)
    prompt = rng.choice(PROMPT_TEMPLATES).format(
        article=_article(category), category=category, words=", ".join(words[i] for i in order)
    )
    return {
        "prompt": prompt,
        "chosen": ANSWER_TEMPLATE.format(category=category, word=words[target]),
        "rejected": ANSWER_TEMPLATE.format(category=category, word=words[distractor]),
    }


def generate(seed: int) -> tuple[list[dict], list[dict]]:
    """Return (train, validation) pairs; a pure function of `seed`.

    Pairs are drawn until there are enough distinct prompts; the first
    NUM_VALIDATION distinct prompts go to validation and the rest to train, so
    no prompt string occurs in both splits.
    """
    rng = random.Random(seed)
    seen = set()
    pairs = []
    while len(pairs) < NUM_VALIDATION + NUM_TRAIN:
        pair = _make_pair(rng)
        if pair["prompt"] not in seen:
            seen.add(pair["prompt"])
            pairs.append(pair)
    return pairs[NUM_VALIDATION:], pairs[:NUM_VALIDATION]


def write_jsonl(records: list[dict], path: str) -> None:
    """One sorted-key JSON object a line, so regeneration is byte-identical."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the default category-picking preference task.")
    parser.add_argument("--out-dir", required=True, help="folder for train.jsonl and validation.jsonl")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    train, validation = generate(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(train, os.path.join(args.out_dir, "train.jsonl"))
    write_jsonl(validation, os.path.join(args.out_dir, "validation.jsonl"))


if __name__ == "__main__":
    main()
