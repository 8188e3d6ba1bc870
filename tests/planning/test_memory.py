"""The memory plan against measurements on CPU: the activation terms (megafusion/planning/activations.py) against
the bytes autograd actually saves in a forward pass, and the whole per-rank estimate against the resident memory a
real `megafusion train` run adds (tests/planning/measure_cpu_run.py); plus the layout arithmetic on GPU plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distributed import megatron_cpu_single_process
from megafusion.config import load_config
from megafusion.config.schema import Config, DataConfig, ModelConfig, MoEConfig, TrainingConfig
from megafusion.planning import make_plan
from megafusion.planning.activations import Profile, embedding_terms, head_terms, layer_terms

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CPU_RUN = ["model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=8", "model.num_query_groups=2",
           "model.ffn_hidden_size=768", "model.vocab_size=4096", "data.seq_length=512", "training.micro_batch_size=4",
           "training.global_batch_size=4", "training.train_steps=2", "optimizer.warmup_steps=1",
           "training.precision=fp32", "data.num_workers=0", "logging.tensorboard=false", "logging.peak_flops=1e12",
           "checkpoint.save_at_end=false"]


def _saved_bytes(cfg: Config, micro_batch: int):
    """Bytes of the distinct non-parameter storages autograd saves in one forward, by where they were saved:
    (embedding, one middle layer, after the last layer), and the batch's latent fraction."""
    from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
    from megafusion.model import MultimodalModel
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.objectives import noise_batch

    m = cfg.model
    with megatron_cpu_single_process():
        torch.manual_seed(0)
        model = MultimodalModel(build_transformer_config(cfg))
        spec = SyntheticSpec(m.vocab_size, cfg.data.seq_length, m.patch_dim, m.patches_per_frame)
        batch = noise_batch(SyntheticDocuments(spec, seed=0).batch(micro_batch), cfg.objective,
                            torch.Generator().manual_seed(0))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        scope, seen = ["embedding"], {}
        for i, layer in enumerate(model.decoder.layers):
            layer.register_forward_pre_hook(lambda mod, args, i=i: scope.__setitem__(0, f"layer{i}"))
            layer.register_forward_hook(lambda mod, args, out: scope.__setitem__(0, "heads"))

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen.setdefault(storage.data_ptr(), (scope[0], storage.nbytes()))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(batch)
    by = {}
    for where, nbytes in seen.values():
        by[where] = by.get(where, 0) + nbytes
    return by["embedding"], by["layer1"], by["heads"], float((batch.modality == 1).float().mean())


LAYERS = {
    "segmented, GQA": dict(),
    "segmented, MHA": dict(num_query_groups=8),
    "dense": dict(attention_backend="dense"),
    "GELU, one shared FFN": dict(activation="gelu", modality_ffn=False),
    "MoE top-2 of 4": dict(moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=128)),
    "selective recompute": dict(recompute="selective"),
    "Mixture-of-Transformers attention": dict(modality_attention=True),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_activation_terms_match_what_autograd_saves(name):
    options = dict(LAYERS[name])
    recompute = options.pop("recompute", "none")
    model = dict(num_layers=3, hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=512,
                 vocab_size=1024, latent_channels=4, latent_size=8, patch_size=2, attention_backend="segmented",
                 transformer_impl="local")
    model.update(options)
    cfg = Config(model=ModelConfig(**model), data=DataConfig(seq_length=256),
                 training=TrainingConfig(precision="fp32", recompute=recompute))
    embedding, layer, heads, latent = _saved_bytes(cfg, micro_batch=2)
    profile = Profile.resolve(cfg, "cpu")
    terms = layer_terms(cfg, profile, 1, False, latent, 2)
    if recompute == "selective":
        terms.pop("core"), terms.pop("scores", None)
    assert sum(terms.values()) == pytest.approx(layer, rel=0.06)
    assert embedding_terms(cfg, profile, 2, latent)["embedding"] == pytest.approx(embedding, rel=0.02)
    assert head_terms(cfg, profile, 1, False, 2, latent)["heads"] == pytest.approx(heads, rel=0.02)


def _measure(run_dir, overrides):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(HERE, "measure_cpu_run.py"), str(run_dir), *overrides],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2
    return result["peak"] - result["baseline"]


def test_estimate_of_a_cpu_training_run_is_within_25_percent_of_its_measured_peak(tmp_path):
    """The planner's per-rank total for a CPU run (fp32, segmented attention, no CUDA context) against the rise of
    the trainer's resident-memory high-water mark over two steps (measure_cpu_run.py: everything train() needs).
    The estimate counts tensors only; the process group, megatron's module and optimizer objects, the data pipeline
    and small-allocation arenas (a roughly constant 30-40 MiB, docs/planning.md) are in the measurement, so the
    estimate sits below it (about 0.9 of it)."""
    measured = _measure(tmp_path / "run", CPU_RUN)
    plan = make_plan(load_config("tiny", CPU_RUN), 1, device="cpu")
    estimate = plan.peak.total
    assert 0.75 * measured <= estimate <= 1.25 * measured, (estimate / 2**20, measured / 2**20)


def test_layout_arithmetic_of_gpu_plans():
    base = make_plan(load_config("7b"), 32)
    stage0 = base.stages[0]
    # Adam state and fp32 master weights shard over DP; gradients and bf16 weights do not
    wide = make_plan(load_config("7b", ["training.global_batch_size=1024"]), 128).stages[0]
    assert wide.static["optimizer (Adam m, v)"] == pytest.approx(stage0.static["optimizer (Adam m, v)"] * 8 / 32)
    assert wide.static["gradients (fp32)"] == stage0.static["gradients (fp32)"] == 2 * stage0.static["weights"]
    # 1F1B: stage 0 of PP 2 holds two micro-batches of its 16 layers, the last stage one
    assert stage0.activations["activations: ffn"] == pytest.approx(2 * base.stages[1].activations["activations: ffn"])
    # selective recompute drops the attention core; full keeps one layer input per layer
    none = make_plan(load_config("7b", ["training.recompute=none"]), 32).stages[0]
    assert none.activations["activations: core"] > 0 and "activations: core" not in stage0.activations
    full = make_plan(load_config("7b", ["training.recompute=full"]), 32).stages[0]
    s, b, h, tp = 4096, 1, 4096, 2
    assert full.activations["activations: layer inputs (full recompute)"] == 16 * 2 * s * b * h * 2 / tp
    assert full.total < stage0.total < none.total


def test_a_plan_that_does_not_fit_names_its_largest_term():
    plan = make_plan(load_config("reference", ["parallel.use_distributed_optimizer=false",
                                               "training.recompute=none"]), 128, gpu_memory=16 * 2**30)
    assert not plan.fits
    assert plan.peak.largest_term() == "activations: ffn"
    assert "does NOT fit" in plan.table() and "largest term: activations: ffn" in plan.table()
