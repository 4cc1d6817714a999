"""Fuzzing the preference reader: whatever bytes a file holds, the outcome is records or the intended error.

The intended error is a ``ValueError`` that starts with ``<file>:<line>:`` (or with the
file name when nothing usable is left); nothing else may escape, and nothing may hang.
"""

import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemo_dpo.data.preference_dataset import read_preference_pairs

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


def read(content: bytes, policy: str):
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    try:
        return path, read_preference_pairs(path, policy)
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
