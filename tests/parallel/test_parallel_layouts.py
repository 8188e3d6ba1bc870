"""TP / PP (1F1B and interleaved) / DP + distributed optimizer / EP on 2 gloo processes reproduce the TP=PP=EP=1
run on the same data and weights, through megatron's schedules, DistributedDataParallel and optimizers.

The reference runs TP=PP=EP=1 with the whole global batch on both ranks (identical data-parallel replicas: the
single-process computation). Relative tolerance 1e-5 everywhere; see parallel_harness.compare for which gradients
are compared.
"""

import pytest
from distributed import run_distributed
from parallel_harness import NUM_MICROBATCHES, SEED, STEPS, compare, make_cfg, reference_run, train

from megafusion.parallel.initialize import destroy_parallel, initialize_parallel

ALL = list(range(NUM_MICROBATCHES))


def _data_parallel_half(rank):
    half = NUM_MICROBATCHES // 2
    return ALL[rank * half:(rank + 1) * half]  # each data-parallel rank gets its half of the global batch


def _pipeline_worker(rank, world_size):
    ref = reference_run({})
    cfg = make_cfg(pp=2)
    info = initialize_parallel(cfg.parallel, SEED)
    assert (info.pp_size, info.pp_rank, info.dp_size, info.is_last_stage) == (2, rank, 1, rank == 1)
    # PP reorders nothing inside a layer: losses, grads and weights agree at every step.
    compare(train(cfg, {}, ref[0], ALL), ref, "PP=2 1F1B", grad_steps=STEPS)
    cfg = make_cfg(pp=2, vpp=2)
    info = initialize_parallel(cfg.parallel, SEED)
    assert info.vpp_size == 2
    compare(train(cfg, {}, ref[0], ALL), ref, "PP=2 x VPP=2 interleaved", grad_steps=STEPS)
    destroy_parallel()


@pytest.mark.distributed
def test_pipeline_parallel_matches_single_stage():
    run_distributed(_pipeline_worker, world_size=2)


def _tensor_and_data_worker(rank, world_size):
    ref = reference_run({})
    cfg = make_cfg(tp=2)
    info = initialize_parallel(cfg.parallel, SEED)
    assert (info.tp_size, info.tp_rank, info.dp_size) == (2, rank, 1)
    compare(train(cfg, {}, ref[0], ALL, steps=1), ref, "TP=2", grad_steps=1)
    cfg = make_cfg(distributed_optimizer=True)
    info = initialize_parallel(cfg.parallel, SEED)
    assert (info.dp_size, info.dp_rank) == (2, rank)
    # The distributed optimizer reduce-scatters: each rank's grad buffer is valid only in its shard, so losses and
    # the all-gathered weights are compared.
    compare(train(cfg, {}, ref[0], _data_parallel_half(rank)), ref, "DP=2 + distributed optimizer", grad_steps=0)
    destroy_parallel()


@pytest.mark.distributed
def test_tensor_and_data_parallel_match_single_process():
    run_distributed(_tensor_and_data_worker, world_size=2)


NUM_EXPERTS = 4


def _moe(dispatcher):
    return {"num_layers": 2, "moe": dict(
        num_moe_experts=NUM_EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=32, moe_router_load_balancing_type="none",
        moe_token_dispatcher_type=dispatcher)}


def _expert_worker(rank, world_size):
    ref = reference_run(_moe("allgather"))
    for dispatcher in ("allgather", "alltoall"):
        cfg = make_cfg(ep=2, num_experts=NUM_EXPERTS)
        info = initialize_parallel(cfg.parallel, SEED)
        assert (info.ep_size, info.ep_rank, info.dp_size) == (2, rank, 2)
        run = train(cfg, _moe(dispatcher), ref[0], _data_parallel_half(rank), steps=2)
        assert len(run[1][0]) < len(ref[2][0]), "each EP rank should hold only its own experts"
        compare(run, ref, f"EP=2 ({dispatcher} dispatcher)", grad_steps=1)
    destroy_parallel()


@pytest.mark.distributed
def test_expert_parallel_matches_single_process():
    run_distributed(_expert_worker, world_size=2)
