"""megafusion.training.optimizer: AdamW through megatron, weight-decay groups, warmup + cosine LR schedule; and
megafusion.parallel.initialize's single-process path (single process, CPU)."""

import math

import pytest
import torch
import torch.distributed as dist
from parallel_harness import build_gpt, transformer_config

from megafusion.config.schema import Config, OptimizerConfig, ParallelConfig, TrainingConfig
from megafusion.parallel import cpu_compat
from megafusion.parallel.initialize import check_layout, destroy_parallel, initialize_parallel, resolve_backend
from megafusion.parallel.wrapping import wrap_model
from megafusion.training.optimizer import build_lr_scheduler, build_optimizer, expected_lr


@pytest.fixture
def one_rank():
    was_enabled = cpu_compat.cpu_compat_enabled()
    had_group = dist.is_initialized()
    info = initialize_parallel(ParallelConfig(), seed=3)
    yield info
    destroy_parallel()
    assert dist.is_initialized() == had_group  # only a group initialize_parallel created is destroyed
    if not was_enabled:
        cpu_compat.disable_cpu_compat()


def _cfg(**optimizer):
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.1)
    base.update(optimizer)
    return Config(optimizer=OptimizerConfig(**base), parallel=ParallelConfig(use_distributed_optimizer=False),
                  training=TrainingConfig(precision="fp32"))


def _wrapped_model(cfg):
    def provider(pre, post, vp):
        tc = transformer_config(cfg, num_layers=2)
        tc.add_bias_linear = True  # biases present, to check their group
        model = build_gpt(tc, pre, post, vp)
        return model

    return wrap_model(provider, cfg)


def _groups_by_param(optimizer):
    """id(param) -> (lr, weight_decay) of its group after the scheduler set them."""
    out = {}
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                out[id(p)] = (group["lr"], group["weight_decay"])
    return out


def test_initialize_single_process(one_rank):
    info = one_rank
    assert (info.world_size, info.dp_size, info.tp_size, info.pp_size, info.ep_size) == (1, 1, 1, 1, 1)
    assert info.backend == "gloo" and info.device.type == "cpu" and info.is_first_stage and info.is_last_stage
    assert cpu_compat.cpu_compat_enabled()
    from megatron.core import parallel_state as ps

    assert ps.model_parallel_is_initialized()


def test_layout_validation_names_the_fields():
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        check_layout(ParallelConfig(tensor_model_parallel_size=4), world_size=2)
    with pytest.raises(ValueError, match="expert_model_parallel_size"):
        check_layout(ParallelConfig(expert_model_parallel_size=2, tensor_model_parallel_size=2), world_size=2)
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size"):
        check_layout(ParallelConfig(virtual_pipeline_model_parallel_size=2), world_size=2)
    assert check_layout(ParallelConfig(pipeline_model_parallel_size=2), world_size=4) == 2
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="distributed_backend=nccl"):
            resolve_backend("nccl")


