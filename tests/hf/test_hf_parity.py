"""megafusion.hf: the plain-PyTorch transformers model equals megafusion's MultimodalModel (fp32, CPU) on a mixed
packed batch for every model variant; the state-dict adapter round-trips bit for bit and names what is wrong; the
attention hook path equals the masked-SDPA path; config <-> overrides round-trip; the exported files are
self-contained."""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest
import torch

from distributed import megatron_cpu_single_process
from megafusion.config.loading import load_config
from megafusion.hf import MegafusionConfig, MegafusionForMultimodalLM, register
from megafusion.hf.adapter import MegafusionStateDictAdapter, hf_config_from_megafusion, model_overrides_from_hf
from megafusion.hf.modeling_megafusion import build_attention_mask
from mixed_batch import SEQ, hf_inputs, mixed_batch
from tiny_model import tiny_config, tiny_model

TOL = 1e-5
MOE = dict(num_experts=4, ffn_hidden_size=32, router_topk=2)
CASES = {
    "modality_ffn_gqa": {},
    "shared_ffn": dict(modality_ffn=False),
    "tied_embeddings": dict(share_embeddings_and_output_weights=True),
    "mha": dict(num_query_groups=None),
    "moe_image": dict(moe=dict(MOE, modalities=["image"])),
    "moe_text": dict(moe=dict(MOE, modalities=["text"])),
    "moe_top1": dict(moe=dict(MOE, router_topk=1)),
    "moe_bias": dict(moe=dict(MOE, modalities=["image"]), add_bias_linear=True),
    "gelu_bias_layernorm": dict(activation="gelu", add_bias_linear=True, normalization="LayerNorm"),
    "sincos2d": dict(patch_position_embedding="sincos2d"),
    "hide_noised": dict(hide_noised_latents=True),
    "segmented_backend": dict(attention_backend="segmented"),
    "mixture_of_transformers": dict(modality_attention=True),
    "mot_moe_gelu_layernorm": dict(modality_attention=True, moe=dict(MOE, modalities=["image"]), activation="gelu",
                                   add_bias_linear=True, normalization="LayerNorm"),
}


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    with megatron_cpu_single_process():
        yield


def megafusion_model(**fields):
    """tiny_model with every parameter perturbed, so biases and norm weights are not their 0 / 1 init."""
    fields.setdefault("attention_backend", "dense")
    model = tiny_model(seed=0, **fields)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def convert(model, fields) -> MegafusionForMultimodalLM:
    hf_config = hf_config_from_megafusion(tiny_config(**fields))
    adapter = MegafusionStateDictAdapter(hf_config)
    hf = MegafusionForMultimodalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(adapter.to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if hf_config.tie_word_embeddings else [])
    return hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_model_equals_megafusion(case):
    fields = dict(CASES[case])
    model = megafusion_model(**fields)
    hf = convert(model, fields)
    batch = mixed_batch()
    with torch.no_grad():
        ours = model(batch)
        theirs = hf(**hf_inputs(batch))
    logits_diff = (theirs.logits - ours.logits.transpose(0, 1)).abs().max().item()
    velocity_diff = (theirs.velocity - ours.velocity).abs().max().item()
    print(f"\n{case}: max |logits diff| {logits_diff:.2e}, max |velocity diff| {velocity_diff:.2e}")
    assert theirs.logits.shape == (2, SEQ, 256) and theirs.velocity.shape == ours.velocity.shape
    assert logits_diff <= TOL and velocity_diff <= TOL


@pytest.mark.parametrize("case", ["modality_ffn_gqa", "moe_bias", "gelu_bias_layernorm", "tied_embeddings",
                                  "mot_moe_gelu_layernorm"])
def test_state_dict_round_trip_is_bit_identical(case):
    model = megafusion_model(**CASES[case])
    adapter = MegafusionStateDictAdapter(hf_config_from_megafusion(tiny_config(**CASES[case])))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    assert adapter.megatron_names() == list(sd)
    back = adapter.from_hf_state_dict(adapter.to_hf_state_dict(sd))
    assert list(back) == list(sd)
    for name, tensor in sd.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_adapter_name_counts_and_skips():
    adapter = MegafusionStateDictAdapter(hf_config_from_megafusion(tiny_config(moe=dict(MOE, modalities=["image"]))))
    assert len(adapter.hf_names("decoder.layers.1.self_attention.linear_qkv.weight")) == 3
    assert adapter.hf_names("decoder.layers.0.mlp.text.linear_fc1.weight") == [
        "model.layers.0.mlp.text.gate_proj.weight", "model.layers.0.mlp.text.up_proj.weight"]
    assert adapter.hf_names("decoder.layers.0.mlp.image.experts.local_experts.3.linear_fc2.weight") == [
        "model.layers.0.mlp.image.experts.3.down_proj.weight"]
    assert adapter.hf_names("decoder.layers.0.mlp.image.router.weight") == ["model.layers.0.mlp.image.router.weight"]
    assert adapter.hf_names("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") == [
        "model.layers.0.input_layernorm.weight"]  # the sharded state dict's name of the same norm
    assert adapter.hf_names("output_layer._extra_state") == []
    for bad in ("decoder.layers.2.input_layernorm.weight", "decoder.layers.0.mlp.text.router.weight",
                "decoder.layers.0.mlp.image.experts.local_experts.4.linear_fc1.weight", "embedding.nonsense"):
        with pytest.raises(ValueError, match="layer 2|experts|expert 4|not a megafusion"):
            adapter.hf_names(bad)


