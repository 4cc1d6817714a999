"""The data of LLaMA-Factory and of `datasets`, made from the default task: sharegpt and Alpaca preference records, a
`save_to_disk` folder and a folder of shards as a Hub dataset repo holds them.

Shared by tests/test_data_peer_formats.py and the peer-format run of tests/data_training_runs.py.
"""

import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from chat_fixtures import GREETING, conversation, default_task_records, write_jsonl

SYSTEM = "Answer in one word."


def turn(speaker, text):
    return {"from": speaker, "value": text}


def sharegpt(record: dict, system: str | None = None) -> dict:
    """A default-task pair in LLaMA-Factory's dpo_en_demo.json layout: greeting, reply, question; the answers one turn each."""
    row = {"conversations": [turn("human", GREETING[0]["content"]), turn("gpt", GREETING[1]["content"]),
                             turn("human", record["prompt"])],
           "chosen": turn("gpt", record["chosen"]), "rejected": turn("gpt", record["rejected"])}
    return {"system": system, **row} if system else row


def alpaca(record: dict) -> dict:
    """A default-task pair as an Alpaca-style preference record: the question split into instruction and input."""
    instruction, _, rest = record["prompt"].partition(":")
    return {"instruction": instruction + ":", "input": rest.strip(), "chosen": record["chosen"],
            "rejected": record["rejected"]}


def save_to_disk(folder, rows, shards=2) -> str:
    datasets.Dataset.from_list(rows).save_to_disk(str(folder), num_shards=shards)
    return str(folder)


def shards(folder, rows_by_name: dict) -> str:
    """A folder as a Hub dataset repo holds one: Parquet and JSON Lines shards named by split, a README."""
    for name, rows in rows_by_name.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            write_jsonl(path, rows)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("---\nconfigs: [train, test]\n---\n")
    return str(folder)


def peer_files(root) -> dict:
    """A sharegpt JSON array, an Alpaca JSON Lines file, a save_to_disk folder and a shards folder: 16 pairs each."""
    records = default_task_records("train", 96)
    os.makedirs(root, exist_ok=True)
    demo = os.path.join(root, "dpo_en_demo.json")
    with open(demo, "w") as f:
        json.dump([sharegpt(r, SYSTEM if i % 3 == 0 else None) for i, r in enumerate(records[:16])], f, indent=2)
    return {
        "sharegpt": demo,
        "alpaca": write_jsonl(os.path.join(root, "alpaca_prefs.jsonl"), [alpaca(r) for r in records[16:32]]),
        "saved": save_to_disk(os.path.join(root, "saved"), [conversation(r) for r in records[32:48]]),
        "shards": shards(os.path.join(root, "shards"), {
            "data/train-00000-of-00002.parquet": [conversation(r) for r in records[48:56]],
            "data/train-00001-of-00002.jsonl": [sharegpt(r) for r in records[56:64]],
            "data/test-00000-of-00001.jsonl": [conversation(r) for r in records[64:96]],
        }),
    }

