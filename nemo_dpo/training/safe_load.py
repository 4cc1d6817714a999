"""Loading a checkpoint never runs code from it.

Checkpoints are shared between people and pulled from storage that others can
write, and a pickle can run any code when it is loaded. megatron's torch_dist
format is read by torch.distributed.checkpoint, which unpickles three things:

- ``.metadata``, the index of every shard, with plain ``pickle.load``;
- byte items (megatron's ``ShardedObject``: anything that is not a tensor, such
  as an RNG state object or a layer's ``_extra_state``) with
  ``torch.load(weights_only=False)``;
- ``common.pt`` with ``torch.load``, whose default is weights-only only since
  torch 2.6 and can be switched off by an environment variable.

nemo-dpo saves tensors and JSON only (RNG states as tensors, its own metadata in
``nemo_dpo.json``), and reads checkpoints through this module:

- the index is unpickled by :class:`_IndexUnpickler`, which builds only the
  checkpoint-index classes of torch.distributed.checkpoint (and torch's
  ``Size``, dtypes and layouts) and refuses any other global, naming it;
  :func:`install` makes torch's own reader use it, so no later read of the same
  file can differ from the one checked;
- a checkpoint with any byte item is refused before anything is loaded;
- ``common.pt`` is loaded with ``weights_only=True``, always.
"""

import os
import pickle
import re

import torch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

INDEX_FILE = ".metadata"
# What a torch.distributed.checkpoint index holds (read off checkpoints of every layout and option here).
_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and the reason."""


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        allowed = name in _INDEX_CLASSES.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True  # torch.float32 and the like
        if not allowed:
            raise CheckpointError(
                f"{self.path}: refers to {module}.{name}, which a checkpoint index never holds; refusing to "
                f"unpickle it (a pickle can run code)"
            )
        return super().find_class(module, name)


def read_index(path: str):
    """The torch.distributed.checkpoint index at ``path``, unpickled with only the index classes allowed."""
    with open(path, "rb") as f:
        try:
            return _IndexUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as err:  # a damaged pickle can raise almost anything
            raise CheckpointError(f"{path}: not a readable checkpoint index ({type(err).__name__}: {err})") from err


def _read_metadata(self, *args, **kwargs):
    """FileSystemReader.read_metadata, with the restricted unpickler in place of ``pickle.load``."""
    metadata = read_index(str(self._get_metadata_path(kwargs.get("rank"))))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def install() -> None:
    """Make torch.distributed.checkpoint read every index through :func:`read_index` (idempotent)."""
    FileSystemReader.read_metadata = _read_metadata


def check_tensors_only(folder) -> None:
    """Refuse a checkpoint whose index lists anything but tensors (byte items are unpickled to load them)."""
    index = read_index(os.path.join(str(folder), INDEX_FILE))
    objects = sorted(k for k, v in index.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    if objects:
        shown = ", ".join(objects[:3]) + (f" and {len(objects) - 3} more" if len(objects) > 3 else "")
        raise CheckpointError(
            f"{folder}: holds pickled objects ({shown}), not only tensors; loading them could run code, so the "
            f"checkpoint is refused (nemo-dpo writes tensors and JSON only; to keep the weights of a checkpoint "
            f"from an earlier nemo-dpo, export them with that version's python -m nemo_dpo.convert mcore-to-hf "
            f"and start from the exported folder)"
        )


class WeightsOnlyCommonLoad(TorchCommonLoadStrategy):
    """megatron's ``common.pt`` loader, weights-only whatever the environment says; no byte items."""

    def load_common(self, checkpoint_dir):
        path = os.path.join(str(checkpoint_dir), COMMON_STATE_FNAME)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise CheckpointError(f"{path} is missing") from err
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f"it refers to {found.group(1)}" if found else str(err).splitlines()[0]
            raise CheckpointError(
                f"{path}: holds more than tensors and plain data ({what}); refusing to load it (a pickle can run code)"
            ) from err

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: loading pickled objects is refused (nemo-dpo checkpoints hold tensors)")
