import os

import pytest
import sentencepiece as spm

from nemo_dpo.data import tokenizer as tokenizer_module
from nemo_dpo.data.default_task import DEFAULT_DATA_DIR
from nemo_dpo.data.preference_dataset import read_preference_pairs, tokenize_pairs
from nemo_dpo.data.tokenizer import SentencePieceTokenizer, load_or_train_tokenizer

TRAIN = os.path.join(DEFAULT_DATA_DIR, "train.jsonl")
VALIDATION = os.path.join(DEFAULT_DATA_DIR, "validation.jsonl")
VOCAB = 512


@pytest.fixture(scope="module")
def default_tokenizer(tmp_path_factory):
    return load_or_train_tokenizer(None, [TRAIN], VOCAB, str(tmp_path_factory.mktemp("cache")))


def test_trained_tokenizer_ids_and_round_trip(default_tokenizer):
    tok = default_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert 256 < tok.vocab_size <= VOCAB
    text = "Which of these is a fruit: tiger, apple, red?"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("émoji 🙂")) == "émoji 🙂"  # byte fallback: unseen characters survive


def test_default_task_is_short_and_separate_encoding_equals_space_join(default_tokenizer):
    records = read_preference_pairs(VALIDATION)[0]
    for r in records:
        for response in (r["chosen"], r["rejected"]):
            joined = default_tokenizer.encode(r["prompt"] + " " + response)
            assert default_tokenizer.encode(r["prompt"]) + default_tokenizer.encode(response) == joined
    _, stats = tokenize_pairs(records, default_tokenizer, 64, "drop")
    assert stats["dropped"] == 0 and stats["max_len"] <= 40


def test_second_call_reuses_the_cache_without_training(tmp_path, monkeypatch):
    first = load_or_train_tokenizer(None, [VALIDATION], VOCAB, str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(first.model_path)]  # no temp files left behind
    assert os.path.basename(first.model_path).startswith("spm_")

    def fail(*args, **kwargs):
        raise RuntimeError("train_tokenizer was called")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", fail)
    second = load_or_train_tokenizer(None, [VALIDATION], VOCAB, str(tmp_path))
    assert second.model_path == first.model_path
    with pytest.raises(RuntimeError, match="train_tokenizer was called"):  # a new vocab_size is a new cache key
        load_or_train_tokenizer(None, [VALIDATION], VOCAB + 1, str(tmp_path))


def test_cache_key_depends_on_file_contents(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(open(VALIDATION, encoding="utf-8").read(), encoding="utf-8")
    first = load_or_train_tokenizer(None, [str(data)], VOCAB, str(tmp_path / "cache"))
    data.write_text('{"prompt": "a b", "chosen": "c", "rejected": "d"}\n', encoding="utf-8")
    second = load_or_train_tokenizer(None, [str(data)], VOCAB, str(tmp_path / "cache"))
    assert first.model_path != second.model_path


def test_failed_training_leaves_no_partial_files(tmp_path, monkeypatch):
    def killed_midway(texts_files, vocab_size, out_path):
        with open(out_path, "wb") as f:
            f.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        load_or_train_tokenizer(None, [VALIDATION], VOCAB, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=64"):
        load_or_train_tokenizer(None, [VALIDATION], 64, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_missing_or_corrupt_model_names_the_path(tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_or_train_tokenizer(missing, [VALIDATION], VOCAB, str(tmp_path))
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="corrupt.model: not a valid SentencePiece model"):
        SentencePieceTokenizer(str(corrupt))


def test_pad_falls_back_to_eos_when_the_model_has_no_pad_piece(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["prompt"] for r in read_preference_pairs(VALIDATION)[0]), encoding="utf-8")
    prefix = str(tmp_path / "nopad")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=prefix, vocab_size=100, hard_vocab_limit=False, pad_id=-1, minloglevel=2
    )
    tok = SentencePieceTokenizer(prefix + ".model")
    assert tok.pad_id == tok.eos_id >= 0
