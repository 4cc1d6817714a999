"""Tokenizers: a given SentencePiece model, one trained on the data and cached, or a Hugging Face directory's.

Training on the data itself means the project needs no downloaded tokenizer;
the cache key covers everything that determines the model, so a cached file is
only reused for exactly the same inputs. A Hugging Face model directory brings
its own tokenizer, which must be used with its weights and encode as it did when
the model was trained: it is loaded by transformers' ``AutoTokenizer``, the
reference every Hugging Face model's tokens are defined by (``tokenizer.json``,
or a slow-only ``tokenizer.model`` converted as transformers converts it, with
the folder's added and special tokens).

Every tokenizer says which ids its own rule puts before a text (``start_ids``):
a Hugging Face tokenizer what ``tokenizer(text)`` adds at the start (Llama-style:
BOS; GPT-2 style: nothing), a SentencePiece model nothing (see
:class:`SentencePieceTokenizer`). ``encode`` never adds them: the dataset puts
them once at the start of each prompt (preference_dataset.py).
"""

import hashlib
import os
import re
import shutil
import tempfile
import time

import sentencepiece as spm

from nemo_dpo.data.preference_dataset import read_preference_pairs
from nemo_dpo.data.schemas import RecordOptions, is_unpaired
from nemo_dpo.files import read_json_object

# Bump when the training options below change, so old cached models are not reused.
TOKENIZER_FORMAT_VERSION = 1
# The smallest vocabulary a trained model can have: byte fallback's 256 byte pieces, the unk/bos/eos/pad
# pieces and one character (SentencePiece wants a piece for every character of the corpus: real text needs more).
MIN_TRAINED_VOCAB = 256 + 4 + 1
# The special pieces of a trained tokenizer (known before it exists: chat templates print them into its corpus).
TRAINED_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


class SentencePieceTokenizer:
    """Thin wrapper exposing the ids the trainer needs (pad falls back to EOS).

    The BOS and EOS pieces written in text encode to their ids, as Hugging Face
    tokenizers treat special tokens, so a chat template that prints ``eos_token``
    means the same with either kind of tokenizer.

    No BOS is put before a text (``start_ids`` is empty), although the trained
    tokenizer defines ``<s>``: a SentencePiece model carries no rule for adding
    one, sentencepiece itself adds none unless asked, and the models trained here
    from scratch (the default run) have always been trained without one. Data
    whose text starts with ``<s>`` (or a chat template that prints ``bos_token``)
    still gets exactly that one BOS.
    """

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
        self.eos_token = self._sp.id_to_piece(self.eos_id)
        self.bos_token = self._sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else None
        self.start_ids = []  # no BOS before a text: see above
        self._special = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id) if i >= 0}
        self._special_re = re.compile("|".join(re.escape(piece) for piece in sorted(self._special, key=len)[::-1]))

    def encode(self, text: str) -> list[int]:
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            ids += self._sp.encode(text[start : match.start()]) + [self._special[match.group()]]
            start = match.end()
        return ids + self._sp.encode(text[start:])

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
                bos_piece=TRAINED_SPECIAL_TOKENS["bos_token"],
                eos_piece=TRAINED_SPECIAL_TOKENS["eos_token"],
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(
                f"training a SentencePiece tokenizer (vocab_size={vocab_size}) on {texts_files} failed: {e}"
            ) from e
        os.replace(prefix + ".model", out_path)
    return out_path


def _cache_key(train_files: list[str], vocab_size: int, options: RecordOptions) -> str:
    digest = hashlib.sha256()
    for path in train_files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    digest.update(f"vocab_size={vocab_size};format={TOKENIZER_FORMAT_VERSION};{options.fingerprint()}".encode())
    return digest.hexdigest()[:16]


