"""ModalityMLP: rows go to their modality's FFN and come back in place; biases are added inside; any submodule
returning (output, bias) can fill a modality's slot; with model.moe a modality's slot is megatron's MoE layer with
its own experts and router, which also runs (and balances nothing) on a batch without that modality's rows."""

from __future__ import annotations


import pytest
import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from distributed import megatron_cpu_single_process
from megafusion.config.schema import Config, DataConfig, ModelConfig, MoEConfig, TrainingConfig
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.model.attention.layout import AttentionLayout
from megafusion.model.modality_mlp import ModalityMLP
from megafusion.model.moe import ModalityRouter, aux_loss_tracker_name
from megafusion.model.specs import get_layer_spec, get_mlp_spec, get_modality_mlp_spec
from megafusion.model.transformer_config import build_transformer_config

SEQ, BATCH = 64, 3


@pytest.fixture(scope="module", autouse=True)
def _megatron_single_process():
    with megatron_cpu_single_process():
        yield


def moe(**fields):
    # allgather: with one expert-parallel rank a local permutation, on CPU tensors on any machine
    values = dict(num_experts=4, router_topk=2, ffn_hidden_size=16, token_dispatcher_type="allgather")
    values.update(fields)
    return MoEConfig(**values)


def make_config(**model):
    fields = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=128,
                  latent_channels=4, latent_size=4, patch_size=2, attention_backend="dense", transformer_impl="local")
    fields.update(model)
    cfg = Config(model=ModelConfig(**fields), data=DataConfig(seq_length=SEQ),
                 training=TrainingConfig(precision="fp32"))
    return build_transformer_config(cfg)


def make_layout(config, seed=0, kind="mixed"):
    spec = SyntheticSpec(config.vocab_size, SEQ, config.patch_dim, 4, kind=kind, fill=0.9)
    batch = SyntheticDocuments(spec, seed=seed).batch(BATCH)
    return AttentionLayout.from_batch(batch)


def build_mlp(config, **spec_kwargs) -> ModalityMLP:
    torch.manual_seed(0)
    return build_module(get_modality_mlp_spec(config, use_te=False, **spec_kwargs), config=config)


def reference(mlp: ModalityMLP, hidden: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """Each modality's FFN on the whole tensor, then pick per position: what routing must reproduce."""
    outs = []
    for module in (mlp.text, mlp.image):
        out, bias = module(hidden)
        outs.append(out + bias if bias is not None else out)
    image = (layout.modality.transpose(0, 1) == 1).unsqueeze(-1)  # [s, b, 1]
    return torch.where(image, outs[1], outs[0])


@pytest.mark.parametrize("bias, moe_config", [(False, MoEConfig()), (True, MoEConfig()), (False, moe())])
def test_rows_use_their_modality_ffn(bias, moe_config):
    """Dropless top-k routing is per token, so an MoE FFN applied to the whole tensor is a valid reference too."""
    config = make_config(add_bias_linear=bias, moe=moe_config)
    mlp = build_mlp(config)
    if bias:  # megatron zero-initialises biases; make them matter
        with torch.no_grad():
            for name, p in mlp.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    layout = make_layout(config)
    assert layout.has_latents and (layout.modality == 0).any()
    hidden = torch.randn(SEQ, BATCH, config.hidden_size)
    out, out_bias = mlp(hidden, padding_mask=layout)
    assert out_bias is None and out.shape == hidden.shape
    assert torch.allclose(out, reference(mlp, hidden, layout), atol=1e-6)


@pytest.mark.parametrize("moe_config", [MoEConfig(), moe(modalities=["image"]), moe()])
@pytest.mark.parametrize("perturbed", ["image", "text"])
def test_perturbing_one_modality_changes_only_its_rows(moe_config, perturbed):
    config = make_config(moe=moe_config)
    mlp = build_mlp(config)
    layout = make_layout(config)
    rows = layout.modality.transpose(0, 1) == (1 if perturbed == "image" else 0)  # [s, b]
    hidden = torch.randn(SEQ, BATCH, config.hidden_size)
    with torch.no_grad():
        base, _ = mlp(hidden, padding_mask=layout)
        for p in getattr(mlp, perturbed).parameters():  # MoE: router and experts
            p.mul_(1.5)
        after, _ = mlp(hidden, padding_mask=layout)
    changed = (after - base).abs().amax(-1) > 0
    assert torch.equal(changed, rows)


def test_gradients_reach_only_the_ffn_of_the_rows_in_the_loss():
    config = make_config()
    mlp = build_mlp(config)
    layout = make_layout(config)
    text = (layout.modality.transpose(0, 1) == 0).unsqueeze(-1)
    hidden = torch.randn(SEQ, BATCH, config.hidden_size, requires_grad=True)
    out, _ = mlp(hidden, padding_mask=layout)
    (out * text).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in mlp.text.parameters())
    assert all(p.grad.abs().sum() == 0 for p in mlp.image.parameters())
    assert hidden.grad[~text.expand_as(hidden)].abs().sum() == 0


