"""Check preference data before a run, on one process: what a run would read, skip, truncate and drop.

    python -m nemo_dpo.data.prepare                                   # the config's train and validation files
    python -m nemo_dpo.data.prepare --data /data/hh.jsonl.gz model.encoder_seq_length=512
    python -m nemo_dpo.data.prepare --config-name gpt_dpo model.data.data_prefix.train=/data/train.parquet
    python -m nemo_dpo.data.prepare --data /data/saved_with_datasets   # a folder: save_to_disk, or shards

Reads each file as training would (same reader, schemas, chat template,
``model.data.on_bad_record``), with the tokenizer the run would use: the
configured one, or the one trained on the training files (with ``--data``, on
the first file given), cached as training caches it. Reports what each folder
is, records read and bad (the first ``--show`` reasons, as file:line), the file
format and the record schemas it recognised (by name, with counts), token
lengths as a run counts them (the prompt with the tokenizer's BOS, if its rule
adds one; chosen, rejected with their EOS; the longer side, the pair's both
sequences: min/mean/median/p95/max), what ``model.data.overflow`` does at
``model.encoder_seq_length``, and the pairs left against ``model.global_batch_size``.
With ``model.dpo.preference_loss=kto`` the items are KTO's examples (data/unpaired.py:
a pair is two), each with its KL completion in place of the rejected response; unpaired
records with another loss are a problem a run would stop on.

Exit status: 0 when a run would start on this data; 1 when it would not (a bad
record under on_bad_record=error, fewer usable pairs than global_batch_size);
2 when the data or config cannot be read at all.
"""

import argparse
import json
import os
import sys

import numpy as np

from nemo_dpo.config import CONF_DIR, ConfigError, load_config, prepare
from nemo_dpo.data.chat_template import record_options
from nemo_dpo.data.data_folders import folder_files
from nemo_dpo.data.pipeline import configured_tokenizer, data_files, unpaired_problem
from nemo_dpo.data.preference_dataset import encode_pair, fit_pair, read_preference_pairs
from nemo_dpo.data.readers import data_format
from nemo_dpo.data.schemas import is_unpaired
from nemo_dpo.data.unpaired import encode_examples, unpaired_examples

LENGTHS = ("prompt", "chosen", "rejected", "longest_side", "pair_total")
KTO_LENGTHS = ("prompt", "completion", "kl_completion", "longest_side", "example_total")  # the same columns, for KTO


