"""Real data: Anthropic HH-RLHF harmless-base test split (../shared, 2,312 pairs, gzip JSON Lines, prompts implicit).

Skipped when the shared folder is absent: the project never needs it at run time.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nemo_dpo.config import load_config
from nemo_dpo.data.chat_template import record_options
from nemo_dpo.data.preference_dataset import encode_pair, read_preference_pairs
from nemo_dpo.data.tokenizer import SentencePieceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")
DELIMITER = "\n\nAssistant:"
pytestmark = pytest.mark.skipif(not os.path.isfile(HH), reason=f"{HH} not present (shared test data)")


@pytest.fixture(scope="module")
def raw():
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data():
    return read_preference_pairs(HH, "skip", record_options(load_config("gpt_dpo").model))


def splits_at_last_turn(row) -> bool:
    """The shared data's README criterion, computed directly: both sides agree up to their last delimiter."""
    chosen, rejected = row["chosen"], row["rejected"]
    cut_c, cut_r = chosen.rfind(DELIMITER), rejected.rfind(DELIMITER)
    return cut_c >= 0 and cut_c == cut_r and chosen[:cut_c] == rejected[:cut_r]


def test_exactly_the_pairs_without_a_shared_prompt_are_skipped(raw, data):
    assert len(raw) == 2312 and sum(map(splits_at_last_turn, raw)) == 2307  # as the data's README says
    no_split = [i for i, row in enumerate(raw, start=1) if not splits_at_last_turn(row)]
    empty = [i for i, row in enumerate(raw, start=1)
             if splits_at_last_turn(row) and not row["chosen"][row["chosen"].rfind(DELIMITER) + len(DELIMITER):].strip()]
    skipped = {int(reason.split(":")[1]): reason for reason in data.skipped}
    assert sorted(skipped) == sorted(no_split + empty)
    assert len(no_split) == 5 and len(empty) == 4  # the 4: an empty chosen answer, a bad record of its own kind
    for line in no_split:
        assert skipped[line].startswith(f"{HH}:{line}: no implicit prompt: ")
    for line in empty:
        assert skipped[line] == f"{HH}:{line}: key 'chosen' is empty"
    assert len(data.records) == 2303 and data.schemas == {"chosen/rejected (implicit prompt, text)": 2303}
    assert data.file_format == "jsonl.gz"


def test_splits_are_exact(raw, data):
    kept = [row for i, row in enumerate(raw, start=1) if splits_at_last_turn(row) and
            row["chosen"][row["chosen"].rfind(DELIMITER) + len(DELIMITER):].strip()]
    assert len(kept) == len(data.records)
    for row, record in zip(kept, data.records):
        assert record["prompt"] + record["chosen"] == row["chosen"]
        assert record["prompt"] + record["rejected"] == row["rejected"]
        assert record["prompt"].endswith(DELIMITER) and record["prompt"].startswith("\n\nHuman:")
        assert DELIMITER not in record["chosen"] and DELIMITER not in record["rejected"]
    first = data.records[0]
    assert first["prompt"].endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert first["chosen"].startswith(" No, sorry!  All of these involve a pen")
    assert first["rejected"].startswith(" There are lots of funny things you can do with pens")
    # Where the common text runs past the delimiter, the cut is still at the delimiter.
    same_start = [r for r in data.records if r["chosen"][:8] == r["rejected"][:8]]
    assert same_start and all(r["prompt"].endswith(DELIMITER) for r in same_start)


@pytest.mark.slow
def test_prepare_reports_counts_lengths_and_overflow(tmp_path, data):
    common = [sys.executable, "-m", "nemo_dpo.data.prepare", "--data", HH, f"model.tokenizer.cache_dir={tmp_path}",
              "model.tokenizer.vocab_size=4000", "model.encoder_seq_length=512", "model.max_position_embeddings=512"]
    strict = subprocess.run(common, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert f"{HH}:87: key 'chosen' is empty" in strict.stdout and "... and 4 more" in strict.stdout
    assert "PROBLEM: 9 bad record(s): with model.data.on_bad_record=error a run stops at the first" in strict.stdout

    report_file = tmp_path / "report.json"
    lax = subprocess.run(common + ["model.data.on_bad_record=skip", "--json", str(report_file)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert lax.returncode == 0, lax.stdout + lax.stderr
    assert "format: jsonl.gz; record schemas: 2303 chosen/rejected (implicit prompt, text)" in lax.stdout
    assert "records: 2312 read, 2303 usable, 9 bad" in lax.stdout
    report = json.loads(report_file.read_text())[0]
    assert (report["records"], report["usable"], report["bad"]) == (2312, 2303, 9)

    # The same numbers, computed here from the tokenizer prepare trained (and cached).
    models = [f for f in os.listdir(tmp_path) if f.startswith("spm_")]
    tokenizer = SentencePieceTokenizer(str(tmp_path / models[0]))
    pairs = [encode_pair(r, tokenizer) for r in data.records]
    prompt = np.array([len(p.prompt) for p in pairs])
    longer = np.array([max(len(p.chosen), len(p.rejected)) for p in pairs])
    total = np.array([2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs])
    assert report["tokens"]["prompt"]["max"] == prompt.max()
    assert report["tokens"]["prompt"]["median"] == pytest.approx(np.median(prompt))
    assert report["tokens"]["longest_side"]["p95"] == pytest.approx(np.percentile(prompt + longer, 95))
    assert report["tokens"]["pair_total"]["mean"] == pytest.approx(total.mean())
    too_long = prompt + longer > 512
    assert report["truncated"] == int((too_long & (longer < 512)).sum())
    assert report["dropped"] == int((too_long & (longer >= 512)).sum())
    assert report["pairs"] == 2303 - report["dropped"] and report["global_batches"] == report["pairs"] // 32
    assert report["truncated"] > 0  # the real data has long dialogues
