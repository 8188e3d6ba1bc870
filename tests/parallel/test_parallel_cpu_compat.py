"""Each megafusion.parallel.cpu_compat adaptation in isolation (single process, CPU). The end-to-end proof that they
make megatron's schedules, DDP, optimizers and MoE dispatchers run is tests/parallel/test_parallel_layouts.py."""

import pytest
import torch
import torch.distributed as dist

from megafusion.config.schema import Config, ParallelConfig, TrainingConfig
from megafusion.parallel import cpu_compat
from megafusion.parallel.initialize import destroy_parallel, initialize_parallel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU adaptations are inactive on a GPU machine")


@pytest.fixture
def compat():
    was_enabled = cpu_compat.cpu_compat_enabled()
    assert cpu_compat.enable_cpu_compat()
    yield
    if not was_enabled:
        cpu_compat.disable_cpu_compat()


@pytest.fixture
def one_rank(compat):
    info = initialize_parallel(ParallelConfig(), seed=1234)
    yield info
    destroy_parallel()


def test_function_mode_maps_cuda_factories_and_moves(compat):
    assert torch.cuda.current_device() == torch.device("cpu")
    made = [
        torch.empty(3, device=torch.cuda.current_device()),  # p2p_communication / layers style
        torch.zeros([], dtype=torch.int, device="cuda"),  # schedules.py total_num_tokens
        torch.tensor([1.0], dtype=torch.float, device="cuda"),  # FP32Optimizer._scale, clip_grads
        torch.ones(2, device=torch.device("cuda", 0)),
        torch.empty(2, device=0),
        torch.tensor([0, 4], device="cuda", pin_memory=True),  # utils.py packed-seq params
    ]
    assert all(t.device.type == "cpu" for t in made)
    x = torch.arange(4.0)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    moved = x.to(torch.device("cuda"), torch.float64)
    assert moved.device.type == "cpu" and moved.dtype == torch.float64
    assert x.to(device="cuda:0", dtype=torch.bfloat16).dtype == torch.bfloat16
    x.record_stream(torch.cuda.current_stream())  # a no-op instead of an error
    assert x.type() == "torch.FloatTensor"  # type names are reported as CUDA only inside the optimizer scopes


def test_enable_is_idempotent_and_disable_restores(compat):
    depth = torch._C._len_torch_function_stack()
    assert cpu_compat.enable_cpu_compat() and torch._C._len_torch_function_stack() == depth
    cpu_compat.disable_cpu_compat()
    try:
        assert not cpu_compat.cpu_compat_enabled()
        with pytest.raises((AssertionError, RuntimeError)):
            torch.cuda.current_device()
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
        from megatron.core.tensor_parallel import random as mrandom

        assert mrandom.CudaRNGStatesTracker.__name__ == "CudaRNGStatesTracker"
    finally:
        cpu_compat.enable_cpu_compat()


def test_stream_and_event_stand_ins(compat):
    stream = torch.cuda.Stream()
    assert isinstance(stream, torch.Stream) and stream.device.type == "cpu"
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        event = stream.record_event()
    event.synchronize()
    assert event.query() and torch.cuda.Event(enable_timing=True).elapsed_time(event) == 0.0
    torch.cuda.synchronize()
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    splits = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert list(splits) == [3, 1] and not torch.is_tensor(splits)
    assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
    kept = torch.tensor([2])
    assert moe_utils.maybe_move_tensor_to_cpu(kept) is kept


def test_cpu_rng_tracker_forks_and_restores_deterministically(compat):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert type(tracker).__name__ == "CpuRNGStatesTracker"
    assert isinstance(tracker, mrandom._MEGAFUSION_ORIGINAL_TRACKER)  # still megatron's tracker type
    tracker.reset()
    tracker.add("a", 5)
    tracker.add("b", 6)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("c", 5)
    expected_a = torch.rand(8, generator=torch.Generator().manual_seed(5))
    expected_b = torch.rand(4, generator=torch.Generator().manual_seed(6))

    torch.manual_seed(0)
    baseline = torch.rand(6)
    torch.manual_seed(0)
    first = torch.rand(3)
    with tracker.fork("a"):
        a1 = torch.rand(4)
        with tracker.fork("b"):  # nested forks, as megatron allows
            b1 = torch.rand(4)
        a2 = torch.rand(4)  # "a" continues where it was before the nested fork
    second = torch.rand(3)  # the default stream is untouched by the forks
    assert torch.equal(torch.cat([first, second]), baseline)
    assert torch.equal(torch.cat([a1, a2]), expected_a) and torch.equal(b1, expected_b)
    with tracker.fork("b"):
        assert not torch.equal(torch.rand(4), expected_b)  # a fork advances its state
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("missing"):
            pass


