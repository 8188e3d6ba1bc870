"""Mixture-of-Transformers (model.modality_attention): per-modality norms and QKV / output projections around one
attention. Against a dense-mask reference written here (both modalities' modules on every row, then a select), with
identical weights it is the shared-attention model, and perturbing one modality's attention weights moves only
what it should; generation with the KV cache equals recomputation; checkpoints round-trip; the config refuses
sequence parallelism. (TP=2 and PP=2 equal single process: tests/model/test_model_tp.py.)"""

from __future__ import annotations

import pytest
import torch

from distributed import megatron_cpu_single_process
from mixed_batch import mixed_batch
from megafusion.data.batch import MODALITY_IMAGE
from megafusion.model.attention.layout import AttentionLayout
from tiny_model import tiny_model

pytestmark = pytest.mark.usefixtures("single_process")


@pytest.fixture(scope="module")
def single_process():
    with megatron_cpu_single_process():
        yield


def perturbed(seed=0, **fields):
    model = tiny_model(seed=seed, attention_backend="dense", **fields)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _select(is_image, text_module, image_module, x):
    """Both modalities' modules on every row, the image one kept at latent rows."""
    def out(module):
        y = module(x)
        if isinstance(y, tuple):
            y, bias = y
            y = y if bias is None else y + bias
        return y

    return torch.where(is_image, out(image_module), out(text_module))


def rotate(x, angles):
    cos, sin = torch.cos(angles), torch.sin(angles)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def reference(model, batch):
    """The MoT forward written out: dense mask, megatron's grouped QKV layout, non-interleaved RoPE."""
    cfg = model.config
    layout = AttentionLayout.from_batch(batch)
    is_image = (batch.modality == MODALITY_IMAGE).transpose(0, 1).unsqueeze(-1)  # [s, b, 1]
    x = model.embedding(batch, layout)
    s, b, _ = x.shape
    nq, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    angles = model._rotary_embedding(s, x.device)  # [s, 1, 1, d]
    mask = layout.dense_mask()
    for layer in model.decoder.layers:
        att = layer.self_attention
        h = _select(is_image, layer.input_layernorm.text, layer.input_layernorm.image, x)
        qkv = _select(is_image, att.linear_qkv.text, att.linear_qkv.image, h).view(s, b, ng, (nq // ng + 2) * d)
        q, k, v = torch.split(qkv, [nq // ng * d, d, d], dim=-1)
        q = rotate(q.reshape(s, b, nq, d), angles)
        k, v = rotate(k, angles), v
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                             scale=d ** -0.5)
        o = o.permute(2, 0, 1, 3).reshape(s, b, nq * d)
        x = x + _select(is_image, att.linear_proj.text, att.linear_proj.image, o)
        h = _select(is_image, layer.pre_mlp_layernorm.text, layer.pre_mlp_layernorm.image, x)
        mlp, _ = layer.mlp(h, padding_mask=layout)
        x = x + mlp
    x = model.decoder.final_layernorm(x)
    logits, _ = model.output_layer(x)
    return logits, model.velocity_head(x, layout)


def test_mot_equals_the_reference_written_out():
    model = perturbed(modality_attention=True)
    names = [n for n, _ in model.named_parameters()]
    assert "decoder.layers.0.self_attention.linear_qkv.image.weight" in names
    assert "decoder.layers.1.pre_mlp_layernorm.text.weight" in names
    batch = mixed_batch()
    with torch.no_grad():
        out = model(batch)
        logits, velocity = reference(model, batch)
    assert (out.logits - logits).abs().max().item() <= 1e-5
    assert (out.velocity - velocity).abs().max().item() <= 1e-5


def test_identical_modality_weights_give_the_shared_attention_model():
    shared = perturbed()
    mot = tiny_model(attention_backend="dense", modality_attention=True)
    weights = shared.state_dict()
    with torch.no_grad():
        for name, param in mot.named_parameters():
            for part in (".text.", ".image."):
                if any(f"{slot}{part}" in name for slot in ("input_layernorm", "pre_mlp_layernorm", "linear_qkv",
                                                            "linear_proj")):
                    name = name.replace(part, ".")
            param.copy_(weights[name])
    batch = mixed_batch()
    with torch.no_grad():
        a, b = shared(batch), mot(batch)
    assert (a.logits - b.logits).abs().max().item() <= 1e-6
    assert (a.velocity - b.velocity).abs().max().item() <= 1e-6


def _positions(batch):
    """Per row: latent positions, text positions before the row's first latent, text positions after it."""
    out = []
    for r in range(batch.batch_size):
        image = (batch.modality[r] == MODALITY_IMAGE) & (batch.document_ids[r] >= 0)
        text = (batch.modality[r] != MODALITY_IMAGE) & (batch.document_ids[r] >= 0)
        first = int(torch.nonzero(image)[0])
        idx = torch.arange(batch.seq_length)
        out.append((image, text & (idx < first), text & (idx > first)))
    return out


@pytest.mark.parametrize("what", ["linear_proj", "linear_qkv", "input_layernorm"])
def test_perturbing_image_attention_moves_only_what_it_should(what):
    """In the last layer: an image output projection changes only latent positions; image QKV or input norm changes
    latent positions and the text after them (which attends to their keys), never text before the first image."""
    model = perturbed(modality_attention=True)
    batch = mixed_batch()
    layout = AttentionLayout.from_batch(batch)
    hidden = {}
    model.decoder.final_layernorm.register_forward_hook(lambda m, args, out: hidden.__setitem__("h", args[0]))
    with torch.no_grad():
        model(batch, layout)
        before = hidden["h"].clone()
        module = getattr(model.decoder.layers[-1].self_attention if what.startswith("linear")
                         else model.decoder.layers[-1], what).image
        for p in module.parameters():
            p.add_(0.3)
        model(batch, AttentionLayout.from_batch(batch))
        after = hidden["h"]
    moved = (after - before).abs().amax(-1).transpose(0, 1) > 1e-6  # [b, s]
    for r, (image, early_text, late_text) in enumerate(_positions(batch)):
        assert moved[r][image].all() and not moved[r][early_text].any()
        if what == "linear_proj":
            assert not moved[r][late_text].any()
        else:
            assert moved[r][late_text].any()


def test_cached_generation_equals_recompute():
    from megafusion.inference.engine import Engine, Prompt
    from megafusion.inference.settings import GenerationConfig

    model = perturbed(modality_attention=True)
    prompts = [Prompt(parts=[[1, 20, 21, 22]], seed=1, force_image=True), Prompt(parts=[[1, 30]], seed=2)]
    settings = GenerationConfig(steps=2, max_new_tokens=4, temperature=0.9, cfg_scale=2.0)
    results = {}
    for cache in (True, False):
        engine = Engine(model, vocab_size=200, context_length=160, use_cache=cache)
        results[cache] = engine.generate(prompts, settings)
    for a, b in zip(results[True], results[False]):
        assert a.tokens == b.tokens
        for x, y in zip(a.media, b.media):
            assert (x - y).abs().max().item() <= 1e-4


def test_sequence_parallel_is_refused():
    from megafusion.config import load_config

    with pytest.raises(ValueError, match="modality_attention"):
        load_config("tiny", ["model.modality_attention=true", "parallel.tensor_model_parallel_size=2",
                             "parallel.sequence_parallel=true"])
