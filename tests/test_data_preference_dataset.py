import json

import pytest

from nemo_dpo.data.preference_dataset import read_preference_pairs, tokenize_pairs

EOS = 1
BOS = 2


class CharTokenizer:
    """One token per character (ids from 10), so lengths are easy to reason about."""

    eos_id = EOS
    eos_token = None  # no EOS text: the appended EOS is the only one
    start_ids = []  # no BOS

    def encode(self, text):
        return [ord(c) + 10 for c in text]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_reads_both_schemas_and_default_rewards(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "p1", "chosen": "c1", "rejected": "r1"}),
            "",
            json.dumps(
                {
                    "prompt": "p2",
                    "chosen_response": "c2",
                    "rejected_response": "r2",
                    "chosen_reward": 5,
                    "rejected_reward": -1.5,
                }
            ),
        ],
    )
    assert read_preference_pairs(path)[0] == [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1", "chosen_reward": 1.0, "rejected_reward": 0.0},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2", "chosen_reward": 5.0, "rejected_reward": -1.5},
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "p", "chosen": ', "invalid JSON"),
        ('["prompt", "chosen"]', "expected a JSON object, got list"),
        ('{"prompt": "p", "rejected": "r"}', "missing key 'chosen' (keys present: ['prompt', 'rejected'])"),
        ('{"prompt": "p", "chosen_response": "c"}', "missing key 'rejected_response'"),
        ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "key 'chosen' must be a string, got int"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_reward": "high"}', "key 'chosen_reward' must be"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "rejected_reward": true}', "key 'rejected_reward' must be"),
        ('{"prompt": "p", "chosen": "  ", "rejected": "r"}', "key 'chosen' is empty"),
        ('{"prompt": "p", "chosen_response": "c", "rejected_response": ""}', "key 'rejected_response' is empty"),
        ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "'chosen' and 'rejected' are identical"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_reward": 1e999}', "must be a finite number"),
        ("[" * 100000, "JSON nested too deeply"),
    ],
)
def test_bad_records_name_file_line_and_problem(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = _write(tmp_path / "bad.jsonl", [good, "", bad_line])
    with pytest.raises(ValueError) as e:
        read_preference_pairs(path)[0]
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_invalid_utf8_is_a_bad_record(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "r"}\n')
    with pytest.raises(ValueError, match=rf"{path}:1: not UTF-8 text"):
        read_preference_pairs(str(path))


def test_skip_policy_leaves_bad_records_out_and_says_which(tmp_path):
    good = [json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}) for i in range(3)]
    path = _write(tmp_path / "mixed.jsonl", [good[0], "{oops", good[1], '{"prompt": "p", "chosen": "x", "rejected": "x"}',
                                             good[2]])
    records, skipped = read_preference_pairs(path, "skip")[:2]
    assert [r["prompt"] for r in records] == ["p0", "p1", "p2"]
    assert len(skipped) == 2 and skipped[0].startswith(f"{path}:2: invalid JSON")
    assert skipped[1].startswith(f"{path}:4: 'chosen' and 'rejected' are identical")
    only_bad = _write(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(ValueError, match=r"bad.jsonl: no preference pairs \(all 1 records are bad, e.g. .*:1: invalid"):
        read_preference_pairs(only_bad, "skip")
    with pytest.raises(ValueError, match=r"on_bad_record must be one of \('error', 'skip'\), got 'ignore'"):
        read_preference_pairs(path, "ignore")


def test_missing_and_empty_files(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="nope.jsonl: preference data file not found"):
        read_preference_pairs(missing)[0]
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="empty.jsonl: no preference pairs"):
        read_preference_pairs(empty)[0]


def _record(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_reward": 1.0, "rejected_reward": 0.0}


def test_tokenize_appends_eos_and_keeps_prompt_separate():
    pairs, stats = tokenize_pairs([_record("ab", "cde", "f")], CharTokenizer(), 16, "truncate_prompt")
    tok = CharTokenizer().encode
    assert pairs[0].prompt == tok("ab")
    assert pairs[0].chosen == tok("cde") + [EOS]
    assert pairs[0].rejected == tok("f") + [EOS]
    assert stats == {"pairs": 1, "truncated": 0, "dropped": 0, "max_len": 6, "mean_len": 5.0}


def test_truncate_prompt_cuts_from_the_left_and_drops_unfittable_pairs():
    records = [
        _record("abcdef", "xy", "z"),  # 6 + 3 = 9 > 6: keep the last 3 prompt tokens
        _record("ab", "xyz", "w"),  # 2 + 4 = 6: fits as is
        _record("ab", "uvwxy", "z"),  # response + EOS = 6 leaves no room for a prompt token: dropped
        _record("abcdefgh", "uvwxyzt", "z"),  # response alone too long: dropped
    ]
    pairs, stats = tokenize_pairs(records, CharTokenizer(), 6, "truncate_prompt")
    assert [p.prompt for p in pairs] == [CharTokenizer().encode("def"), CharTokenizer().encode("ab")]
    assert stats["pairs"] == 2 and stats["truncated"] == 1 and stats["dropped"] == 2
    assert stats["max_len"] == 6


def test_bos_starts_every_prompt_once_and_truncation_keeps_it():
    class BosCharTokenizer(CharTokenizer):
        start_ids = [BOS]  # what a Llama-style tokenizer puts before a text

    records = [
        _record("abcdef", "xy", "z"),  # 7 + 3 > 6: BOS, then the last 2 prompt tokens
        _record("ab", "uvwx", "z"),  # 3 + 5 > 6: the BOS alone is the prompt
        _record("a", "uvwxy", "z"),  # response + EOS = 6 leaves no room for the BOS: dropped
        _record("a", "b", "c"),  # fits: BOS once
    ]
    pairs, stats = tokenize_pairs(records, BosCharTokenizer(), 6, "truncate_prompt")
    tok = CharTokenizer().encode
    assert [p.prompt for p in pairs] == [[BOS] + tok("ef"), [BOS], [BOS] + tok("a")]
    assert (stats["truncated"], stats["dropped"], stats["max_len"]) == (2, 1, 6)


def test_drop_policy_drops_every_too_long_pair():
    records = [_record("abcdef", "xy", "z"), _record("ab", "xyz", "w"), _record("ab", "uvwxy", "z")]
    pairs, stats = tokenize_pairs(records, CharTokenizer(), 6, "drop")
    assert [p.prompt for p in pairs] == [CharTokenizer().encode("ab")]
    assert (stats["pairs"], stats["truncated"], stats["dropped"]) == (1, 0, 2)


def test_unknown_overflow_policy_names_the_config_key():
    with pytest.raises(ValueError, match=r"model\.data\.overflow.*truncate_prompt.*drop.*'clip'"):
        tokenize_pairs([_record("a", "b", "c")], CharTokenizer(), 8, "clip")
