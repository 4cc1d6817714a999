"""Long passes say what they are doing, with progress and an ETA; short ones print nothing."""

from nemo_dpo.console import PassProgress


def test_a_short_pass_is_quiet():
    lines = []
    quick = PassProgress("tokenizing a.jsonl", 3, "records", lines.append, interval=60)
    for _ in range(3):
        quick.advance()
    quick.finish()
    assert lines == []


def test_a_long_pass_reports_each_interval_and_its_end():
    lines = []
    slow = PassProgress("reference log-probs", 4, "pairs", lines.append, interval=0)
    for _ in range(4):
        slow.advance()
    slow.finish()
    assert lines[0].startswith("reference log-probs: 1/4 pairs (25%), elapsed 0:00, eta 0:00")
    assert [line.split(": ")[1].split(" (")[0] for line in lines[:3]] == ["1/4 pairs", "2/4 pairs", "3/4 pairs"]
    assert lines[3] == "reference log-probs: 4 pairs in 0:00" and len(lines) == 4
