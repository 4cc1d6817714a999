"""Fuzzing the preference reader: whatever bytes a file holds, the outcome is records or the intended error.

The intended error is a ``ValueError`` that starts with ``<file>:<line>:`` (or with the
file name when nothing usable is left); nothing else may escape, and nothing may hang.
"""

import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from chat_fixtures import CHATML

from nemo_dpo.data.chat_template import ChatTemplate
from nemo_dpo.data.preference_dataset import read_preference_pairs
from nemo_dpo.data.schemas import RecordOptions

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Records that are nearly right: the expected keys with values of any JSON type.
near_records = st.fixed_dictionaries(
    {"prompt": json_values, "chosen": json_values, "rejected": json_values},
    optional={"chosen_reward": json_values, "rejected_reward": json_values},
)
text_records = st.fixed_dictionaries({"prompt": st.text(), "chosen": st.text(), "rejected": st.text()})


def read(content: bytes, policy: str, options: RecordOptions = RecordOptions()):
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    try:
        return path, read_preference_pairs(path, policy, options)
    except ValueError as err:
        assert str(err).startswith(path), err
        return path, None
    finally:
        os.remove(path)


def check_records(records):
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
        assert all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))
        assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]


@FUZZ
@given(lines=st.lists(st.binary(max_size=200), max_size=8), policy=st.sampled_from(["error", "skip"]))
def test_random_bytes(lines, policy):
    _, result = read(b"\n".join(lines), policy)
    if result is not None:
        check_records(result[0])


@FUZZ
@given(values=st.lists(json_values | near_records | text_records, min_size=1, max_size=8),
       policy=st.sampled_from(["error", "skip"]))
def test_random_json_and_unicode(values, policy):
    content = "\n".join(json.dumps(v, ensure_ascii=False) for v in values).encode("utf-8", "surrogatepass")
    path, result = read(content, policy)
    if result is not None:
        records, skipped = result[:2]
        check_records(records)
        assert len(records) + len(skipped) == sum(1 for v in values if json.dumps(v).strip())
        assert all(message.startswith(f"{path}:") for message in skipped)


@settings(max_examples=5, deadline=10000)
@given(size=st.integers(min_value=1_000_000, max_value=5_000_000), policy=st.sampled_from(["error", "skip"]))
def test_huge_lines(size, policy):
    huge = json.dumps({"prompt": "x" * size, "chosen": "a", "rejected": "b"}).encode()
    _, result = read(huge + b"\n" + b"{" * size, policy)
    assert (result is None) == (policy == "error")


# The other schemas, mostly right or nearly: odd roles and values, ranks of any type, dialogues that may not split.
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=8)})
odd_message = st.fixed_dictionaries({"role": json_values, "content": json_values})
messages = st.lists(message, min_size=1, max_size=3) | st.lists(message | odd_message, max_size=3) | json_values
answer = st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(min_size=1, max_size=8)}),
                  min_size=1, max_size=2)
side = answer | messages
dialogue = st.lists(st.sampled_from(["\n\nHuman:", "\n\nAssistant:", " hi", " yes", " no", ""]), max_size=6).map("".join)
shared_start = st.tuples(dialogue | st.lists(message, max_size=3), dialogue | side, dialogue | side).map(
    lambda t: {"chosen": t[0] + t[1], "rejected": t[0] + t[2]} if type(t[0]) is type(t[1]) is type(t[2])
    else {"chosen": t[1], "rejected": t[2]})
ranked = st.lists(st.fixed_dictionaries({"rank": st.integers(0, 9), "completion": answer}), min_size=2, max_size=4,
                  unique_by=lambda c: c["rank"])
odd_ranked = st.lists(st.fixed_dictionaries({"rank": st.integers(0, 3) | json_values, "completion": side}), max_size=4)
hh = st.tuples(dialogue, st.text(max_size=6), st.text(max_size=6)).map(
    lambda t: {"chosen": f"{t[0]}\n\nAssistant:{t[1]}", "rejected": f"{t[0]}\n\nAssistant:{t[2]}"})
other_records = (
    st.fixed_dictionaries({"prompt": messages | st.text(max_size=12), "chosen": side, "rejected": side})
    | st.fixed_dictionaries({"context": messages, "completions": ranked | odd_ranked})
    | shared_start
    | hh
)
CHAT = RecordOptions(ChatTemplate(CHATML, "fuzz", {"eos_token": "<|im_end|>"}), "\n\nAssistant:")


@FUZZ
@given(values=st.lists(other_records, min_size=1, max_size=6), policy=st.sampled_from(["error", "skip"]))
def test_conversational_ranked_and_implicit_records(values, policy):
    path, result = read("\n".join(json.dumps(v) for v in values).encode(), policy, CHAT)
    if result is not None:
        check_records(result.records)
        assert len(result.records) + len(result.skipped) == len(values)
        assert sum(result.schemas.values()) == len(result.records)
