import pytest
import torch

from megafusion.config import Config, load_config, to_yaml
from megafusion.config.loading import _read_yaml


def test_tiny_preset_and_overrides():
    cfg = load_config("tiny", ["model.num_layers=4", "training.train_steps=7"])
    assert isinstance(cfg, Config)
    assert cfg.model.num_layers == 4 and cfg.training.train_steps == 7
    assert cfg.model.patch_dim == cfg.model.latent_channels * cfg.model.patch_size**2


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.not_a_key=1", "model.not_a_key"),
        ("model.num_layers=abc", "model.num_layers"),
        ("model.patch_size=3", "patch_size"),
        ("objective.loss_weighting=magic", "objective.loss_weighting"),
        ("parallel.tensor_model_parallel_size=3", "tensor_model_parallel_size"),
        ("model", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        load_config("tiny", [override])


def test_unknown_preset_lists_presets():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no-such-preset")


def test_yaml_round_trip_and_defaults_chain(tmp_path):
    cfg = load_config("tiny")
    base = tmp_path / "base.yaml"
    base.write_text(to_yaml(cfg))
    child = tmp_path / "child.yaml"
    child.write_text("defaults: base.yaml\nmodel:\n  hidden_size: 96\n  num_attention_heads: 6\n"
                     "  num_query_groups: 3\n")
    again = load_config(str(child))
    assert again.model.hidden_size == 96 and again.model.num_layers == cfg.model.num_layers
    loop = tmp_path / "loop.yaml"
    loop.write_text("defaults: loop.yaml\n")
    with pytest.raises(ValueError, match="circular"):
        _read_yaml(str(loop))


def test_image_must_fit_sequence():
    with pytest.raises(ValueError, match="data.seq_length"):
        load_config("tiny", ["data.seq_length=8"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["parallel.sequence_parallel=true"], "tensor_model_parallel_size > 1"),
        (["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2", "data.seq_length=129"],
         "data.seq_length=129 must be divisible"),
    ],
)
def test_sequence_parallel_needs_tp_and_a_divisible_sequence(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config("tiny", overrides)
    cfg = load_config("tiny", ["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2"])
    assert cfg.parallel.sequence_parallel and cfg.data.seq_length % 2 == 0


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["parallel.expert_model_parallel_size=2"], "expert_model_parallel_size=2 needs MoE layers"),
        (["model.moe.num_experts=3", "parallel.expert_model_parallel_size=2"], "num_experts=3 is not divisible"),
        (["model.moe.num_experts=2", "model.moe.router_topk=3"], "router_topk=3 exceeds num_experts=2"),
        (["model.moe.modalities=[video]"], r"model\.moe\.modalities"),
        (["model.moe.token_dispatcher_type=flex"], r"model\.moe\.token_dispatcher_type"),
        (["model.moe.router_load_balancing_type=sinkhorn"], r"model\.moe\.router_load_balancing_type"),
        (["model.moe.num_experts=4", "model.modality_ffn=false"], r"model\.modality_ffn=true"),
        (["model.moe.num_experts=4", "parallel.tensor_model_parallel_size=2", "model.add_bias_linear=true"],
         r"model\.add_bias_linear=false"),
        (["model.moe.num_experts=4", "model.moe.expert_capacity_factor=0"], r"model\.moe\.expert_capacity_factor"),
        (["model.moe.num_experts=4", "model.moe.pad_expert_input_to_capacity=true"],
         r"needs model\.moe\.expert_capacity_factor"),
        (["model.moe.num_experts=4", "model.moe.router_enable_expert_bias=true"],
         r"router_score_function=sigmoid"),
        (["model.moe.num_experts=4", "model.moe.router_dtype=fp16"], r"model\.moe\.router_dtype"),
        (["model.moe.num_experts=4", "model.moe.token_drop_policy=random"], r"model\.moe\.token_drop_policy"),
        (["model.moe.num_experts=4", "model.moe.shared_expert_intermediate_size=0"],
         r"model\.moe\.shared_expert_intermediate_size"),
        (["model.moe.num_experts=4", "model.moe.grouped_gemm=true", "model.transformer_impl=local"],
         r"model\.moe\.grouped_gemm=false"),
    ],
)
def test_moe_settings_are_validated_by_field(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config("tiny", overrides)


def test_moe_maps_onto_megatron_fields():
    from megafusion.model.transformer_config import build_transformer_config

    dense = build_transformer_config(load_config("tiny"))
    assert dense.num_moe_experts is None and dense.moe_modalities == ()
    cfg = load_config("tiny", ["model.moe.num_experts=8", "model.moe.modalities=[image]", "model.moe.router_topk=1",
                               "model.moe.token_dispatcher_type=allgather", "parallel.expert_model_parallel_size=2"])
    config = build_transformer_config(cfg)
    assert (config.num_moe_experts, config.moe_modalities, config.moe_router_topk) == (8, ("image",), 1)
    assert config.moe_router_pre_softmax  # megatron requires it for top-1
    assert config.moe_ffn_hidden_size == config.ffn_hidden_size == 128  # experts default to the dense FFN width
    assert (config.moe_router_load_balancing_type, config.moe_aux_loss_coeff) == ("aux_loss", 1e-2)
    assert config.moe_token_dispatcher_type == "allgather" and config.expert_model_parallel_size == 2
    off = build_transformer_config(load_config("tiny", ["model.moe.num_experts=8",
                                                        "model.moe.router_load_balancing_type=none"]))
    assert off.moe_aux_loss_coeff == 0.0
    if not torch.cuda.is_available():  # auto resolves to local torch layers: no grouped GEMM
        with pytest.raises(ValueError, match="model.moe.grouped_gemm"):
            build_transformer_config(load_config("tiny", ["model.moe.num_experts=8", "model.moe.grouped_gemm=true"]))