def test_lr_schedule_warmup_then_cosine(one_rank):
    cfg = _cfg(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    optimizer = build_optimizer(cfg, _wrapped_model(cfg))
    scheduler = build_lr_scheduler(cfg, optimizer, total_steps=110)
    # step: closed form written out by hand (warmup 0 -> lr over 10 steps, cosine to min_lr at step 110)
    expected = {
        0: 0.0,
        5: 0.5e-3,
        10: 1e-3,
        60: 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4,  # = 5.5e-4, half-way through the decay
        85: 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.75)) * 9e-4,
        110: 1e-4,
        150: 1e-4,  # past the end: min_lr
    }
    done = 0
    for step in sorted(expected):
        scheduler.step(step - done)
        done = step
        lrs = {lr for lr, _ in _groups_by_param(optimizer).values()}
        assert len(lrs) == 1, lrs
        assert lrs.pop() == pytest.approx(expected[step], rel=1e-9, abs=1e-15), f"step {step}"
        assert expected_lr(cfg, step, 110) == pytest.approx(expected[step], rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_lr_scheduler(cfg, optimizer, total_steps=5)


def test_adamw_and_default_weight_decay_groups(one_rank):
    cfg = _cfg()
    chunks = _wrapped_model(cfg)
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_lr_scheduler(cfg, optimizer, total_steps=100)
    scheduler.step(1)
    inner = optimizer.chained_optimizers[0]
    assert isinstance(inner.optimizer, torch.optim.AdamW)  # decoupled weight decay
    groups = _groups_by_param(optimizer)
    seen = set()
    for name, p in chunks[0].named_parameters():
        _, wd = groups[id(p)]
        no_decay = p.dim() == 1 or name.endswith(".bias") or "embedding" in name
        assert wd == (0.0 if no_decay else 0.1), name
        seen.add("norm" if "layernorm" in name else "bias" if name.endswith(".bias") else
                 "embedding" if "embedding" in name else "matrix")
    assert seen == {"norm", "bias", "embedding", "matrix"}
    # the untied LM head is a linear layer: decayed
    out = dict(chunks[0].named_parameters())["module.output_layer.weight"]
    assert groups[id(out)][1] == 0.1


def test_weight_decay_switches(one_rank):
    cfg = _cfg(decay_embeddings=True)
    chunks = _wrapped_model(cfg)
    optimizer = build_optimizer(cfg, chunks)
    build_lr_scheduler(cfg, optimizer, total_steps=100).step(1)
    groups = _groups_by_param(optimizer)
    for name, p in chunks[0].named_parameters():
        expect = 0.0 if (p.dim() == 1 or name.endswith(".bias")) else 0.1
        assert groups[id(p)][1] == expect, name

    cfg = _cfg(decay_embeddings=True, decay_norms_and_biases=True)
    chunks = _wrapped_model(cfg)
    optimizer = build_optimizer(cfg, chunks)
    build_lr_scheduler(cfg, optimizer, total_steps=100).step(1)
    assert {wd for _, wd in _groups_by_param(optimizer).values()} == {0.1}


def test_build_optimizer_needs_ddp_chunks(one_rank):
    cfg = _cfg()
    bare = build_gpt(transformer_config(cfg, num_layers=2))
    with pytest.raises(TypeError, match="wrap_model"):
        build_optimizer(cfg, [bare])


def _groups_with_eps(optimizer):
    out = {}
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                out[id(p)] = (group["lr"], group["weight_decay"], group["eps"])
    return out


def test_per_module_groups_and_depth_factor(one_rank):
    """optimizer.groups: each kind of parameter gets its lr multiplier (the whole schedule), weight decay and
    epsilon; transformer layer l of L also gets depth_lr_decay^(l / (L-1)); the decay switches still exempt
    norms, biases and embeddings."""
    from megafusion.config.schema import ParamGroupConfig, ParamGroupsConfig
    from megafusion.training.optimizer import param_kind

    groups = ParamGroupsConfig(embedding=ParamGroupConfig(lr_mult=3.0, eps=1e-6),
                               unembedding=ParamGroupConfig(lr_mult=0.5, weight_decay=0.2),
                               attention=ParamGroupConfig(weight_decay=0.05), mlp=ParamGroupConfig(eps=1e-7),
                               norm=ParamGroupConfig(lr_mult=2.0), depth_lr_decay=0.25)
    cfg = _cfg(groups=groups)
    chunks = _wrapped_model(cfg)
    optimizer = build_optimizer(cfg, chunks)
    build_lr_scheduler(cfg, optimizer, total_steps=100).step(5)
    warm = 1e-3 * 5 / 10
    got = _groups_with_eps(optimizer)
    kinds = set()
    for name, p in chunks[0].named_parameters():
        kind = param_kind(name)
        kinds.add(kind)
        g = getattr(groups, kind)
        layer = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else None
        mult = g.lr_mult * (0.25 ** layer if layer is not None else 1.0)
        no_decay = p.dim() == 1 or name.endswith(".bias") or kind == "embedding"
        wd = 0.0 if no_decay else (g.weight_decay if g.weight_decay is not None else 0.1)
        lr, got_wd, eps = got[id(p)]
        assert lr == pytest.approx(warm * mult, rel=1e-12), name
        assert got_wd == pytest.approx(wd, rel=1e-12), name
        assert eps == (g.eps if g.eps is not None else 1e-8), name
    assert kinds == {"embedding", "unembedding", "attention", "mlp", "norm"}


def test_per_module_groups_are_validated():
    from megafusion.config import load_config

    with pytest.raises(ValueError, match=r"optimizer\.groups\.mlp\.lr_mult"):
        load_config("tiny", ["optimizer.groups.mlp.lr_mult=0"])
    with pytest.raises(ValueError, match=r"optimizer\.groups\.norm\.weight_decay needs optimizer\.weight_decay > 0"):
        load_config("tiny", ["optimizer.weight_decay=0", "optimizer.groups.norm.weight_decay=0.1"])
    with pytest.raises(ValueError, match=r"optimizer\.groups\.depth_lr_decay"):
        load_config("tiny", ["optimizer.groups.depth_lr_decay=-1"])
