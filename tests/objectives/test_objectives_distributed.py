"""Objectives on 2 gloo ranks, in one spawn to keep the suite fast:
vocab-parallel cross-entropy with TP=2 equals TP=1 and torch's reference (loss and logit gradients), and the
adaptive loss-weighting EMA is identical on 2 data-parallel ranks that see different local losses."""

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.objectives.cross_entropy import text_cross_entropy
from megafusion.objectives.loss_weighting import AdaptiveWeighting, reduce_for_weighting

VOCAB, ALPHA, MU = 64, 0.3, 0.9


def _tp_check(rank):
    from megatron.core import parallel_state

    spec = SyntheticSpec(vocab_size=VOCAB, seq_length=64, patch_dim=4, patches_per_frame=4, fill=0.8)
    batch = SyntheticDocuments(spec, 1).batch(2).validate()
    full = torch.randn(64, 2, VOCAB, generator=torch.Generator().manual_seed(3))  # [s, b, V], same on both ranks
    ref_logits = full.clone().requires_grad_(True)
    per = F.cross_entropy(ref_logits.transpose(0, 1).reshape(-1, VOCAB), batch.labels.reshape(-1), reduction="none")
    ref = (per * batch.loss_mask.reshape(-1)).sum() / batch.loss_mask.sum()
    ref.backward()

    results = {}
    for tp in (1, 2):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        part = VOCAB // tp
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        assert tp_rank == (rank if tp == 2 else 0)
        cols = slice(tp_rank * part, (tp_rank + 1) * part)
        shard = full[:, :, cols].clone().requires_grad_(True)  # [s, b, V/tp]
        loss, count = text_cross_entropy(shard, batch)
        loss.backward()
        results[tp] = loss.detach()
        assert count.item() == batch.num_text_targets
        assert torch.allclose(shard.grad, ref_logits.grad[:, :, cols], atol=1e-7)
        parallel_state.destroy_model_parallel()
    assert torch.allclose(results[1], results[2], atol=1e-6), results
    assert torch.allclose(results[2], ref.detach(), atol=1e-6)


def _ema_check(rank, world_size):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different local losses
    w = AdaptiveWeighting(ALPHA, MU)
    history = []
    for step in range(6):
        micro_ce = (4.0 + rank + torch.rand(3, generator=g)).tolist()
        micro_fm = (0.5 + 0.2 * rank + 0.1 * torch.rand(3, generator=g)).tolist()
        if step == 2 and rank == 1:
            micro_fm[1] = 0.0  # a micro-batch without latents on one rank
        if step == 4:
            micro_fm = [0.0] * 3  # a step without latents anywhere
        for l_ce, l_fm in zip(micro_ce, micro_fm):
            w_ce, w_fm = w.weights(torch.tensor(l_ce), torch.tensor(l_fm))
            assert torch.isfinite(w_ce) and torch.isfinite(w_fm)
        g_ce, g_fm = reduce_for_weighting(micro_ce, micro_fm)
        history.append((w.commit(g_ce, g_fm), micro_ce, micro_fm))
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (w.state_dict(), history))
    (state0, hist0), (state1, hist1) = gathered
    assert hist0[0][1] != hist1[0][1]  # the ranks really saw different losses
    assert state0 == state1, (state0, state1)  # bit-identical EMA on both ranks
    # independently: B_k from the mean over every present micro-batch of both ranks
    b = None
    for k in range(6):
        ce = hist0[k][1] + hist1[k][1]
        fm = [v for v in hist0[k][2] + hist1[k][2] if v > 0]
        if fm:
            a_k = ALPHA * sum(ce) / len(ce) + (1 - ALPHA) * sum(fm) / len(fm)
            b = a_k if b is None else MU * b + (1 - MU) * a_k
        assert hist0[k][0] == pytest.approx(b, rel=1e-6) and hist1[k][0] == hist0[k][0]
    assert state0["num_updates"] == 5 and state0["num_partial"] == 1


def _worker(rank, world_size):
    _tp_check(rank)
    _ema_check(rank, world_size)


@pytest.mark.distributed
def test_vocab_parallel_tp2_equals_tp1_and_ema_identical_across_dp_ranks():
    run_distributed(_worker, world_size=2)