def load_or_train_tokenizer(
    model_path: str | None, train_files: list[str], vocab_size: int, cache_dir: str,
    options: RecordOptions = RecordOptions(), log=None,
) -> SentencePieceTokenizer:
    """Load `model_path`, or train on the text of `train_files` and cache the result.

    The corpus is the records' text as training sees it: any file format the
    reader takes, conversations rendered by the chat template in ``options``,
    implicit prompts split off; so the cache key covers the files' bytes and
    ``options``. Training happens in a temporary folder inside `cache_dir` and the
    finished model is moved into place with `os.replace`, so readers never see a
    partial file even if a run is killed mid-training. ``log`` (a print function)
    hears when a model is trained, which can take a while on a large file.
    """
    if model_path is not None:
        return SentencePieceTokenizer(model_path)
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    cached = os.path.join(cache_dir, f"spm_{_cache_key(train_files, vocab_size, options)}.model")
    if not os.path.isfile(cached):
        start = time.perf_counter()
        if log is not None:
            log(f"tokenizer: training a SentencePiece model (vocab_size {vocab_size}) on {', '.join(train_files)}, "
                f"cached as {cached}")
        tmp = tempfile.mkdtemp(prefix=".spm_train_", dir=cache_dir)
        try:
            corpus = os.path.join(tmp, "corpus.txt")
            with open(corpus, "w", encoding="utf-8") as f:
                for path in train_files:
                    for record in read_preference_pairs(path, "skip", options).records:  # the trainer reports bad ones
                        keys = ("prompt", "completion") if is_unpaired(record) else ("prompt", "chosen", "rejected")
                        for key in keys:
                            # One sentence a line: fold newlines, which SentencePiece normalizes to spaces anyway.
                            f.write(" ".join(record[key].split()) + "\n")
            os.replace(train_tokenizer([corpus], vocab_size, os.path.join(tmp, "spm.model")), cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if log is not None:
            log(f"tokenizer: trained in {time.perf_counter() - start:.1f} s")
    return SentencePieceTokenizer(cached)


# What a Hugging Face directory's tokenizer consists of, copied alongside exported weights.
HF_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
# The files that make a folder a Hugging Face tokenizer; a folder with only tokenizer.model is a SentencePiece model
# (how nemo-dpo checkpoints store a trained tokenizer).
HF_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def _config_token_id(hf_dir: str, kind: str) -> int:
    """config.json's ``<kind>_token_id`` (eos, bos, pad), or -1 as SentencePiece reports a missing piece."""
    token_id = read_json_object(os.path.join(hf_dir, "config.json")).get(f"{kind}_token_id")
    if isinstance(token_id, list):  # several stop tokens: the first is the one to append
        token_id = token_id[0] if token_id else None
    return token_id if isinstance(token_id, int) else -1


def _start_ids(tok) -> list[int]:
    """The ids ``tok(text)`` puts before the text's own tokens (its post-processor, ``add_bos_token``)."""
    plain = tok("x", add_special_tokens=False)["input_ids"]
    marked = tok("x")["input_ids"]
    return next(marked[:i] for i in range(len(marked)) if marked[i : i + len(plain)] == plain)


class HFTokenizer:
    """A Hugging Face tokenizer folder read by transformers' ``AutoTokenizer``, behind SentencePieceTokenizer's interface.

    Special tokens are the tokenizer's own (tokenizer_config.json, special_tokens_map.json,
    added tokens); an EOS, BOS or pad it lacks comes from config.json's ids.
    ``encode`` adds no special tokens: the dataset adds ``start_ids`` and EOS itself.
    Nothing is fetched from the Hub and no code from the folder runs.
    """

    def __init__(self, hf_dir: str):
        # Imported here: it takes seconds, and only Hugging Face folders need it.
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True, trust_remote_code=False)
        except Exception as err:  # transformers and the Rust library raise many kinds
            raise ValueError(f"{hf_dir}: transformers' AutoTokenizer cannot load this tokenizer folder "
                             f"({type(err).__name__}: {err})") from err
        self.folder = hf_dir
        vocabularies = [os.path.join(hf_dir, name) for name in ("tokenizer.json", "tokenizer.model")]
        self.model_path = next((path for path in vocabularies if os.path.isfile(path)), hf_dir)  # what it was read from
        self.vocab_size = len(self._tok)
        own = {"eos": self._tok.eos_token_id, "bos": self._tok.bos_token_id, "pad": self._tok.pad_token_id}
        ids = {kind: _config_token_id(hf_dir, kind) if token_id is None else token_id for kind, token_id in own.items()}
        self.eos_id, self.bos_id = ids["eos"], ids["bos"]
        if self.eos_id < 0:
            raise ValueError(
                f"{hf_dir}: the tokenizer defines no EOS token (tokenizer_config.json eos_token or "
                "config.json eos_token_id); DPO sequences must end with EOS"
            )
        self.pad_id = ids["pad"] if ids["pad"] >= 0 else self.eos_id
        self.eos_token = self._tok.convert_ids_to_tokens(self.eos_id)
        self.bos_token = self._tok.convert_ids_to_tokens(self.bos_id) if self.bos_id >= 0 else None
        self.start_ids = _start_ids(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer_from_dir(hf_dir: str):
    """A model directory's tokenizer: Hugging Face's if it has tokenizer.json or tokenizer_config.json, else
    its tokenizer.model (SentencePiece)."""
    if any(os.path.isfile(os.path.join(hf_dir, name)) for name in HF_TOKENIZER_MARKERS):
        return HFTokenizer(hf_dir)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(hf_dir, "tokenizer.model"))
    raise FileNotFoundError(f"{hf_dir}: no tokenizer found (expected tokenizer.json, tokenizer_config.json or "
                            f"tokenizer.model)")


def open_tokenizer(path: str):
    """The tokenizer at ``path``: a Hugging Face (or checkpoint) tokenizer folder, or a SentencePiece model file."""
    return load_tokenizer_from_dir(path) if os.path.isdir(path) else SentencePieceTokenizer(path)


def special_token_texts(tokenizer_model: str | None) -> dict:
    """The BOS and EOS text of ``model.tokenizer.model`` (a trained tokenizer's when null), for chat templates."""
    if tokenizer_model is None:
        return dict(TRAINED_SPECIAL_TOKENS)
    tokenizer = open_tokenizer(tokenizer_model)
    return {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}


def tokenizer_files(hf_dir: str) -> list[str]:
    """Paths of the tokenizer files present in ``hf_dir``, to copy next to exported weights."""
    return [os.path.join(hf_dir, name) for name in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, name))]


def source_files(tokenizer) -> dict:
    """``{file name: path}`` of the files a loaded tokenizer was read from (checkpoints store them)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return {"tokenizer.model": tokenizer.model_path}
    return {os.path.basename(f): f for f in tokenizer_files(tokenizer.folder)}