def _summary(values: list) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"min": int(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def token_lengths(pairs: list, names: tuple = LENGTHS) -> dict:
    """Length statistics of tokenized pairs (responses include their EOS), under ``names`` (KTO's for its items);
    none for no pairs."""
    if not pairs:
        return {}
    columns = [[] for _ in names]
    for p in pairs:
        row = (len(p.prompt), len(p.chosen), len(p.rejected), len(p.prompt) + max(len(p.chosen), len(p.rejected)),
               p.num_tokens)
        for column, value in zip(columns, row):
            column.append(value)
    return {name: _summary(values) for name, values in zip(names, columns)}


def check_file(path: str, model_cfg, options, tokenizer) -> dict:
    """Everything the report says about one file, as numbers (JSON-serializable)."""
    data = read_preference_pairs(path, "skip", options)
    kto = model_cfg.dpo.preference_loss == "kto"
    if kto:
        pairs = encode_examples(unpaired_examples(data.records), tokenizer, model_cfg.micro_batch_size)
    else:
        pairs = [encode_pair(record, tokenizer) for record in data.records if not is_unpaired(record)]
    keep = len(tokenizer.start_ids)
    fitted = [fit_pair(pair, model_cfg.encoder_seq_length, model_cfg.data.overflow, keep) for pair in pairs]
    kept = sum(pair is not None for pair, _ in fitted)
    return {
        "file": path,
        "format": data.file_format,
        "schemas": data.schemas,
        "records": len(data.records) + len(data.skipped),
        "usable": len(data.records),
        "bad": len(data.skipped),
        "bad_reasons": data.skipped,
        "items": "examples" if kto else "pairs",
        "unpaired_problem": unpaired_problem(path, data.records, model_cfg.dpo.preference_loss),
        "tokens": token_lengths(pairs, KTO_LENGTHS if kto else LENGTHS),
        "truncated": sum(truncated for _, truncated in fitted),
        "dropped": len(pairs) - kept,
        "pairs": kept,
        "global_batches": kept // model_cfg.global_batch_size,
    }


def _problems(report: dict, model_cfg) -> list:
    problems = []
    if report["bad"] and model_cfg.data.on_bad_record == "error":
        problems.append(f"{report['bad']} bad record(s): with model.data.on_bad_record=error a run stops at the first "
                        f"(model.data.on_bad_record=skip would leave them out)")
    if report["unpaired_problem"]:
        problems.append(report["unpaired_problem"])
    if report["pairs"] < model_cfg.global_batch_size:
        problems.append(f"{report['pairs']} usable {report['items']}, fewer than model.global_batch_size "
                        f"({model_cfg.global_batch_size}): a run would stop")
    return problems


def render(report: dict, model_cfg, show: int) -> str:
    schemas = ", ".join(f"{count} {name}" for name, count in report["schemas"].items())
    lines = [f"== {report['file']}",
             f"format: {report['format']}; record schemas: {schemas}",
             f"records: {report['records']} read, {report['usable']} usable, {report['bad']} bad "
             f"(model.data.on_bad_record={model_cfg.data.on_bad_record})"]
    lines += [f"  {reason}" for reason in report["bad_reasons"][:show]]
    if report["bad"] > show:
        lines.append(f"  ... and {report['bad'] - show} more")
    lines.append(f"tokens{'':10s}{'min':>8s}{'mean':>10s}{'median':>10s}{'p95':>10s}{'max':>8s}")
    for name, s in report["tokens"].items():
        lines.append(f"  {name:14s}{s['min']:8d}{s['mean']:10.1f}{s['median']:10.1f}{s['p95']:10.1f}{s['max']:8d}")
    lines.append(f"at model.encoder_seq_length={model_cfg.encoder_seq_length} with model.data.overflow="
                 f"{model_cfg.data.overflow}: {report['truncated']} prompt-truncated, {report['dropped']} dropped")
    gbs = model_cfg.global_batch_size
    lines.append(f"{report['items']}: {report['pairs']} remain = {report['global_batches']} global batches of "
                 f"model.global_batch_size={gbs} ({report['pairs'] - report['global_batches'] * gbs} unused per epoch)")
    lines += [f"PROBLEM: {problem}" for problem in _problems(report, model_cfg)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nemo_dpo.data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-path", default=str(CONF_DIR), help="folder holding the YAML configs")
    parser.add_argument("--config-name", default="gpt_dpo", help="config file name without .yaml")
    parser.add_argument("--data", action="append", default=[], metavar="PATH",
                        help="a data file, or a folder (datasets' save_to_disk, or shards), to check (repeatable); "
                             "default: the config's train and validation files")
    parser.add_argument("--show", type=int, default=5, help="bad-record reasons to print per file")
    parser.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for examples/train_dpo.py")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config_name, args.overrides, args.config_path)
        m = cfg.model
        prepare(cfg, m.tensor_model_parallel_size * m.pipeline_model_parallel_size, training=False)  # one DP rank
        if args.data:
            files = []
            for given in args.data:
                if os.path.isdir(given):
                    kind, found = folder_files(given, None)
                    print(f"{given} is {kind}: {len(found)} file(s)")
                    files += found
                else:
                    files.append(given)
            train_files = files[:1]
        else:
            splits = data_files(m.data, print)
            files, train_files = [path for paths in splits.values() for path in paths], splits["train"]
        for path in files:
            if not os.path.isfile(path):
                raise ValueError(f"{path}: preference data file not found")
            data_format(path)
        options = record_options(m)
        tokenizer = configured_tokenizer(m.tokenizer, train_files, options)
        reports = [check_file(path, m, options, tokenizer) for path in files]
    except (ConfigError, ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"tokenizer: {tokenizer.model_path} ({tokenizer.vocab_size} tokens; before each prompt: "
          f"{tokenizer.start_ids or 'no BOS'})")
    if options.chat_template is not None:
        print(f"chat template: {options.chat_template.origin}")
    for report in reports:
        print(render(report, m, args.show))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=1)
    return 1 if any(_problems(report, m) for report in reports) else 0
