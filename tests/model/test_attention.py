"""Hybrid attention: the mask rule on crafted layouts, every backend against the `dense` reference (outputs and
dq, dk, dv), the backend registry. CPU tests run in fp32 at 1e-5; GPU tests are marked `gpu`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layouts import crafted_batch, crafted_layout, drop_context, random_batch
from megafusion.model.attention import segmented as segmented_module
from megafusion.model.attention.backends import (
    BACKENDS,
    get_attention_function,
    resolve_backend,
    transformer_engine_available,
)
from megafusion.model.attention.dense import dense_attention
from megafusion.model.attention.layout import AttentionLayout
from megafusion.model.attention.segmented import CAUSAL, PAD, segmented_attention

TOL = dict(atol=1e-5, rtol=1e-5)

# random layouts from the synthetic documents (seq 128, 8 patches per frame: several documents per row)
CASES = {
    "text": dict(kind="text"),
    "image": dict(kind="image"),
    "interleaved": dict(kind="interleaved"),
    "multi_image": dict(kind="multi_image"),
    "video": dict(kind="video"),
    "padding_tail": dict(kind="mixed", fill=0.7),
    "cfg_dropped": dict(kind="mixed", cfg_drop=0.6, clean_frames=0.3),
    "batch_of_3": dict(kind="mixed", batch_size=3, fill=0.85, cfg_drop=0.3, clean_frames=0.4),
}
# crafted rows: documents "|", text tN, noised frame iN, clean frame cN, adjacent frames = one video
CRAFTED = [
    "t5 i8 t3 c8 t4 | t6 i6 i6 t2",
    "t3 c6 t2 i6 t4 i5 i5 t3",
    "t5 i8 t3 | c4 c4 t3 | i8 t9",  # starts like row 0: equal-shaped segments batch into one SDPA call
]


def qkv(b, s, nq=4, nkv=4, d=16, seed=0, requires_grad=True, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(b, n, s, d, generator=g).to(device, dtype).requires_grad_(requires_grad)  # noqa
    return make(nq), make(nkv), make(nkv), torch.randn(b, nq, s, d, generator=g).to(device, dtype)


def fwd_bwd(fn, q, k, v, grad, layout, scale):
    out = fn(q, k, v, layout, scale, 0.0)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def assert_matches_dense(fn, layout, nq, nkv, tol=TOL, device="cpu", dtype=torch.float32):
    b, s = layout.block_ids.shape
    q, k, v, grad = qkv(b, s, nq, nkv, device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = fwd_bwd(dense_attention, *ref_inputs, grad.float(), layout, scale)
    got = fwd_bwd(fn, q, k, v, grad, layout, scale)
    for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(g.float(), r, **tol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------ the mask rule
def test_text_only_row_is_exactly_causal():
    layout = crafted_layout(["t64"], 64)
    assert torch.equal(layout.dense_mask()[0, 0], torch.ones(64, 64, dtype=torch.bool).tril())
    q, k, v, _ = qkv(1, 64, requires_grad=False)
    out = segmented_attention(q, k, v, layout, 0.25)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25),
                               atol=1e-6, rtol=0)


def test_packed_text_documents_are_block_diagonal_causal():
    layout = crafted_layout(["t5 | t7 | t4"], 20)  # 16 positions + 4 padding
    mask = layout.dense_mask()[0, 0]
    expected = torch.zeros(20, 20, dtype=torch.bool)
    for a, e in ((0, 5), (5, 12), (12, 16)):
        expected[a:e, a:e] = torch.ones(e - a, e - a, dtype=torch.bool).tril()
    expected[16:, 16:] = torch.eye(4, dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_no_token_sees_a_later_document_or_a_later_image():
    batch = crafted_batch(["t4 i6 t3 i5 i5 t2 | t5 c4 t2"], 48)
    mask = AttentionLayout.from_batch(batch).dense_mask()[0, 0]
    doc, block = batch.document_ids[0], batch.block_ids[0]
    pos = torch.arange(48)
    later_doc = doc.view(1, -1) > doc.view(-1, 1)
    later_other_block = (block.view(1, -1) >= 0) & (block.view(1, -1) != block.view(-1, 1)) & (pos.view(1, -1) > pos.view(-1, 1))
    assert not (mask & later_doc).any()
    assert not (mask & later_other_block).any()
    # inside a block: bidirectional; a video's second frame sees the first, not the other way round
    first, second = (block == 1).nonzero().flatten(), (block == 2).nonzero().flatten()
    assert mask[first][:, first].all() and mask[second][:, first].all() and not mask[first][:, second].any()
    # padding: attends only to itself, nobody attends to it
    pad = doc < 0
    assert torch.equal(mask[pad][:, pad], torch.eye(int(pad.sum()), dtype=torch.bool))
    assert not mask[~pad][:, pad].any()


def test_cfg_dropped_image_sees_only_itself_and_hide_noised_hides_other_noised_blocks():
    batch = drop_context(crafted_batch(["t4 i6 t3 c5 t2"], 24), [[0]])
    block = batch.block_ids[0]
    img, clean = (block == 0).nonzero().flatten(), (block == 1).nonzero().flatten()
    mask = AttentionLayout.from_batch(batch).dense_mask()[0, 0]
    assert mask[img][:, img].all() and not mask[img][:, :4].any()  # caption invisible to the dropped image
    assert mask[10:13][:, img].all() and mask[18:20][:, img].all()  # later text still sees it
    hidden = AttentionLayout.from_batch(batch, hide_noised=True).dense_mask()[0, 0]
    assert hidden[img][:, img].all()  # a noised block still sees itself
    assert not hidden[img.max() + 1:][:, img].any()  # ... and nothing after it does
    assert hidden[18:20][:, clean].all()  # clean frames stay visible to later text


# ------------------------------------------------------------------------------------------ segmented
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("hide_noised", [False, True], ids=["visible", "hide_noised"])
@pytest.mark.parametrize("case", list(CASES))
def test_segmented_matches_dense(case, hide_noised, heads):
    batch = random_batch(seed=7, **CASES[case])
    layout = AttentionLayout.from_batch(batch, hide_noised=hide_noised)
    assert_matches_dense(segmented_attention, layout, *heads)


@pytest.mark.parametrize("hide_noised", [False, True], ids=["visible", "hide_noised"])
def test_segmented_matches_dense_on_crafted_rows(hide_noised):
    layout = crafted_layout(CRAFTED, 64, hide_noised=hide_noised)
    assert_matches_dense(segmented_attention, layout, 4, 2)
    plan = layout.cache[segmented_module.PLAN_KEY]
    segments = [seg for row in plan.rows for seg in row]
    assert any(seg.kind == PAD for seg in segments)
    assert any(seg.kind == CAUSAL and seg.num_keys > seg.num_queries for seg in segments)  # text after a prefix
    assert any(seg.key_index is not None for seg in segments) == hide_noised  # gathered keys only when hiding
    assert len(plan.groups) < len(segments) - len(plan.pads)  # equal shapes share one SDPA call


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("hide_noised", [False, True], ids=["visible", "hide_noised"])
def test_segmented_text_runs_in_query_chunks_match_dense(monkeypatch, hide_noised, heads):
    monkeypatch.setattr(segmented_module, "TEXT_CHUNK", 2)  # every text run after a prefix in chunks of 2
    layout = crafted_layout(CRAFTED, 64, hide_noised=hide_noised)
    assert_matches_dense(segmented_attention, layout, *heads)
    causal = [seg for row in layout.cache[segmented_module.PLAN_KEY].rows for seg in row if seg.kind == CAUSAL]
    assert max(seg.num_queries for seg in causal if seg.num_keys > seg.num_queries) == 2
    assert max(seg.num_queries for seg in causal) > 2  # runs without a prefix stay one is_causal call


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_segmented_text_after_a_prefix_runs_unmasked_on_cpu_with_mha(heads):
    # MHA on CPU: prefix + causal own keys as two unmasked flash calls (no mask is ever built); GQA: masked SDPA
    layout = crafted_layout(CRAFTED, 64, hide_noised=True)
    assert_matches_dense(segmented_attention, layout, *heads)
    assert (not layout.cache[segmented_module.PLAN_KEY].masks) == (heads[0] == heads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_causal_equals_masked_sdpa_forward_and_backward(dtype):
    n, h, prefix, own, d = 3, 2, 5, 7, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, size, d, generator=g) for size in (own, prefix + own, prefix + own))
    grad = torch.randn(n, h, own, d, generator=g)
    allowed = torch.ones(own, prefix + own, dtype=torch.bool).tril(prefix)  # causal aligned bottom-right
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=allowed, scale=0.3)
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    got_in = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    qq, kk, vv = got_in
    got = segmented_module._PrefixCausal.apply(
        qq, kk[:, :, :prefix], vv[:, :, :prefix], kk[:, :, prefix:], vv[:, :, prefix:], 0.3
    )
    got_grads = torch.autograd.grad(got, got_in, grad.to(dtype))
    tol = TOL if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for name, r, x in zip(("out", "dq", "dk", "dv"), (ref, *ref_grads), (got, *got_grads)):
        assert x.dtype == dtype
        torch.testing.assert_close(x.float(), r, **tol, msg=lambda m: f"{name}: {m}")


def test_segmented_plan_is_built_once_per_batch(monkeypatch):
    calls = []
    build = segmented_module.build_plan
    monkeypatch.setattr(segmented_module, "build_plan", lambda layout: calls.append(1) or build(layout))
    layout = crafted_layout(CRAFTED, 64)
    q, k, v, _ = qkv(3, 64, requires_grad=False)
    first = segmented_attention(q, k, v, layout, 0.25)
    second = segmented_attention(q * 2, k, v, layout, 0.25)  # a second "layer" on the same batch
    assert len(calls) == 1 and not torch.equal(first, second)


def test_segmented_rejects_a_split_visual_block():
    layout = crafted_layout(["t4 i6 t4"], 16)
    layout.block_ids[0, 6] = -1  # block 0 now has a hole
    q, k, v, _ = qkv(1, 16, requires_grad=False)
    with pytest.raises(ValueError, match="not contiguous"):
        segmented_attention(q, k, v, layout, 0.25)


def test_core_attention_module_runs_the_configured_backend():
    from megafusion.model.attention.core_attention import HybridCoreAttention
    from megafusion.model.transformer_config import MultimodalTransformerConfig

    outs = []
    layout = crafted_layout(CRAFTED, 64, hide_noised=True)
    for backend in ("dense", "segmented"):
        config = MultimodalTransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                                             num_query_groups=2, attention_dropout=0.0,
                                             hybrid_attention_backend=backend)
        module = HybridCoreAttention(config, layer_number=1)
        q, k, v, _ = qkv(3, 64, 4, 2)
        q, k, v = (x.detach().permute(2, 0, 1, 3).requires_grad_() for x in (q, k, v))  # [s, b, heads, d]
        out = module(q, k, v, layout)
        assert out.shape == (64, 3, 4 * 16)
        outs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for r, g in zip(*outs):
        torch.testing.assert_close(g, r, **TOL)


# ------------------------------------------------------------------------------------------ flex
def _flex_forward_or_skip(layout, q, k, v):
    from megafusion.model.attention.flex import flex_attention_backend

    try:
        return flex_attention_backend(q, k, v, layout, 0.25)
    except (ImportError, RuntimeError) as err:  # flex unavailable / not runnable on this CPU build
        pytest.skip(f"flex_attention does not run on this CPU: {type(err).__name__}: {str(err)[:200]}")


@pytest.mark.parametrize("hide_noised", [False, True], ids=["visible", "hide_noised"])
def test_flex_forward_matches_dense_on_cpu(hide_noised):
    layout = crafted_layout(CRAFTED, 64, hide_noised=hide_noised)
    q, k, v, _ = qkv(3, 64, 4, 2, requires_grad=False)
    out = _flex_forward_or_skip(layout, q, k, v)
    torch.testing.assert_close(out, dense_attention(q, k, v, layout, 0.25), **TOL)


def test_flex_refuses_backward_on_cpu_and_dropout():
    from megafusion.model.attention.flex import flex_attention_backend

    layout = crafted_layout(["t8 i8"], 16)
    q, k, v, _ = qkv(1, 16)
    with pytest.raises(NotImplementedError, match="segmented"):
        flex_attention_backend(q, k, v, layout, 0.25)
    with pytest.raises(ValueError, match="attention_dropout"):
        flex_attention_backend(q, k, v, layout, 0.25, dropout_p=0.1)


# ------------------------------------------------------------------------------------------ registry
def test_resolve_backend():
    assert resolve_backend("auto", torch.device("cpu")) == "segmented"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    for name in ("dense", "segmented", "flex"):
        assert resolve_backend(name) == name
        assert callable(get_attention_function(name))
    with pytest.raises(ValueError, match=r"model.attention_backend='flash'.*segmented"):
        resolve_backend("flash")
    with pytest.raises(ValueError, match="function backends"):
        get_attention_function("auto")
    assert set(BACKENDS) == {"dense", "segmented", "flex", "te"}


@pytest.mark.skipif(transformer_engine_available(), reason="transformer-engine is installed here")
def test_te_missing_gives_a_clear_error():
    with pytest.raises(ImportError, match="attention_backend=flex on GPU or segmented on CPU"):
        resolve_backend("te")
    te_fn = get_attention_function("te")  # importing the module is lazy and works without TE
    q, k, v, _ = qkv(1, 8, requires_grad=False)
    with pytest.raises(ImportError, match="flex on GPU or segmented on CPU"):
        te_fn(q, k, v, crafted_layout(["t8"], 8), 0.25, 0.0)


# ------------------------------------------------------------------------------------------ GPU
GPU_TOL = dict(atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("hide_noised", [False, True], ids=["visible", "hide_noised"])
@pytest.mark.parametrize("case", ["interleaved", "video", "batch_of_3"])
def test_flex_matches_dense_forward_and_backward_on_gpu(case, hide_noised):
    from megafusion.model.attention.flex import flex_attention_backend

    batch = random_batch(seed=3, **CASES[case]).to("cuda")
    layout = AttentionLayout.from_batch(batch, hide_noised=hide_noised)
    assert_matches_dense(flex_attention_backend, layout, 4, 2, tol=GPU_TOL, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("hide_noised", [False, True], ids=["visible", "hide_noised"])
def test_segmented_matches_dense_on_gpu(hide_noised):
    layout = AttentionLayout.from_batch(random_batch(seed=5, **CASES["batch_of_3"]).to("cuda"), hide_noised)
    assert_matches_dense(segmented_attention, layout, 4, 2, tol=GPU_TOL, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not transformer_engine_available(), reason="needs transformer-engine")
@pytest.mark.parametrize("case", ["text", "padding_tail", "interleaved"])
def test_te_matches_dense_on_gpu(case):
    from megafusion.model.attention import te as te_module

    layout = AttentionLayout.from_batch(random_batch(seed=11, **CASES[case]).to("cuda"))
    # text-only batches take the THD path; multimodal ones the arbitrary-mask path
    assert_matches_dense(te_module.te_attention, layout, 4, 2, tol=dict(atol=3e-2, rtol=3e-2), device="cuda",
                         dtype=torch.bfloat16)
    assert layout.cache[te_module.PLAN_KEY].packed == (case != "interleaved")
