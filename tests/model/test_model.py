"""MultimodalModel on one CPU process: parity with megatron's GPTModel, modality FFN routing, gradients, recompute,
sharded state dict, patchify helpers."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from distributed import megatron_single_process
from megafusion.config.schema import Config, DataConfig, ModelConfig, TrainingConfig
from megafusion.data.batch import MODALITY_IMAGE, Batch
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.model import ModelOutput, MultimodalModel, patchify, unpatchify
from megafusion.model.transformer_config import build_transformer_config

VOCAB, SEQ, BATCH = 200, 96, 2


@pytest.fixture(scope="module", autouse=True)
def _megatron_single_process():
    with megatron_single_process():
        yield


def make_config(backend="dense", recompute="none", precision="fp32", cpu_init=True, **model):
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  vocab_size=VOCAB, latent_channels=4, latent_size=4, patch_size=2, attention_backend=backend,
                  transformer_impl="local")
    fields.update(model)
    cfg = Config(model=ModelConfig(**fields), data=DataConfig(seq_length=SEQ),
                 training=TrainingConfig(precision=precision, recompute=recompute))
    return build_transformer_config(cfg, use_cpu_initialization=cpu_init)


def build(config, seed=0) -> MultimodalModel:
    torch.manual_seed(seed)
    return MultimodalModel(config)


def text_batch(b=BATCH, s=SEQ, seed=0, patch_dim=16) -> Batch:
    """One whole document per row, no padding: the case where megafusion's mask is plain causal attention."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(16, VOCAB, (b, s), generator=g)
    zeros = torch.zeros(b, s, dtype=torch.long)
    return Batch(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(b, s), modality=zeros,
                 block_ids=zeros - 1, document_ids=zeros, context_start=zeros, noised=zeros.bool(),
                 latents=torch.zeros(0, patch_dim), noisy_latents=torch.zeros(0, patch_dim), latent_t=torch.zeros(0),
                 ).validate()


