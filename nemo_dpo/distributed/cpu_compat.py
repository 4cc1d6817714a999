"""Run megatron-core on CPU (gloo) by answering its CUDA assumptions.

megatron-core is written for GPUs. On a machine without CUDA (a laptop, a CI box)
it works unchanged except for a handful of places that assume a GPU. This module
answers exactly those, and nothing is patched when CUDA is available:

1. ``torch.cuda.current_device()`` is used as the device of new tensors in
   tensor_parallel (mappings, layers, memory buffer), p2p communication, DDP
   buffers, rotary embeddings. Without CUDA it raises; we make it name the CPU.
   ``torch.cuda.synchronize()`` (after pipeline p2p) has nothing to wait for.
2. ``pipeline_parallel/schedules.py``, the optimizers, gradient clipping, the
   default causal mask (``transformer/utils.py``) and the fallback multi-tensor
   L2 norm (``utils.py``) create tensors with a literal ``device="cuda"``.
   Those modules get a view of ``torch`` whose factory functions map "cuda" to "cpu".
3. The model-parallel RNG tracker (``tensor_parallel/random.py``) forks CUDA
   generator states, and activation recomputation saves and restores the CUDA
   generator; on CPU both use the CPU generator instead.
4. Two methods move CPU tensors with ``.cuda()`` before a collective: with tied
   embeddings and PP > 1, ``LanguageModule`` (the shared weight, all-reduced
   across stages), and the distributed optimizer when it gathers its state for
   a reshardable checkpoint. During those calls ``Tensor.cuda`` leaves CPU
   tensors where they are.
5. Type-string checks ``param.type() == 'torch.cuda.FloatTensor'`` (optimizers,
   gradient clipping) are answered by ``Parameter.type()`` reporting the CUDA
   type name for CPU parameters, and the clipping routine that asserts it on
   ``.grad`` is replaced by an equivalent device-agnostic one.
6. Under context parallelism RoPE keeps this rank's rows of its table
   (``rope_utils.get_pos_emb_on_this_cp_rank``) with an index tensor made in
   pinned memory and moved with ``.cuda()``. Pinned memory needs an accelerator:
   the factories of item 2 leave ``pin_memory`` out, and the move is skipped as
   in item 4.
7. The all-to-all token dispatcher of mixture-of-experts layers
   (``transformer/moe/token_dispatcher.py``) copies its token counts to the host
   on a side CUDA stream (``torch.cuda.Stream``, ``current_stream``, ``stream``)
   and waits on an event recorded there. On CPU the counts are on the host
   already: that module's ``torch.cuda`` offers torch's CPU streams, whose
   recorded event has nothing to wait for. The copy itself
   (``moe_utils.maybe_move_tensor_to_cpu``) turns the all-to-all split sizes
   into numpy arrays only for CUDA tensors, and ``all_to_all_single`` refuses
   the tensors it leaves on CPU; the dispatcher gets a copy that converts CPU
   tensors too.
8. With TP > 1 as well as EP, that dispatcher gathers the experts' tokens over
   the TP ranks, and scatters their results back, in shares of different sizes
   (``tensor_parallel/mappings.py``: ``all_gather`` into a list of unequal
   tensors, ``reduce_scatter`` of one). NCCL takes those; gloo requires equal
   sizes. On CPU the shares are padded to the largest, gathered or
   reduce-scattered whole, and cut back: the same numbers.

Call :func:`apply` once, before building models (``distributed.init`` does).
"""

import contextlib
import functools
import types

import torch

_APPLIED = False
_CUDA_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")


def needed() -> bool:
    """The adaptation is active only when there is no CUDA device."""
    return not torch.cuda.is_available()


def _cpu_device():
    return torch.device("cpu")


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return "cpu"
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # there is no pinned memory without an accelerator
        return fn(*args, **kwargs)

    return wrapper


class _TorchOnCpu(types.ModuleType):
    """``torch`` as seen by a megatron module that hard-codes ``device="cuda"``."""

    def __init__(self):
        super().__init__("torch")
        for name in _CUDA_FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


