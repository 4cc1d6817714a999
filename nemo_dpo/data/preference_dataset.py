"""Read preference pairs from any supported file and turn them into token sequences.

Reading: readers.py gives each file's records (JSON Lines, gzip, JSON, Parquet,
Arrow), schemas.py turns every accepted schema into one text record, and a bad
record follows ``model.data.on_bad_record``.

Token rule (one rule for every side of every pair):
    side = start + encode(prompt) + encode(response) + [eos_id]
``start`` is what the tokenizer's own rule puts before a text (``tokenizer.start_ids``:
a Llama-style Hugging Face tokenizer's BOS, nothing for GPT-2 style ones and for
SentencePiece models), once per sequence: it belongs to the prompt, so chosen and
rejected share it, and it is left out when the prompt's tokens already start with
it (a chat template that prints ``bos_token``, text that starts with the BOS text).
Plain text and text rendered by a chat template follow the same rule: downstream
of schemas.py a record is text, wherever it came from.
The prompt and response are encoded separately so the boundary between them is
always a token boundary (the loss mask depends on it). SentencePiece adds a
word-boundary marker in front of every encoded text, so with the project's
tokenizer this equals encoding `prompt + " " + response`: store responses
without a leading space. A side ends with exactly one EOS: when the response,
less trailing whitespace, already ends with the EOS token (chat templates that
close a turn with the tokenizer's EOS, e.g. ChatML's <|im_end|> when that is the
eos_token), it is encoded without that whitespace and nothing is appended.
"""

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from nemo_dpo.data.readers import data_format, read_rows
from nemo_dpo.data.schemas import MissingSetting, RecordOptions, normalize

OVERFLOW_POLICIES = ("truncate_prompt", "drop")
BAD_RECORD_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]  # starting with the tokenizer's start_ids (BOS), if it has any
    chosen: list[int]  # response tokens, ending with eos_id
    rejected: list[int]  # response tokens, ending with eos_id
    chosen_reward: float
    rejected_reward: float

    @property
    def num_tokens(self) -> int:
        """Tokens the pair puts through the model: the prompt twice (once per side) and both responses."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


class PreferenceData(NamedTuple):
    records: list  # {prompt, chosen, rejected, chosen_reward, rejected_reward}, texts
    skipped: list  # one message per bad record left out, starting with file:line (or file:row)
    schemas: dict  # schema name -> records read in it
    file_format: str  # readers.FORMATS value


def read_preference_pairs(path: str, on_bad_record: str = "error", options: RecordOptions = RecordOptions()) -> PreferenceData:
    """Every record of ``path`` as text, and what was skipped.

    A bad record (not UTF-8, invalid JSON, a missing or mistyped field, an empty
    response, chosen == rejected, a non-finite reward, a non-assistant message in
    a response, a pair with no implicit prompt, a chat template that fails on it)
    raises ``ValueError`` naming ``file:line`` (``file:row N`` for Parquet and
    Arrow) and the field with ``on_bad_record="error"``; with ``"skip"`` it is
    left out and its message returned. A record that needs a setting the options
    lack (``schemas.MissingSetting``) always raises.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"model.data.on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
    records, skipped, schemas = [], [], Counter()
    for where, load in read_rows(path):
        try:
            record, schema = normalize(load(), where, options)
        except MissingSetting:
            raise
        except ValueError as err:
            if on_bad_record == "error":
                raise
            skipped.append(str(err))
            continue
        records.append(record)
        schemas[schema] += 1
    if not records:
        detail = f"all {len(skipped)} records are bad, e.g. {skipped[0]}" if skipped else "the file is empty"
        raise ValueError(f"{path}: no preference pairs ({detail})")
    return PreferenceData(records, skipped, dict(schemas), data_format(path))


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Prompt tokens starting with the tokenizer's ``start_ids`` exactly once (see the token rule above)."""
    ids, start = tokenizer.encode(text), tokenizer.start_ids
    return ids if ids[: len(start)] == start else start + ids


def encode_response(text: str, tokenizer) -> list[int]:
    """Response tokens ending with exactly one EOS (see the token rule above)."""
    trimmed = text.rstrip()
    if tokenizer.eos_token and trimmed.endswith(tokenizer.eos_token):
        ids = tokenizer.encode(trimmed)
        if ids and ids[-1] == tokenizer.eos_id:
            return ids
    return tokenizer.encode(text) + [tokenizer.eos_id]


def encode_pair(record: dict, tokenizer) -> TokenizedPair:
    """A record's tokens before any overflow policy."""
    return TokenizedPair(
        encode_prompt(record["prompt"], tokenizer),
        encode_response(record["chosen"], tokenizer),
        encode_response(record["rejected"], tokenizer),
        record["chosen_reward"],
        record["rejected_reward"],
    )


def fit_pair(pair: TokenizedPair, max_seq_length: int, overflow: str, keep: int) -> tuple[TokenizedPair | None, bool]:
    """(the pair as it fits ``max_seq_length``, or None if dropped; whether its prompt was truncated).

    "truncate_prompt" drops prompt tokens from the left (the end of the prompt
    matters most for the response), after the first ``keep`` (the tokenizer's
    ``start_ids``: a truncated prompt still starts with its BOS), and keeps at
    least one, since the first response token is predicted from the last prompt
    token; a pair whose response cannot fit that way is dropped. "drop" drops
    every too-long pair.
    """
    longest_response = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest_response <= max_seq_length:
        return pair, False
    prompt_room = max_seq_length - longest_response
    if overflow == "drop" or prompt_room < max(1, keep):
        return None, False
    prompt = pair.prompt[:keep] + pair.prompt[len(pair.prompt) - (prompt_room - keep) :]
    return TokenizedPair(prompt, pair.chosen, pair.rejected, pair.chosen_reward, pair.rejected_reward), True


def tokenize_pairs(
    records: list[dict], tokenizer, max_seq_length: int, overflow: str, progress=None
) -> tuple[list[TokenizedPair], dict]:
    """Tokenize records (``encode_pair``), applying the overflow policy to pairs longer than `max_seq_length` (``fit_pair``).

    ``progress`` (a ``console.PassProgress``) is advanced once per record.
    """
    return fit_pairs((encode_pair(record, tokenizer) for record in records), tokenizer, max_seq_length, overflow,
                     progress)


def fit_pairs(encoded, tokenizer, max_seq_length: int, overflow: str, progress=None) -> tuple[list[TokenizedPair], dict]:
    """``fit_pair`` on every pair of ``encoded`` (an iterable); the pairs kept and what overflow did to them."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"model.data.overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    pairs = []
    truncated = dropped = 0
    keep = len(tokenizer.start_ids)
    for encoded_pair in encoded:
        pair, was_truncated = fit_pair(encoded_pair, max_seq_length, overflow, keep)
        if progress is not None:
            progress.advance()
        if pair is None:
            dropped += 1
            continue
        truncated += was_truncated
        pairs.append(pair)
    lengths = [len(p.prompt) + len(side) for p in pairs for side in (p.chosen, p.rejected)]
    stats = {
        "pairs": len(pairs),
        "truncated": truncated,
        "dropped": dropped,
        "max_len": max(lengths, default=0),
        "mean_len": sum(lengths) / len(lengths) if lengths else 0.0,
    }
    return pairs, stats
