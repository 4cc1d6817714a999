"""Read preference pairs from JSONL and turn them into token sequences.

Token rule (one rule for every side of every pair):
    side = encode(prompt) + encode(response) + [eos_id]
The prompt and response are encoded separately so the boundary between them is
always a token boundary (the loss mask depends on it). SentencePiece adds a
word-boundary marker in front of every encoded text, so with the project's
tokenizer this equals encoding `prompt + " " + response`: store responses
without a leading space.
"""

import json
import math
import os
from dataclasses import dataclass

SCHEMAS = (("prompt", "chosen", "rejected"), ("prompt", "chosen_response", "rejected_response"))
DEFAULT_REWARDS = {"chosen_reward": 1.0, "rejected_reward": 0.0}
OVERFLOW_POLICIES = ("truncate_prompt", "drop")
BAD_RECORD_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]  # response tokens, ending with eos_id
    rejected: list[int]  # response tokens, ending with eos_id
    chosen_reward: float
    rejected_reward: float


def _normalize(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = SCHEMAS[1] if "chosen_response" in obj else SCHEMAS[0]
    for key in keys:
        if key not in obj:
            raise ValueError(
                f"{where}: missing key '{key}' (keys present: {sorted(obj)}); "
                f"expected keys {SCHEMAS[0]} or {SCHEMAS[1]}"
            )
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: key '{key}' must be a string, got {type(obj[key]).__name__}")
    record = {"prompt": obj[keys[0]], "chosen": obj[keys[1]], "rejected": obj[keys[2]]}
    for key in keys[1:]:
        if not obj[key].strip():
            raise ValueError(f"{where}: key '{key}' is empty")
    if record["chosen"] == record["rejected"]:
        raise ValueError(f"{where}: '{keys[1]}' and '{keys[2]}' are identical (no preference to learn)")
    for key, default in DEFAULT_REWARDS.items():
        value = obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: key '{key}' must be a finite number, got {value!r}")
        record[key] = float(value)
    return record


def _parse_line(raw: bytes, where: str) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from e
    except RecursionError as e:
        raise ValueError(f"{where}: JSON nested too deeply") from e
    return _normalize(obj, where)


def read_preference_pairs(path: str, on_bad_record: str = "error") -> tuple[list[dict], list[str]]:
    """Normalized records {prompt, chosen, rejected, chosen_reward, rejected_reward}, and what was skipped.

    Accepts (prompt, chosen, rejected) and NeMo-Aligner's (prompt, chosen_response,
    rejected_response); blank lines are ignored. A bad record (not UTF-8, invalid
    JSON, missing or non-string fields, an empty response, chosen == rejected, a
    non-finite reward) raises ``ValueError`` naming ``file:line`` and the field with
    ``on_bad_record="error"``; with ``"skip"`` it is left out and its message returned.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"model.data.on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: preference data file not found")
    records, skipped = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                records.append(_parse_line(raw, f"{path}:{line_no}"))
            except ValueError as err:
                if on_bad_record == "error":
                    raise
                skipped.append(str(err))
    if not records:
        detail = f"all {len(skipped)} records are bad, e.g. {skipped[0]}" if skipped else "the file is empty"
        raise ValueError(f"{path}: no preference pairs ({detail})")
    return records, skipped


def tokenize_pairs(
    records: list[dict], tokenizer, max_seq_length: int, overflow: str
) -> tuple[list[TokenizedPair], dict]:
    """Tokenize records, applying the overflow policy to pairs longer than `max_seq_length`.

    "truncate_prompt" drops prompt tokens from the left (the end of the prompt
    matters most for the response) but keeps at least one, since the first
    response token is predicted from the last prompt token; a pair whose
    response cannot fit that way is dropped. "drop" drops every too-long pair.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"model.data.overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    pairs = []
    truncated = dropped = 0
    for record in records:
        prompt = tokenizer.encode(record["prompt"])
        chosen = tokenizer.encode(record["chosen"]) + [tokenizer.eos_id]
        rejected = tokenizer.encode(record["rejected"]) + [tokenizer.eos_id]
        longest_response = max(len(chosen), len(rejected))
        if len(prompt) + longest_response > max_seq_length:
            prompt_room = max_seq_length - longest_response
            if overflow == "drop" or prompt_room < 1:
                dropped += 1
                continue
            prompt = prompt[len(prompt) - prompt_room :]
            truncated += 1
        pairs.append(TokenizedPair(prompt, chosen, rejected, record["chosen_reward"], record["rejected_reward"]))
    lengths = [len(p.prompt) + len(side) for p in pairs for side in (p.chosen, p.rejected)]
    stats = {
        "pairs": len(pairs),
        "truncated": truncated,
        "dropped": dropped,
        "max_len": max(lengths, default=0),
        "mean_len": sum(lengths) / len(lengths) if lengths else 0.0,
    }
    return pairs, stats
