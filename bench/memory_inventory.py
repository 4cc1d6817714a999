"""Where a training process's memory goes: resident set at named moments, and live tensors by role.

The bench's peak resident set is one number; to act on it one has to know how much is
the interpreter and libraries, how much the tensors a run keeps (weights, the
reference's weights, gradients, optimizer state) and how much the step's activations
and the allocator add on top. ``Inventory`` records the resident set at moments the
worker names, and counts every live tensor (found through the garbage collector) by
the storage it uses, attributing each storage to the first role that claims it, so a
tensor viewed twice (a parameter and its gradient buffer's slice) is counted once.
Storages no role claims are "other tensors" (caches, tokenized data, RoPE tables).
"""

import gc
import warnings

import psutil
import torch

MIB = 2**20


def _storages(tensors) -> dict:
    """``{storage pointer: bytes}`` of the tensors (each storage once, CPU and GPU alike)."""
    found = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            try:
                storage = t.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # torch.compile's fake tensors stand for no memory
                continue
    return found


def live_tensors() -> list:
    gc.collect()
    tensors = []
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    tensors.append(obj)
            except ReferenceError:  # a weak proxy whose referent is gone
                continue
    return tensors


class Inventory:
    def __init__(self):
        self.process = psutil.Process()
        self.moments = {}
        self.tensors = {}

    def moment(self, name: str) -> None:
        """The resident set now, under ``name``."""
        self.moments[name] = self.process.memory_info().rss / MIB

    def count_tensors(self, roles: dict) -> None:
        """``roles``: ``{role: iterable of tensors}``, in order of precedence; the rest of the live tensors are
        counted as "other tensors"."""
        claimed = {}
        for role, tensors in roles.items():
            mine = {ptr: n for ptr, n in _storages(tensors).items() if ptr not in claimed}
            claimed.update(mine)
            self.tensors[role] = sum(mine.values()) / MIB
        rest = {ptr: n for ptr, n in _storages(live_tensors()).items() if ptr not in claimed and ptr != 0}
        self.tensors["other tensors"] = sum(rest.values()) / MIB

    def report(self) -> dict:
        return {"rss_mib": dict(self.moments), "tensors_mib": dict(self.tensors)}


def _role_name(qualified: str) -> str:
    """A module's name without the path to its layer: ``decoder.layers.3.mlp.linear_fc1`` -> ``mlp.linear_fc1``."""
    parts = qualified.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numbered[-1] + 1 :]) if numbered else qualified


class SavedForBackward:
    """Bytes the forward passes keep for backward, by the module that was running when each was saved.

    A saved tensor keeps its whole storage alive (a view of a larger tensor keeps all
    of it), so each storage is counted once, in full, under the first module that saved
    it; modules are named by their role in a layer (all layers' ``mlp.linear_fc1``
    together). Compiled regions save through the hooks too (checked for the fused SwiGLU).
    What a backward saves while it recomputes is transient and not counted; nor is what
    activation checkpointing keeps itself (``torch.utils.checkpoint`` holds a layer's
    inputs behind hooks of its own, as TRL's default ``gradient_checkpointing`` does).
    """

    def __init__(self, modules):
        self.names = {id(module): _role_name(name) or "(model)" for name, module in modules}
        self.bytes = {}
        self.seen = set()
        self.running = []

    def _pack(self, tensor):
        try:
            storage = tensor.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except RuntimeError:
            return tensor
        if ptr not in self.seen and torch._C._current_graph_task_id() == -1:  # -1: not inside a backward
            self.seen.add(ptr)
            where = self.running[-1] if self.running else "(outside the model)"
            self.bytes[where] = self.bytes.get(where, 0) + size
        return tensor

    def _enter(self, module, args):
        name = self.names.get(id(module))
        if name is not None:
            self.running.append(name)

    def _leave(self, module, args, output):
        if self.names.get(id(module)) is not None:
            self.running.pop()

    def __enter__(self):
        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
                        torch.nn.modules.module.register_module_forward_hook(self._leave)]
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def report(self) -> dict:
        """``{module role: MiB}``, largest first."""
        return {name: size / MIB for name, size in sorted(self.bytes.items(), key=lambda item: -item[1])}