def test_layout_is_required():
    config = make_config()
    mlp = build_mlp(config)
    with pytest.raises(TypeError, match="AttentionLayout"):
        mlp(torch.randn(SEQ, BATCH, config.hidden_size), padding_mask=None)


class RecordingFFN(MLP):
    """A stand-in for a later MoE image FFN: returns (output, bias) and records the padding mask it was given."""

    def forward(self, hidden_states, padding_mask=None, **kwargs):
        self.seen = (tuple(hidden_states.shape), padding_mask.clone())
        return super().forward(hidden_states)


def test_a_modality_slot_takes_any_output_bias_module():
    config = make_config()
    image_spec = get_mlp_spec(config, use_te=False)
    image_spec = ModuleSpec(module=RecordingFFN, submodules=image_spec.submodules)
    mlp = build_mlp(config, image=image_spec)
    layout = make_layout(config)
    out, _ = mlp(torch.randn(SEQ, BATCH, config.hidden_size), padding_mask=layout)
    n_image = int((layout.modality == 1).sum())
    shape, padding = mlp.image.seen
    assert shape == (1, n_image, config.hidden_size)
    assert padding.shape == (n_image, 1) and not padding.any()  # latent positions are never padding


def test_layer_spec_selects_modality_or_plain_ffn_and_shared_norm():
    with_modality = get_layer_spec(make_config(modality_ffn=True), use_te=False)
    plain = get_layer_spec(make_config(modality_ffn=False), use_te=False)
    assert with_modality.submodules.mlp.module is ModalityMLP
    assert plain.submodules.mlp.module is MLP
    assert "pre_mlp_layernorm." not in with_modality.submodules.sharded_state_dict_keys_map
    assert plain.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"


def test_moe_spec_per_modality():
    mlp = build_mlp(make_config(moe=moe(modalities=["image"])))
    assert type(mlp.text) is MLP and isinstance(mlp.image, MoELayer)
    assert isinstance(mlp.image.router, ModalityRouter) and mlp.image.router.modality == "image"
    assert len(mlp.image.experts.local_experts) == 4
    assert mlp.image.experts.local_experts[0].linear_fc1.weight.shape[0] == 2 * 16  # SwiGLU: gate and up


def test_moe_without_image_rows_runs_and_balances_only_text():
    """A text-only batch: the image MoE runs one padding row (every rank enters its collectives), the output and
    gradients match the text FFN alone, image experts get zero gradients and no balancing loss is recorded."""
    config = make_config(moe=moe(aux_loss_coeff=0.1))
    mlp = build_mlp(config)
    mlp.set_layer_number(1)
    layout = make_layout(config, kind="text")
    assert layout.modality_rows(1).numel() == 0
    clear_aux_losses_tracker()
    hidden = torch.randn(SEQ, BATCH, config.hidden_size, requires_grad=True)
    out, _ = mlp(hidden, padding_mask=layout)
    out.square().sum().backward()
    assert torch.isfinite(hidden.grad).all()
    assert all(p.grad is not None and not p.grad.any() for p in mlp.image.parameters())
    assert all(torch.isfinite(p.grad).all() for p in mlp.text.parameters())
    tracker = get_moe_layer_wise_logging_tracker()
    assert tracker[aux_loss_tracker_name("text")]["values"][0] >= 1.0  # the Switch loss is >= 1
    image = tracker.get(aux_loss_tracker_name("image"))
    assert image is None or not image["values"].any()
    assert torch.allclose(out, reference(mlp, hidden, layout), atol=1e-6)


