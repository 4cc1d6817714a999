"""From the ``model`` config to tokenized pairs: the data half of a run, shared by training and ``prepare``.

1. Files: ``model.data.data_prefix`` per split (a file or a folder, or a list of
   them read in order as one dataset; a folder is the files it stands for, see
   data_folders.py), or the embedded default task. NeMo-Aligner's ``test`` split
   is accepted and named, never read.
2. Records: every file read and checked before anything else; a bad record
   follows ``model.data.on_bad_record`` (skipped ones are listed in the log dir).
3. Tokenizer: ``model.tokenizer.model``, or a SentencePiece model trained on the
   text of the training files and cached. In a distributed run rank 0 trains it and
   sends the model's bytes, so every rank has the identical vocabulary with or
   without a shared filesystem.
4. Pairs: tokenized and fitted to ``encoder_seq_length`` (``model.data.overflow``).
   For KTO (``model.dpo.preference_loss=kto``) the items are unpaired examples,
   each with its KL completion (unpaired.py); pairs give two examples each, and
   unpaired records with any other loss are refused.
"""

import os
import tempfile
from dataclasses import dataclass

import torch.distributed as dist

from nemo_dpo.console import PassProgress
from nemo_dpo.data.chat_template import ChatTemplate, record_options, template_source
from nemo_dpo.data.data_folders import folder_files
from nemo_dpo.data.default_task import DEFAULT_DATA_DIR
from nemo_dpo.data.preference_dataset import BAD_RECORD_POLICIES, OVERFLOW_POLICIES, read_preference_pairs, tokenize_pairs
from nemo_dpo.data.readers import data_format, needs_pyarrow, pyarrow_missing
from nemo_dpo.data.schemas import RecordOptions, is_unpaired
from nemo_dpo.data.unpaired import tokenize_examples, unpaired_examples
from nemo_dpo.data.tokenizer import (
    MIN_TRAINED_VOCAB,
    SentencePieceTokenizer,
    load_or_train_tokenizer,
    open_tokenizer,
)
from nemo_dpo.files import write_atomic
from nemo_dpo.ranges import FilePath, Integer, OneOf, Text

SPLITS = ("train", "validation")
SKIPPED_LIST = "skipped_records.txt"  # in the log dir

RANGES = {
    "model.data.data_prefix.train": FilePath(many=True, nullable=True),
    "model.data.data_prefix.validation": FilePath(many=True, nullable=True),
    "model.data.data_prefix.test": FilePath(many=True, nullable=True),
    "model.data.chat_template": Text(nullable=True),
    "model.data.implicit_prompt_delimiter": Text(nullable=True),
    "model.data.overflow": OneOf(choices=OVERFLOW_POLICIES),
    "model.data.on_bad_record": OneOf(choices=BAD_RECORD_POLICIES),
    "model.tokenizer.model": FilePath(nullable=True),
    "model.tokenizer.vocab_size": Integer(ge=MIN_TRAINED_VOCAB),
    "model.tokenizer.cache_dir": FilePath(),
}


def _given(data_cfg, split: str) -> list:
    given = data_cfg.data_prefix[split]
    return [] if given is None else [given] if isinstance(given, str) else list(given)


def data_files(data_cfg, log=None) -> dict:
    """``{split: [paths]}`` from ``model.data.data_prefix``: files and folders per split (a folder is its files for
    the split), the embedded default where unset. Every file must exist and be of a readable kind (ValueError naming
    the key). ``log`` is told what each folder turned out to be."""
    files = {}
    for split in SPLITS:
        key = f"model.data.data_prefix.{split}"
        files[split] = [] if _given(data_cfg, split) else [os.path.join(DEFAULT_DATA_DIR, f"{split}.jsonl")]
        for given in _given(data_cfg, split):
            if not os.path.isdir(given):
                files[split].append(given)
                continue
            try:
                kind, found = folder_files(given, split)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from err
            if log is not None:
                log(f"{split}: {given} is {kind}: {len(found)} file(s)")
            files[split] += found
        for file in files[split]:
            if not os.path.isfile(file):
                raise ValueError(f"{key}: file {file} does not exist")
            try:
                data_format(file)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from err
            if needs_pyarrow(file) and pyarrow_missing():
                raise ValueError(f"{key}: {pyarrow_missing()}")
    return files


def check_data_config(model_cfg) -> None:
    """The data files, the tokenizer and the chat template can be used (ValueError naming the key).

    Runs once every key is in its range (:data:`RANGES`).
    """
    data = model_cfg.data
    data_files(data)
    tokenizer = model_cfg.tokenizer.model
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ValueError(f"model.tokenizer.model: {tokenizer} does not exist (a tokenizer.model file or a folder)")
    if model_cfg.dpo.preference_loss == "kto" and model_cfg.micro_batch_size < 2:
        raise ValueError(f"model.micro_batch_size must be >= 2 for kto, got {model_cfg.micro_batch_size}: an "
                         f"example's KL completion is another completion of its chunk of micro_batch_size examples "
                         f"(TRL's per_device_train_batch_size)")
    source = template_source(data.chat_template, tokenizer)  # the chat template compiles
    if source is not None:
        ChatTemplate(*source, special_tokens={})


def configured_tokenizer(tok_cfg, train_files: list, options: RecordOptions, log=print):
    """``model.tokenizer.model``, or a SentencePiece model trained on ``train_files`` (cached); one process."""
    if tok_cfg.model is not None:
        return open_tokenizer(tok_cfg.model)
    return load_or_train_tokenizer(None, train_files, tok_cfg.vocab_size, tok_cfg.cache_dir, options, log)