def test_megatron_seeding_gives_distinct_tensor_parallel_streams(one_rank):
    from megatron.core import tensor_parallel

    draws = {}
    for tp_rank in (0, 1):
        tensor_parallel.model_parallel_cuda_manual_seed(77, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        with tracker.fork():  # the model-parallel state: differs per TP rank
            mp = torch.rand(4)
        with tracker.fork(tensor_parallel.random._DATA_PARALLEL_RNG_TRACKER_NAME):  # same on every TP rank
            dp = torch.rand(4)
        draws[tp_rank] = (mp, dp)
    assert not torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[0][1], draws[1][1])


def _dot_product_attention(dropout):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, attention_dropout=dropout,
                               masked_softmax_fusion=False, use_cpu_initialization=True)
    return DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def test_dot_product_attention_dropout_runs_under_the_cpu_tracker(one_rank):
    from megatron.core import tensor_parallel

    attention = _dot_product_attention(0.5).train()
    q, k, v = (torch.randn(6, 2, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))  # [s, b, n, d]

    def run(seed):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return attention(q, k, v, attention_mask=None)

    out = run(3)
    assert out.shape == (6, 2, 16)
    assert torch.equal(out, run(3)) and not torch.equal(out, run(4))
    no_dropout = _dot_product_attention(0.0)(q, k, v, attention_mask=None)
    assert not torch.allclose(out, no_dropout)


def test_activation_recompute_replays_dropout(one_rank):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(11)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    weight = torch.randn(8, 8, requires_grad=True)

    def block(x):
        with tracker.fork():
            return torch.nn.functional.dropout(x @ weight, p=0.5, training=True).sum(-1)

    x = torch.randn(4, 8, requires_grad=True)
    state = tracker.get_states()
    cpu_state = torch.get_rng_state()
    block(x).sum().backward()
    plain = (x.grad.clone(), weight.grad.clone())
    x.grad, weight.grad = None, None
    tracker.set_states({k: v.clone() for k, v in state.items()})
    torch.set_rng_state(cpu_state)
    tensor_parallel.checkpoint(block, False, x).sum().backward()  # CheckpointFunction saves/restores RNG states
    assert torch.equal(x.grad, plain[0]) and torch.equal(weight.grad, plain[1])


