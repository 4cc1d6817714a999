"""A folder given as data, as the ``datasets`` library leaves one: the files it stands for, in order.

People who prepare data with ``datasets`` have either what ``save_to_disk``
wrote or a folder of shards as ``load_dataset`` reads one, and should not have
to list files by hand:

- ``save_to_disk`` of a Dataset: ``state.json`` lists its Arrow files
  (``data-00000-of-00002.arrow``, ...), read in that order.
- ``save_to_disk`` of a DatasetDict: ``dataset_dict.json`` lists its splits,
  each such a folder; a data split takes the one of its name.
- Any other folder: its data files at any depth (every extension readers.py
  reads), in path order. Where the names mark splits as ``load_dataset`` reads
  them (``train-00000-of-00002.parquet``, ``data/test.jsonl``, a ``validation/``
  folder: a split name between separators), a data split takes its own files.

Hidden files and folders (``.``, ``_``) and the metadata files ``datasets``
writes are not data. What a folder holds is known before anything starts, and a
folder with no files for a split is an error naming what it does hold.
"""

import json
import os
import re

from nemo_dpo.data.readers import FORMATS

SAVED_DATASET = "state.json"  # save_to_disk of a Dataset
SAVED_DATASET_DICT = "dataset_dict.json"  # save_to_disk of a DatasetDict
METADATA = {SAVED_DATASET, SAVED_DATASET_DICT, "dataset_info.json", "dataset_infos.json"}
# load_dataset's names for each split (its SPLIT_KEYWORDS), under the names of model.data.data_prefix.
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEPARATOR = r"[-._ 0-9]"
_MARK = {split: re.compile(rf"(?:^|{_SEPARATOR})(?:{'|'.join(words)})(?:{_SEPARATOR}|$)")
         for split, words in SPLIT_WORDS.items()}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable as the JSON that datasets' save_to_disk writes ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, as datasets' save_to_disk writes")
    return value


def _saved_dataset(folder: str) -> list[str]:
    state = _read_json(os.path.join(folder, SAVED_DATASET))
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{folder}/{SAVED_DATASET}: lists no data files ('_data_files')")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        path = os.path.join(folder, name) if isinstance(name, str) and os.path.basename(name) == name else None
        if path is None or not os.path.isfile(path):
            raise ValueError(f"{folder}/{SAVED_DATASET}: lists {entry!r}, which is not a file of {folder}")
        files.append(path)
    return files


def split_of(relative_path: str) -> str | None:
    """The split a data file's path names (its file name first, then its folders), or None."""
    for part in reversed(relative_path.split(os.sep)):
        for split, mark in _MARK.items():
            if mark.search(part):
                return split
    return None


def _data_files(folder: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for name in names:
            if name.startswith((".", "_")) or name in METADATA:
                continue
            if any(name.lower().endswith(ext) for ext in FORMATS):
                found.append(os.path.join(root, name))
    return sorted(found)


def folder_files(folder: str, split: str | None) -> tuple[str, list[str]]:
    """(what the folder is, its data files for ``split``; every file when ``split`` is None). ValueError naming the
    folder when it holds none."""
    if os.path.isfile(os.path.join(folder, SAVED_DATASET)):
        return "datasets save_to_disk", _saved_dataset(folder)
    if os.path.isfile(os.path.join(folder, SAVED_DATASET_DICT)):
        names = _read_json(os.path.join(folder, SAVED_DATASET_DICT)).get("splits")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{folder}/{SAVED_DATASET_DICT}: expected a list of split names under 'splits'")
        chosen = [n for n in names if split is None or n in SPLIT_WORDS.get(split, (split,))]
        if not chosen:
            raise ValueError(f"{folder}: a datasets DatasetDict with the splits {names} and none for {split}; name "
                             f"one of its split folders, e.g. {os.path.join(folder, names[0])}")
        files = [path for name in chosen for path in _saved_dataset(os.path.join(folder, name))]
        return f"datasets save_to_disk, split {', '.join(chosen)}", files
    files = _data_files(folder)
    if not files:
        raise ValueError(f"{folder}: a folder with no data files ({', '.join(FORMATS)}) and no datasets "
                         f"save_to_disk ({SAVED_DATASET} or {SAVED_DATASET_DICT})")
    splits = {path: split_of(os.path.relpath(path, folder)) for path in files}
    if split is None or not any(splits.values()):
        return "data files", files
    own = [path for path in files if splits[path] == split]
    if not own:
        marked = sorted({s for s in splits.values() if s is not None})
        raise ValueError(f"{folder}: its file names mark the splits {marked} (as load_dataset reads them) and none "
                         f"is {split}; name the files to use")
    return f"data files, split {split}", own