def shared_tokenizer(tok_cfg, train_files: list, options: RecordOptions, rank: int, log):
    """:func:`configured_tokenizer` for every rank of a run: rank 0 trains (if needed) and sends the model bytes."""
    if tok_cfg.model is not None:
        return open_tokenizer(tok_cfg.model)
    cache_dir = os.path.expanduser(tok_cfg.cache_dir)
    payload = [None, None]
    if rank == 0:
        tokenizer = configured_tokenizer(tok_cfg, train_files, options, log)
        with open(tokenizer.model_path, "rb") as f:
            payload = [os.path.basename(tokenizer.model_path), f.read()]
    dist.broadcast_object_list(payload, src=0)
    if rank == 0:
        return tokenizer
    name, blob = payload
    path = os.path.join(cache_dir, name)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".spm_recv_")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    return SentencePieceTokenizer(path)


def unpaired_problem(path: str, records: list, preference_loss) -> str | None:
    """Why ``path``'s records cannot train with ``preference_loss``: unpaired records (prompt/completion/label) are
    only for KTO, which learns from them (None when they can)."""
    unpaired = sum(map(is_unpaired, records))
    if unpaired and preference_loss != "kto":
        return (f"{path}: {unpaired} unpaired record(s) (prompt/completion/label, TRL's unpaired preference format): "
                f"model.dpo.preference_loss={preference_loss} learns from pairs; unpaired examples need "
                f"model.dpo.preference_loss=kto")
    return None


def read_splits(files: dict, policy: str, options: RecordOptions, log, preference_loss="dpo") -> tuple:
    """(``{split: text records}``, messages of the bad records left out): each split's files, in order, as one.
    Unpaired records are refused unless ``preference_loss`` is kto."""
    records, skipped = {}, []
    for split, paths in files.items():
        records[split] = []
        for path in paths:
            data = read_preference_pairs(path, policy, options)
            problem = unpaired_problem(path, data.records, preference_loss)
            if problem:
                raise ValueError(problem)
            records[split] += data.records
            schemas = ", ".join(f"{count} {name}" for name, count in data.schemas.items())
            log(f"{split}: {data.file_format} file {path}: {schemas}")
            if data.skipped:
                log(f"{split}: skipped {len(data.skipped)} bad record(s) of {path} "
                    f"(model.data.on_bad_record={policy}), e.g. {data.skipped[0]}")
            skipped += data.skipped
    return records, skipped


def write_skipped_list(log_dir: str, skipped: list, log) -> None:
    """``<log dir>/skipped_records.txt``: one line per record left out (removed when there is none)."""
    listing = os.path.join(log_dir, SKIPPED_LIST)
    if skipped:
        os.makedirs(log_dir, exist_ok=True)
        write_atomic(listing, "".join(line + "\n" for line in skipped))
        log(f"data: {len(skipped)} skipped record(s) listed in {listing}")
    elif os.path.exists(listing):
        os.remove(listing)  # from an earlier run of this log dir


@dataclass
class RunData:
    """What a run trains and validates on."""

    tokenizer: object  # data.tokenizer's SentencePieceTokenizer or HFTokenizer
    files: dict  # split -> its data files, in reading order
    options: RecordOptions  # how records became text (a chat template file is an input too)
    pairs: dict  # split -> list of TokenizedPair (for KTO: examples with their KL completions, unpaired.py)

    def input_files(self) -> list:
        """Every file the pairs' tokens depend on besides the tokenizer (for cache keys)."""
        return [*(path for paths in self.files.values() for path in paths), *self.options.files()]


def load_run_data(model_cfg, log_dir: str, rank: int, log) -> RunData:
    """Files -> checked records -> tokenizer -> pairs, for every split (see the module docstring)."""
    files = data_files(model_cfg.data, log)
    if _given(model_cfg.data, "test"):
        log(f"test: {', '.join(_given(model_cfg.data, 'test'))} (model.data.data_prefix.test, NeMo-Aligner's test split) "
            f"is not read: nemo-dpo trains on train and validates on validation")
    options = record_options(model_cfg)
    loss = model_cfg.dpo.preference_loss
    records, skipped = read_splits(files, model_cfg.data.on_bad_record, options, log, loss)
    if rank == 0:
        write_skipped_list(log_dir, skipped, log)
    tokenizer = shared_tokenizer(model_cfg.tokenizer, files["train"], options, rank, log)
    pairs = {}
    seq_len, overflow, gbs = model_cfg.encoder_seq_length, model_cfg.data.overflow, model_cfg.global_batch_size
    items = "examples" if loss == "kto" else "pairs"
    for split, paths in files.items():
        names = ", ".join(paths)
        texts = unpaired_examples(records[split]) if loss == "kto" else records[split]
        progress = PassProgress(f"{split}: tokenizing {names}", len(texts), "records", log)
        if loss == "kto":
            pairs[split], stats = tokenize_examples(texts, tokenizer, seq_len, overflow, model_cfg.micro_batch_size,
                                                    progress)
        else:
            pairs[split], stats = tokenize_pairs(texts, tokenizer, seq_len, overflow, progress)
        progress.finish()
        balance = f"{stats['desirable']} desirable, {stats['pairs'] - stats['desirable']} undesirable; " \
            if loss == "kto" else ""
        log(f"{split}: {stats['pairs']} {items} from {names} ({balance}longest {stats['max_len']} tokens, "
            f"{stats['truncated']} prompt-truncated and {stats['dropped']} dropped by "
            f"model.data.overflow={overflow}, encoder_seq_length={seq_len})")
        if len(pairs[split]) < gbs:
            raise ValueError(f"{names}: {len(pairs[split])} usable {items}, fewer than model.global_batch_size ({gbs})")
    return RunData(tokenizer, files, options, pairs)
