"""The data tests' five training runs, in one 2-process launch.

Each run is small (2 or 3 steps of a 2-layer model). Started as a torchrun job of
its own, most of its time went to starting two processes and importing torch,
megatron-core and transformers. Here the DPO program's ``main`` runs the jobs one
after another inside the two processes of one launch (dense_scenarios.train: each
on a fresh port, as a separate launch would be; its exit status and console kept).

Each job's inputs are built here, in a folder of its own, with the overrides its
test gave torchrun. The tests read their job's ``Run`` from the session fixture
``data_training_runs`` (tests/conftest.py), which launches once, for the first
test that asks: tests/test_data_chat_training.py, test_data_bos_training.py,
test_data_prefix.py and test_data_peer_formats.py.
"""

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from bos_fixtures import save_bos_tokenizer
from chat_fixtures import CHATML, conversation, default_task_records, save_chatml_tokenizer, write_jsonl
from dense_scenarios import train
from distributed_harness import run_world
from parallel_scenarios import SMALL
from peer_fixtures import peer_files


@dataclasses.dataclass
class Run:
    """A job's folder (its log dir is ``folder/run``), the input files its test names, and what rank 0 of it did."""

    folder: Path
    files: dict
    status: int
    console: str


def conversational_job(folder: Path, tokenizer: str) -> tuple[list, dict]:
    """Conversations (train JSON Lines, validation Parquet) under ChatML, from a tokenizer folder's template
    (``hf_folder``) or from a .jinja file with a SentencePiece model trained in ``folder`` (``trained``)."""
    if tokenizer == "hf_folder":
        settings = [f"model.tokenizer.model={save_chatml_tokenizer(folder / 'tok')}"]
    else:
        (folder / "chatml.jinja").write_text(CHATML.replace("<|im_end|>", "{{ eos_token }}"))
        settings = [f"model.data.chat_template={folder / 'chatml.jinja'}", f"model.tokenizer.cache_dir={folder}"]
    train_file = write_jsonl(folder / "train.jsonl", [conversation(r) for r in default_task_records("train", 64)])
    validation = str(folder / "validation.parquet")
    pq.write_table(pa.Table.from_pylist([conversation(r) for r in default_task_records("validation", 16)]), validation)
    argv = [*settings, f"model.data.data_prefix.train={train_file}",
            f"model.data.data_prefix.validation={validation}", f"exp_manager.explicit_log_dir={folder / 'run'}",
            "model.encoder_seq_length=256", "model.max_position_embeddings=256", "model.num_layers=2",
            "model.global_batch_size=8", "model.micro_batch_size=2", "trainer.dpo.max_steps=3",
            "trainer.dpo.val_check_interval=0", "trainer.dpo.limit_val_batches=1"]
    return argv, {"train": train_file, "validation": validation}


def bos_job(folder: Path) -> tuple[list, dict]:
    """A Llama-style tokenizer folder whose post-processor adds <s>; padded batches (its test rebuilds them)."""
    tokenizer = save_bos_tokenizer(folder / "tok", "llama")
    train_file = write_jsonl(folder / "train.jsonl", default_task_records("train", 64))
    validation = write_jsonl(folder / "validation.jsonl", default_task_records("validation", 16))
    argv = [f"model.tokenizer.model={tokenizer}", f"model.data.data_prefix.train={train_file}",
            f"model.data.data_prefix.validation={validation}", f"exp_manager.explicit_log_dir={folder / 'run'}",
            "model.encoder_seq_length=64", "model.max_position_embeddings=64", "model.num_layers=2",
            "model.global_batch_size=8", "model.micro_batch_size=2", "trainer.dpo.max_steps=2",
            "model.data.packing=false", "trainer.dpo.val_check_interval=0", "trainer.dpo.limit_val_batches=1"]
    return argv, {"train": train_file, "validation": validation}


def listed_files_job(folder: Path) -> tuple[list, dict]:
    """Two training files and a validation list of one, as NeMo-Aligner's configs list them; the tokenizer trained
    on both training files."""
    rows = default_task_records("train", 64)
    a = write_jsonl(folder / "a.jsonl", rows[:40])
    b = write_jsonl(folder / "b.jsonl", rows[40:])
    c = write_jsonl(folder / "c.jsonl", default_task_records("validation", 16))
    argv = [*SMALL, f"model.data.data_prefix={{train: [{a}, {b}], validation: [{c}]}}", "trainer.dpo.max_steps=2",
            "trainer.dpo.limit_val_batches=1", f"model.tokenizer.cache_dir={folder / 'tok'}",
            f"exp_manager.explicit_log_dir={folder / 'run'}"]
    return argv, {"a": a, "b": b, "c": c}


def peer_formats_job(folder: Path) -> tuple[list, dict]:
    """The train split lists a sharegpt file, an Alpaca file, a save_to_disk folder and a shards folder (its train
    shards: 64 pairs in all); conversations for validation; a ChatML tokenizer folder."""
    tokenizer = save_chatml_tokenizer(folder / "tok")
    files = peer_files(folder / "data")
    validation = write_jsonl(folder / "val.jsonl", [conversation(r) for r in default_task_records("validation", 8)])
    train_files = ", ".join(files[k] for k in ("sharegpt", "alpaca", "saved", "shards"))
    argv = [f"model.tokenizer.model={tokenizer}",
            f"model.data.data_prefix={{train: [{train_files}], validation: [{validation}]}}",
            "model.encoder_seq_length=256", "model.max_position_embeddings=256", "model.num_layers=2",
            "model.global_batch_size=8", "model.micro_batch_size=2", "trainer.dpo.max_steps=2",
            "trainer.dpo.val_check_interval=0", f"exp_manager.explicit_log_dir={folder / 'run'}",
            "exp_manager.create_tensorboard_logger=false"]
    return argv, {**files, "validation": validation}


JOBS = {
    "conversational_hf_folder": lambda folder: conversational_job(folder, "hf_folder"),
    "conversational_trained": lambda folder: conversational_job(folder, "trained"),
    "bos": bos_job,
    "listed_files": listed_files_job,
    "peer_formats": peer_formats_job,
}


def run_all(root: Path) -> dict:
    """``{job name: Run}`` for every job of JOBS, each in its folder under ``root``, all in one 2-process launch."""
    built = {}
    for name, build in JOBS.items():
        (root / name).mkdir()
        built[name] = build(root / name)
    consoles = run_world(2, str(root / "launch"), train, {name: argv for name, (argv, _) in built.items()})[0]
    return {name: Run(root / name, files, *consoles[name]) for name, (_, files) in built.items()}