def mixed_batch(config, b=BATCH, seed=0, kind="mixed") -> Batch:
    """Synthetic interleaved documents with flow-matching inputs filled in (random t, z_t, noised rows)."""
    spec = SyntheticSpec(VOCAB, SEQ, config.patch_dim, (config.latent_size // config.patch_size) ** 2, kind=kind)
    batch = SyntheticDocuments(spec, seed=seed).batch(b)
    g = torch.Generator().manual_seed(seed)
    n = batch.num_latent_positions
    t = torch.rand(n, generator=g)
    noise = torch.randn(n, config.patch_dim, generator=g)
    z_t = t[:, None] * batch.latents + (1 - t[:, None]) * noise
    noised = batch.noised[batch.image_positions]
    return batch.replace(noisy_latents=torch.where(noised[:, None], z_t, batch.latents),
                         latent_t=torch.where(noised, t, torch.ones_like(t)),
                         velocity_target=batch.latents - noise, fm_loss_mask=noised.float()).validate()


def loss_of(out: ModelOutput, batch: Batch) -> torch.Tensor:
    logits = out.logits.transpose(0, 1).float()  # [b, s, V]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), reduction="none")
    ce = (ce * batch.loss_mask.reshape(-1)).sum()
    fm = ((out.velocity - batch.velocity_target) ** 2).mean(1) if batch.velocity_target is not None else out.velocity
    return ce + (fm * batch.fm_loss_mask).sum() if batch.fm_loss_mask is not None else ce


# ---------------------------------------------------------------------------------------------- peer parity
class CausalSDPA(MegatronModule):
    """GPTModel's core attention in the parity test: plain causal SDPA with grouped-query heads, the CPU stand-in for
    megatron's DotProductAttention (whose constructor and dropout path need CUDA)."""

    def __init__(self, config, layer_number, attn_mask_type=None, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        self.scale = softmax_scale or config.kv_channels ** -0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, nq, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * d)


@contextlib.contextmanager
def cpu_compat():
    """GPTModel's RotaryEmbedding.get_emb calls torch.cuda.current_device(); megafusion's CPU adapter covers it."""
    from megafusion.parallel.cpu_compat import disable_cpu_compat, enable_cpu_compat

    active = enable_cpu_compat()
    try:
        yield
    finally:
        if active:
            disable_cpu_compat()


def test_text_only_logits_equal_megatron_gpt_model():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = make_config(modality_ffn=False)
    model = build(config).eval()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = CausalSDPA
    gpt = GPTModel(config, spec, vocab_size=config.padded_vocab_size, max_sequence_length=SEQ,
                   position_embedding_type="rope", rotary_base=int(config.rotary_base)).eval()
    ours = model.state_dict()
    missing = [k for k in gpt.state_dict() if k not in ours]
    assert not missing, f"GPTModel parameters without a megafusion counterpart: {missing}"
    gpt.load_state_dict({k: ours[k] for k in gpt.state_dict()})

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # megatron's RoPE follows CUDA if present
    model, gpt = model.to(device), gpt.to(device)
    batch = text_batch().to(device)
    with torch.no_grad(), cpu_compat():
        reference = gpt(input_ids=batch.tokens, position_ids=None, attention_mask=None)  # [b, s, V]
    with torch.no_grad():
        logits = model(batch).logits  # [s, b, V]
    assert logits.shape == (SEQ, BATCH, config.padded_vocab_size)
    assert (logits.transpose(0, 1) - reference).abs().max().item() <= 1e-5


def test_padded_vocab_follows_megatron_convention():
    config = make_config()
    assert config.padded_vocab_size == 256  # 200 rounded up to 128 * TP(1)
    model = build(config)
    assert model.embedding.word_embeddings.weight.shape[0] == 256
    assert model.output_layer.weight.shape[0] == 256


def test_tied_lm_head_uses_the_word_embedding():
    model = build(make_config(share_embeddings_and_output_weights=True))
    assert model.output_layer.weight is None
    batch = mixed_batch(model.config)
    hidden = {}
    model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    out = model(batch)
    expected = hidden["h"] @ model.embedding.word_embeddings.weight.t()
    assert torch.allclose(out.logits, expected, atol=1e-5)
    loss_of(out, batch).backward()
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.skipif(importlib.util.find_spec("megafusion.model.attention.segmented") is None,
                    reason="megafusion/model/attention/segmented.py is not written yet")
def test_segmented_backend_matches_dense():
    dense = build(make_config(backend="dense"))
    segmented = build(make_config(backend="segmented"))
    segmented.load_state_dict(dense.state_dict())
    batch = mixed_batch(dense.config)
    outs = [m(batch) for m in (dense, segmented)]
    assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
    assert torch.allclose(outs[0].velocity, outs[1].velocity, atol=1e-5)
    for m, o in zip((dense, segmented), outs):
        loss_of(o, batch).backward()
    for (name, a), b in zip(dense.named_parameters(), segmented.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


# ---------------------------------------------------------------------------------------------- modality FFN
def test_identical_modality_ffns_equal_shared_ffn_model():
    shared = build(make_config(modality_ffn=False)).eval()
    split = build(make_config(modality_ffn=True)).eval()
    state = {}
    for name, value in shared.state_dict().items():
        if ".mlp." in name:
            state[name.replace(".mlp.", ".mlp.text.")] = value
            state[name.replace(".mlp.", ".mlp.image.")] = value
        else:
            state[name] = value
    split.load_state_dict(state)
    batch = mixed_batch(split.config)
    with torch.no_grad():
        a, b = shared(batch), split(batch)
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.velocity, b.velocity, atol=1e-6)


def test_last_layer_modality_ffn_only_touches_its_positions():
    model = build(make_config()).eval()
    batch = mixed_batch(model.config)
    image = batch.image_positions.transpose(0, 1)  # [s, b]
    with torch.no_grad():
        base = model(batch)
        for p in model.decoder.layers[-1].mlp.image.parameters():
            p.add_(0.5)
        after_image = model(batch)
        for p in model.decoder.layers[-1].mlp.text.parameters():
            p.add_(0.5)
        after_both = model(batch)
    text_changed = (after_image.logits - base.logits).abs().amax(-1)
    assert text_changed[~image].max() == 0, "perturbing the image FFN changed logits at text positions"
    assert (after_image.velocity - base.velocity).abs().min(1).values.gt(0).all()
    assert (after_both.logits - after_image.logits).abs().amax(-1)[~image].gt(0).all()
    assert torch.equal(after_both.velocity, after_image.velocity), "perturbing the text FFN changed the velocity"


# ---------------------------------------------------------------------------------------------- training path
def test_output_shapes_and_every_parameter_gets_a_gradient():
    model = build(make_config())
    batch = mixed_batch(model.config)
    assert batch.fm_loss_mask.sum() > 0 and (batch.modality == MODALITY_IMAGE).any()
    out = model(batch)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (SEQ, BATCH, model.config.padded_vocab_size)
    assert out.velocity.shape == batch.latents.shape
    loss_of(out, batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_text_only_batch_still_touches_every_parameter():
    """Branches run even with zero rows, so DDP hooks and TP/EP collectives fire on every rank every step."""
    model = build(make_config())
    batch = text_batch(patch_dim=model.config.patch_dim)
    out = model(batch)
    assert out.velocity.shape == (0, model.config.patch_dim)
    (loss_of(out, batch) + 0 * out.velocity.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_velocity_rows_follow_batch_latent_order():
    """Row j of the velocity is computed from latent position j in row-major (b, s) order: changing one latent row's
    input changes that velocity row first of all (its own position), checked via the embedding's scatter."""
    model = build(make_config()).eval()
    batch = mixed_batch(model.config, kind="image")
    layout = model.build_layout(batch)
    with torch.no_grad():
        hidden = model.embedding(batch, layout)  # [s, b, h]
        b_idx, s_idx = torch.nonzero(batch.image_positions, as_tuple=True)
        expected = model.embedding.patch_embed(batch.noisy_latents)
        noised = batch.noised[batch.image_positions]
        expected = expected + model.embedding.timestep_embed(batch.latent_t) * noised[:, None]
        assert torch.allclose(hidden[s_idx, b_idx], expected, atol=1e-6)
        text = ~batch.image_positions
        words = model.embedding.word_embeddings(batch.tokens)
        assert torch.allclose(hidden.transpose(0, 1)[text], words[text])


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_matches_plain_forward_backward(recompute, monkeypatch):
    """The AttentionLayout must survive megatron's CheckpointFunction (selective: core attention; full: layers)."""
    from megatron.core import tensor_parallel

    calls = []
    original = tensor_parallel.checkpoint
    monkeypatch.setattr(tensor_parallel, "checkpoint", lambda *a: calls.append(a[0]) or original(*a))
    plain = build(make_config())
    recomputed = build(make_config(recompute=recompute))
    recomputed.load_state_dict(plain.state_dict())
    if recompute == "selective":  # also recompute the MLP (megatron passes padding_mask via functools.partial)
        for layer in recomputed.decoder.layers:
            layer.recompute_mlp = True
    batch = mixed_batch(plain.config)
    with cpu_compat():  # megatron's CheckpointFunction saves CUDA RNG states; the adapter maps them to the CPU
        losses = []
        for model in (plain, recomputed):
            model.train()
            loss = loss_of(model(batch), batch)
            loss.backward()
            losses.append(loss.detach())
    expected = 2 * plain.config.num_layers if recompute == "selective" else plain.config.num_layers
    assert len(calls) == expected, f"{len(calls)} checkpointed calls, expected {expected}"
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_sharded_state_dict_covers_every_parameter():
    """dist_checkpointing sees every parameter, with megatron's layer-stacked keys and the SwiGLU fc1 factory for
    both modality FFNs."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    model = build(make_config())
    sharded = model.sharded_state_dict()
    for name, param in model.named_parameters():
        entry = sharded.get(name)
        assert isinstance(entry, (ShardedTensor, ShardedTensorFactory)), f"{name} missing from sharded_state_dict"
        assert entry.data is param, name
    for modality in ("text", "image"):
        entry = sharded[f"decoder.layers.1.mlp.{modality}.linear_fc1.weight"]
        assert isinstance(entry, ShardedTensorFactory) and entry.key == f"decoder.layers.mlp.{modality}.linear_fc1.weight"
    assert sharded["decoder.layers.0.input_layernorm.weight"].key == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"


def test_dist_checkpointing_round_trip(tmp_path):
    from megatron.core import dist_checkpointing

    saved, restored = build(make_config(), seed=0), build(make_config(), seed=1)
    with cpu_compat():  # the torch_dist writer calls torch.cuda.synchronize
        dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
        restored.load_state_dict(dist_checkpointing.load(restored.sharded_state_dict(), str(tmp_path)))
    for (name, a), b in zip(saved.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_bf16_training_step_on_gpu(impl):
    from megatron.core import tensor_parallel

    from megafusion.model.attention.backends import transformer_engine_available

    if impl == "transformer_engine" and not transformer_engine_available():
        pytest.skip("transformer-engine is not installed")
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # GPU weight init draws from megatron's CUDA RNG tracker
    # megatron builds norms on the CPU and expects the caller to move the model (Megatron-LM's get_model does)
    model = MultimodalModel(make_config(precision="bf16", cpu_init=False, transformer_impl=impl)).cuda()
    assert next(model.parameters()).device.type == "cuda"
    batch = mixed_batch(model.config).to("cuda")
    out = model(batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert out.velocity.shape == batch.latents.shape and torch.isfinite(out.velocity).all()
    loss_of(out, batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------------------------- patchify
def test_patchify_layout_and_round_trip():
    c, h, w, p = 3, 6, 4, 2
    latent = torch.randn(2, c, h, w)
    patches = patchify(latent, p)
    assert patches.shape == (2, (h // p) * (w // p), c * p * p)
    # patch 1 is the second in raster order (row 0, column 1); its vector is (C, p, p) flattened
    assert torch.equal(patches[0, 1], latent[0, :, 0:p, p:2 * p].reshape(-1))
    assert torch.equal(patches[1, (w // p) + 0], latent[1, :, p:2 * p, 0:p].reshape(-1))
    assert torch.equal(unpatchify(patches, (c, h, w)), latent)
    with pytest.raises(ValueError, match="do not tile"):
        unpatchify(patches, (c, h + 2, w))
