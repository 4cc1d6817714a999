"""SentencePiece tokenizer: load a given model, or train a small one on the data and cache it.

Training on the data itself means the project needs no downloaded tokenizer;
the cache key covers everything that determines the model, so a cached file is
only reused for exactly the same inputs.
"""

import hashlib
import os
import shutil
import tempfile

import sentencepiece as spm

from nemo_dpo.data.preference_dataset import read_preference_jsonl

# Bump when the training options below change, so old cached models are not reused.
TOKENIZER_FORMAT_VERSION = 1


class SentencePieceTokenizer:
    """Thin wrapper exposing the ids the trainer needs (pad falls back to EOS)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path}: not a valid SentencePiece model ({e})") from e
        self.model_path = model_path
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id()
        if self.eos_id < 0:
            raise ValueError(f"{model_path}: the tokenizer defines no EOS piece; DPO sequences must end with EOS")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def train_tokenizer(texts_files: list[str], vocab_size: int, out_path: str) -> str:
    """Train a unigram model on plain-text files (one sentence a line) and write it to `out_path`.

    `vocab_size` is a soft limit (small corpora yield fewer pieces); byte
    fallback adds 256 byte pieces so any text stays encodable.
    """
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_path))) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                input=texts_files,
                model_prefix=prefix,
                vocab_size=vocab_size,
                model_type="unigram",
                hard_vocab_limit=False,
                byte_fallback=True,
                character_coverage=1.0,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(
                f"training a SentencePiece tokenizer (vocab_size={vocab_size}) on {texts_files} failed: {e}"
            ) from e
        os.replace(prefix + ".model", out_path)
    return out_path


def _cache_key(train_files: list[str], vocab_size: int) -> str:
    digest = hashlib.sha256()
    for path in train_files:
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    digest.update(f"vocab_size={vocab_size};format={TOKENIZER_FORMAT_VERSION}".encode())
    return digest.hexdigest()[:16]


def load_or_train_tokenizer(
    model_path: str | None, train_files: list[str], vocab_size: int, cache_dir: str
) -> SentencePieceTokenizer:
    """Load `model_path`, or train on the text of `train_files` (JSONL) and cache the result.

    Training happens in a temporary folder inside `cache_dir` and the finished
    model is moved into place with `os.replace`, so readers never see a partial
    file even if a run is killed mid-training.
    """
    if model_path is not None:
        return SentencePieceTokenizer(model_path)
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    cached = os.path.join(cache_dir, f"spm_{_cache_key(train_files, vocab_size)}.model")
    if not os.path.isfile(cached):
        tmp = tempfile.mkdtemp(prefix=".spm_train_", dir=cache_dir)
        try:
            corpus = os.path.join(tmp, "corpus.txt")
            with open(corpus, "w", encoding="utf-8") as f:
                for path in train_files:
                    for record in read_preference_jsonl(path):
                        for key in ("prompt", "chosen", "rejected"):
                            # One sentence a line: fold newlines, which SentencePiece normalizes to spaces anyway.
                            f.write(" ".join(record[key].split()) + "\n")
            os.replace(train_tokenizer([corpus], vocab_size, os.path.join(tmp, "spm.model")), cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SentencePieceTokenizer(cached)
