"""The CPU adaptation of megatron-core: inert with CUDA, and each answer correct without it.

(The multi-rank tests exercise it end to end: TP, PP, DP, DDP and the distributed
optimizer on gloo.)
"""

import pytest
import torch

from nemo_dpo.distributed import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the adaptation is for machines without CUDA")


@pytest.fixture(scope="module", autouse=True)
def applied():
    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True  # idempotent


def test_inactive_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.needed() is False
    assert cpu_compat.apply() is False


def test_cuda_device_requests_land_on_cpu():
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.utils import get_default_causal_mask

    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert schedules.torch.is_tensor is torch.is_tensor  # everything else is torch itself
    mask = get_default_causal_mask(3)
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    torch.cuda.synchronize()  # nothing to wait for, and no error


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    saved = tracker.get_states()
    tracker.reset()
    try:
        tracker.add("stream", 7)
        torch.manual_seed(0)
        outer_expected = torch.rand(3)
        torch.manual_seed(0)
        with tracker.fork("stream"):
            first = torch.rand(3)
        outer = torch.rand(3)
        with tracker.fork("stream"):
            second = torch.rand(3)
        torch.testing.assert_close(first, torch.rand(3, generator=torch.Generator().manual_seed(7)))
        assert not torch.equal(first, second)  # the stream advances
        torch.testing.assert_close(outer, outer_expected)  # the default stream is untouched
        with pytest.raises(ValueError, match="already exists"):
            tracker.add("other", 7)
        with pytest.raises(ValueError, match="not added"):
            with tracker.fork("missing"):
                pass
    finally:
        tracker.reset()
        tracker.set_states(saved)


def test_parameter_type_reports_cuda_names_for_megatron_checks():
    assert torch.nn.Parameter(torch.zeros(2)).type() == "torch.cuda.FloatTensor"
    assert torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(2).type() == "torch.FloatTensor"  # plain tensors are unaffected
    assert torch.nn.Parameter(torch.zeros(2)).type(torch.float64).dtype == torch.float64


def test_gradient_clipping_scales_by_total_norm():
    from megatron.core.optimizer import optimizer

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.tensor([3.0, 0.0])
    params[1].grad = torch.tensor([4.0])
    optimizer.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(params[1].grad, torch.tensor([0.8]), atol=1e-6, rtol=0)
    optimizer.clip_grad_by_total_norm_fp32(params, max_norm=10.0, total_norm=1.0)  # below the limit: untouched
    torch.testing.assert_close(params[1].grad, torch.tensor([0.8]), atol=1e-6, rtol=0)


def test_rope_rows_of_a_context_parallel_rank_need_no_pinned_memory_or_move():
    """RoPE under CP keeps rows (chunk r, chunk 2CP-1-r) of its table, with an index made in pinned memory."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    class Group:  # rank 1 of a CP group of 2
        def size(self):
            return 2

        def rank(self):
            return 1

    table = torch.arange(8.0).reshape(8, 1, 1, 1)
    rows = rotary_pos_embedding.get_pos_emb_on_this_cp_rank(table, 0, Group())
    assert rows.flatten().tolist() == [2.0, 3.0, 4.0, 5.0]  # chunks 1 and 2 of 4
    assert rows.device.type == "cpu"


def test_moe_dispatcher_takes_its_token_counts_to_the_host_on_cpu():
    """The all-to-all dispatcher's own copy-and-wait step, on CPU tensors: split sizes come out as the numpy
    arrays ``all_to_all_single`` takes (it refuses tensors), the side stream and its event wait for nothing."""
    from types import SimpleNamespace

    import numpy as np
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as Dispatcher

    dispatcher = SimpleNamespace(
        drop_and_pad=False, cuda_dtoh_point="before_permutation_1", cuda_sync_point="before_permutation_1",
        cuda_dtoh_stream=Dispatcher.cuda_dtoh_stream or cpu_compat._CpuStream(), num_local_experts=2,
        config=SimpleNamespace(moe_permute_fusion=False), input_splits=torch.tensor([3, 1]),
        output_splits=torch.tensor([2, 2]), output_splits_tp=torch.tensor([4]), num_out_tokens=torch.tensor(4),
        num_global_tokens_per_local_expert=torch.tensor([[1, 3]]),
    )
    counts = torch.tensor([1, 3])
    assert Dispatcher._maybe_dtoh_and_synchronize(dispatcher, "before_permutation_1", counts) is counts
    for name, want in (("input_splits", [3, 1]), ("output_splits", [2, 2]), ("output_splits_tp", [4])):
        splits = getattr(dispatcher, name)
        assert isinstance(splits, np.ndarray) and splits.tolist() == want, name
    assert torch.equal(dispatcher.num_out_tokens, torch.tensor(4))  # tensors asked for as tensors stay tensors
    assert dispatcher.d2h_event.query()


class _RankOfTwo:
    def __init__(self, rank):
        self._rank = rank

    def size(self):
        return 2

    def rank(self):
        return self._rank


def test_unequal_shares_travel_padded_through_gloos_equal_size_collectives():
    """EP with TP gathers (and reduce-scatters) shares of 3 and 1 tokens: each travels padded to 3, comes back cut."""
    from megatron.core.tensor_parallel import mappings

    shares = [torch.arange(6.0).reshape(3, 2), torch.tensor([[6.0, 7.0]])]
    padded = [shares[0], torch.cat([shares[1], torch.zeros(2, 2)])]

    def equal_gather(input_, group, sizes=None, use_global_buffer=False):
        assert sizes is None and torch.equal(input_, padded[group.rank()])
        return torch.cat(padded)

    gather = cpu_compat._uneven_gather(equal_gather)
    for rank in (0, 1):
        torch.testing.assert_close(gather(shares[rank], _RankOfTwo(rank), [3, 1]), torch.cat(shares), atol=0, rtol=0)

    inputs = [torch.arange(8.0).reshape(4, 2), 10 * torch.arange(8.0).reshape(4, 2)]  # each rank's [3 + 1] rows

    def pad(x):  # rank 0's 3 rows, then rank 1's 1 row padded to 3
        return torch.cat([x[:3], x[3:], torch.zeros(2, 2)])

    def equal_reduce_scatter(input_, group, sizes=None, use_global_buffer=False):
        assert sizes is None and torch.equal(input_, pad(inputs[group.rank()]))
        total = pad(inputs[0]) + pad(inputs[1])
        return total[3 * group.rank() : 3 * group.rank() + 3]

    reduce_scatter = cpu_compat._uneven_reduce_scatter(equal_reduce_scatter)
    summed = inputs[0] + inputs[1]
    torch.testing.assert_close(reduce_scatter(inputs[0], _RankOfTwo(0), [3, 1]), summed[:3], atol=0, rtol=0)
    torch.testing.assert_close(reduce_scatter(inputs[1], _RankOfTwo(1), [3, 1]), summed[3:], atol=0, rtol=0)
    assert mappings._gather_along_first_dim.__wrapped__ is not None  # megatron's own, wrapped on CPU
    assert mappings._reduce_scatter_along_first_dim.__wrapped__ is not None