def test_from_hf_state_dict_names_missing_and_unexpected():
    model = megafusion_model()
    adapter = MegafusionStateDictAdapter(hf_config_from_megafusion(tiny_config()))
    hf_sd = adapter.to_hf_state_dict(model.state_dict())
    del hf_sd["model.layers.1.self_attn.k_proj.weight"]
    hf_sd["model.layers.1.self_attn.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.self_attn.k_proj.weight'\], "
                                         r"unexpected \['model.layers.1.self_attn.bogus.weight'\]"):
        adapter.from_hf_state_dict(hf_sd)


def test_wrong_shape_names_tensor_and_both_shapes():
    adapter = MegafusionStateDictAdapter(hf_config_from_megafusion(tiny_config()))  # 4 heads, 2 groups, d=16
    q, kv = torch.zeros(64, 64), torch.zeros(32, 64)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert adapter.from_hf(name, {"model.layers.0.self_attn.q_proj.weight": q,
                                  "model.layers.0.self_attn.k_proj.weight": kv,
                                  "model.layers.0.self_attn.v_proj.weight": kv}).shape == (128, 64)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(16, 64\) but the "
                                         r"config expects \(32, 64\)"):
        adapter.from_hf(name, {"model.layers.0.self_attn.q_proj.weight": q,
                               "model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64),
                               "model.layers.0.self_attn.v_proj.weight": kv})
    with pytest.raises(ValueError, match=r"embedding.word_embeddings.weight has shape \(200, 64\) but the config "
                                         r"expects \(256, 64\)"):
        adapter.to_hf("embedding.word_embeddings.weight", torch.zeros(200, 64))


def test_attention_hook_path_equals_default_path():
    model = megafusion_model(hide_noised_latents=True)
    hf = convert(model, dict(hide_noised_latents=True))
    batch = mixed_batch(seed=1)
    mask = build_attention_mask(batch.block_ids, batch.context_start, batch.document_ids >= 0, batch.noised, True)
    layers = []

    def hook(layer_number, q, k, v, scale):
        layers.append(layer_number)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                enable_gqa=q.shape[1] != k.shape[1])

    with torch.no_grad():
        plain = hf(**hf_inputs(batch))
        hooked = hf(**hf_inputs(batch), attention_hook=hook)
        last = hf(**hf_inputs(batch), logit_positions=torch.tensor([3, 17]))
    assert layers == [1, 2]
    assert torch.equal(plain.logits, hooked.logits) and torch.equal(plain.velocity, hooked.velocity)
    torch.testing.assert_close(last.logits[:, 0], plain.logits[torch.arange(2), torch.tensor([3, 17])], atol=1e-6,
                               rtol=0)


def test_hf_model_trains():
    hf = convert(megafusion_model(moe=dict(MOE)), dict(moe=dict(MOE))).train()
    out = hf(**hf_inputs(mixed_batch()))
    (out.logits.square().mean() + out.velocity.square().mean()).backward()
    assert all(p.grad is not None for n, p in hf.named_parameters() if ".experts." not in n)


@pytest.mark.parametrize("case", ["moe_top1", "gelu_bias_layernorm", "hide_noised", "mixture_of_transformers"])
def test_config_overrides_round_trip(case):
    cfg = tiny_config(**CASES[case])
    hf_config = hf_config_from_megafusion(cfg)
    assert load_config(None, model_overrides_from_hf(hf_config)).model == cfg.model
    # without the stored section the HF fields alone rebuild an equivalent model
    derived = MegafusionConfig(**{**hf_config.to_dict(), "megafusion_model": None})
    rebuilt = hf_config_from_megafusion(load_config(None, model_overrides_from_hf(derived)))
    skip = {"megafusion_model", "transformers_version"}
    assert {k: v for k, v in rebuilt.to_dict().items() if k not in skip} == {
        k: v for k, v in hf_config.to_dict().items() if k not in skip}


def test_config_validation_and_registration():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        MegafusionConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_act='gelu' with gated_mlp=True"):
        MegafusionConfig(hidden_act="gelu")
    with pytest.raises(ValueError, match="moe_topk=5"):
        MegafusionConfig(moe_num_experts=4, moe_topk=5)
    assert MegafusionConfig(latent_channels=4, patch_size=2).patch_dim == 16
    register()
    register()  # idempotent
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("megafusion", num_hidden_layers=1)
    assert isinstance(AutoModel.from_config(config), MegafusionForMultimodalLM)


def test_exported_files_are_self_contained():
    """configuration_ and modeling_megafusion.py are copied into exported folders: only stdlib, torch,
    transformers and the sibling file may be imported."""
    import megafusion.hf as package

    folder = os.path.dirname(package.__file__)
    for name in ("configuration_megafusion.py", "modeling_megafusion.py"):
        tree = ast.parse(open(os.path.join(folder, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = ["." + (node.module or "")] if node.level else [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in {"__future__", "math", "dataclasses", "typing", "torch", "transformers",
                                ".configuration_megafusion"}, (name, root)


def test_text_only_defaults():
    hf = MegafusionForMultimodalLM(MegafusionConfig(vocab_size=256, num_hidden_layers=1)).eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        out = hf(ids)
        prefix = hf(ids[:, :5])
    assert out.velocity.shape == (0, 16)
    torch.testing.assert_close(out.logits[:, :5], prefix.logits, atol=1e-6, rtol=0)  # causal
    with pytest.raises(ValueError, match=r"modality has shape \(2, 8\), expected input_ids' shape"):
        hf(ids, modality=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="block_ids is required"):
        hf(ids, modality=torch.ones(2, 9, dtype=torch.long))


def test_dataclass_section_is_plain():
    cfg = tiny_config(moe=dict(MOE))
    section = hf_config_from_megafusion(cfg).megafusion_model
    assert section == dataclasses.asdict(cfg.model) and isinstance(section["moe"]["modalities"], list)