class _DoneEvent:
    """What a CPU stream records: work on the host is finished when it is issued."""

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuStream(torch.cpu.Stream):
    def record_event(self):
        return _DoneEvent()


class _TorchWithCpuStreams(_TorchOnCpu):
    """``torch`` for a megatron module that moves data between CUDA streams: ``cuda`` names CPU streams."""

    def __init__(self):
        super().__init__()
        self.cuda = types.SimpleNamespace(Stream=_CpuStream, current_stream=torch.cpu.current_stream,
                                          stream=torch.cpu.stream)


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu`` for tensors already on the host: the numpy form when asked."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _uneven_gather(original):
    """``_gather_along_first_dim`` whose unequal shares (``output_split_sizes``) travel padded to the largest."""

    @functools.wraps(original)
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = original(padded, group)  # [TP x largest, ...], rank by rank
        shares = gathered.split(largest)
        return torch.cat([share[:size] for share, size in zip(shares, output_split_sizes)])

    return gather


def _uneven_reduce_scatter(original):
    """``_reduce_scatter_along_first_dim`` whose unequal shares (``input_split_sizes``) travel padded to the largest."""

    @functools.wraps(original)
    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or len(set(input_split_sizes)) == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        largest = max(input_split_sizes)
        padded = input_.new_zeros((largest * len(input_split_sizes), *input_.shape[1:]))
        for share, chunk in zip(padded.split(largest), input_.split(list(input_split_sizes))):
            share[: chunk.shape[0]] = chunk
        return original(padded, group)[: input_split_sizes[group.rank()]]

    return reduce_scatter


class CpuRNGStatesTracker:
    """Stand-in for megatron's CudaRNGStatesTracker that forks the CPU generator.

    Named states are used by megatron for dropout inside tensor-parallel regions
    (and for weight init when not initialising on CPU); semantics match the CUDA
    tracker: ``fork(name)`` runs the block with that stream and advances it.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _parameter_type(original):
    """``Parameter.type()`` with no argument reports the CUDA type name on CPU."""

    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
            return "torch.cuda." + name[len("torch."):]
        return name

    return type_


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Device-agnostic version of megatron's clip_grad_by_total_norm_fp32."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            if grad.dtype != torch.float32 and not use_decoupled_grad:
                raise TypeError(f"gradient clipping expects fp32 gradients, got {grad.dtype}")
            grad.detach().mul_(clip_coeff)


@contextlib.contextmanager
def _cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _without_cuda_moves(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _cuda_is_identity():
            return method(*args, **kwargs)

    return wrapper


def apply() -> bool:
    """Install the adaptation if there is no CUDA. Idempotent; returns whether active."""
    global _APPLIED
    if not needed():
        return False
    if _APPLIED:
        return True

    from megatron.core import utils as core_utils
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.current_device = _cpu_device
    torch.cuda.synchronize = lambda device=None: None
    torch_on_cpu = _TorchOnCpu()
    for module in (
        schedules, clip_grads, optimizer, distrib_optimizer, transformer_utils, core_utils, rope_utils
    ):
        module.torch = torch_on_cpu
    token_dispatcher.torch = _TorchWithCpuStreams()
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    mappings._gather_along_first_dim = _uneven_gather(mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = _uneven_reduce_scatter(mappings._reduce_scatter_along_first_dim)
    torch.nn.Parameter.type = _parameter_type(torch.nn.Parameter.type)
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    LanguageModule.setup_embeddings_and_output_layer = _without_cuda_moves(
        LanguageModule.setup_embeddings_and_output_layer
    )
    DistributedOptimizer = distrib_optimizer.DistributedOptimizer
    DistributedOptimizer.get_parameter_state_dp_zero = _without_cuda_moves(
        DistributedOptimizer.get_parameter_state_dp_zero
    )
    cp_rows = _without_cuda_moves(rope_utils.get_pos_emb_on_this_cp_rank)
    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):  # each imported it by name
        module.get_pos_emb_on_this_cp_rank = cp_rows
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    tp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _APPLIED = True
    return True