def test_optimizer_type_checks_see_cuda_names_only_inside_megatron_optimizers(compat):
    t = torch.zeros(2)
    with cpu_compat.reporting_cuda_tensor_types():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.to(torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64  # conversions are untouched
    assert t.type() == "torch.FloatTensor"
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for fn in (DistributedOptimizer.__init__, DistributedOptimizer._build_model_and_main_param_groups,
               optimizer.Float16OptimizerWithFloat16Params.__init__, clip_grads.clip_grad_by_total_norm_fp32,
               optimizer.clip_grad_by_total_norm_fp32):
        assert hasattr(fn, "_megafusion_wrapped")


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_megatron_optimizers_step_on_cpu_in_fp32_and_bf16(compat, distributed_optimizer):
    """FP32Optimizer / Float16OptimizerWithFloat16Params / DistributedOptimizer (fp32 and bf16 params) build and
    step on the CPU through wrap_model + build_optimizer + megatron's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from parallel_harness import SEQ, VOCAB, build_gpt, make_batches, transformer_config

    from megafusion.parallel.wrapping import wrap_model
    from megafusion.training.optimizer import build_optimizer

    for precision in ("fp32", "bf16"):
        cfg = Config(parallel=ParallelConfig(use_distributed_optimizer=distributed_optimizer),
                     training=TrainingConfig(precision=precision, micro_batch_size=2, global_batch_size=8))
        initialize_parallel(cfg.parallel, seed=5)
        bf16 = precision == "bf16"

        def provider(pre, post, vp):
            tc = transformer_config(cfg, num_layers=2)
            tc.bf16, tc.params_dtype, tc.pipeline_dtype = bf16, (torch.bfloat16 if bf16 else torch.float32), \
                (torch.bfloat16 if bf16 else torch.float32)
            return build_gpt(tc, pre, post, vp)

        chunks = wrap_model(provider, cfg)
        opt = build_optimizer(cfg, chunks)
        expected = {False: ("FP32Optimizer", "Float16OptimizerWithFloat16Params"),
                    True: ("DistributedOptimizer", "DistributedOptimizer")}[distributed_optimizer][bf16]
        inner = getattr(opt, "chained_optimizers", [opt])
        assert [type(o).__name__ for o in inner] == [expected]
        before = [p.detach().float().clone() for p in chunks[0].parameters()]
        batches = make_batches(0)

        def step(it, model):
            b = next(it)
            out = model(b["tokens"], torch.arange(SEQ).expand(2, SEQ), None, labels=b["labels"])
            return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

        for chunk in chunks:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        losses = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=chunks,
                                             num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=2)
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm is not None and grad_norm > 0
        loss = torch.stack([l["loss"] for l in losses]).mean().item()
        assert abs(loss - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5, loss  # near-uniform at init
        after = [p.detach().float() for p in chunks[0].parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{precision}: no weight changed"
        assert all(p.dtype == (torch.bfloat16 if bf16 else torch.float32) for p in chunks[0].parameters())
        destroy_parallel()


def test_pipeline_p2p_on_gloo_uses_megatron_ordered_ops(one_rank, monkeypatch):
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    calls = []
    monkeypatch.setattr(p2p, "_p2p_ops", lambda **kw: calls.append(kw) or {"recv_prev": "req"})
    reqs = p2p._batched_p2p_ops(tensor_send_prev=None, tensor_recv_prev=None, tensor_send_next=None,
                                tensor_recv_next=None, group=dist.group.WORLD, prev_pipeline_rank=0,
                                next_pipeline_rank=0)
    assert reqs == ["req"] and len(calls) == 1  # a list, as P2PCommunicator._communicate expects when batching


def test_moe_router_gemm_works_without_transformer_engine(compat):
    from megatron.core.transformer.moe import moe_utils

    assert hasattr(moe_utils, "te_general_gemm")
    inp = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    logits = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
    torch.testing.assert_close(logits, inp @ weight.t())
    logits.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(5, 4).t() @ inp.detach())


def test_single_rank_gloo_buffer_collectives_are_identities(one_rank):
    """G: megatron DDP's bucket collectives over a 1-rank gloo group do no communication when synchronous (the DP=2
    parity tests compare runs with and without it end to end); asynchronous calls still reach gloo."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import param_and_grad_buffer as buffers

    group = ps.get_data_parallel_group()
    assert group.size() == 1
    data, gathered = torch.arange(6.0), torch.zeros(6)
    with buffers._coalescing_manager(group, async_ops=False) as manager:
        assert buffers.dist_reduce_scatter_func(data, data[:6], group=group) is None  # in place: nothing to move
        assert buffers.dist_all_gather_func(gathered, data, group=group) is None
    assert isinstance(manager, cpu_compat._Completed) and manager.wait() is None
    assert torch.equal(gathered, data) and torch.equal(data, torch.arange(6.0))
    work = buffers.dist_all_gather_func(gathered.zero_(), data, group=group, async_op=True)
    assert work is not None
    work.wait()
    assert torch.equal(gathered, data)


def _uneven_collectives(rank, world_size, out_dir):
    """Adaptation H on 2 gloo ranks: rank r holds r + 2 rows of value r + 1."""
    import json
    import os

    from megatron.core.tensor_parallel import mappings

    assert cpu_compat.enable_cpu_compat()
    group = dist.group.WORLD
    sizes = [2, 3]
    mine = torch.full((sizes[rank], 4), float(rank + 1))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
    full = torch.arange(5 * 4, dtype=torch.float32).view(5, 4) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"gathered": gathered.tolist(), "scattered": scattered.tolist()}, f)


def test_uneven_first_dim_collectives_on_gloo(tmp_path):
    """megatron-core 0.16.1's gather / reduce-scatter with split sizes (the alltoall MoE dispatcher at TP > 1 and
    EP > 1) give the values NCCL would on gloo."""
    import inspect
    import json

    from megatron.core.tensor_parallel import mappings

    from distributed import run_distributed

    for name, split in (("_gather_along_first_dim", "output_split_sizes"),
                        ("_reduce_scatter_along_first_dim", "input_split_sizes")):
        assert split in inspect.signature(getattr(mappings, name)).parameters  # the shape adaptation H targets
    run_distributed(_uneven_collectives, world_size=2, args=(str(tmp_path),))
    expected_gather = [[1.0] * 4] * 2 + [[2.0] * 4] * 3
    full = torch.arange(20, dtype=torch.float32).view(5, 4) * 3  # summed over ranks (x1 + x2)
    for rank, rows in ((0, slice(0, 2)), (1, slice(2, 5))):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["gathered"] == expected_gather
        assert got["scattered"] == full[rows].tolist()
