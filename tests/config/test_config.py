import pytest

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
    child.write_text("defaults: base.yaml\nmodel:\n  hidden_size: 96\n  num_attention_heads: 6\n  num_query_groups: 3\n")
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
    assert load_config("tiny", ["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2"])