@pytest.mark.parametrize("balancing, coeff", [("aux_loss", 0.1), ("aux_loss", 0.2), ("none", 0.1)])
def test_balancing_loss_reaches_router_gradients(balancing, coeff):
    """With no gradient from the output, the routers' gradients come from the balancing loss alone: coeff times
    the loss's gradient (megatron's MoEAuxLossAutoScaler; the schedule sets its scale, here 1)."""
    config = make_config(moe=moe(router_load_balancing_type=balancing, aux_loss_coeff=coeff))
    mlp = build_mlp(config)
    mlp.set_layer_number(1)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(()))
    out, _ = mlp(torch.randn(SEQ, BATCH, config.hidden_size), padding_mask=make_layout(config))
    (out * 0).sum().backward()
    for branch in (mlp.text, mlp.image):
        grad = branch.router.weight.grad
        if balancing == "none":
            assert not grad.any()
        else:
            assert grad.abs().sum() > 0
            per_unit = grad / coeff
            _GRAD_PER_COEFF.setdefault(branch.router.modality, per_unit)
            assert torch.allclose(per_unit, _GRAD_PER_COEFF[branch.router.modality], rtol=1e-5, atol=1e-9)


_GRAD_PER_COEFF = {}


def test_aux_loss_free_expert_bias_moves_towards_even_loads():
    """model.moe.router_enable_expert_bias: the routers count their tokens per expert in training, and megatron's
    update (what finalize_model_grads runs after every step) raises the bias of under-loaded experts."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    config = make_config(moe=moe(router_score_function="sigmoid", router_enable_expert_bias=True,
                                 router_load_balancing_type="none", router_bias_update_rate=0.1))
    mlp = build_mlp(config).train()
    layout = make_layout(config)
    hidden = torch.randn(layout.seq_length, layout.batch_size, config.hidden_size)
    mlp(hidden, padding_mask=layout)[0].sum().backward()
    router = mlp.image.router
    counts = router.local_tokens_per_expert.clone()
    assert counts.sum() > 0 and torch.equal(router.expert_bias, torch.zeros_like(router.expert_bias))
    _update_router_expert_bias([mlp], config)
    bias = router.expert_bias
    assert (bias[counts < counts.mean()] > 0).all() and (bias[counts > counts.mean()] < 0).all()


@pytest.mark.parametrize("moe_config", [MoEConfig(), moe(modalities=["text", "image", "audio"])])
def test_masked_diffusion_routes_text_image_and_audio_codes_to_their_own_ffn(moe_config):
    """The masked-diffusion family's discrete batch: every position is a token (modality TEXT); its FFN path is its
    discrete modality (AttentionLayout.route from Batch.token_modality), with a third FFN for audio codes."""
    import numpy as np

    from megafusion.config.schema import MaskedDiffusionConfig, ObjectiveConfig
    from megafusion.discrete.batch import discrete_batch
    from megafusion.discrete.vocab import AUDIO, IMAGE, TEXT, UnifiedVocab

    vocab = UnifiedVocab(60, 16, 8)
    md = MaskedDiffusionConfig(text_vocab_size=60, image_codebook_size=16, audio_codebook_size=8)
    cfg = Config(model=ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                                   vocab_size=vocab.size, transformer_impl="local", attention_backend="dense",
                                   moe=moe_config),
                 data=DataConfig(seq_length=24), objective=ObjectiveConfig(kind="masked_diffusion", loss_weighting="fixed",
                                                                           masked_diffusion=md),
                 training=TrainingConfig(precision="fp32"))
    config = build_transformer_config(cfg)
    assert config.ffn_modalities == ("text", "image", "audio")
    mlp = build_mlp(config)
    rows = [[vocab.document("image_text", [(TEXT, [1, 2]), (IMAGE, vocab.codes_to_ids(IMAGE, np.arange(6)))])],
            [vocab.document("audio_text", [(TEXT, [3]), (AUDIO, vocab.codes_to_ids(AUDIO, np.arange(5)))]),
             vocab.document("text", [(TEXT, [4, 5])])]]
    batch = discrete_batch(rows, 24, vocab)
    layout = AttentionLayout.from_batch(batch)
    hidden = torch.randn(24, 2, config.hidden_size)
    with torch.no_grad():
        out, _ = mlp(hidden, padding_mask=layout)
        outs = []
        for module in (mlp.text, mlp.image, mlp.audio):
            o, bias = module(hidden)
            outs.append(o)
        path = batch.token_modality.clamp(min=0).t()  # [s, b]
        expected = torch.stack(outs)[path, torch.arange(24)[:, None], torch.arange(2)[None, :]]
    assert torch.allclose(out, expected, atol=1e-6)
    assert {0, 1, 2} <= set(path.unique().tolist())
